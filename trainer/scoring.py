"""The one way Switchboard scores an adapter: the server's engine generates, chrF scores.

The publish gate (``switchboard train``), ``make eval`` and ``make reproduce`` all call
:class:`EngineGenerator` and :func:`scores`, so the number that lets an adapter in is the
number reported for it, and both are what the server would answer: the same engine
(batched, greedy, ``max_new_tokens``), the same adapter cache, every output cut at its
first newline and stripped, for every row and every system alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from server.adapters.cache import AdapterCache
from server.adapters.store import AdapterStore
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def scores(outputs: list[str], references: list[str]) -> dict[str, float]:
    """Corpus chrF and BLEU (sacrebleu) and the share of distinct outputs."""
    import sacrebleu

    return {"chrf": round(sacrebleu.corpus_chrf(outputs, [references]).score, 2),
            "bleu": round(sacrebleu.corpus_bleu(outputs, [references]).score, 2),
            "distinct": round(len(set(outputs)) / max(1, len(outputs)), 3)}


def sentence_chrf(output: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(output, [reference]).score)


class EngineGenerator:
    """The server's engine and adapter cache over adapter roots, for batched greedy runs.

    The engine wraps ``model``'s linear layers in place: the model belongs to it from
    here on (the trainer hands over its base model once training is done).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, base_fingerprint: str,
                 roots: list[Path], max_new_tokens: int, *, max_loras: int = 4,
                 max_lora_rank: int = 64, max_model_len: int = 1024) -> None:
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.engine = Engine(model, tokenizer, EngineConfig(
            max_batch_size=16, max_queue_size=4096, max_model_len=max_model_len,
            max_loras=max_loras, max_lora_rank=max_lora_rank,
            max_new_tokens_limit=max_new_tokens))
        self.cache = AdapterCache(AdapterStore(roots), self.engine.slots, base_fingerprint)

    def run(self, prompts: list[list[int]], adapter: str | None, scale: float) -> list[str]:
        """Greedy answers (first lines) to token prompts, with ``adapter`` at ``scale``."""
        sampling = SamplingParams(max_new_tokens=self.max_new_tokens)
        handles = [self.engine.submit(GenerationRequest(
            ids, sampling, adapter=self.cache.lease(adapter) if adapter else None,
            weight_scale=scale)) for ids in prompts]
        return [first_line(h.result(timeout=3600).text) for h in handles]

    def close(self) -> None:
        self.engine.stop()
        self.cache.close()
