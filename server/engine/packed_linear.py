"""A frozen linear layer on the fastest GEMM kernel for its device.

On this project's CPUs (AMD Zen 3, AVX2), ``F.linear`` goes through MKL's sgemm, which
handles skinny decode shapes (a few rows times a wide weight) at a fraction of the
memory bandwidth; oneDNN with the weight reordered once into its blocked layout is
1.5-3x faster at 16-64 rows (the vocabulary head at 16 rows: 52 ms -> 15 ms, measured
in ``docs/benchmarks.md``). These are the kernels inductor's CPU path emits with
``freezing=True``; called directly they need no compiler. Anything else (CUDA, bf16
without oneDNN support, a torch built without mkldnn) keeps ``F.linear``.

oneDNN builds and caches one kernel ("primitive") per input shape, in two LRU caches
of 1024 entries (oneDNN's and ideep's), each entry holding JIT code and scratch space:
fed every prefill length a server sees, they grew the soak's RSS by >100 MB. So the
row count is bucketed (:func:`row_bucket`) and long inputs run in chunks of
``CHUNK_ROWS``: at most ~30 shapes per weight, whatever the traffic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


class PackedLinear:
    """``y = x @ W^T (+ b)`` with ``W`` prepacked once; ``W`` never changes afterwards."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.bias = bias
        self.onednn = onednn_available(weight)
        # The packed copy replaces the plain one: keep only what the kernel reads.
        self.weight = (torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
                       if self.onednn else weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.onednn:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, self.in_features)
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
