"""PackedLinear: the same numbers as ``F.linear`` at every row count on every backend, and
a bounded set of oneDNN kernel shapes (oneDNN caches one kernel per shape: unbounded
shapes grew the soak's RSS)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from server.engine import cpu_kernels, packed_linear
from server.engine.packed_linear import (
    CHUNK_ROWS,
    PackedLinear,
    gemm_backend,
    onednn_available,
    row_bucket,
)


def test_row_buckets_are_few_and_cover_every_row_count() -> None:
    buckets = {row_bucket(rows) for rows in range(1, CHUNK_ROWS + 1)}
    assert all(row_bucket(rows) >= rows for rows in range(1, CHUNK_ROWS + 1))
    assert set(range(1, 17)) <= buckets  # decode batches run unpadded
    assert len(buckets) <= 32, sorted(buckets)


@pytest.mark.parametrize("gemm", ["auto", "onednn", "aten"])
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 100, 256, 257, 700])
def test_matches_f_linear_at_every_row_count(rows: int, gemm: str) -> None:
    torch.manual_seed(rows)
    weight, bias = torch.randn(100, 40), torch.randn(100)  # 100: not whole 16-wide panels
    x = torch.randn(rows, 40)
    expected = F.linear(x, weight, bias)
    got = PackedLinear(weight, bias, gemm)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # a leading batch dimension keeps its shape
    torch.testing.assert_close(PackedLinear(weight, gemm=gemm)(x.view(1, rows, 40)),
                               F.linear(x, weight).view(1, rows, 100), rtol=1e-4, atol=1e-4)


def test_backend_follows_the_setting() -> None:
    weight = torch.randn(32, 8)
    expected_auto = "avx2" if cpu_kernels.kernel() is not None else (
        "onednn" if onednn_available(weight) else "aten")
    assert gemm_backend(weight, "auto") == expected_auto
    assert gemm_backend(weight, "aten") == "aten"
    assert gemm_backend(weight.to(torch.bfloat16), "auto") == "aten"
    with pytest.raises(ValueError, match="gemm must be one of"):
        gemm_backend(weight, "fastest")


@pytest.mark.skipif(not onednn_available(torch.zeros(1, 1)), reason="no oneDNN in this torch")
def test_oneDNN_sees_a_bounded_set_of_shapes() -> None:
    seen: set[tuple[int, ...]] = set()
    real = torch.ops.mkldnn._linear_pointwise

    def spy(x, *args):
        seen.add(tuple(x.shape))
        return real(x, *args)

    layer = PackedLinear(torch.randn(24, 8), gemm="onednn")
    assert layer.backend == "onednn"
    with mock.patch.object(packed_linear.torch.ops.mkldnn, "_linear_pointwise", spy):
        for rows in range(1, 1200, 7):
            layer(torch.randn(rows, 8))
    assert 0 < len(seen) <= 32, sorted(seen)
