"""Publish a trained adapter into ``<publish_root>/<name>/`` so a running server picks it up.

Order matters (DESIGN.md decision 7): the two weight files are written to temporary
names and moved into place with ``os.replace``, and the ``switchboard.json`` manifest,
which records their digests, comes last; the server accepts a version only when the
files match the manifest, so it never serves a half-written adapter.

The gate: nothing is published, unless ``force``, when no measured ``weight_scale`` keeps
the base model's other abilities within the retention limits (``trainer.scale_choice``),
when the new adapter's validation chrF is below the base model's (an adapter that makes
the model worse), or when an adapter of that name is already published and the new one
scores lower. That comparison is like with like: each version at the scale it would
serve (the new one at its chosen scale, the published one at its manifest's
``default_weight_scale``), both measured in this run on the same validation rows through
the same engine (``PublishedScore``, ``trainer.evaluate``). A figure recorded in the
published manifest is never compared: it may have been measured at another scale (a
manifest whose scale ``make eval --choose-scale`` changed) or by an older scorer.

A run whose adapter is the published version (same weight files, template, scale, base,
data and description: an unchanged config on the same data, trained again) publishes
nothing and says so; that is a success, not a refusal. The replaced version's files are
kept in ``<name>/previous/`` for rollback.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import ManifestError, SwitchboardError
from server.formats.files import atomic_write_bytes
from server.formats.manifest import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    MANIFEST_FILE,
    AdapterManifest,
    adapter_version,
    read_manifest,
    verify_weight_files,
    weight_file_digests,
    write_manifest,
)
from trainer.config import TrainConfig

PREVIOUS_DIR = "previous"


@dataclass(frozen=True)
class PublishResult:
    published: bool
    folder: Path
    version: str | None
    message: str
    unchanged: bool = False
    """Nothing was published because the run's adapter is the published version."""


@dataclass(frozen=True)
class PublishedScore:
    """The published version's validation chrF, measured in this run the way the new
    adapter's is (the same rows and engine), at the scale it serves."""

    version: str
    weight_scale: float
    val_chrf: float


def comparable_version(target: Path, base_fingerprint: str) -> AdapterManifest | None:
    """The version published at ``target`` when a new run can be measured against it: a
    readable manifest, weight files that match it, trained for this base model. Anything
    else could not be served either, so it protects nothing."""
    try:
        manifest = read_manifest(target / MANIFEST_FILE)
    except (ManifestError, OSError):
        return None
    if manifest.base_fingerprint != base_fingerprint or not _intact(target, manifest):
        return None
    return manifest


def _intact(folder: Path, manifest: AdapterManifest) -> bool:
    try:
        verify_weight_files(folder, manifest)
    except SwitchboardError:
        return False
    return True


def gate(existing: AdapterManifest | None, new_chrf: float | None, force: bool,
         base_chrf: float | None = None, retention_problem: str | None = None,
         published: PublishedScore | None = None, new_scale: float | None = None,
         ) -> str | None:
    """Why publishing is refused, or None. ``published`` is the published version measured
    in this run (None when there is none that could be measured: see
    ``comparable_version``); ``new_scale`` is the scale ``new_chrf`` was measured at."""
    if force:
        return None
    if retention_problem is not None:
        return f"not published: {retention_problem} (use --force to publish anyway)"
    if new_chrf is not None and base_chrf is not None and new_chrf < base_chrf:
        return (f"not published: validation chrF {new_chrf:.2f} is below the base model's "
                f"{base_chrf:.2f} (use --force to publish anyway)")
    if existing is None:
        return None
    if new_chrf is None:
        if published is None and existing.metrics.get("val_chrf") is None:
            return None
        return ("not published: this run has no validation chrF to compare with the "
                "published version's (use --force to publish anyway)")
    if published is not None and new_chrf < published.val_chrf:
        at = "" if new_scale is None else f" at weight_scale {new_scale:g}"
        return (f"not published: validation chrF {new_chrf:.2f}{at} is below the published "
                f"version's {published.val_chrf:.2f} at its weight_scale "
                f"{published.weight_scale:g} ({published.version[:12]}; both measured now, "
                "on the same rows) (use --force to publish anyway)")
    return None


def _same_version(existing: AdapterManifest, target: Path, config: TrainConfig,
                  adapter_dir: Path, base_fingerprint: str, data_digest: str,
                  scale: float) -> bool:
    """Whether publishing would serve exactly what ``target`` serves now."""
    files = {
        ADAPTER_CONFIG_FILE: hashlib.sha256(canonical_adapter_config(
            (adapter_dir / ADAPTER_CONFIG_FILE).read_bytes())).hexdigest(),
        ADAPTER_WEIGHTS_FILE: hashlib.sha256(
            (adapter_dir / ADAPTER_WEIGHTS_FILE).read_bytes()).hexdigest(),
    }
    return (existing.files == files and _intact(target, existing)
            and existing.default_weight_scale == scale
            and existing.prompt_template == config.prompt_template
            and existing.base_fingerprint == base_fingerprint
            and existing.training_data_digest == data_digest
            and existing.dialect == (config.dialect or config.name)
            and existing.description == config.description)


