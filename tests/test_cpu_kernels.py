"""The AVX2 kernels (server/engine/cpu_kernels.py + skinny_gemm.c + decode_attention.c): built
with the system compiler, cached, loaded from the cache only when this user built it and
nobody changed it, the same numbers as ``F.linear`` on every tile shape, a ``ValueError``
for input the C code would read out of bounds, and a clear reason (and oneDNN) wherever
they cannot run."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from server.engine import cpu_kernels, kernel_library
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
    compiler = kernel_library.find_compiler()
    assert compiler is not None
    built = kernel_library.build(compiler)
    os.close(built.fd)
    first = built.path
    assert first is not None and first.parent == tmp_path / "kernels" and first.exists()
    stamp = first.stat().st_mtime_ns
    again = kernel_library.build(compiler)
    os.close(again.fd)
    assert again.path == first and first.stat().st_mtime_ns == stamp
    record = first.with_suffix(".sha256")
    # no temporary left; the library, its digest record and the build lock only
    assert sorted(p.name for p in first.parent.iterdir()) == sorted(
        [first.name, record.name, ".lock"])
    # this user's alone: the folder 0700, the library read-only, the digest recorded
    assert stat.S_IMODE(first.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(first.stat().st_mode) == 0o500
    assert record.read_text().strip() == hashlib.sha256(first.read_bytes()).hexdigest()


def test_a_failed_build_is_a_reason_not_a_crash(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(kernel_library, "SOURCES", (broken,))
    cpu_kernels._load.cache_clear()
    try:
        kernel, reason = cpu_kernels._load()
        assert kernel is None
        assert reason is not None and "failed" in reason, reason
        # nothing half-written kept (the build lock stays)
        assert [p.name for p in (tmp_path / "kernels").iterdir()] == [".lock"]
    finally:
        monkeypatch.undo()
        cpu_kernels._load.cache_clear()


def test_no_compiler_falls_back_to_onednn_and_says_why(monkeypatch) -> None:
    from server.engine.packed_linear import PackedLinear, onednn_available

    monkeypatch.setattr(kernel_library, "find_compiler", lambda: None)
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


# --- The cached library is loaded only when this user built it and nobody changed it ---

PLANTED = """
#include <fcntl.h>
#include <unistd.h>
/* What a planted library could do: run code the moment it is loaded. */
__attribute__((constructor)) static void planted(void) {
    int fd = open(MARKER, O_CREAT | O_WRONLY, 0600);
    if (fd >= 0) close(fd);
}
"""


def _plant(tmp_path: Path, compiler: str) -> tuple[Path, Path]:
    """A library at the cache's predictable name that leaves ``marker`` when loaded, with
    a digest record that matches it (so only the owner and mode checks can stop it)."""
    source, marker = tmp_path / "planted.c", tmp_path / "planted-ran"
    source.write_text(PLANTED)
    folder = tmp_path / "cache" / "kernels"
    folder.mkdir(parents=True, mode=0o700)
    target = folder / kernel_library.library_name(compiler)
    subprocess.run([compiler, "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o",
                    str(target)], check=True, capture_output=True)
    target.chmod(0o500)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    target.with_suffix(".sha256").write_text(digest + "\n")
    return target, marker


@pytest.fixture
def fresh_load(tmp_path, monkeypatch):
    """``_load`` uncached, against a cache under ``tmp_path``; the process's own kernel
    is restored afterwards."""
    monkeypatch.setenv("SWITCHBOARD_CACHE_DIR", str(tmp_path / "cache"))
    cpu_kernels._load.cache_clear()
    yield cpu_kernels._load
    monkeypatch.undo()
    cpu_kernels._load.cache_clear()


def _load_refusing(load, marker: Path) -> tuple:
    """``load()``, asserting above all that the planted library's code never ran."""
    try:
        return load()
    finally:
        assert not marker.exists(), "the planted library was loaded: its code ran"


def _compiler() -> str:
    compiler = kernel_library.find_compiler()
    assert compiler is not None
    return compiler


