"""The AVX2 GEMM kernel (server/engine/cpu_kernels.py + skinny_gemm.c): built with the system
compiler, cached, the same numbers as ``F.linear`` on every tile shape, and a clear reason
(and oneDNN) wherever it cannot run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from server.engine import cpu_kernels
from server.engine.config import EngineConfig
from server.errors import InvalidOption

needs_kernel = pytest.mark.skipif(cpu_kernels.kernel() is None,
                                  reason=f"kernel unavailable: {cpu_kernels.unavailable_reason()}")


@needs_kernel
@pytest.mark.parametrize("rows", [*range(1, 14), 16, 64, 191, 192, 193, 400])
@pytest.mark.parametrize("out_features,in_features", [(48, 40), (100, 37), (16, 1)])
def test_matches_f_linear_on_every_tile_shape(rows: int, out_features: int,
                                              in_features: int) -> None:
    kernel = cpu_kernels.kernel()
    assert kernel is not None
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    x = torch.randn(rows, in_features, generator=generator)
    packed = kernel.pack(weight)
    assert packed.numel() == cpu_kernels.padded(out_features) * in_features
    torch.testing.assert_close(kernel.matmul(x, packed, cpu_kernels.pad_bias(bias), out_features),
                               F.linear(x, weight, bias), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kernel.matmul(x, packed, None, out_features),
                               F.linear(x, weight), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_strided_rows_and_thread_counts_give_the_same_numbers() -> None:
    kernel = cpu_kernels.kernel()
    assert kernel is not None
    wide = torch.randn(9, 70)
    x = wide[:, 5:45]  # rows 70 floats apart
    weight = torch.randn(64, 40)
    packed = kernel.pack(weight)
    expected = F.linear(x, weight)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            torch.testing.assert_close(kernel.matmul(x, packed, None, 64), expected,
                                       rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)
    # the input is only read
    torch.testing.assert_close(x, wide[:, 5:45])


@needs_kernel
def test_one_openmp_runtime_in_the_process() -> None:
    """The kernel uses the libgomp torch loaded, not a second thread pool."""
    maps = Path("/proc/self/maps").read_text()
    assert len(set(re.findall(r"\S*libgomp[^\s]*", maps))) == 1


@needs_kernel
def test_the_build_is_cached_by_source_and_compiler(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_CACHE_DIR", str(tmp_path))
    compiler = cpu_kernels._compiler()
    assert compiler is not None
    first = cpu_kernels._build(compiler)
    assert first.parent == tmp_path / "kernels" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels._build(compiler) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left


def test_a_failed_build_is_a_reason_not_a_crash(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(cpu_kernels, "SOURCES", (broken,))
    cpu_kernels._load.cache_clear()
    try:
        kernel, reason = cpu_kernels._load()
        assert kernel is None
        assert reason is not None and "failed" in reason, reason
        assert not list((tmp_path / "kernels").iterdir())  # nothing half-written kept
    finally:
        monkeypatch.undo()
        cpu_kernels._load.cache_clear()


def test_no_compiler_falls_back_to_onednn_and_says_why(monkeypatch) -> None:
    from server.engine.packed_linear import PackedLinear, onednn_available

    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    cpu_kernels._load.cache_clear()
    try:
        assert cpu_kernels.kernel() is None
        assert cpu_kernels.unavailable_reason() == "no C compiler found ($CC, gcc or cc)"
        weight = torch.randn(24, 8)
        layer = PackedLinear(weight)
        assert layer.backend == ("onednn" if onednn_available(weight) else "aten")
        x = torch.randn(3, 8)
        torch.testing.assert_close(layer(x), F.linear(x, weight), rtol=1e-4, atol=1e-4)
    finally:
        monkeypatch.undo()
        cpu_kernels._load.cache_clear()


def test_engine_setting_is_validated() -> None:
    assert EngineConfig().gemm == "auto"
    with pytest.raises(InvalidOption, match="engine setting gemm must be one of auto, onednn"):
        EngineConfig(gemm="mkl")
