"""The project's own fp32 CPU kernels for x86 with AVX2 + FMA: the GEMM of every base
projection (``skinny_gemm.c``) and decode attention (``decode_attention.c``).

A decode step reads every weight once for a few rows, so its GEMMs are bound by how fast
they stream the weights. On this project's CPUs (AMD Zen 3), MKL and oneDNN read them at
8-13 GB/s, about half the memory's read rate; the ~150-line C kernel next to this file
reads them at 17-21 GB/s for one row and is 1.1-1.6x faster at 4-64 rows, and no slower
for 256-row prefill chunks (``docs/benchmarks.md``, "Decode").

It is compiled once with the system C compiler (``$CC``, else ``gcc``/``cc``; about a
second) into ``<cache>/kernels/`` keyed by the source, the flags and the compiler, loaded
with ctypes (which releases the GIL during a call) and checked against ``torch`` before
first use. Anything missing -- not x86-64 with AVX2, no compiler, a failed build or check --
makes :func:`unavailable_reason` say why, and :class:`PackedLinear` falls back to oneDNN.
Its OpenMP threads come from the ``libgomp`` torch has already loaded (same soname), so
the process keeps one thread pool; each call uses ``torch.get_num_threads()`` threads.

Loading a library runs its constructors, and the cached file's name is predictable, so a
cached build is loaded only when nobody else could have written it (:func:`_build`): the
folder is created 0700 and must belong to this user and be writable by no one else; so
must the library and its digest record (written at build time), and the library's bytes
must match that digest. A cached file that fails is logged and rebuilt over; a folder
that fails is logged and left alone, and the library is built into a private temporary
folder for this process instead (a second of compiling per start rather than a slower
fallback). The check and the load read one open descriptor, so the file cannot be swapped
in between.

The wrappers check what the C code assumes (dtype, device, contiguity, alignment, sizes,
indexes within the cache) and raise ``ValueError`` naming the problem: attribute compares
in Python, and the per-row lengths and cache rows in C, so the hot path reads no tensor.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch

from server.basemodel.gguf_cache import cache_root

log = logging.getLogger(__name__)

SOURCES = (Path(__file__).with_name("skinny_gemm.c"),
           Path(__file__).with_name("decode_attention.c"))
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)
MAX_GROUP = 16
"""Query heads per KV head the attention kernel takes (its per-task arrays)."""
BUILD_TIMEOUT_S = 120
PANEL = 16
"""Output columns per packed panel (``PANEL`` in the C source)."""

_LONG, _PTR, _INT = ctypes.c_long, ctypes.c_void_p, ctypes.c_int


ALIGNMENT = 32
"""Bytes the packed weight's address must be a multiple of (the GEMM's aligned loads)."""


class _Kernel:
    """The loaded library: ``pack`` once per weight, ``matmul`` per call."""

    def __init__(self, library: _Library) -> None:
        # dlopen by /proc/self/fd/N loads exactly the file that was checked. The loader
        # remembers libraries by that name, so the descriptor stays open for as long as
        # the library is mapped (the process's life): its number, and so the name, is
        # never reused for another library.
        self.descriptor = library.fd
        try:
            self.library = ctypes.CDLL(f"/proc/self/fd/{library.fd}")
        except OSError:
            os.close(library.fd)
            raise
        self.path = library.path
        self._pack = self.library.sb_pack
        self._pack.argtypes = [_PTR, _PTR, _LONG, _LONG, _INT]
        self._pack.restype = None
        self._gemm = self.library.sb_gemm
        self._gemm.argtypes = [_PTR, _LONG, _PTR, _PTR, _PTR, _LONG, _LONG, _LONG, _LONG, _INT]
        self._gemm.restype = None
        self._attention = self.library.sb_decode_attention
        self._attention.argtypes = [_PTR, _LONG, _PTR, _PTR, _PTR, _PTR, _PTR, _LONG, _LONG,
                                    _LONG, _LONG, _LONG, _LONG, _LONG, _LONG, ctypes.c_float,
                                    _INT]
        self._attention.restype = _INT
        self.library.sb_panel.restype = _LONG
        if self.library.sb_panel() != PANEL:
            raise RuntimeError("the built library's panel width does not match PANEL")

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` ``[n, k]`` in the kernel's panel layout (a new tensor)."""
        if weight.dtype != torch.float32 or not weight.is_cpu or weight.dim() != 2:
            raise ValueError(f"kernel pack: weight must be a 2-D float32 CPU tensor, got "
                             f"{_describe(weight)}")
        weight = weight.detach().contiguous()
        n, k = weight.shape
        packed = torch.empty(padded(n) * k, dtype=torch.float32)
        self._pack(weight.data_ptr(), packed.data_ptr(), n, k, torch.get_num_threads())
        return packed

    def matmul(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
               out_features: int) -> torch.Tensor:
        """``x @ W^T (+ bias)`` for 2-D ``x`` ``[m, k]``; ``bias`` padded to whole panels.

        Runs per GEMM call (hundreds per step), so its checks compare attributes only."""
        if x.dtype != torch.float32 or not x.is_cpu or x.dim() != 2:
            raise ValueError(f"kernel matmul: x must be a 2-D float32 CPU tensor, got "
                             f"{_describe(x)}")
        if (packed.dtype != torch.float32 or not packed.is_cpu
                or not packed.is_contiguous() or packed.data_ptr() % ALIGNMENT):
            raise ValueError("kernel matmul: the packed weight must be a contiguous, "
                             f"{ALIGNMENT}-byte-aligned float32 CPU tensor (from pack), got "
                             f"{_describe(packed)} at address {packed.data_ptr():#x}")
        rows, k = x.shape
        width = padded(out_features)
        if packed.numel() != width * k:
            raise ValueError(f"kernel matmul: x has {k} input features; the packed weight has "
                             f"{packed.numel() / width if width else 0:g} "
                             f"({packed.numel()} floats for {out_features} outputs)")
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_cpu
                                 or not bias.is_contiguous() or bias.numel() != width):
            raise ValueError(f"kernel matmul: bias must be a contiguous float32 CPU tensor of "
                             f"{width} (pad_bias), got {_describe(bias)}")
        if x.stride(-1) != 1:
            x = x.contiguous()
        y = torch.empty(rows, out_features, dtype=torch.float32)
        self._gemm(x.data_ptr(), x.stride(0), packed.data_ptr(),
                   None if bias is None else bias.data_ptr(), y.data_ptr(), out_features,
                   rows, out_features, k, torch.get_num_threads())
        return y

    def decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         kv_rows: torch.Tensor, lengths: torch.Tensor, max_length: int,
                         scale: float) -> torch.Tensor:
        """Attention of one query token per row: ``q`` ``[B, heads, hd]`` (rows may be
        strided, heads and dims contiguous) over cache rows ``kv_rows`` of ``keys`` and
        ``values`` ``[rows, kv_heads, max_len, hd]`` (contiguous), row ``b`` seeing its
        first ``lengths[b]`` (<= ``max_length``) positions; ``kv_rows`` and ``lengths``
        are contiguous int64. Returns ``[B, heads, hd]``, as SDPA with a causal prefix
        mask would.

        Runs once per layer and step: the shapes are checked here, the ``B`` lengths and
        rows by the C code before it reads anything (no tensor read in Python)."""
        if q.dtype != torch.float32 or not q.is_cpu or q.dim() != 3:
            raise ValueError(f"kernel attention: q must be a 3-D float32 CPU tensor, got "
                             f"{_describe(q)}")
        if (keys.dtype != torch.float32 or values.dtype != torch.float32
                or not keys.is_cpu or not values.is_cpu or keys.dim() != 4
                or values.shape != keys.shape
                or not keys.is_contiguous() or not values.is_contiguous()):
            raise ValueError("kernel attention: keys and values must be contiguous 4-D "
                             f"float32 CPU tensors of one shape, got {_describe(keys)} and "
                             f"{_describe(values)}")
        batch, heads, hd = q.shape
        cache_rows, kv_heads, cache_length, key_dim = keys.shape
        if hd % 8 or hd == 0 or key_dim != hd:
            raise ValueError("kernel attention: head_dim must be a positive multiple of 8 "
                             f"and the same in q and keys, got {hd} and {key_dim}")
        if kv_heads == 0 or heads % kv_heads or heads // kv_heads > MAX_GROUP:
            raise ValueError(f"kernel attention: {heads} query heads do not split into "
                             f"groups of at most {MAX_GROUP} over {kv_heads} KV heads")
        for name, index in (("kv_rows", kv_rows), ("lengths", lengths)):
            if (index.dtype != torch.int64 or not index.is_cpu or index.dim() != 1
                    or index.shape[0] != batch or not index.is_contiguous()):
                raise ValueError(f"kernel attention: {name} must be a contiguous 1-D int64 "
                                 f"CPU tensor of {batch} (one per query row), got "
                                 f"{_describe(index)}")
        if not 0 <= max_length <= cache_length:
            raise ValueError(f"kernel attention: max_length {max_length} is outside "
                             f"0..{cache_length} (the cache's length)")
        if q.stride(2) != 1 or q.stride(1) != hd:
            q = q.contiguous()
        out = torch.empty(batch, heads, hd, dtype=torch.float32)
        status = self._attention(
            q.data_ptr(), q.stride(0), keys.data_ptr(), values.data_ptr(), kv_rows.data_ptr(),
            lengths.data_ptr(), out.data_ptr(), batch, kv_heads, heads // kv_heads, hd,
            keys.stride(0), keys.stride(1), cache_rows, max_length, scale,
            torch.get_num_threads())
        if status == _BAD_LENGTH:
            raise ValueError(_first_outside("lengths", lengths, max_length))
        if status == _BAD_ROW:
            raise ValueError(_first_outside("kv_rows", kv_rows, cache_rows - 1))
        if status != 0:
            raise MemoryError("decode attention could not allocate its scratch space")
        return out


