"""End-of-run evaluation: validation chrF/BLEU of the base model and of the new adapter,
the scale curve (validation chrF and retention per ``weight_scale``, the scale chosen),
all through ``trainer.scoring`` (the server's engine, as ``make eval``), and the loss
curve."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.formats.prompt import build_prompt
from trainer.config import TrainConfig
from trainer.retention import PERPLEXITY_WINDOW, load_control_sets
from trainer.rows import Row
from trainer.scale_choice import RetentionLimits, scale_curve, summary_line
from trainer.scoring import EngineGenerator, scores


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


def evaluate_run(model: torch.nn.Module, tokenizer: Any, base_fingerprint: str,
                 adapter_dir: Path, rows: list[Row], config: TrainConfig, max_lora_rank: int,
                 report: Callable[[str], None] = print) -> RunEvaluation:
    """Score ``adapter_dir`` on the validation ``rows`` and, unless ``control_samples``
    is 0, measure the scale curve (validation chrF and retention at every candidate
    scale) and choose the scale. ``model`` is the plain base (no PEFT layers); the engine
    takes it over."""
    template = config.prompt_template
    prompts = [build_prompt(template, row.text, tokenizer) for row in rows]
    longest = max(len(p) for p in prompts) + config.eval_max_new_tokens
    retained = config.control_samples > 0
    sets = load_control_sets() if retained else None
    if sets is not None:
        controls = sets.mandarin[: config.control_samples] + sets.english[: config.control_samples]
        longest = max(longest, PERPLEXITY_WINDOW + 1, config.eval_max_new_tokens + max(
            len(build_prompt(template, row.text, tokenizer)) for row in controls))
    generator = EngineGenerator(model, tokenizer, base_fingerprint, [adapter_dir.parent],
                                config.eval_max_new_tokens, max_loras=1,
                                max_lora_rank=max_lora_rank, max_model_len=longest)
    try:
        if sets is None:
            return _without_retention(generator, prompts, rows, adapter_dir.name, config)
        scales = sorted({*config.scale_candidates, 1.0} | (
            set() if config.choose_scale else {config.default_weight_scale}))
        limits = RetentionLimits(config.max_control_chrf_drop,
                                 config.max_perplexity_increase_pct)
        curve = scale_curve(generator, template, adapter_dir.name, rows, sets, scales, limits,
                            samples=config.control_samples)
    finally:
        generator.close()
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
    return RunEvaluation(metrics, curve, scale, problem)


def _without_retention(generator: EngineGenerator, prompts: list[list[int]], rows: list[Row],
                       adapter: str, config: TrainConfig) -> RunEvaluation:
    references = [row.label for row in rows]
    base = generator.submit(prompts, None, 0.0)
    tuned = generator.submit(prompts, adapter, 1.0)
    metrics: dict[str, float] = {}
    for label, handles in (("base", base), ("adapter", tuned)):
        result = scores(generator.collect(handles), references)
        metrics[f"val_chrf_{label}"] = result["chrf"]
        metrics[f"val_bleu_{label}"] = result["bleu"]
    metrics["val_chrf"] = metrics["val_chrf_adapter"]
    return RunEvaluation(metrics, None, config.default_weight_scale, None)


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
