"""Per-row sampling: repetition penalty, temperature, top-k, top-p, seeded draws.

Each row of a batch carries its own settings and its own ``torch.Generator``, so a
request's output depends on its seed alone, never on who shares the batch. The logit
transforms follow transformers' processors exactly (and are tested against them), in
the order ``generate`` applies them: repetition penalty, temperature, top-k, top-p.
``temperature == 0`` means greedy (argmax after the repetition penalty).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from server.errors import InvalidRequest

MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MIN_TEMPERATURE = 1e-3
"""Below this (and above 0, greedy) logits / temperature overflow to inf in fp32."""
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 100.0
SEED_LIMIT = 2**64
"""torch generators take seeds in [0, 2**64)."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 is greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 turns it off."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (CTRL-style, as transformers)."""
    seed: int | None = None
    """Same seed, same prompt, same settings: same output."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first occurrence of any of these; excluded from output."""
    ignore_eos: bool = False
    """Keep generating past EOS until max_new_tokens (benchmarks: fixed output length)."""
    min_tokens: int = 0
    """EOS is masked, and stop strings do not end the reply, until this many tokens are
    generated (vLLM's ``min_tokens``; at most max_new_tokens): a base model that would
    stop after 3 tokens still gives a benchmark the length it asked for."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, max_new_tokens_limit: int) -> None:
        """Raise :class:`InvalidRequest` naming the first field out of range."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise InvalidRequest("max_new_tokens must be an integer", "max_new_tokens")
        if self.max_new_tokens <= 0:
            raise InvalidRequest(f"max_new_tokens must be > 0, got {self.max_new_tokens}",
                                 "max_new_tokens")
        if self.max_new_tokens > max_new_tokens_limit:
            raise InvalidRequest(
                f"max_new_tokens {self.max_new_tokens} exceeds the limit {max_new_tokens_limit}",
                "max_new_tokens")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest("ignore_eos must be a boolean", "ignore_eos")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or \
                not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidRequest(
                f"min_tokens must be an integer between 0 and max_new_tokens "
                f"({self.max_new_tokens}; max_tokens in the OpenAI API), got "
                f"{str(self.min_tokens)[:24]}", "min_tokens")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(
                f"temperature must be a finite number >= 0, got {self.temperature}",
                "temperature")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise InvalidRequest(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, "
                                 f"got {self.temperature}", "temperature")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be an integer >= 0, got {self.top_k}", "top_k")
        if not math.isfinite(self.repetition_penalty) or not \
                MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise InvalidRequest(
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, "
                f"{MAX_REPETITION_PENALTY}], got {self.repetition_penalty}",
                "repetition_penalty")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(
                self.seed, int) or not 0 <= self.seed < SEED_LIMIT):
            raise InvalidRequest(f"seed must be an integer in [0, 2**64), got "
                                 f"{str(self.seed)[:24]}", "seed")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(
                f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}",
                "stop")
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise InvalidRequest("stop strings must be non-empty strings", "stop")
            if len(stop.encode("utf-8")) > MAX_STOP_BYTES:
                raise InvalidRequest(
                    f"stop string of {len(stop.encode('utf-8'))} bytes exceeds {MAX_STOP_BYTES}",
                    "stop")


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """logits ``[vocab]``; seen ``[n]`` token ids (prompt + output). Returns new logits."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    score = logits.gather(0, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(0, seen, score)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, top_k).values[..., -1, None]
    return logits.masked_fill(logits < threshold, -math.inf)


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, sorted_indices, remove_sorted)
    return logits.masked_fill(remove, -math.inf)


def process_logits(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor
) -> torch.Tensor:
    """The row's logits ``[vocab]`` after penalty and, unless greedy, temperature/top-k/top-p."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    logits = apply_top_k(logits, params.top_k)
    return apply_top_p(logits, params.top_p)


def choose_token(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
    generator: torch.Generator | None,
) -> int:
    """One token for one row from its logits ``[vocab]``."""
    processed = process_logits(logits, params, seen)
    if params.greedy:
        return int(torch.argmax(processed))
    probs = processed.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
