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

How the library is built, cached and checked before it is loaded: ``kernel_library``.

The wrappers check what the C code assumes (dtype, device, contiguity, alignment, sizes,
indexes within the cache) and raise ``ValueError`` naming the problem: attribute compares
in Python, and the per-row lengths and cache rows in C, so the hot path reads no tensor.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import subprocess
import time

import torch

from server.engine import kernel_library

log = logging.getLogger(__name__)

MAX_GROUP = 16
"""Query heads per KV head the attention kernel takes (its per-task arrays)."""
PANEL = 16
"""Output columns per packed panel (``PANEL`` in the C source)."""

_LONG, _PTR, _INT = ctypes.c_long, ctypes.c_void_p, ctypes.c_int


ALIGNMENT = 32
"""Bytes the packed weight's address must be a multiple of (the GEMM's aligned loads)."""


class _Kernel:
    """The loaded library: ``pack`` once per weight, ``matmul`` per call."""

    def __init__(self, library: kernel_library.Library) -> None:
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
    compiler = kernel_library.find_compiler()
    if compiler is None:
        return None, "no C compiler found ($CC, gcc or cc)"
    try:
        started = time.perf_counter()
        kernel = _Kernel(kernel_library.build(compiler))
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
