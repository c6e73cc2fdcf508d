"""What an adapter costs the base model outside its dialect, measured the way it serves.

Three control sets (``trainer/control/``, see its DATA.md), each scored for the base
model and for an adapter at a scale, through the server's engine (``trainer.scoring``):

- ``mandarin``: Mandarin customer-service utterances → English, chrF; a caller routed to
  a dialect adapter may well speak Mandarin;
- ``english``: plain English customer utterances → a short reply, chrF;
- ``text``: general English and Chinese prose, perplexity, computed from the engine's
  own logits (teacher-forced windows), so the number is what serving computes.

The utterances go through the adapter's prompt template, as the server would wrap them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from server.formats.prompt import build_prompt
from trainer.rows import Row, read_rows
from trainer.scoring import EngineGenerator, scores

CONTROL_DIR = Path(__file__).parent / "control"
PERPLEXITY_WINDOW = 256
"""Tokens per teacher-forced window (each window is one engine request)."""


@dataclass(frozen=True)
class ControlSets:
    mandarin: list[Row]
    english: list[Row]
    text: str


def load_control_sets(folder: Path = CONTROL_DIR) -> ControlSets:
    return ControlSets(mandarin=read_rows(folder / "mandarin_cs.csv"),
                       english=read_rows(folder / "english_cs.csv"),
                       text=(folder / "general_text.txt").read_text(encoding="utf-8"))


def control_chrf(generator: EngineGenerator, template: str, rows: list[Row],
                 adapter: str | None, scale: float) -> float:
    """Corpus chrF of the greedy answers to ``rows`` (wrapped in ``template``)."""
    prompts = [build_prompt(template, row.text, generator.tokenizer) for row in rows]
    outputs = generator.run(prompts, adapter, scale if adapter else 0.0)
    return scores(outputs, [row.label for row in rows])["chrf"]


def perplexity(generator: EngineGenerator, token_ids: list[int], adapter: str | None,
               scale: float, window: int = PERPLEXITY_WINDOW) -> float:
    """exp(mean NLL) of ``token_ids`` in windows of ``window`` tokens, each window a
    teacher-forced engine request (its first token is the prompt, the rest forced) whose
    recorded logits score the forced tokens. Needs ``generator.max_new_tokens`` ≥
    ``window`` - 1."""
    windows = [token_ids[i : i + window] for i in range(0, len(token_ids), window)]
    windows = [w for w in windows if len(w) > 1]
    handles = []
    for ids in windows:
        forced = ids[1:]
        handles.append(generator.engine.submit(GenerationRequest(
            ids[:1], SamplingParams(max_new_tokens=len(forced), ignore_eos=True),
            adapter=generator.cache.lease(adapter) if adapter else None,
            weight_scale=scale if adapter else 0.0, forced_tokens=forced,
            record_logits=True)))
    total, count = 0.0, 0
    for ids, handle in zip(windows, handles, strict=True):
        result = handle.result(timeout=3600)
        assert result.logits is not None and len(result.logits) == len(ids) - 1
        logits = torch.stack([row.reshape(-1) for row in result.logits]).float()
        targets = torch.tensor(ids[1:])
        total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += len(targets)
    return math.exp(total / count)


def retention(generator: EngineGenerator, sets: ControlSets, template: str,
              adapter: str, scales: list[float],
              window: int = PERPLEXITY_WINDOW) -> dict[str, Any]:
    """The base model's control scores, and for each scale the adapter's scores and their
    change against the base: chrF drop in points, perplexity increase in percent.
    ``generator`` must allow ``window`` - 1 new tokens."""
    tokens = generator.tokenizer.encode(sets.text, add_special_tokens=False)
    base = {"mandarin_chrf": control_chrf(generator, template, sets.mandarin, None, 0.0),
            "english_chrf": control_chrf(generator, template, sets.english, None, 0.0),
            "perplexity": round(perplexity(generator, tokens, None, 0.0, window), 3)}
    by_scale: dict[str, dict[str, float]] = {}
    for scale in scales:
        mandarin = control_chrf(generator, template, sets.mandarin, adapter, scale)
        english = control_chrf(generator, template, sets.english, adapter, scale)
        ppl = perplexity(generator, tokens, adapter, scale, window)
        by_scale[f"{scale:g}"] = {
            "mandarin_chrf": mandarin, "english_chrf": english,
            "perplexity": round(ppl, 3),
            "mandarin_chrf_drop": round(base["mandarin_chrf"] - mandarin, 2),
            "english_chrf_drop": round(base["english_chrf"] - english, 2),
            "perplexity_increase_pct": round(100 * (ppl / base["perplexity"] - 1), 2),
        }
    return {"base": base, "by_scale": by_scale}
