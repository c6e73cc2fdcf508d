"""A frozen linear layer on the fastest GEMM kernel for its device.

On this project's CPUs (AMD Zen 3, AVX2), ``F.linear`` goes through MKL's sgemm, which
handles skinny decode shapes (a few rows times a wide weight) at a fraction of the
memory bandwidth. Measured per shape (``docs/benchmarks.md``, "Decode"), the fastest is
the project's own AVX2 kernel (``cpu_kernels``: 17-21 GB/s for one row, 1.1-1.6x oneDNN's
speed at 4-64 rows, even at 256); next is oneDNN with the weight reordered once into its
blocked layout (1.5-3x MKL at 16-64 rows), the kernels inductor's CPU path emits with
``freezing=True``. ``gemm`` picks: ``auto`` takes the first that runs here, ``onednn``
skips the AVX2 kernel, ``aten`` keeps ``F.linear`` (also what CUDA, bf16 and a torch
without mkldnn get).

oneDNN builds and caches one kernel ("primitive") per input shape, in two LRU caches
of 1024 entries (oneDNN's and ideep's), each entry holding JIT code and scratch space:
fed every prefill length a server sees, they grew the soak's RSS by >100 MB. So for
oneDNN the row count is bucketed (:func:`row_bucket`) and long inputs run in chunks of
``CHUNK_ROWS``: at most ~30 shapes per weight, whatever the traffic. The AVX2 kernel has
no per-shape state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.engine import cpu_kernels
from server.engine.config import GEMM_KERNELS

EXACT_ROWS = 16
"""Row counts up to this run unpadded: decode batches, where padding costs the most."""
ROW_STEP = 16
CHUNK_ROWS = 256
"""Longer inputs run in chunks of this many rows (measured as fast as one call)."""


def row_bucket(rows: int) -> int:
    """The row count oneDNN sees for ``rows`` (1 <= rows <= CHUNK_ROWS) input rows."""
    if rows <= EXACT_ROWS:
        return rows
    return -(-rows // ROW_STEP) * ROW_STEP


def onednn_available(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be prepacked for oneDNN's CPU linear kernel."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def gemm_backend(weight: torch.Tensor, gemm: str = "auto") -> str:
    """The kernel :class:`PackedLinear` runs for ``weight`` under setting ``gemm``:
    ``avx2`` (``cpu_kernels``), ``onednn`` or ``aten``."""
    if gemm not in GEMM_KERNELS:
        raise ValueError(f"gemm must be one of {', '.join(GEMM_KERNELS)}, got {gemm!r}")
    on_cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
    if gemm == "aten" or not on_cpu_fp32:
        return "aten"
    if gemm == "auto" and cpu_kernels.kernel() is not None:
        return "avx2"
    return "onednn" if onednn_available(weight) else "aten"


BACKEND_NOTES = {"avx2": "AVX2 kernel", "onednn": "oneDNN prepacked", "aten": "aten"}
"""How a backend is named in the decode path's description."""


class PackedLinear:
    """``y = x @ W^T (+ b)`` with ``W`` prepacked once; ``W`` never changes afterwards."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 gemm: str = "auto") -> None:
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.backend = gemm_backend(weight, gemm)
        self.bias = bias
        # The packed copy replaces the plain one: keep only what the kernel reads.
        self.weight = weight
        self._kernel = cpu_kernels.kernel() if self.backend == "avx2" else None
        if self._kernel is not None:
            self.weight = self._kernel.pack(weight)
            self.bias = cpu_kernels.pad_bias(bias)
        elif self.backend == "onednn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "aten":
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, self.in_features)
        if self._kernel is not None:
            y = self._kernel.matmul(flat, self.weight, self.bias, self.out_features)
            return y.view(*x.shape[:-1], self.out_features)
        rows = flat.shape[0]
        if rows <= CHUNK_ROWS:
            y = self._bucketed(flat)
        else:
            y = flat.new_empty(rows, self.out_features)
            for start in range(0, rows, CHUNK_ROWS):
                y[start : start + CHUNK_ROWS] = self._bucketed(flat[start : start + CHUNK_ROWS])
        return y.view(*x.shape[:-1], self.out_features)

    def _bucketed(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        bucket = row_bucket(rows)
        if bucket != rows:
            padded = x.new_zeros(bucket, self.in_features)
            padded[:rows] = x
            x = padded
        y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias,
                                               "none", [], "")
        return y[:rows]
