"""The adapter manifest ``switchboard.json``: schema, validating reader and writer.

A manifest sits next to a PEFT adapter (``adapter_config.json`` +
``adapter_model.safetensors``) and says what the adapter is for (dialect, prompt
template, default weight scale), which base it fits (``base_fingerprint``) and which
exact weight files it describes (their sha256). Publishing writes the weight files
first and the manifest last, so a reader that finds the digests matching knows the
folder is complete.

An adapter's *version* is the sha256 over the two weight files and the manifest
(:func:`adapter_version`); other files in the folder do not count.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.errors import AdapterDigestMismatch, ManifestError, PromptTemplateError
from server.formats.files import atomic_write_bytes
from server.formats.prompt import validate_template

MANIFEST_FILE = "switchboard.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
WEIGHT_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
SCHEMA_VERSION = 1

ADAPTER_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def combine_version(file_digests: dict[str, str]) -> str:
    """The version from the sha256 of each version-defining file (manifest optional)."""
    digest = hashlib.sha256()
    for name in (*WEIGHT_FILES, MANIFEST_FILE):
        if name in file_digests:
            digest.update(name.encode() + b"\0" + file_digests[name].encode() + b"\n")
    return digest.hexdigest()


def adapter_version(folder: str | os.PathLike[str]) -> str:
    """sha256 over the weight files and, when present, the manifest, in a fixed order."""
    folder = Path(folder)
    names = [n for n in (*WEIGHT_FILES, MANIFEST_FILE) if n != MANIFEST_FILE
             or (folder / MANIFEST_FILE).exists()]
    return combine_version({name: file_sha256(folder / name) for name in names})


def utc_now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class AdapterManifest:
    """Contents of ``switchboard.json`` (schema version 1)."""

    name: str
    """Adapter name, a plain identifier: ``[a-z0-9][a-z0-9_-]{0,63}``."""
    prompt_template: str
    """How a caller's ``text`` becomes the prompt; exactly one ``{text}`` placeholder."""
    base_fingerprint: str
    """``base_fingerprint`` of the base model the adapter was trained on."""
    files: dict[str, str]
    """sha256 of ``adapter_config.json`` and ``adapter_model.safetensors``."""
    dialect: str = ""
    """Human-facing dialect label, e.g. ``wuyu`` or ``cantonese``."""
    description: str = ""
    default_weight_scale: float = 1.0
    """Scale applied when a request names no ``weight_scale``."""
    training_data_digest: str | None = None
    """sha256 over the training data, so a result can be traced to its data."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Evaluation figures (e.g. ``val_chrf``), name to number."""
    training_config: dict[str, Any] | None = None
    """The resolved trainer configuration that produced the adapter."""
    created_at: str = field(default_factory=utc_now_iso)
    """ISO 8601 UTC time of publishing."""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _validate(asdict(self))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> AdapterManifest:
        if not isinstance(data, dict):
            raise ManifestError(f"{MANIFEST_FILE}: top level must be an object")
        _validate(data)
        return cls(**data)


_REQUIRED = ("schema_version", "name", "prompt_template", "base_fingerprint", "files")
_FIELD_NAMES = tuple(AdapterManifest.__dataclass_fields__)