_BAD_LENGTH, _BAD_ROW = -2, -3
"""What ``sb_decode_attention`` returns for a length or a cache row out of range."""


def _first_outside(name: str, index: torch.Tensor, top: int) -> str:
    """The error for the first entry of ``index`` outside ``0..top`` (read on error only)."""
    values = index.tolist()
    at = next(i for i, value in enumerate(values) if not 0 <= value <= top)
    return f"kernel attention: {name}[{at}] = {values[at]} is outside 0..{top}"


def _describe(tensor: torch.Tensor) -> str:
    """A tensor's dtype, device, shape and layout, for an error message."""
    layout = "contiguous" if tensor.is_contiguous() else f"strides {tuple(tensor.stride())}"
    return f"{tensor.dtype} on {tensor.device}, shape {tuple(tensor.shape)}, {layout}"


def attention_fits(q_heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the attention kernel takes this head layout."""
    return (q_heads % kv_heads == 0 and q_heads // kv_heads <= MAX_GROUP
            and head_dim % 8 == 0)


def padded(n: int) -> int:
    """``n`` output columns rounded up to whole panels."""
    return -(-n // PANEL) * PANEL


def pad_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A copy of ``bias`` zero-padded to whole panels (what the kernel reads)."""
    if bias is None:
        return None
    out = torch.zeros(padded(bias.shape[0]), dtype=torch.float32)
    out[: bias.shape[0]] = bias.detach()
    return out


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "gcc", "cc"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


def _compiler_version(compiler: str) -> str:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                          timeout=30, check=False)
    return done.stdout.splitlines()[0] if done.stdout else ""


