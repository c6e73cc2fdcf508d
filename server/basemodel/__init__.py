"""Base-model provisioning and loading, shared by the server and the trainer."""

from server.basemodel.fingerprint import base_fingerprint
from server.basemodel.loader import (
    LORA_TARGET_MODULES,
    QUANTIZE_CHOICES,
    BaseModelInfo,
    LoadedBaseModel,
    load_base_model,
    resolve_device,
)
from server.basemodel.source import DEFAULT_SOURCE

__all__ = [
    "DEFAULT_SOURCE",
    "LORA_TARGET_MODULES",
    "QUANTIZE_CHOICES",
    "BaseModelInfo",
    "LoadedBaseModel",
    "base_fingerprint",
    "load_base_model",
    "resolve_device",
]
