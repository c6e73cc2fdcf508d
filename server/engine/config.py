"""EngineConfig: the engine's settings, each documented once and validated."""

from __future__ import annotations

from dataclasses import dataclass, fields

from server.basemodel.loader import LORA_TARGET_MODULES
from server.errors import InvalidOption

DECODE_PATHS = ("fused", "eager", "compiled")
GEMM_KERNELS = ("auto", "onednn", "aten")


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16
    """Rows decoding together; also the number of preallocated KV-cache rows."""
    max_queue_size: int = 256
    """Requests waiting for admission; one more is refused with QueueFull."""
    max_model_len: int = 1024
    """Prompt + generated tokens per request; bounds KV-cache memory."""
    max_num_batched_tokens: int = 512
    """Token budget of one step (decode tokens + prefill chunks)."""
    prefill_chunk_size: int = 256
    """Longest prompt slice prefilled in one step, so long prompts never freeze streams."""
    max_loras: int = 8
    """Device slots for adapters in the same batch."""
    max_lora_rank: int = 16
    """Largest adapter rank a slot holds; lower ranks are zero-padded."""
    max_adapters_per_request: int = 4
    """Adapters one request may compose (each holds a slot while it runs)."""
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    """Base linear layers wrapped for LoRA."""
    max_new_tokens_limit: int = 1024
    """Largest max_new_tokens a request may ask for."""
    max_weight_scale: float = 4.0
    """Largest weight_scale a request may ask for."""
    aging_limit_s: float = 2.0
    """A request not admissible for this long stops later requests from passing it."""
    trace_capacity: int = 4096
    """Steps kept in the step trace."""
    decode: str = "fused"
    """How a step runs the model: ``fused`` (fused projections on prepacked GEMM kernels
    chosen by ``gemm``,
    server/engine/fused.py) or ``eager`` (the model's own modules, one per projection).
    A base the fused path cannot run (a quantized one) decodes eagerly, and says why.
    ``compiled`` (CPU only) also builds inductor graphs of the pure decode step in the
    background, 2-3.5 minutes of CPU each here, and uses each once ready: measured 2x
    faster than ``fused`` on oneDNN for one row, 1.1x for 16, slower for 64; ``fused`` on
    the AVX2 kernels (``gemm: auto``) is faster than that one-row figure
    (docs/benchmarks.md, "Decode")."""
    gemm: str = "auto"
    """The fused path's kernels on the CPU: ``auto`` (the project's AVX2 GEMM and decode
    attention, server/engine/skinny_gemm.c and decode_attention.c, built with the system
    C compiler at start-up; oneDNN and torch's SDPA where they cannot build or run),
    ``onednn`` (oneDNN with prepacked weights, SDPA) or ``aten`` (``F.linear``, SDPA).
    GPUs always use ``F.linear`` and SDPA."""
    compiled_batch_sizes: tuple[int, ...] = (1, 16)
    """Batch buckets the ``compiled`` path builds graphs for (rows are padded up to the
    next one; a step above the largest runs fused). One graph per bucket and loaded LoRA
    shape."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
                raise InvalidOption(f"engine setting {f.name} must be > 0, got {value}")
        if self.max_num_batched_tokens < self.max_batch_size:
            raise InvalidOption(
                "engine setting max_num_batched_tokens must be >= max_batch_size "
                "(every decoding row needs one token per step)"
            )
        if self.decode not in DECODE_PATHS:
            raise InvalidOption(
                f"engine setting decode must be one of {', '.join(DECODE_PATHS)}, "
                f"got {self.decode!r}"
            )
        if self.gemm not in GEMM_KERNELS:
            raise InvalidOption(
                f"engine setting gemm must be one of {', '.join(GEMM_KERNELS)}, "
                f"got {self.gemm!r}"
            )
        if not all(isinstance(b, int) and b > 0 for b in self.compiled_batch_sizes):
            raise InvalidOption("engine setting compiled_batch_sizes must hold integers > 0")
        unknown = set(self.target_modules) - set(LORA_TARGET_MODULES)
        if unknown:
            raise InvalidOption(
                f"engine setting target_modules has unknown module {sorted(unknown)[0]!r} "
                f"(valid: {', '.join(LORA_TARGET_MODULES)})"
            )