def library_name(compiler: str) -> str:
    """The cached library's file name: keyed by the sources, the flags and the compiler."""
    parts = [path.read_bytes() for path in SOURCES]
    key = hashlib.sha256(b"\0".join([*parts, " ".join(FLAGS + LIBS).encode(),
                                     _compiler_version(compiler).encode()])).hexdigest()[:16]
    return f"switchboard-kernels-{key}.so"


@dataclass(frozen=True)
class _Library:
    """A built library, checked, as an open read-only descriptor (what gets loaded)."""

    fd: int
    path: Path | None
    """Where it lies in the cache (None: built privately, its folder already removed)."""


def _owner() -> int:
    """The uid every cache entry must belong to: this process's."""
    return os.geteuid()


def _distrust(info: os.stat_result, path: Path | str) -> str | None:
    """Why another user could have written ``path`` (None: only this one could)."""
    if info.st_uid != _owner():
        return f"{path} belongs to uid {info.st_uid}, not to this process's uid {_owner()}"
    writers = [who for who, bit in (("its group", stat.S_IWGRP), ("others", stat.S_IWOTH))
               if info.st_mode & bit]
    if writers:
        return (f"{path} is writable by {' and '.join(writers)} "
                f"(mode {stat.S_IMODE(info.st_mode):o})")
    return None


