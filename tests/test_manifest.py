"""switchboard.json: validating reader/writer, weight-file digests and versions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server.errors import AdapterDigestMismatch, ManifestError
from server.formats.manifest import (
    MANIFEST_FILE,
    AdapterManifest,
    adapter_version,
    read_manifest,
    verify_weight_files,
    weight_file_digests,
    write_manifest,
)

FINGERPRINT = "ab" * 32


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not really tensors")
    return tmp_path


def _manifest(folder: Path, **overrides) -> AdapterManifest:
    fields = {
        "name": "wuyu",
        "dialect": "wuyu",
        "description": "Shanghainese to English",
        "prompt_template": "Translate Wu dialect to English: {text}\n",
        "default_weight_scale": 0.8,
        "base_fingerprint": FINGERPRINT,
        "files": weight_file_digests(folder),
        "training_data_digest": "cd" * 32,
        "metrics": {"val_chrf": 41.5, "val_bleu": 12},
    }
    fields.update(overrides)
    return AdapterManifest(**fields)


def test_round_trip(adapter_dir: Path) -> None:
    manifest = _manifest(adapter_dir)
    write_manifest(adapter_dir, manifest)
    assert read_manifest(adapter_dir) == manifest
    assert read_manifest(adapter_dir / MANIFEST_FILE).created_at.endswith("Z")
    verify_weight_files(adapter_dir, manifest)


def _write_raw(folder: Path, data: dict) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(data))


@pytest.mark.parametrize(
    "field", ["schema_version", "name", "prompt_template", "base_fingerprint", "files"]
)
def test_missing_field_is_named(adapter_dir: Path, field: str) -> None:
    data = _manifest(adapter_dir).to_dict()
    del data[field]
    _write_raw(adapter_dir, data)
    with pytest.raises(ManifestError, match=f"field '{field}' is missing"):
        read_manifest(adapter_dir)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("default_weight_scale", "0.8", "must be a number, got str"),
        ("default_weight_scale", True, "must be a number, got bool"),
        ("default_weight_scale", -1, "must be a finite number >= 0"),
        ("name", 7, "must be a string, got int"),
        ("name", "../etc", r"must match \[a-z0-9\]"),
        ("schema_version", "1", "must be an integer, got str"),
        ("schema_version", 2, "this Switchboard reads version 1"),
        ("prompt_template", "no placeholder", "must contain {text} exactly once"),
        ("base_fingerprint", "xyz", "64 lowercase hex digits"),
        ("files", [], "must be an object, got list"),
        ("files", {"adapter_config.json": "ab" * 32}, "exactly the sha256"),
        ("metrics", {"chrf": "high"}, "entry 'chrf' must be a number"),
        ("created_at", "yesterday", "ISO 8601"),
        ("training_data_digest", 5, "64 lowercase hex digits or null"),
    ],
)
def test_mistyped_field_is_named(adapter_dir: Path, field: str, value, message: str) -> None:
    data = _manifest(adapter_dir).to_dict()
    data[field] = value
    _write_raw(adapter_dir, data)
    with pytest.raises(ManifestError, match=f"field '{field}' (.* )?{message}"):
        read_manifest(adapter_dir)


def test_unknown_field_lists_valid_ones(adapter_dir: Path) -> None:
    data = _manifest(adapter_dir).to_dict() | {"weight_scale": 1.0}
    _write_raw(adapter_dir, data)
    with pytest.raises(ManifestError, match=r"unknown field 'weight_scale' \(valid: name, "):
        read_manifest(adapter_dir)


def test_unparsable_and_missing(adapter_dir: Path) -> None:
    with pytest.raises(ManifestError, match=r"switchboard\.json not found"):
        read_manifest(adapter_dir)
    (adapter_dir / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match="invalid JSON at line 1"):
        read_manifest(adapter_dir)
    (adapter_dir / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(ManifestError, match="top level must be an object"):
        read_manifest(adapter_dir)


def test_changed_weights_do_not_match(adapter_dir: Path) -> None:
    manifest = _manifest(adapter_dir)
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"other bytes")
    message = r"adapter_model\.safetensors: sha256 .* does not match"
    with pytest.raises(AdapterDigestMismatch, match=message):
        verify_weight_files(adapter_dir, manifest)
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterDigestMismatch, match="missing, but the manifest records it"):
        verify_weight_files(adapter_dir, manifest)


def test_version_covers_weights_and_manifest_only(adapter_dir: Path) -> None:
    without_manifest = adapter_version(adapter_dir)
    write_manifest(adapter_dir, _manifest(adapter_dir))
    with_manifest = adapter_version(adapter_dir)
    assert with_manifest != without_manifest
    (adapter_dir / "train.yaml").write_text("epochs: 3\n")
    (adapter_dir / "README.md").write_text("model card")
    assert adapter_version(adapter_dir) == with_manifest
    write_manifest(adapter_dir, _manifest(adapter_dir, default_weight_scale=1.0))
    assert adapter_version(adapter_dir) != with_manifest


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clients", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_check_reports_bad_field_in_one_line(adapter_dir: Path) -> None:
    data = _manifest(adapter_dir).to_dict()
    data["default_weight_scale"] = "high"
    _write_raw(adapter_dir, data)
    result = _cli("manifest", "check", str(adapter_dir))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: switchboard.json: field 'default_weight_scale' must be a number, got str"
    ]


def test_cli_check_accepts_good_manifest(adapter_dir: Path) -> None:
    write_manifest(adapter_dir, _manifest(adapter_dir))
    result = _cli("manifest", "check", str(adapter_dir))
    assert result.returncode == 0, result.stderr
    assert "match the manifest" in result.stdout
    assert adapter_version(adapter_dir) in result.stdout