@needs_kernel
@pytest.mark.parametrize("record", ["no digest record", "a digest record of other bytes"])
def test_a_planted_library_is_rebuilt_not_loaded(tmp_path, fresh_load, caplog,
                                                 record: str) -> None:
    compiler = _compiler()
    target, marker = _plant(tmp_path, compiler)
    planted = target.read_bytes()
    digest_record = target.with_suffix(".sha256")
    if record == "no digest record":
        digest_record.unlink()
    else:
        digest_record.write_text(hashlib.sha256(b"something else").hexdigest())
    with caplog.at_level(logging.WARNING, logger=kernel_library.__name__):
        kernel, reason = _load_refusing(fresh_load, marker)
    assert kernel is not None and reason is None
    assert "rebuilding" in caplog.text and "digest" in caplog.text
    # The cache now holds this user's build and its digest.
    assert target.read_bytes() != planted
    assert digest_record.read_text().strip() == hashlib.sha256(target.read_bytes()).hexdigest()


@needs_kernel
@pytest.mark.parametrize("mode,who", [(0o770, "its group"), (0o707, "others")])
def test_a_cache_folder_others_can_write_is_not_used(tmp_path, fresh_load, caplog, mode: int,
                                                     who: str) -> None:
    compiler = _compiler()
    target, marker = _plant(tmp_path, compiler)
    target.parent.chmod(mode)
    before = sorted(p.name for p in target.parent.iterdir())
    with caplog.at_level(logging.WARNING, logger=kernel_library.__name__):
        kernel, reason = _load_refusing(fresh_load, marker)
    assert kernel is not None and reason is None  # built privately instead
    assert f"is writable by {who}" in caplog.text and "private" in caplog.text
    assert sorted(p.name for p in target.parent.iterdir()) == before  # nothing written there


@needs_kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another uid needs root")
@pytest.mark.parametrize("owned", ["folder", "library", "digest record"])
def test_a_cache_entry_of_another_owner_is_refused(tmp_path, fresh_load, caplog,
                                                   owned: str) -> None:
    compiler = _compiler()
    target, marker = _plant(tmp_path, compiler)
    path = {"folder": target.parent, "library": target,
            "digest record": target.with_suffix(".sha256")}[owned]
    os.chown(path, 4242, 4242)
    with caplog.at_level(logging.WARNING, logger=kernel_library.__name__):
        kernel, reason = _load_refusing(fresh_load, marker)
    assert kernel is not None and reason is None
    assert "belongs to uid 4242" in caplog.text
    if owned != "folder":  # a foreign file in this user's folder is replaced by a build
        assert target.stat().st_uid == os.geteuid()


@needs_kernel
def test_a_cache_of_another_owner_is_refused_without_root(tmp_path, fresh_load, caplog,
                                                          monkeypatch) -> None:
    compiler = _compiler()
    _, marker = _plant(tmp_path, compiler)
    monkeypatch.setattr(kernel_library, "_owner", lambda: os.geteuid() + 1)
    with caplog.at_level(logging.WARNING, logger=kernel_library.__name__):
        kernel, reason = _load_refusing(fresh_load, marker)
    assert kernel is not None and reason is None
    assert f"belongs to uid {os.geteuid()}" in caplog.text and "private" in caplog.text


@needs_kernel
def test_a_cache_that_cannot_be_written_builds_privately(tmp_path, fresh_load, caplog,
                                                         monkeypatch) -> None:
    """A read-only or full cache disk costs a private build, not the kernels."""
    def unwritable(folder: Path):
        raise PermissionError(13, "Permission denied", str(folder / ".lock"))

    monkeypatch.setattr(kernel_library, "_locked", unwritable)
    with caplog.at_level(logging.WARNING, logger=kernel_library.__name__):
        kernel, reason = fresh_load()
    assert kernel is not None and reason is None and kernel.path is None
    assert "PermissionError" in caplog.text and "private" in caplog.text
    assert not list((tmp_path / "cache" / "kernels").iterdir())


# --- The wrappers refuse what the C code would read out of bounds ---

