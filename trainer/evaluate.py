"""End-of-run evaluation: greedy answers of the base model and of the adapter on the
validation rows, scored with chrF and BLEU (sacrebleu), and the loss curve as a PNG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from server.formats.prompt import build_prompt
from trainer.data import Row


@dataclass(frozen=True)
class Scores:
    chrf: float
    bleu: float
    outputs: list[str]


@torch.no_grad()
def generate_answers(model: PeftModel, tokenizer: Any, rows: list[Row], template: str,
                     max_new_tokens: int, use_adapter: bool) -> list[str]:
    """Greedy answers, one row at a time (no padding effects), stopping at EOS."""
    model.eval()
    device = next(model.parameters()).device
    answers = []
    for row in rows:
        ids = torch.tensor([build_prompt(template, row.text, tokenizer)], device=device)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False,
                      eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        if use_adapter:
            out = model.generate(input_ids=ids, **kwargs)
        else:
            with model.disable_adapter():
                out = model.generate(input_ids=ids, **kwargs)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def score(outputs: list[str], references: list[str]) -> Scores:
    import sacrebleu

    chrf = sacrebleu.corpus_chrf(outputs, [references]).score
    bleu = sacrebleu.corpus_bleu(outputs, [references]).score
    return Scores(round(chrf, 2), round(bleu, 2), outputs)


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
