"""Retention control sets and metrics (trainer/retention.py) on the trainable tiny model
(its logits are not near-uniform, so an adapter can cost perplexity): the engine's
perplexity (prefill log-probabilities) equals a plain forward's, scale 0 is the base,
and a loud adapter's cost shows."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from server.basemodel import load_base_model
from tests.support import ALL_TARGETS, make_random_adapter
from trainer.retention import load_control_sets, perplexity, retention
from trainer.scoring import EngineGenerator

WINDOW = 32


def test_the_shipped_control_sets() -> None:
    sets = load_control_sets()
    assert len(sets.mandarin) == 60 and len(sets.english) == 60
    assert len({r.text for r in sets.mandarin}) == 60 and len(sets.text) > 5000


@pytest.fixture(scope="module")
def generator(trainable_tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("retention")
    make_random_adapter(str(trainable_tiny_dir), root / "loud", 8, ALL_TARGETS, seed=5, b_std=4.0)
    loaded = load_base_model(trainable_tiny_dir, dtype="float32")
    generator = EngineGenerator(loaded.model, loaded.tokenizer, loaded.base_fingerprint,
                                [root], max_new_tokens=WINDOW, max_model_len=128)
    yield generator
    generator.close()


def test_engine_perplexity_equals_a_plain_forward(generator, trainable_tiny_dir: Path) -> None:
    tokens = generator.tokenizer.encode(load_control_sets().text,
                                        add_special_tokens=False)[: 4 * WINDOW + 5]
    ours = perplexity(generator, tokens, None, 0.0, window=WINDOW)
    model = load_base_model(trainable_tiny_dir, dtype="float32").model
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens), WINDOW):
            ids = tokens[start : start + WINDOW]
            if len(ids) < 2:
                continue
            logits = model(torch.tensor([ids])).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(
                logits, torch.tensor(ids[1:]), reduction="sum"))
            count += len(ids) - 1
    assert ours == pytest.approx(math.exp(total / count), rel=1e-4)
    assert perplexity(generator, tokens, "loud", 0.0, window=WINDOW) == \
        pytest.approx(ours, rel=1e-6)  # scale 0 is the base


def test_retention_reports_the_cost_per_scale(generator) -> None:
    sets = load_control_sets()
    sets = type(sets)(mandarin=sets.mandarin[:6], english=sets.english[:6],
                      text=sets.text[:1500])
    report = retention(generator, sets, "Translate: {text}\n", "loud", [0.0, 1.5],
                       window=WINDOW)
    zero, loud = report["by_scale"]["0"], report["by_scale"]["1.5"]
    assert zero["mandarin_chrf_drop"] == 0 and zero["english_chrf_drop"] == 0
    assert zero["perplexity_increase_pct"] == pytest.approx(0, abs=1e-3)
    assert loud["perplexity_increase_pct"] > 5, report  # a loud random adapter costs


def test_a_row_too_long_to_submit_leaves_no_lease_held(generator) -> None:
    """One control row longer than max_model_len makes the retention run fail at submit;
    the runs it already started are cancelled and every lease, the failed row's too, is
    given back (none would be otherwise: the adapter would stay pinned for good)."""
    from server.errors import InvalidRequest
    from tests.polling import wait_for
    from trainer.rows import Row

    sets = load_control_sets()
    long_row = Row(text="侬今朝吃饭伐? " * 200, label="x", where="test:1")
    sets = type(sets)(mandarin=[*sets.mandarin[:3], long_row], english=sets.english[:3],
                      text=sets.text[:600])
    with pytest.raises(InvalidRequest, match="exceeds max_model_len"):
        retention(generator, sets, "Translate: {text}\n", "loud", [1.0], window=WINDOW)
    wait_for(lambda: generator.cache.usage()["version_pins"] == 0, timeout=60)
    usage = generator.cache.usage()
    assert usage["slot_pins"] == 0 and usage["version_pins"] == 0
    # and the generator still serves
    assert perplexity(generator, generator.tokenizer.encode(
        sets.text, add_special_tokens=False)[:WINDOW], "loud", 1.0, window=WINDOW) > 0


@pytest.mark.parametrize("case", ["too-long", "unknown-composed"])
def test_a_failed_submit_gives_back_every_lease(generator, case) -> None:
    """EngineGenerator.submit (retention, make eval, composition eval) takes an adapter
    lease per row before the engine takes the row: a row the engine refuses, or a
    composed adapter that cannot load, must not leave leases held, and the rows already
    started are cancelled."""
    from server.errors import AdapterNotFound, InvalidRequest
    from tests.polling import wait_for

    ok = generator.tokenizer.encode("Translate: 侬好\n", add_special_tokens=False)
    if case == "too-long":
        prompts, composed = [ok, ok, ok * 40], ()
        error: type[Exception] = InvalidRequest
    else:
        prompts, composed = [ok, ok], (("ghost", 0.5),)
        error = AdapterNotFound
    with pytest.raises(error):
        generator.submit(prompts, "loud", 1.0, composed=composed)
    wait_for(lambda: generator.cache.usage()["version_pins"] == 0, timeout=60)
    assert generator.cache.usage()["slot_pins"] == 0
