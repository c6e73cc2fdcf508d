"""End-of-run evaluation: validation chrF/BLEU of the base model and of the new adapter,
through ``trainer.scoring`` (the server's engine, as ``make eval``), and the loss curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from server.formats.prompt import build_prompt
from trainer.rows import Row
from trainer.scoring import EngineGenerator, scores


def validation_scores(model: torch.nn.Module, tokenizer: Any, base_fingerprint: str,
                      adapter_dir: Path, rows: list[Row], template: str, max_new_tokens: int,
                      max_lora_rank: int) -> dict[str, float]:
    """``val_chrf_base``, ``val_chrf_adapter`` and their BLEU, for ``adapter_dir`` at scale 1.

    ``model`` is the plain base (no PEFT layers); the engine takes it over.
    """
    prompts = [build_prompt(template, row.text, tokenizer) for row in rows]
    references = [row.label for row in rows]
    longest = max(len(p) for p in prompts) + max_new_tokens
    generator = EngineGenerator(model, tokenizer, base_fingerprint, [adapter_dir.parent],
                                max_new_tokens, max_loras=1, max_lora_rank=max_lora_rank,
                                max_model_len=longest)
    metrics: dict[str, float] = {}
    try:
        for label, adapter in (("base", None), ("adapter", adapter_dir.name)):
            result = scores(generator.run(prompts, adapter, 1.0 if adapter else 0.0),
                            references)
            metrics[f"val_chrf_{label}"] = result["chrf"]
            metrics[f"val_bleu_{label}"] = result["bleu"]
    finally:
        generator.close()
    return metrics


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
