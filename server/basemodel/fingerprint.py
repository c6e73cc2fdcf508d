"""``base_fingerprint``: which base an adapter fits, whatever its dtype or quantization.

The fingerprint is a sha256 over (a) the architecture part of the model config and
(b) every parameter's name and *logical* (unquantized) shape. bitsandbytes packs an
nf4 weight ``[out, in]`` into a ``[out*in/2, 1]`` uint8 tensor; its ``quant_state``
still records the logical shape, which is what we hash. So an adapter trained with
QLoRA on an nf4 base serves on an fp32 or bf16 base of the same weights, and the other
way round, while an adapter for another architecture is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Config keys that change tensor shapes or the forward math. Others (dtype, token ids,
# quantization_config, transformers_version, name_or_path) deliberately do not count.
ARCHITECTURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
)


def _canonical(value: Any) -> Any:
    # GGUF stores eps and theta as float32: 1e-5 arrives as 9.999999747378752e-06.
    # Six significant digits make the HF original and its GGUF conversion agree.
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def architecture_summary(config: Any) -> dict[str, Any]:
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {key: _canonical(data[key]) for key in ARCHITECTURE_KEYS if data.get(key) is not None}


def logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """Shape of ``param`` before quantization (bitsandbytes keeps it in ``quant_state``)."""
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return tuple(int(d) for d in (shape if shape is not None else param.shape))


def logical_parameter_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Unquantized shape of every parameter (tied parameters appear once)."""
    return {name: logical_shape(param) for name, param in model.named_parameters()}


def base_fingerprint(model: torch.nn.Module) -> str:
    payload = {
        "architecture": architecture_summary(model.config),
        "parameters": sorted(
            [name, list(shape)] for name, shape in logical_parameter_shapes(model).items()
        ),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
