"""Sampler: the logit transforms equal transformers' processors; draws follow the law."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from server.engine.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    choose_token,
    make_generator,
    process_logits,
)
from server.errors import InvalidRequest

VOCAB = 1000


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _same(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    # -inf must match -inf; finite values must match closely.
    return bool(torch.equal(torch.isinf(ours), torch.isinf(theirs))) and torch.allclose(
        ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)], atol=1e-6
    )


@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.3, 2.0])
@pytest.mark.parametrize("seed", range(3))
def test_repetition_penalty_matches_transformers(penalty: float, seed: int) -> None:
    logits = _logits(seed)
    seen = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(seed))
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(seen[None], logits[None].clone())[0]
    assert _same(apply_repetition_penalty(logits, seen, penalty), theirs)


@pytest.mark.parametrize("top_k", [1, 5, 50, 999])
@pytest.mark.parametrize("seed", range(3))
def test_top_k_matches_transformers(top_k: int, seed: int) -> None:
    logits = _logits(seed)
    theirs = TopKLogitsWarper(top_k)(None, logits[None].clone())[0]
    assert _same(apply_top_k(logits, top_k), theirs)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_top_p_matches_transformers(top_p: float, seed: int) -> None:
    logits = _logits(seed)
    theirs = TopPLogitsWarper(top_p)(None, logits[None].clone())[0]
    assert _same(apply_top_p(logits, top_p), theirs)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "penalty"),
    [(0.7, 0, 1.0, 1.0), (1.3, 20, 0.9, 1.2), (0.5, 5, 0.5, 1.5), (1.0, 0, 0.8, 1.1)],
)
def test_pipeline_matches_transformers_order(temperature, top_k, top_p, penalty) -> None:
    logits = _logits(7)
    seen = torch.arange(0, 30)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=penalty)
    theirs = logits[None].clone()
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(seen[None], theirs)
    theirs = TemperatureLogitsWarper(temperature)(None, theirs)
    if top_k:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    theirs = TopPLogitsWarper(top_p)(None, theirs)
    assert _same(process_logits(logits, params, seen), theirs[0])


def test_greedy_is_argmax_after_penalty() -> None:
    logits = torch.zeros(10)
    logits[3], logits[4] = 2.0, 1.9
    params = SamplingParams(repetition_penalty=1.2)
    assert choose_token(logits, params, torch.tensor([3]), None) == 4
    assert choose_token(logits, SamplingParams(), torch.tensor([3]), None) == 3


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.8, 8, 0.9)])
def test_sampled_frequencies_follow_the_distribution(temperature, top_k, top_p) -> None:
    logits = torch.randn(12, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=11)
    probs = process_logits(logits, params, torch.empty(0, dtype=torch.long)).softmax(-1)
    generator = make_generator(11, torch.device("cpu"))
    draws = 20_000
    counts = torch.zeros(12)
    for _ in range(draws):
        counts[choose_token(logits, params, torch.empty(0, dtype=torch.long), generator)] += 1
    support = probs > 0
    assert counts[~support].sum() == 0  # filtered tokens are never drawn
    result = chisquare(counts[support].numpy(), (probs[support] * draws).numpy())
    assert result.pvalue > 1e-3, result


def test_same_seed_same_draws() -> None:
    logits = _logits(1)
    params = SamplingParams(temperature=1.0, seed=5)
    empty = torch.empty(0, dtype=torch.long)

    def draw() -> list[int]:
        generator = make_generator(5, torch.device("cpu"))
        return [choose_token(logits, params, empty, generator) for _ in range(20)]

    assert draw() == draw()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(max_new_tokens=0), "max_new_tokens must be > 0"),
        (SamplingParams(max_new_tokens=-3), "max_new_tokens must be > 0"),
        (SamplingParams(max_new_tokens=10**9), "exceeds the limit 512"),
        (SamplingParams(temperature=-0.1), "temperature must be a finite number >= 0"),
        (SamplingParams(temperature=math.nan), "temperature must be a finite number >= 0"),
        (SamplingParams(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (SamplingParams(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (SamplingParams(top_p=math.nan), r"top_p must be in \(0, 1\]"),
        (SamplingParams(top_k=-1), "top_k must be an integer >= 0"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty must be"),
        (SamplingParams(repetition_penalty=1e-40), "repetition_penalty must be"),
        (SamplingParams(temperature=1e-40), "temperature must be 0 .greedy. or >= 0.001"),
        (SamplingParams(temperature=1.0, seed=2**64), r"seed must be an integer in \[0, 2\*\*64\)"),
        (SamplingParams(temperature=1.0, seed=-1), "seed must be"),
        (SamplingParams(stop=tuple(str(i) for i in range(17))), "at most 16 stop strings"),
        (SamplingParams(stop=("x" * 257,)), "stop string of 257 bytes exceeds 256"),
        (SamplingParams(stop=("侬" * 86,)), "stop string of 258 bytes exceeds 256"),
        (SamplingParams(stop=("",)), "non-empty"),
    ],
)
def test_invalid_settings_are_named(params: SamplingParams, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        params.validate(max_new_tokens_limit=512)
