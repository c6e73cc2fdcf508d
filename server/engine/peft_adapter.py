"""Read a PEFT LoRA adapter folder into plain per-module tensors.

PEFT is the format (design decision 2), not the serving path: this reads
``adapter_config.json`` and ``adapter_model.safetensors`` (never pickle) and returns,
for every adapted module, its ``A`` ``[r, in]`` and ``B`` ``[out, r]`` matrices and
its scaling (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``,
honouring ``rank_pattern``/``alpha_pattern``). The adapter registry wraps this with
validation against the base model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from server.errors import AdapterIncompatible, AdapterNotFound
from server.formats.manifest import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

# "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight" (adapter name optional)
_KEY_RE = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$"
)


@dataclass(frozen=True)
class LoraModule:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class PeftAdapter:
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(repr=False)
    """Keyed by the module's path in the base model, e.g. ``model.layers.0.self_attn.q_proj``."""

    @property
    def rank(self) -> int:
        return max(module.rank for module in self.modules.values())

    @property
    def target_names(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT matches a pattern key against the end of the module's dotted path.
    for key, value in patterns.items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module,
                                 config.get("lora_alpha", rank)))
    denominator = math.sqrt(rank) if config.get("use_rslora") else rank
    return alpha / denominator


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterNotFound(f"{folder}: no {ADAPTER_CONFIG_FILE}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterIncompatible(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterIncompatible(f"{path}: top level must be an object")
    return config


def read_peft_adapter(path: str | Path, device: str | torch.device = "cpu") -> PeftAdapter:
    """Read a PEFT LoRA adapter folder (safetensors only) into :class:`PeftAdapter`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    config = read_adapter_config(folder)
    weights_path = folder / ADAPTER_WEIGHTS_FILE
    if not weights_path.is_file():
        if (folder / "adapter_model.bin").exists():
            raise AdapterIncompatible(
                f"{folder}: adapter_model.bin is a pickle file, which can run code when "
                f"loaded; convert it to {ADAPTER_WEIGHTS_FILE}"
            )
        raise AdapterNotFound(f"{folder}: no {ADAPTER_WEIGHTS_FILE}")
    try:
        tensors = load_file(weights_path, device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterIncompatible(f"{weights_path}: unreadable safetensors ({exc})") from None

    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key)
        if match is None:
            raise AdapterIncompatible(f"{weights_path}: unexpected tensor '{key[:120]}'")
        halves.setdefault(match["module"], {})[match["which"]] = tensor
    modules: dict[str, LoraModule] = {}
    for name, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise AdapterIncompatible(f"{weights_path}: module '{name}' lacks lora_A or lora_B")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterIncompatible(
                f"{weights_path}: module '{name}' has mismatched shapes A{tuple(a.shape)} "
                f"B{tuple(b.shape)}"
            )
        modules[name] = LoraModule(a, b, _scaling(config, name, int(a.shape[0])))
    if not modules:
        raise AdapterIncompatible(f"{weights_path}: holds no LoRA weights")
    return PeftAdapter(folder, config, modules)
