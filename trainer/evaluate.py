"""End-of-run evaluation: validation chrF/BLEU of the base model and of the new adapter,
the scale curve (validation chrF and retention per ``weight_scale``, the scale chosen),
the published version's validation chrF at its own scale (for the publish gate: like
with like), all through ``trainer.scoring`` (the server's engine, as ``make eval``), and
the loss curve."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from server.formats.manifest import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    MANIFEST_FILE,
    adapter_version,
    read_manifest,
)
from server.formats.prompt import build_prompt
from trainer.config import TrainConfig
from trainer.publish import PublishedScore
from trainer.retention import PERPLEXITY_WINDOW, ControlSets, load_control_sets
from trainer.rows import Row
from trainer.scale_choice import RetentionLimits, scale_curve, summary_line
from trainer.scoring import EngineGenerator, scores

PUBLISHED = "published"
"""The published version's name in the run's comparison root (a copy of its weights)."""


@dataclass(frozen=True)
class RunEvaluation:
    metrics: dict[str, float]
    """Validation chrF/BLEU of the base and of the adapter at scale 1, and with retention:
    ``weight_scale`` (the scale to publish), ``val_chrf`` and the retention costs at it."""
    curve: dict[str, Any] | None
    """``trainer.scale_choice.scale_curve``'s result, when retention was measured."""
    weight_scale: float
    retention_problem: str | None
    """Why no measured scale keeps the base's abilities within the limits, or None."""
    published: PublishedScore | None = None
    """The published version measured now on the same rows, at its own scale."""


def evaluate_run(model: torch.nn.Module, tokenizer: Any, base_fingerprint: str,
                 adapter_dir: Path, rows: list[Row], config: TrainConfig, max_lora_rank: int,
                 report: Callable[[str], None] = print,
                 published: Path | None = None) -> RunEvaluation:
    """Score ``adapter_dir`` on the validation ``rows`` and, unless ``control_samples``
    is 0, measure the scale curve (validation chrF and retention at every candidate
    scale) and choose the scale. ``model`` is the plain base (no PEFT layers); the engine
    takes it over. ``published`` is the folder of the version this run would replace
    (see ``trainer.publish.comparable_version``): it is scored on the same rows, at the
    scale its manifest serves, with its template, after the curve."""
    template = config.prompt_template
    prompts = [build_prompt(template, row.text, tokenizer) for row in rows]
    longest = max(len(p) for p in prompts) + config.eval_max_new_tokens
    retained = config.control_samples > 0
    sets = load_control_sets() if retained else None
    if sets is not None:
        controls = sets.mandarin[: config.control_samples] + sets.english[: config.control_samples]
        longest = max(longest, PERPLEXITY_WINDOW + 1, config.eval_max_new_tokens + max(
            len(build_prompt(template, row.text, tokenizer)) for row in controls))
    old = read_manifest(published / MANIFEST_FILE) if published is not None else None
    # The published weights are copied under a name of their own, so a run whose adapter
    # has that name too still measures both, and a publish racing this run changes nothing.
    with tempfile.TemporaryDirectory(prefix="published-", dir=adapter_dir.parent) as scratch:
        roots = [adapter_dir.parent]
        if published is not None and old is not None:
            copy = Path(scratch) / PUBLISHED
            copy.mkdir()
            for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
                shutil.copyfile(published / name, copy / name)
            roots.append(Path(scratch))
            max_lora_rank = max(max_lora_rank, _lora_rank(copy))
            longest = max(longest, config.eval_max_new_tokens + max(
                len(build_prompt(old.prompt_template, row.text, tokenizer)) for row in rows))
        generator = EngineGenerator(model, tokenizer, base_fingerprint, roots,
                                    config.eval_max_new_tokens, max_loras=len(roots),
                                    max_lora_rank=max_lora_rank, max_model_len=longest)
        try:
            if sets is None:
                evaluation = _without_retention(generator, prompts, rows, adapter_dir.name,
                                                config)
            else:
                evaluation = _with_retention(generator, rows, adapter_dir.name, config, sets,
                                             report)
            if published is not None and old is not None:
                score = PublishedScore(adapter_version(published), old.default_weight_scale,
                                       scores(generator.run(
                                           [build_prompt(old.prompt_template, row.text,
                                                         tokenizer) for row in rows],
                                           PUBLISHED, old.default_weight_scale),
                                           [row.label for row in rows])["chrf"])
                report(f"{config.name}: the published version {score.version[:12]} at its "
                       f"weight_scale {score.weight_scale:g}: validation chrF "
                       f"{score.val_chrf:.2f} (measured now, on the same rows); this run: "
                       f"{evaluation.metrics['val_chrf']:.2f} at weight_scale "
                       f"{evaluation.weight_scale:g}")
                evaluation = replace(evaluation, published=score)
        finally:
            generator.close()
    return evaluation


