"""Formats shared by the server and the trainer: the adapter manifest and the prompt."""

from server.formats.manifest import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    MANIFEST_FILE,
    AdapterManifest,
    adapter_version,
    file_sha256,
    read_manifest,
    verify_weight_files,
    weight_file_digests,
    write_manifest,
)
from server.formats.prompt import (
    DEFAULT_PROMPT_TEMPLATE,
    build_answer,
    build_prompt,
    render_prompt,
    validate_template,
)

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "DEFAULT_PROMPT_TEMPLATE",
    "MANIFEST_FILE",
    "AdapterManifest",
    "adapter_version",
    "build_answer",
    "build_prompt",
    "file_sha256",
    "read_manifest",
    "render_prompt",
    "validate_template",
    "verify_weight_files",
    "weight_file_digests",
    "write_manifest",
]