def _gemm_case(change: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(x, packed, bias, out_features) for a 40 -> 40 layer, with one thing wrong."""
    kernel = cpu_kernels.kernel()
    assert kernel is not None
    n, k = 40, 40
    x, weight, bias = torch.randn(3, k), torch.randn(n, k), torch.randn(n)
    packed, padded_bias = kernel.pack(weight), cpu_kernels.pad_bias(bias)
    if change == "x float64":
        x = x.double()
    elif change == "x on another device":
        x = torch.empty(3, k, device="meta")
    elif change == "x 3-D":
        x = x[None]
    elif change == "x narrower than the weight":
        x = x[:, :-1]
    elif change == "x wider than the weight":
        x = torch.randn(3, k + 8)
    elif change == "packed float64":
        packed = packed.double()
    elif change == "packed misaligned":
        storage = torch.zeros(packed.numel() + 8)
        packed = storage[1 : 1 + packed.numel()]
        packed.copy_(kernel.pack(weight))
    elif change == "packed strided":
        packed = torch.stack((packed, packed), dim=1)[:, 0]
    elif change == "bias unpadded":
        padded_bias = bias
    elif change == "bias float64":
        padded_bias = padded_bias.double()  # type: ignore[union-attr]
    return x, packed, padded_bias, n


@needs_kernel
@pytest.mark.parametrize("change,message", [
    ("x float64", "x must be a 2-D float32 CPU tensor"),
    ("x on another device", "x must be a 2-D float32 CPU tensor"),
    ("x 3-D", "x must be a 2-D float32 CPU tensor"),
    ("x narrower than the weight", "x has 39 input features; the packed weight has 40"),
    ("x wider than the weight", "x has 48 input features; the packed weight has 40"),
    ("packed float64", "packed weight must be a contiguous, 32-byte-aligned float32"),
    ("packed misaligned", "packed weight must be a contiguous, 32-byte-aligned float32"),
    ("packed strided", "packed weight must be a contiguous, 32-byte-aligned float32"),
    ("bias unpadded", "bias must be a contiguous float32 CPU tensor of 48"),
    ("bias float64", "bias must be a contiguous float32 CPU tensor of 48"),
])
def test_matmul_refuses_what_the_kernel_cannot_read(change: str, message: str) -> None:
    kernel = cpu_kernels.kernel()
    assert kernel is not None
    x, packed, bias, n = _gemm_case(change)
    with pytest.raises(ValueError, match=re.escape(message)):
        kernel.matmul(x, packed, bias, n)


@needs_kernel
@pytest.mark.parametrize("weight", [torch.randn(4, 8, dtype=torch.float64),
                                    torch.randn(2, 4, 8), torch.empty(4, 8, device="meta")])
def test_pack_refuses_what_the_kernel_cannot_read(weight: torch.Tensor) -> None:
    kernel = cpu_kernels.kernel()
    assert kernel is not None
    with pytest.raises(ValueError, match="weight must be a 2-D float32 CPU tensor"):
        kernel.pack(weight)


def _attention_args(change: str) -> dict[str, Any]:
    """Arguments of a valid 4-row attention call (2 KV heads, group 3, head_dim 16, a
    20-position cache of 6 rows), with one thing wrong."""
    generator = torch.Generator().manual_seed(1)
    args: dict[str, Any] = {
        "q": torch.randn(4, 6, 16, generator=generator),
        "keys": torch.randn(6, 2, 20, 16, generator=generator),
        "values": torch.randn(6, 2, 20, 16, generator=generator),
        "kv_rows": torch.tensor([5, 0, 2, 3]), "lengths": torch.tensor([1, 20, 7, 12]),
        "max_length": 20, "scale": 0.25}
    if change == "a length past max_length":
        args["lengths"] = torch.tensor([1, 21, 7, 12])
    elif change == "a negative length":
        args["lengths"] = torch.tensor([1, -1, 7, 12])
    elif change == "max_length past the cache":
        args["lengths"], args["max_length"] = torch.tensor([1, 21, 7, 12]), 21
    elif change == "a row past the cache":
        args["kv_rows"] = torch.tensor([5, 0, 6, 3])
    elif change == "a negative row":
        args["kv_rows"] = torch.tensor([5, 0, -1, 3])
    elif change == "int32 lengths":
        args["lengths"] = args["lengths"].int()
    elif change == "a length too few":
        args["lengths"] = args["lengths"][:3]
    elif change == "strided rows":
        args["kv_rows"] = torch.tensor([5, 9, 0, 9, 2, 9, 3, 9])[::2]
    elif change == "q float64":
        args["q"] = args["q"].double()
    elif change == "values float64":
        args["values"] = args["values"].double()
    elif change == "values shorter than keys":
        args["values"] = args["values"][:, :, :10].contiguous()
    elif change == "keys not contiguous":
        args["keys"] = args["keys"].transpose(0, 1).contiguous().transpose(0, 1)
    elif change == "head_dim of q and keys differ":
        args["q"] = torch.randn(4, 6, 8)
    elif change == "head_dim not a multiple of 8":
        args.update(q=torch.randn(4, 6, 12), keys=torch.randn(6, 2, 20, 12),
                    values=torch.randn(6, 2, 20, 12))
    elif change == "heads not a multiple of KV heads":
        args["q"] = torch.randn(4, 5, 16)
    elif change == "a group of 17":
        args["q"] = torch.randn(4, 34, 16)
    return args


@needs_kernel
@pytest.mark.parametrize("change,message", [
    ("a length past max_length", "lengths[1] = 21 is outside 0..20"),
    ("a negative length", "lengths[1] = -1 is outside 0..20"),
    ("max_length past the cache", "max_length 21 is outside 0..20 (the cache's length)"),
    ("a row past the cache", "kv_rows[2] = 6 is outside 0..5"),
    ("a negative row", "kv_rows[2] = -1 is outside 0..5"),
    ("int32 lengths", "lengths must be a contiguous 1-D int64 CPU tensor of 4"),
    ("a length too few", "lengths must be a contiguous 1-D int64 CPU tensor of 4"),
    ("strided rows", "kv_rows must be a contiguous 1-D int64 CPU tensor of 4"),
    ("q float64", "q must be a 3-D float32 CPU tensor"),
    ("values float64", "keys and values must be contiguous 4-D float32 CPU tensors"),
    ("values shorter than keys", "keys and values must be contiguous 4-D float32 CPU tensors"),
    ("keys not contiguous", "keys and values must be contiguous 4-D float32 CPU tensors"),
    ("head_dim of q and keys differ", "head_dim must be a positive multiple of 8 and"),
    ("head_dim not a multiple of 8", "head_dim must be a positive multiple of 8 and"),
    ("heads not a multiple of KV heads", "5 query heads do not split into groups of at most 16"),
    ("a group of 17", "34 query heads do not split into groups of at most 16"),
])
def test_decode_attention_refuses_what_the_kernel_cannot_read(change: str,
                                                              message: str) -> None:
    kernel = cpu_kernels.kernel()
    assert kernel is not None
    args = _attention_args("")
    reference = kernel.decode_attention(**args)  # the valid call works
    assert torch.isfinite(reference).all()
    with pytest.raises(ValueError, match=re.escape(message)):
        kernel.decode_attention(**_attention_args(change))


@needs_kernel
def test_exp_treats_nan_the_same_in_its_vector_and_scalar_parts() -> None:
    """A NaN score poisons its softmax row, as in SDPA, whether it falls in the eight-lane
    part (positions 0-7 of 12) or the scalar tail (8-11); the other KV head is untouched."""
    kernel = cpu_kernels.kernel()
    assert kernel is not None
    args = _attention_args("")
    args["lengths"] = torch.tensor([12, 12, 12, 12])
    keys = args["keys"]
    rows = args["kv_rows"].tolist()
    keys[rows[0], 0, 3, 0] = float("nan")   # row 0, KV head 0: vector part
    keys[rows[1], 0, 10, 0] = float("nan")  # row 1, KV head 0: scalar tail
    got = kernel.decode_attention(**args)
    for row in (0, 1):
        assert torch.isnan(got[row, :3]).all(), f"row {row}: a NaN score was dropped"
        assert torch.isfinite(got[row, 3:]).all()
    assert torch.isfinite(got[2:]).all()
    mask = torch.arange(20)[None, :] < args["lengths"][:, None]
    want = F.scaled_dot_product_attention(
        args["q"].reshape(4, 2, 3, 16), keys[args["kv_rows"]], args["values"][args["kv_rows"]],
        attn_mask=mask[:, None, None, :], scale=0.25).reshape(4, 6, 16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)
