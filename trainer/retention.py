"""What an adapter costs the base model outside its dialect, measured the way it serves.

Four control sets (``trainer/control/``, see its DATA.md), each scored for the base
model and for an adapter at a scale, through the server's engine (``trainer.scoring``).
A call reaches a dialect adapter only when its caller is from that region (the base
serves everyone else, unchanged), so the sets that bind stand for what those callers
send besides their dialect:

- ``mandarin``: Mandarin customer-service utterances → English, chrF; a caller routed to
  a dialect adapter may well speak Mandarin;
- ``english``: plain English customer utterances → a short reply, chrF;
- ``domain``: customer-service dialogue in the scripts routed callers use (Mandarin,
  Cantonese, Wu-script Chinese characters, English), perplexity (``domain_perplexity``);
- ``text``: general English and Chinese prose, perplexity (``perplexity``): reported
  beside the others, binding only when a config sets a limit for it.

Perplexity comes from the log-probabilities the engine's prefill computes for each
window's tokens, so the number is what serving computes. The utterances go through the
adapter's prompt template, as the server would wrap them; the texts are scored raw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.engine.request import RequestHandle
from server.engine.sampling import SamplingParams
from server.formats.prompt import build_prompt
from trainer.rows import Row, read_rows
from trainer.scoring import EngineGenerator, scores

CONTROL_DIR = Path(__file__).parent / "control"
PERPLEXITY_WINDOW = 256
"""Tokens per perplexity window (each window is one engine request)."""


@dataclass(frozen=True)
class ControlSets:
    mandarin: list[Row]
    english: list[Row]
    text: str
    """General prose (``general_text.txt``)."""
    domain: str = ""
    """In-domain dialogue (``domain_dialogue.txt``); empty: not measured (small sets
    built by tests)."""


def load_control_sets(folder: Path = CONTROL_DIR) -> ControlSets:
    return ControlSets(mandarin=read_rows(folder / "mandarin_cs.csv"),
                       english=read_rows(folder / "english_cs.csv"),
                       text=(folder / "general_text.txt").read_text(encoding="utf-8"),
                       domain=(folder / "domain_dialogue.txt").read_text(encoding="utf-8"))


def perplexity(generator: EngineGenerator, token_ids: list[int], adapter: str | None,
               scale: float, window: int = PERPLEXITY_WINDOW) -> float:
    """exp(mean NLL) of ``token_ids`` in windows of ``window`` tokens. Each window is one
    engine request whose prefill returns its tokens' log-probabilities (the first token
    of a window is context only): the serving path's own numbers."""
    return _perplexity(_submit_windows(generator, token_ids, adapter, scale, window))


def retention(generator: EngineGenerator, sets: ControlSets, template: str,
              adapter: str, scales: list[float], window: int = PERPLEXITY_WINDOW,
              samples: int | None = None, val_rows: list[Row] | None = None,
              ) -> dict[str, Any]:
    """The base model's control scores, and for each scale the adapter's scores and their
    change against the base: chrF drop in points, perplexity increase in percent (general
    prose: ``perplexity``, in-domain dialogue: ``domain_perplexity``).

    ``samples`` limits the rows of each control set; with ``val_rows`` the same pass
    scores the dialect's validation chrF too (``val_chrf``, ``val_bleu``). Everything is
    submitted before anything is collected, so the engine runs full batches.
    ``generator`` must allow prompts of ``window`` tokens."""
    tokens = generator.tokenizer.encode(sets.text, add_special_tokens=False)
    domain = generator.tokenizer.encode(sets.domain, add_special_tokens=False) \
        if sets.domain else []
    named = {"mandarin": sets.mandarin[:samples], "english": sets.english[:samples]}
    if val_rows:
        named["val"] = val_rows
    systems: list[tuple[str, str | None, float]] = [("base", None, 0.0)]
    systems += [(f"{scale:g}", adapter, scale) for scale in scales]
    pending = {
        label: ({name: _submit_rows(generator, template, rows, which, scale)
                 for name, rows in named.items()},
                _submit_windows(generator, tokens, which, scale, window))
        for label, which, scale in systems
    }
    # Last, so the runs above are batched as they were before this set existed.
    in_domain = {label: _submit_windows(generator, domain, which, scale, window)
                 for label, which, scale in systems}
    measured: dict[str, dict[str, float]] = {}
    for label, (runs, windows) in pending.items():
        domain_windows = in_domain[label]
        point: dict[str, float] = {}
        for name, handles in runs.items():
            outputs = generator.collect(handles)
            if name == "val":
                result = scores(outputs, [row.label for row in named[name]])
                point.update(val_chrf=result["chrf"], val_bleu=result["bleu"])
            else:
                point[f"{name}_chrf"] = _chrf(outputs, named[name])
        point["perplexity"] = round(_perplexity(windows), 3)
        if domain_windows:
            point["domain_perplexity"] = round(_perplexity(domain_windows), 3)
        measured[label] = point
    base = measured.pop("base")
    for point in measured.values():
        point.update(
            mandarin_chrf_drop=round(base["mandarin_chrf"] - point["mandarin_chrf"], 2),
            english_chrf_drop=round(base["english_chrf"] - point["english_chrf"], 2),
            perplexity_increase_pct=_increase(point["perplexity"], base["perplexity"]))
        if "domain_perplexity" in point:
            point["domain_perplexity_increase_pct"] = _increase(point["domain_perplexity"],
                                                                base["domain_perplexity"])
    return {"base": base, "by_scale": measured, "control_rows": len(named["mandarin"]),
            "perplexity_tokens": len(tokens), "domain_perplexity_tokens": len(domain)}


def _increase(value: float, base: float) -> float:
    """Percent ``value`` lies above ``base``."""
    return round(100 * (value / base - 1), 2)


def _submit_rows(generator: EngineGenerator, template: str, rows: list[Row],
                 adapter: str | None, scale: float) -> list[RequestHandle]:
    prompts = [build_prompt(template, row.text, generator.tokenizer) for row in rows]
    return generator.submit(prompts, adapter, scale)


def _chrf(outputs: list[str], rows: list[Row]) -> float:
    return scores(outputs, [row.label for row in rows])["chrf"]


def _submit_windows(generator: EngineGenerator, token_ids: list[int], adapter: str | None,
                    scale: float, window: int) -> list[RequestHandle]:
    windows = [token_ids[i : i + window] for i in range(0, len(token_ids), window)]
    return generator.submit([ids for ids in windows if len(ids) > 1], adapter, scale,
                            sampling=SamplingParams(max_new_tokens=1), prompt_logprobs=True)


def _perplexity(handles: list[RequestHandle]) -> float:
    total, count = 0.0, 0
    for handle in handles:
        result = handle.result(timeout=3600)
        if result.prompt_logprobs is None:
            raise RuntimeError(f"perplexity window ended without scores: {result.error}")
        total -= sum(result.prompt_logprobs)
        count += len(result.prompt_logprobs)
    return math.exp(total / count)