def model_card(config: TrainConfig, metrics: dict[str, float], version: str,
               weight_scale: float) -> str:
    rows = "\n".join(f"| {k} | {v:g} |" for k, v in sorted(metrics.items()))
    return f"""# {config.name}

LoRA adapter for Switchboard ({config.dialect or config.name}), version `{version[:12]}`.
{config.description}

- base model: `{config.base_model}`; LoRA rank {config.lora_rank}, alpha {config.lora_alpha:g},
  targets {", ".join(config.target_modules)}
- prompt template: `{config.prompt_template!r}`
- default weight scale: {weight_scale:g} (`scale.png`: validation chrF and retention by scale)
- training: {config.epochs:g} epochs, batch {config.batch_size} x {config.grad_accum},
  learning rate {config.learning_rate:g}, seed {config.seed}

| metric | value |
| --- | --- |
{rows}

Serve it: a running `switchboard serve` picks this folder up by itself; call it with
`switchboard generate --dialect {config.name} "..."`.
"""


def canonical_adapter_config(raw: bytes) -> bytes:
    """PEFT writes ``target_modules`` from a set, so its order changes from one process to
    the next (string hashing is randomised). Sorted, the same training run gives the same
    bytes, hence the same adapter version."""
    data = json.loads(raw)
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def publish(config: TrainConfig, adapter_dir: Path, base_fingerprint: str,
            metrics: dict[str, float], data_digest: str, target: Path,
            force: bool = False, *, weight_scale: float | None = None,
            retention_problem: str | None = None,
            published_score: PublishedScore | None = None) -> PublishResult:
    """Publish ``adapter_dir`` as ``target`` (``<publish_root>/<name>``) unless gated, or
    unless it is the version published there already (``unchanged``, even with
    ``force``: publishing it again would only move the same files to ``previous/``).

    ``weight_scale`` (default: the config's) becomes the manifest's default scale;
    ``retention_problem`` (no scale keeps the base's abilities within the limits)
    refuses it unless ``force``, and a forced publish says so; ``published_score`` is the
    published version measured in this run, for the gate."""
    scale = config.default_weight_scale if weight_scale is None else weight_scale
    existing = None
    if (target / MANIFEST_FILE).exists():
        try:
            existing = read_manifest(target / MANIFEST_FILE)
        except ManifestError:
            existing = None  # an unreadable manifest protects nothing
    if existing is not None and _same_version(existing, target, config, adapter_dir,
                                              base_fingerprint, data_digest, scale):
        version = adapter_version(target)
        return PublishResult(False, target, version, (
            f"{config.name}: identical to the published version {version[:12]} (the same "
            f"weights, prompt template and weight_scale {scale:g}): nothing to publish"),
            unchanged=True)
    refusal = gate(existing, metrics.get("val_chrf"), force, metrics.get("val_chrf_base"),
                   retention_problem, published_score, scale)
    if refusal is not None:
        return PublishResult(False, target, None, refusal)
    target.mkdir(parents=True, exist_ok=True)
    if existing is not None and _intact(target, existing):
        # Only a complete, verified version becomes the rollback copy: after a publish
        # that stopped halfway, the folder mixes two versions and previous/ stays as is.
        previous = target / PREVIOUS_DIR
        shutil.rmtree(previous, ignore_errors=True)
        previous.mkdir()
        for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE):
            if (target / name).exists():
                shutil.copy2(target / name, previous / name)
    atomic_write_bytes(target / ADAPTER_CONFIG_FILE,
                       canonical_adapter_config((adapter_dir / ADAPTER_CONFIG_FILE).read_bytes()))
    atomic_write_bytes(target / ADAPTER_WEIGHTS_FILE,
                       (adapter_dir / ADAPTER_WEIGHTS_FILE).read_bytes())
    numbers: dict[str, Any] = {k: float(v) for k, v in metrics.items()}
    manifest = AdapterManifest(
        name=config.name, prompt_template=config.prompt_template,
        base_fingerprint=base_fingerprint, files=weight_file_digests(target),
        dialect=config.dialect or config.name, description=config.description,
        default_weight_scale=scale, training_data_digest=data_digest,
        metrics=numbers, training_config=config.to_dict())
    write_manifest(target, manifest)  # last: it makes the new version acceptable
    version = adapter_version(target)
    (target / "README.md").write_text(model_card(config, numbers, version, scale),
                                      encoding="utf-8")
    forced = f" (forced: {retention_problem})" if retention_problem is not None else ""
    return PublishResult(True, target, version, f"published {config.name} {version[:12]} to "
                                                f"{target} at weight_scale {scale:g}{forced}")