def _fail(field_name: str, problem: str) -> ManifestError:
    return ManifestError(f"{MANIFEST_FILE}: field '{field_name}' {problem}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_type(data: dict[str, Any], key: str, kinds: tuple[type, ...], label: str) -> None:
    value = data[key]
    ok = _is_number(value) if kinds == (float,) else isinstance(value, kinds)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    if not ok:
        raise _fail(key, f"must be {label}, got {type(value).__name__}")


def _validate(data: dict[str, Any]) -> None:
    unknown = sorted(set(data) - set(_FIELD_NAMES))
    if unknown:
        raise ManifestError(
            f"{MANIFEST_FILE}: unknown field '{unknown[0]}' (valid: {', '.join(_FIELD_NAMES)})"
        )
    for key in _REQUIRED:
        if key not in data:
            raise _fail(key, "is missing")

    _check_type(data, "schema_version", (int,), "an integer")
    if data["schema_version"] != SCHEMA_VERSION:
        raise _fail(
            "schema_version",
            f"is {data['schema_version']}; this Switchboard reads version {SCHEMA_VERSION}",
        )
    for key in ("name", "prompt_template", "base_fingerprint", "dialect", "description",
                "created_at"):
        if key in data:
            _check_type(data, key, (str,), "a string")
    if not ADAPTER_NAME_RE.fullmatch(data["name"]):
        raise _fail("name", "must match [a-z0-9][a-z0-9_-]{0,63}")
    try:
        validate_template(data["prompt_template"])
    except PromptTemplateError as exc:
        raise _fail("prompt_template", str(exc).removeprefix("prompt template ")) from None
    if not _SHA256_RE.fullmatch(data["base_fingerprint"]):
        raise _fail("base_fingerprint", "must be 64 lowercase hex digits")

    _check_type(data, "files", (dict,), "an object")
    if sorted(data["files"]) != sorted(WEIGHT_FILES):
        raise _fail("files", f"must hold exactly the sha256 of {' and '.join(WEIGHT_FILES)}")
    for name, digest in data["files"].items():
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise _fail("files", f"entry '{name}' must be 64 lowercase hex digits")

    if "default_weight_scale" in data:
        _check_type(data, "default_weight_scale", (float,), "a number")
        scale = data["default_weight_scale"]
        if not math.isfinite(scale) or scale < 0:
            raise _fail("default_weight_scale", f"must be a finite number >= 0, got {scale}")
    digest = data.get("training_data_digest")
    if digest is not None and (not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest)):
        raise _fail("training_data_digest", "must be 64 lowercase hex digits or null")
    if "metrics" in data:
        _check_type(data, "metrics", (dict,), "an object")
        for name, value in data["metrics"].items():
            if not _is_number(value):
                raise _fail("metrics", f"entry '{name}' must be a number")
    if data.get("training_config") is not None:
        _check_type(data, "training_config", (dict,), "an object or null")
    if "created_at" in data:
        try:
            datetime.fromisoformat(data["created_at"].replace("Z", "+00:00"))
        except ValueError:
            raise _fail("created_at", "must be an ISO 8601 time") from None


def read_manifest(path: str | os.PathLike[str]) -> AdapterManifest:
    """Read and validate a manifest; ``path`` is the file or the adapter folder."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{MANIFEST_FILE} not found at {path}") from None
    return parse_manifest(raw, str(path))


def parse_manifest(raw: bytes, label: str) -> AdapterManifest:
    """Validate manifest bytes; ``label`` names the source in error messages."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ManifestError(f"{label}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{label}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    return AdapterManifest.from_dict(data)


def write_manifest(folder: str | os.PathLike[str], manifest: AdapterManifest) -> Path:
    """Write ``switchboard.json`` atomically (temp file + ``os.replace``)."""
    target = Path(folder) / MANIFEST_FILE
    payload = json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    atomic_write_bytes(target, payload.encode("utf-8"))
    return target


def weight_file_digests(folder: str | os.PathLike[str]) -> dict[str, str]:
    """The ``files`` entry of a manifest for the weight files now in ``folder``."""
    return {name: file_sha256(Path(folder) / name) for name in WEIGHT_FILES}


def check_digests(manifest: AdapterManifest, digests: dict[str, str], where: str) -> None:
    """Raise unless ``digests`` (weight file name -> sha256) are the manifest's."""
    for name, recorded in manifest.files.items():
        if digests[name] != recorded:
            raise AdapterDigestMismatch(
                f"{where}/{name}: sha256 {digests[name][:12]}… does not match the manifest's "
                f"{recorded[:12]}… (being published, or altered)"
            )


def verify_weight_files(folder: str | os.PathLike[str], manifest: AdapterManifest) -> None:
    """Raise unless the weight files in ``folder`` are the ones the manifest records."""
    try:
        digests = weight_file_digests(folder)
    except FileNotFoundError as exc:
        raise AdapterDigestMismatch(
            f"{exc.filename}: missing, but the manifest records it"
        ) from None
    check_digests(manifest, digests, str(folder))