def _with_retention(generator: EngineGenerator, rows: list[Row], adapter: str,
                    config: TrainConfig, sets: ControlSets, report: Callable[[str], None]
                    ) -> RunEvaluation:
    """The scale curve, the choice, and the metrics at the chosen scale."""
    scales = sorted({*config.scale_candidates, 1.0} | (
        set() if config.choose_scale else {config.default_weight_scale}))
    limits = RetentionLimits.from_config(config)
    curve = scale_curve(generator, config.prompt_template, adapter, rows, sets, scales, limits,
                        samples=config.control_samples)
    for scale in scales:
        report(f"{config.name}: {summary_line(curve, scale)}")
    allowed = [float(s) for s, p in curve["by_scale"].items() if p["within_limits"]]
    problem = None if allowed else str(curve["choice"])
    scale = config.default_weight_scale
    if config.choose_scale and curve["chosen_scale"] is not None:
        scale = float(curve["chosen_scale"])
    report(f"{config.name}: {curve['choice'] if config.choose_scale else 'scale as configured'}"
           f"; publishing with weight_scale {scale:g}")
    at_one, chosen = curve["by_scale"]["1"], curve["by_scale"][f"{scale:g}"]
    metrics = {
        "val_chrf_base": curve["base"]["val_chrf"], "val_bleu_base": curve["base"]["val_bleu"],
        "val_chrf_adapter": at_one["val_chrf"], "val_bleu_adapter": at_one["val_bleu"],
        "weight_scale": scale, "val_chrf": chosen["val_chrf"],
        "control_mandarin_chrf_drop": chosen["mandarin_chrf_drop"],
        "control_english_chrf_drop": chosen["english_chrf_drop"],
        "perplexity_increase_pct": chosen["perplexity_increase_pct"],
    }
    if "domain_perplexity_increase_pct" in chosen:
        metrics["domain_perplexity_increase_pct"] = chosen["domain_perplexity_increase_pct"]
    return RunEvaluation(metrics, curve, scale, problem)


def _lora_rank(folder: Path) -> int:
    """The largest LoRA rank in ``folder``'s adapter_config.json."""
    data = json.loads((folder / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    return max([int(data.get("r", 8)), *(int(r) for r in
                                          (data.get("rank_pattern") or {}).values())])


def _without_retention(generator: EngineGenerator, prompts: list[list[int]], rows: list[Row],
                       adapter: str, config: TrainConfig) -> RunEvaluation:
    """Base and adapter at scale 1; ``val_chrf`` (what the gate compares) at the scale that
    will be published, the configured one."""
    references = [row.label for row in rows]
    scale = config.default_weight_scale
    systems = {"base": generator.submit(prompts, None, 0.0),
               "adapter": generator.submit(prompts, adapter, 1.0)}
    if scale != 1.0:
        systems["served"] = generator.submit(prompts, adapter, scale)
    metrics: dict[str, float] = {}
    for label, handles in systems.items():
        result = scores(generator.collect(handles), references)
        metrics[f"val_chrf_{label}"] = result["chrf"]
        metrics[f"val_bleu_{label}"] = result["bleu"]
    metrics["val_chrf"] = metrics.pop("val_chrf_served", metrics["val_chrf_adapter"])
    metrics.pop("val_bleu_served", None)
    if scale != 1.0:
        metrics["weight_scale"] = scale
    return RunEvaluation(metrics, None, scale, None)


def plot_losses(path: Path, train: list[tuple[int, float]], val: list[tuple[int, float]],
                title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        axes.plot(*zip(*val, strict=True), label="validation", marker="o")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (label tokens)")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
