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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from server.errors import (
    AdapterConfigError,
    AdapterCorrupt,
    AdapterPickleRefused,
)
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
    # As PEFT's get_pattern_key: a key matches the end of the module's dotted path.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module,
                                 config.get("lora_alpha", rank)))
    denominator = math.sqrt(rank) if config.get("use_rslora") else rank
    return alpha / denominator


_DTYPES = {"F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
           "F64": (torch.float64, 8)}


def safetensors_header(raw: bytes) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file in ``raw`` and where its data starts.

    The format is an 8-byte little-endian header length, a JSON header mapping names to
    ``{dtype, shape, data_offsets}``, then the data.
    """
    if len(raw) < 8:
        raise ValueError("file shorter than the 8-byte header length")
    header_len = int.from_bytes(raw[:8], "little")
    if header_len > len(raw) - 8 or header_len > 100_000_000:
        raise ValueError(f"header claims {header_len} bytes, file has {len(raw) - 8}")
    try:
        header = json.loads(raw[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, 8 + header_len


def safetensors_data(raw: bytes, dtype: torch.dtype) -> torch.Tensor | None:
    """All tensor data of ``raw`` as one flat ``dtype`` view, or None if it does not fit.

    Lets a check run once over every tensor (e.g. finiteness) instead of once per tensor.
    Call it on bytes :func:`safetensors_views` has accepted (it trusts the header length).
    """
    base = 8 + int.from_bytes(raw[:8], "little") if len(raw) >= 8 else len(raw)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if base >= len(raw) or base % itemsize or (len(raw) - base) % itemsize:
        return None
    with warnings.catch_warnings():  # bytes are read-only; the view is never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw, dtype=dtype, offset=base)


def safetensors_views(raw: bytes) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file held in ``raw``, as read-only views (no copy).

    Every header field is checked against the buffer (a header claiming more bytes than
    exist is refused), so hostile files fail with ``ValueError`` before anything is
    allocated. Views avoid copying a 10 MB adapter twice; they are copied once, into a
    device slot. Tensors are slices of one flat view per dtype where offsets allow: a
    slice costs less than a ``frombuffer`` call, and an adapter has hundreds of tensors.
    """
    header, base = safetensors_header(raw)
    data_len = len(raw) - base
    flat: dict[torch.dtype, torch.Tensor | None] = {}
    views: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():  # bytes are read-only; the views are never written
        warnings.simplefilter("ignore", UserWarning)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, itemsize, shape, start, end = _entry(base, data_len, name, info)
            if start == end:
                views[name] = torch.zeros(shape, dtype=dtype)
                continue
            if dtype not in flat:
                aligned = base % itemsize == 0 and data_len >= itemsize
                flat[dtype] = torch.frombuffer(raw, dtype=dtype, offset=base,
                                               count=data_len // itemsize) if aligned else None
            whole = flat[dtype]
            if whole is not None and start % itemsize == 0:
                views[name] = whole[start // itemsize : end // itemsize].view(shape)
            else:
                views[name] = torch.frombuffer(raw, dtype=dtype, count=(end - start) // itemsize,
                                               offset=base + start).view(shape)
    return views


def _entry(base: int, data_len: int, name: str,
           info: Any) -> tuple[torch.dtype, int, list[int], int, int]:
    """One header entry, checked against the data size: dtype, itemsize, shape, offsets."""
    try:
        dtype, itemsize = _DTYPES[info["dtype"]]
        shape = [int(d) for d in info["shape"]]
        start, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        message = f"tensor {str(name)[:80]!r}: bad or unsupported header entry"
        raise ValueError(message) from None
    count = 1
    for dim in shape:
        if dim < 0:
            raise ValueError(f"tensor '{name[:80]}': negative dimension")
        count *= dim
    if not 0 <= start <= end <= data_len or end - start != count * itemsize:
        raise ValueError(f"tensor '{name[:80]}': offsets outside the file or wrong size")
    return dtype, itemsize, shape, start, end


def parse_adapter_config(raw: bytes, label: str) -> dict[str, Any]:
    try:
        config = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterConfigError(f"{label}: not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(config, dict):
        raise AdapterConfigError(f"{label}: top level must be an object")
    return config


def read_adapter_files(folder: Path) -> tuple[bytes, bytes]:
    """The raw bytes of ``adapter_config.json`` and ``adapter_model.safetensors``.

    Reading each file once, into memory, gives a consistent snapshot: the digests and
    the tensors come from the same bytes even if a publisher replaces the files now.
    """
    try:
        config = (folder / ADAPTER_CONFIG_FILE).read_bytes()
    except FileNotFoundError:
        raise AdapterConfigError(f"{folder.name}: no {ADAPTER_CONFIG_FILE}") from None
    weights_path = folder / ADAPTER_WEIGHTS_FILE
    if not weights_path.is_file():
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
            raise AdapterPickleRefused(
                f"{folder.name}: weights are pickle (.bin/.pt), which can run code when "
                f"loaded; convert them to {ADAPTER_WEIGHTS_FILE}"
            )
        raise AdapterCorrupt(f"{folder.name}: no {ADAPTER_WEIGHTS_FILE}")
    return config, weights_path.read_bytes()


def parse_peft_adapter(folder: Path, config: dict[str, Any], weights: bytes,
                       device: str | torch.device = "cpu") -> PeftAdapter:
    """Split safetensors bytes into per-module LoRA matrices."""
    try:
        tensors = safetensors_views(weights)
        if torch.device(device).type != "cpu":
            tensors = {k: v.to(device) for k, v in tensors.items()}
    except ValueError as exc:
        raise AdapterCorrupt(
            f"{folder.name}/{ADAPTER_WEIGHTS_FILE}: unreadable safetensors ({str(exc)[:120]})"
        ) from None

    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key)
        if match is None:
            raise AdapterCorrupt(f"{folder.name}: unexpected LoRA tensor name '{key[:120]}'")
        halves.setdefault(match["module"], {})[match["which"]] = tensor
    modules: dict[str, LoraModule] = {}
    for name, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise AdapterCorrupt(f"{folder.name}: module '{name}' lacks lora_A or lora_B")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterCorrupt(
                f"{folder.name}: module '{name}' has mismatched shapes A{tuple(a.shape)} "
                f"B{tuple(b.shape)}"
            )
        modules[name] = LoraModule(a, b, _scaling(config, name, int(a.shape[0])))
    if not modules:
        raise AdapterCorrupt(f"{folder.name}: {ADAPTER_WEIGHTS_FILE} holds no LoRA weights")
    return PeftAdapter(folder, config, modules)


def read_peft_adapter(path: str | Path, device: str | torch.device = "cpu") -> PeftAdapter:
    """Read a PEFT LoRA adapter folder (safetensors only) into :class:`PeftAdapter`."""
    folder = Path(path)
    config_raw, weights = read_adapter_files(folder)
    config = parse_adapter_config(config_raw, f"{folder.name}/{ADAPTER_CONFIG_FILE}")
    return parse_peft_adapter(folder, config, weights, device)
