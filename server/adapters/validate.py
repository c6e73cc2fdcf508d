"""Load one adapter version from disk and refuse it, with the reason, if it cannot serve.

Each failure is its own error kind (see ``server/errors.py``), all subclasses of
``AdapterIncompatible`` so the service maps them to one status code. PEFT options that
change the math are either served exactly (``rank_pattern``, ``alpha_pattern``,
``layers_to_transform``, ``use_rslora``: oracle-tested against PEFT) or refused by name.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.adapters.store import AdapterLocation
from server.engine.multi_lora import LoraSlots
from server.engine.peft_adapter import (
    PeftAdapter,
    parse_adapter_config,
    parse_peft_adapter,
    read_adapter_files,
    safetensors_data,
)
from server.errors import (
    AdapterBaseMismatch,
    AdapterConfigError,
    AdapterIncompatible,
    AdapterNonFinite,
    AdapterRankError,
    AdapterUnsupportedOption,
)
from server.formats.manifest import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    MANIFEST_FILE,
    AdapterManifest,
    check_digests,
    combine_version,
    parse_manifest,
)

_DIGESTS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-digest")

# option -> (is it set in a way we cannot serve?, how to name it)
UNSUPPORTED_OPTIONS = {
    "use_dora": (lambda v: bool(v), "DoRA (use_dora)"),
    "modules_to_save": (lambda v: bool(v), "modules_to_save (full copies of base modules)"),
    "bias": (lambda v: v not in (None, "none"), "bias (trained base biases)"),
    "lora_bias": (lambda v: bool(v), "lora_bias"),
    "fan_in_fan_out": (lambda v: bool(v), "fan_in_fan_out"),
    "layer_replication": (lambda v: bool(v), "layer_replication"),
    "use_qalora": (lambda v: bool(v), "use_qalora"),
}


@dataclass(frozen=True)
class ValidatedAdapter:
    name: str
    version: str
    """sha256 over the weight files and the manifest (see ``combine_version``)."""
    folder: Path
    adapter: PeftAdapter
    manifest: AdapterManifest | None
    nbytes: int


def check_config(name: str, config: dict[str, Any]) -> None:
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterConfigError(f"{name}: peft_type is {peft_type!r}; only LoRA is served")
    for option, (is_set, label) in UNSUPPORTED_OPTIONS.items():
        if option in config and is_set(config[option]):
            raise AdapterUnsupportedOption(
                f"{name}: {label} is not supported; retrain without it"
            )
    rank = config.get("r")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise AdapterRankError(f"{name}: r is {rank!r}; a LoRA rank must be a positive integer")


def check_finite(name: str, adapter: PeftAdapter, weights_raw: bytes) -> None:
    """Refuse NaN or infinite weights, naming the first module that holds one.

    Fast path: one float32 sum over the whole data block (one call instead of one per
    tensor; bytes between tensors, if any, only ever cause a false alarm). Finite sums
    prove every element finite; otherwise each tensor is summed in float64, which is NaN
    or infinite exactly when some element is (finite fp32/bf16 values cannot overflow it).
    """
    dtypes = {t.dtype for m in adapter.modules.values() for t in (m.a, m.b)}
    if len(dtypes) == 1:
        data = safetensors_data(weights_raw, dtypes.pop())
        if data is not None and math.isfinite(float(data.sum(dtype=torch.float32))):
            return
    for module_name, module in adapter.modules.items():
        if not all(math.isfinite(float(t.sum(dtype=torch.float64))) for t in (module.a, module.b)):
            raise AdapterNonFinite(f"{name}: '{module_name}' holds NaN or infinite weights")


def load_validated(location: AdapterLocation, slots: LoraSlots, base_fingerprint: str,
                   device: str | torch.device = "cpu") -> ValidatedAdapter:
    """Read, check and parse the adapter at ``location`` (host memory only).

    The weights' sha256 (the largest single cost of a cold load) runs on another thread
    while the tensors are parsed and checked; hashlib releases the GIL. Manifest
    failures (digests, base) are reported before parse failures, as if run in order.
    """
    folder, name = location.folder, location.name
    config_raw, weights_raw = read_adapter_files(folder)
    weights_digest = _DIGESTS.submit(hashlib.sha256, weights_raw)
    parse_error: AdapterIncompatible | None = None
    adapter: PeftAdapter | None = None
    try:
        config = parse_adapter_config(config_raw, f"{name}/{ADAPTER_CONFIG_FILE}")
        check_config(name, config)
        adapter = parse_peft_adapter(folder, config, weights_raw, device)
        check_finite(name, adapter, weights_raw)
    except AdapterIncompatible as exc:
        parse_error = exc
    digests = {
        ADAPTER_CONFIG_FILE: hashlib.sha256(config_raw).hexdigest(),
        ADAPTER_WEIGHTS_FILE: weights_digest.result().hexdigest(),
    }
    manifest = None
    manifest_path = folder / MANIFEST_FILE
    if manifest_path.exists():
        manifest_raw = manifest_path.read_bytes()
        manifest = parse_manifest(manifest_raw, f"{name}/{MANIFEST_FILE}")
        check_digests(manifest, digests, name)
        if manifest.base_fingerprint != base_fingerprint:
            raise AdapterBaseMismatch(
                f"{name}: trained for base {manifest.base_fingerprint[:12]}…, "
                f"but the loaded base is {base_fingerprint[:12]}…"
            )
        digests[MANIFEST_FILE] = hashlib.sha256(manifest_raw).hexdigest()
    if parse_error is not None:
        raise parse_error
    assert adapter is not None
    slots.check_compatible(adapter)
    nbytes = sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size()
                 for m in adapter.modules.values())
    return ValidatedAdapter(name, combine_version(digests), folder, adapter, manifest, nbytes)
