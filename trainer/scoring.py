"""The one way Switchboard scores an adapter: the server's engine generates, chrF scores.

The publish gate (``switchboard train``), ``make eval`` and ``make reproduce`` all call
:class:`EngineGenerator` and :func:`scores`, so the number that lets an adapter in is the
number reported for it, and both are what the server would answer: the same engine
(batched, greedy, ``max_new_tokens``), the same adapter cache, every output cut at its
first newline and stripped, for every row and every system alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from server.adapters.cache import AdapterCache, AdapterLease
from server.adapters.store import AdapterStore
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, RequestHandle
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
                 max_lora_rank: int = 64, max_model_len: int = 1024,
                 max_batch_size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        # 64 rows per step: on this CPU a step of 64 costs about twice one of 16 (eval
        # passes submit hundreds of rows at once); results do not depend on it.
        self.engine = Engine(model, tokenizer, EngineConfig(
            max_batch_size=max_batch_size, max_queue_size=16384, max_model_len=max_model_len,
            max_loras=max_loras, max_lora_rank=max_lora_rank,
            max_new_tokens_limit=max_new_tokens))
        self.cache = AdapterCache(AdapterStore(roots), self.engine.slots, base_fingerprint)

    def submit(self, prompts: list[list[int]], adapter: str | None, scale: float, *,
               composed: Sequence[tuple[str, float]] = (),
               sampling: SamplingParams | None = None,
               prompt_logprobs: bool = False) -> list[RequestHandle]:
        """Start greedy runs of ``prompts`` with ``adapter`` at ``scale`` (and ``composed``
        adapters with theirs); see ``collect``. Submitting several systems before
        collecting any fills the engine's batches.

        All or nothing: when one prompt cannot be submitted (too long, a full queue, an
        adapter that cannot load), the runs already started are cancelled and the error
        is raised; no lease is left held."""
        sampling = sampling or SamplingParams(max_new_tokens=self.max_new_tokens)
        handles: list[RequestHandle] = []
        try:
            for ids in prompts:
                handles.append(self._submit_one(ids, adapter, scale, composed, sampling,
                                                prompt_logprobs))
        except BaseException:
            for handle in handles:
                handle.cancel()  # the engine releases their leases as they leave
            raise
        return handles

    def _submit_one(self, ids: list[int], adapter: str | None, scale: float,
                    composed: Sequence[tuple[str, float]], sampling: SamplingParams,
                    prompt_logprobs: bool) -> RequestHandle:
        """One run; the leases it takes are the engine's once submitted, ours until."""
        leases: list[AdapterLease] = []
        try:
            if adapter:
                leases.append(self.cache.lease(adapter))
            for name, _ in composed:
                leases.append(self.cache.lease(name))
            first = leases[0] if adapter else None
            rest = leases[1:] if adapter else leases
            return self.engine.submit(GenerationRequest(
                ids, sampling, adapter=first, weight_scale=scale if adapter else 0.0,
                composed=tuple(zip(rest, (c for _, c in composed), strict=True)),
                prompt_logprobs=prompt_logprobs))
        except BaseException:
            for lease in leases:
                lease.release()
            raise

    @staticmethod
    def collect(handles: list[RequestHandle]) -> list[str]:
        """The answers (first lines) of submitted runs, in order."""
        return [first_line(h.result(timeout=3600).text) for h in handles]

    def run(self, prompts: list[list[int]], adapter: str | None, scale: float) -> list[str]:
        """Greedy answers (first lines) to token prompts, with ``adapter`` at ``scale``."""
        return self.collect(self.submit(prompts, adapter, scale))

    def close(self) -> None:
        self.engine.stop()
        self.cache.close()
