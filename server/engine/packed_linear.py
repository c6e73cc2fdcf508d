"""A frozen linear layer on the fastest GEMM kernel for its device.

On this project's CPUs (AMD Zen 3, AVX2), ``F.linear`` goes through MKL's sgemm, which
handles skinny decode shapes (a few rows times a wide weight) at a fraction of the
memory bandwidth; oneDNN with the weight reordered once into its blocked layout is
1.5-3x faster at 16-64 rows (the vocabulary head at 16 rows: 52 ms -> 15 ms, measured
in ``docs/benchmarks.md``). These are the kernels inductor's CPU path emits with
``freezing=True``; called directly they need no compiler. Anything else (CUDA, bf16
without oneDNN support, a torch built without mkldnn) keeps ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