def _open_checked(path: Path | str) -> int:
    """A descriptor on the regular file ``path``, not followed through a link, that only
    this user could have written; OSError or RuntimeError saying why not."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    info = os.fstat(fd)
    problem = None if stat.S_ISREG(info.st_mode) else f"{path} is not a regular file"
    problem = problem or _distrust(info, path)
    if problem:
        os.close(fd)
        raise RuntimeError(problem)
    return fd


def _digest(fd: int) -> str:
    """sha256 of the open file's bytes."""
    digest, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _record_of(target: Path) -> Path:
    """Where the digest of the library ``target`` is recorded at build time."""
    return target.with_suffix(".sha256")


def _cache_folder() -> tuple[Path, str | None]:
    """``<cache>/kernels``, created 0700 when missing, and why it may not be used (None:
    it may)."""
    folder = cache_root() / "kernels"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        info = folder.lstat()
    except OSError as exc:
        return folder, f"cannot create {folder}: {exc}"
    if not stat.S_ISDIR(info.st_mode):
        return folder, f"{folder} is not a folder (a link or a file)"
    return folder, _distrust(info, folder)


def _open_cached(target: Path) -> int | None:
    """A descriptor on the cached library if this user built it and nobody changed it
    since (its digest record matches); None if absent or refused (logged)."""
    if not target.exists() and not target.is_symlink():
        return None
    fd = None
    try:
        fd = _open_checked(target)
        try:
            record_fd = _open_checked(_record_of(target))
        except FileNotFoundError:
            raise RuntimeError(f"{target} has no digest record") from None
        try:
            recorded = os.pread(record_fd, 256, 0).decode("ascii", "replace").strip()
        finally:
            os.close(record_fd)
        if recorded != (actual := _digest(fd)):
            raise RuntimeError(f"{target} has digest {actual[:16]}..., its record says "
                               f"{recorded[:16] or 'nothing'}...")
        return fd
    except (OSError, RuntimeError) as exc:
        if fd is not None:
            os.close(fd)
        problem = exc if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
        log.warning("not loading the cached CPU kernel library (%s); rebuilding it", problem)
        return None


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One process at a time checks and builds in ``folder`` (replicas starting together
    compile once and never see a library without its digest record)."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _compile(compiler: str, folder: Path, target: Path | None) -> int:
    """Compile into ``folder`` and return a descriptor on the result; with ``target``, also
    publish it there with its digest record."""
    fd, temporary = tempfile.mkstemp(prefix=".switchboard-kernels-", suffix=".so", dir=folder)
    os.close(fd)
    leftovers = [temporary]
    try:
        done = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", temporary, *LIBS],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                              check=False)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no output"])[0]
            raise RuntimeError(f"{Path(compiler).name} failed: {first}")
        # The linker creates its output with the umask's mode: make it this user's alone.
        # Only this user can write in ``folder``, so the file needs no further check.
        os.chmod(temporary, 0o500)
        library = os.open(temporary, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if target is not None:
                record_fd, record_temporary = tempfile.mkstemp(
                    prefix=".switchboard-kernels-", suffix=".sha256", dir=folder)
                leftovers.append(record_temporary)
                with os.fdopen(record_fd, "w") as out:
                    out.write(_digest(library) + "\n")
                # The record first, then the library: a library never lacks its record.
                os.replace(record_temporary, _record_of(target))
                os.replace(temporary, target)
        except BaseException:
            os.close(library)
            raise
    finally:
        for leftover in leftovers:
            if os.path.exists(leftover):
                os.unlink(leftover)
    return library


def _build(compiler: str) -> _Library:
    """The compiled library, checked and open: from the cache when this user built it
    there, else built now: into the cache when its folder is safe and writable, else into
    a private temporary folder (the reason logged)."""
    folder, problem = _cache_folder()
    if problem is None:
        try:
            return _from_cache(compiler, folder)
        except OSError as exc:  # a read-only or full disk, say
            problem = f"{type(exc).__name__}: {exc}"
    log.warning("not using the CPU kernel cache (%s); building into a private temporary "
                "folder instead", problem)
    # mkdtemp's folder is 0700 and freshly named; the open descriptor outlives it.
    with tempfile.TemporaryDirectory(prefix="switchboard-kernels-") as private:
        return _Library(_compile(compiler, Path(private), None), None)


def _from_cache(compiler: str, folder: Path) -> _Library:
    """The cached library if it passes :func:`_open_cached`, else a build published
    into ``folder`` (a safe one)."""
    target = folder / library_name(compiler)
    with _locked(folder):
        fd = _open_cached(target)
        if fd is None:
            fd = _compile(compiler, folder, target)
    return _Library(fd, target)


def _check(kernel: _Kernel) -> None:
    """Compare with torch on shapes that reach every code path (tiles of 1-6 rows, a
    partial panel, a bias, a row block boundary, strided input rows)."""
    generator = torch.Generator().manual_seed(0)
    for rows, n, k in ((1, 40, 37), (7, 40, 37), (16, 96, 64), (200, 24, 19), (5, 16, 1)):
        x = torch.randn(rows, k + 3, generator=generator)[:, :k]
        weight = torch.randn(n, k, generator=generator)
        bias = torch.randn(n, generator=generator)
        got = kernel.matmul(x, kernel.pack(weight), pad_bias(bias), n)
        want = torch.nn.functional.linear(x, weight, bias)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            error = (got - want).abs().max().item()
            raise RuntimeError(f"wrong results for {rows}x{k} @ {k}x{n} (max error {error:.3g})")
    got, want = _attention_case(kernel, generator)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        error = (got - want).abs().max().item()
        raise RuntimeError(f"wrong decode attention (max error {error:.3g})")


def _attention_case(kernel: _Kernel, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, SDPA) for 5 rows of a 3-KV-head, 9-query-head cache, uneven lengths,
    rows read out of order."""
    keys = torch.randn(7, 3, 40, 16, generator=generator)
    values = torch.randn(7, 3, 40, 16, generator=generator)
    q = torch.randn(5, 12, 16, generator=generator)[:, :9]  # strided rows, as in the model
    rows, lengths = torch.tensor([4, 0, 6, 2, 3]), torch.tensor([1, 17, 40, 9, 33])
    got = kernel.decode_attention(q, keys, values, rows, lengths, 40, 0.25)
    mask = torch.arange(40)[None, :] < lengths[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(5, 3, 3, 16), keys[rows], values[rows], attn_mask=mask[:, None, None, :],
        scale=0.25).reshape(5, 9, 16)
    return got, want


@functools.cache
def _load() -> tuple[_Kernel | None, str | None]:
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"not an x86-64 Linux machine ({platform.system()} {platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return None, f"the CPU lacks AVX2 + FMA (torch reports {capability})"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found ($CC, gcc or cc)"
    try:
        started = time.perf_counter()
        kernel = _Kernel(_build(compiler))
        _check(kernel)
        log.info("CPU kernels ready in %.2f s: %s", time.perf_counter() - started,
                 kernel.path or "a private build")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("CPU kernels unavailable, using oneDNN and SDPA: %s", reason)
        return None, reason
    return kernel, None


def kernel() -> _Kernel | None:
    """The loaded kernels, built on first call (None where they cannot run here)."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here (None: they can)."""
    return _load()[1]
