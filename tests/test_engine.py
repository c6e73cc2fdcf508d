"""Engine behaviour on the tiny model: batching, joining, chunked prefill, streaming,
cancellation, deadlines, faults, bad input, leaks and admission order."""

from __future__ import annotations

import asyncio
import gc
import math
import threading
import time
from pathlib import Path

import pytest
import torch

from server.basemodel import load_base_model
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.peft_adapter import read_peft_adapter
from server.engine.request import FinishReason, GenerationRequest, GenerationResult, TokenChunk
from server.engine.sampling import SamplingParams
from server.errors import EngineFault, EngineStopped, InvalidOption, InvalidRequest, QueueFull
from tests.lora_helpers import assert_same_greedy, top2_margins
from tests.polling import wait_for
from tests.support import ALL_TARGETS, make_random_adapter


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("tiny-adapters")
    return [
        make_random_adapter(tiny_model_dir, out / f"a{i}", rank=(4, 8)[i % 2],
                            targets=ALL_TARGETS if i % 2 else ("q_proj", "v_proj"),
                            seed=100 + i, b_std=0.5)
        for i in range(4)
    ]


@pytest.fixture
def make_engine(tiny_model_dir: Path, tiny_adapters: list[Path]):
    engines: list[Engine] = []

    def factory(**overrides) -> Engine:
        start = overrides.pop("start", True)
        settings = dict(max_batch_size=8, max_model_len=512, max_loras=4, max_lora_rank=8)
        settings.update(overrides)
        loaded = load_base_model(tiny_model_dir, dtype="float32")
        engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(**settings), start=start)
        for slot, path in enumerate(tiny_adapters):
            engine.slots.load(slot, read_peft_adapter(path))
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        engine.stop()


def prompt(tokenizer, i: int, length: int | None = None) -> list[int]:
    ids = tokenizer.encode(f"Caller {i} says: 侬好, order {i * 37} is late again.",
                           add_special_tokens=False)
    if length is not None:
        ids = (ids * (length // len(ids) + 1))[:length]
    return ids


def greedy(ids: list[int], n: int = 8, slot: int | None = None, scale: float = 1.0,
           **kwargs) -> GenerationRequest:
    return GenerationRequest(ids, SamplingParams(max_new_tokens=n), adapter=slot,
                             weight_scale=scale, record_logits=True, **kwargs)


def assert_same_output(reference: GenerationResult, other: GenerationResult) -> None:
    """The tolerance rule, with ``reference`` (run with record_logits) as the oracle."""
    assert reference.logits is not None
    assert_same_greedy(reference.token_ids, top2_margins(reference.logits), other.token_ids)


# --- batch invariance and real joining -------------------------------------------------


def test_output_is_the_same_alone_in_a_full_batch_and_when_joining(make_engine, tokenizer):
    engine = make_engine()
    target = greedy(prompt(tokenizer, 1), n=8, slot=1, scale=0.8)
    alone = engine.generate(target, timeout=60)

    # Full mixed batch: 8 rows, base and 4 adapters at several scales.
    others = [greedy(prompt(tokenizer, 10 + i), n=8, slot=(i % 5) - 1 if i % 5 else None,
                     scale=(0.5, 1.0, 1.5)[i % 3]) for i in range(7)]
    handles = [engine.submit(r) for r in others[:3]]
    batched = engine.submit(greedy(prompt(tokenizer, 1), n=8, slot=1, scale=0.8))
    handles += [engine.submit(r) for r in others[3:]]
    assert_same_output(alone, batched.result(60))
    for h in handles:
        h.result(60)

    # Joining a batch that is already decoding.
    steps_before = engine.steps
    early = [engine.submit(greedy(prompt(tokenizer, 20 + i), n=40)) for i in range(4)]
    wait_for(lambda: engine.steps >= steps_before + 4)  # prefilled, then decoding
    late = engine.submit(greedy(prompt(tokenizer, 1), n=8, slot=1, scale=0.8))
    late_result = late.result(60)
    assert_same_output(alone, late_result)
    for h in early:
        h.result(60)

    trace = list(engine.trace)
    late_steps = [s for s in trace if late.request_id in s.rows]
    early_ids = {h.request_id for h in early}
    # The late row shared decode steps with rows that were admitted before it.
    assert any(early_ids & set(s.rows) for s in late_steps)
    first_late = late_steps[0]
    assert first_late.prefill_tokens == {late.request_id: len(late.request.prompt_ids)}
    assert early_ids <= set(first_late.rows)  # the batch kept decoding while it joined
    # Nobody's KV cache was recomputed: prefill tokens add up to the prompt lengths.
    all_requests = [target, *others, batched.request, *[h.request for h in early], late.request]
    assert sum(sum(s.prefill_tokens.values()) for s in trace) == sum(
        len(r.prompt_ids) for r in all_requests
    )


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(make_engine, tokenizer):
    engine = make_engine(prefill_chunk_size=32, max_num_batched_tokens=40)
    short = engine.submit(greedy(prompt(tokenizer, 2), n=30))
    wait_for(lambda: engine.steps >= 2)
    long = engine.submit(greedy(prompt(tokenizer, 3, length=200), n=4))
    long_result = long.result(60)
    short.result(60)
    chunks = [s.prefill_tokens[long.request_id] for s in engine.trace
              if long.request_id in s.prefill_tokens]
    assert sum(chunks) == 200 and max(chunks) <= 32 and len(chunks) >= 7
    prefill_steps = [s for s in engine.trace if long.request_id in s.prefill_tokens]
    assert all(short.request_id in s.rows for s in prefill_steps[:5])  # the stream kept going
    alone = make_engine().generate(greedy(prompt(tokenizer, 3, length=200), n=4), timeout=60)
    assert_same_output(alone, long_result)


# --- streaming ----------------------------------------------------------------------------


def test_stream_concatenates_to_the_unary_text(make_engine, tokenizer):
    engine = make_engine()
    request = GenerationRequest(prompt(tokenizer, 4), SamplingParams(
        max_new_tokens=24, temperature=0.9, top_p=0.95, seed=1234))

    async def collect() -> tuple[list[TokenChunk], GenerationResult]:
        chunks: list[TokenChunk] = []
        final = None
        async for event in engine.submit(request).stream():
            if isinstance(event, TokenChunk):
                chunks.append(event)
            else:
                final = event
        assert final is not None
        return chunks, final

    chunks, final = asyncio.run(collect())
    assert "".join(c.text for c in chunks) == final.text
    assert sum(len(c.token_ids) for c in chunks) == final.completion_tokens - (
        final.finish_reason == FinishReason.EOS)
    # Same seed, same output, whoever shares the batch.
    again = [engine.submit(GenerationRequest(prompt(tokenizer, 4), request.sampling))
             for _ in range(3)]
    noise = [engine.submit(greedy(prompt(tokenizer, 30 + i), n=20)) for i in range(3)]
    for handle in again:
        assert handle.result(60).token_ids == final.token_ids
    for handle in noise:
        handle.result(60)


def test_stop_string_ends_generation(make_engine, tokenizer):
    engine = make_engine()
    free = engine.generate(greedy(prompt(tokenizer, 5), n=24), timeout=60)
    text = free.text
    assert len(text) > 6
    stop = text[3:6]
    stopped = engine.generate(GenerationRequest(
        prompt(tokenizer, 5), SamplingParams(max_new_tokens=24, stop=(stop,))), timeout=60)
    assert stopped.finish_reason == FinishReason.STOP
    assert stopped.text == text[: text.find(stop)]


# --- leaving the batch -------------------------------------------------------------------


def test_cancel_leaves_within_one_step(make_engine, tokenizer):
    engine = make_engine()
    keep = engine.submit(greedy(prompt(tokenizer, 6), n=60))
    victim = engine.submit(greedy(prompt(tokenizer, 7), n=400))
    wait_for(lambda: sum(victim.request_id in s.rows for s in engine.trace) >= 3)
    victim.cancel()
    cancelled_at = engine.steps
    result = victim.result(30)
    assert result.finish_reason == FinishReason.CANCELLED
    later = [s for s in engine.trace if s.step > cancelled_at and victim.request_id in s.rows]
    assert later == []  # at most the step already running when cancel() was called
    assert keep.result(60).finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
    wait_for(lambda: engine.stats()["free_kv_rows"] == engine.config.max_batch_size)


def test_deadline_ends_running_and_queued_requests(make_engine, tokenizer):
    engine = make_engine(max_batch_size=1)
    soon = time.monotonic() + 0.3
    running = engine.submit(greedy(prompt(tokenizer, 8), n=400, deadline=soon))
    queued = engine.submit(greedy(prompt(tokenizer, 9), n=4, deadline=soon))
    assert running.result(30).finish_reason == FinishReason.DEADLINE
    assert queued.result(30).finish_reason == FinishReason.DEADLINE
    assert engine.generate(greedy(prompt(tokenizer, 9), n=4), 30).completion_tokens == 4


def test_fault_in_a_step_ends_only_its_rows(make_engine, tokenizer):
    engine = make_engine(max_batch_size=2)
    fault_step: list[int] = []

    def hook(step: int) -> None:
        if fault_step and step == fault_step[0]:
            raise RuntimeError("injected fault")

    engine.fault_hook = hook
    running = [engine.submit(greedy(prompt(tokenizer, 11 + i), n=200)) for i in range(2)]
    wait_for(lambda: engine.steps >= 3)
    queued = engine.submit(greedy(prompt(tokenizer, 13), n=4))  # waits: the batch is full
    fault_step.append(engine.steps + 1)
    for handle in running:
        with pytest.raises(EngineFault, match="injected fault"):
            handle.result(30)
    assert queued.result(30).completion_tokens == 4  # not in the faulted step
    assert engine.generate(greedy(prompt(tokenizer, 14), n=4), 30).completion_tokens == 4
    assert engine.stats()["free_kv_rows"] == 2


def test_many_sequential_requests_leak_nothing(make_engine, tokenizer):
    engine = make_engine(trace_capacity=16)
    ids = prompt(tokenizer, 15)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    for i in range(50):  # warm-up: lazy allocations, generators, caches
        engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=4, seed=i,
                                                             temperature=1.0)), 30)
    baseline, kv_bytes = live_tensors(), engine.cache.nbytes
    for i in range(1000):
        result = engine.generate(GenerationRequest(
            ids, SamplingParams(max_new_tokens=4, temperature=1.0, seed=i),
            adapter=i % 4 if i % 3 else None), 30)
        assert result.completion_tokens >= 1
    assert live_tensors() <= baseline + 5
    assert engine.cache.nbytes == kv_bytes
    stats = engine.stats()
    assert (stats["running"], stats["waiting"], stats["free_kv_rows"]) == (0, 0, 8)


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(weight_scale=-0.5), "weight_scale must be a finite number >= 0"),
        (dict(weight_scale=math.nan), "weight_scale must be a finite number >= 0"),
        (dict(weight_scale=math.inf), "weight_scale must be a finite number >= 0"),
        (dict(weight_scale=9.0), "weight_scale 9.0 exceeds the limit 4.0"),
        (dict(sampling=SamplingParams(top_p=1.5)), r"top_p must be in \(0, 1\]"),
        (dict(sampling=SamplingParams(top_p=0)), r"top_p must be in \(0, 1\]"),
        (dict(sampling=SamplingParams(max_new_tokens=0)), "max_new_tokens must be > 0"),
        (dict(sampling=SamplingParams(max_new_tokens=500)), "exceeds max_model_len 512"),
        (dict(sampling=SamplingParams(stop=("a",) * 17)), "at most 16 stop strings"),
        (dict(sampling=SamplingParams(stop=("a" * 300,))), "300 bytes exceeds 256"),
        (dict(adapter=9), r"unknown adapter slot 9 \(loaded: \[0, 1, 2, 3\]\)"),
        (dict(adapter=-1), "unknown adapter slot -1"),
        (dict(prompt_ids=[]), "prompt is empty"),
        (dict(prompt_ids=[10**9]), "token ids outside"),
    ],
)
def test_bad_input_is_refused_and_others_keep_running(make_engine, tokenizer, change, message):
    engine = make_engine()
    running = engine.submit(greedy(prompt(tokenizer, 16), n=30))
    fields = dict(prompt_ids=prompt(tokenizer, 17), sampling=SamplingParams(max_new_tokens=4))
    fields.update(change)
    with pytest.raises(InvalidRequest, match=message):
        engine.submit(GenerationRequest(**fields))
    assert running.result(60).completion_tokens >= 1


def test_queue_full_and_stopped(make_engine, tokenizer):
    engine = make_engine(max_queue_size=2, start=False)
    handles = [engine.submit(greedy(prompt(tokenizer, i), n=2)) for i in range(2)]
    with pytest.raises(QueueFull, match="wait queue is full"):
        engine.submit(greedy(prompt(tokenizer, 3), n=2))
    engine.start()
    for handle in handles:
        assert handle.result(30).completion_tokens == 2
    engine.stop()
    with pytest.raises(EngineStopped):
        engine.submit(greedy(prompt(tokenizer, 3), n=2))


def test_bad_engine_settings_are_named() -> None:
    with pytest.raises(InvalidOption, match="max_batch_size must be > 0"):
        EngineConfig(max_batch_size=0)
    with pytest.raises(InvalidOption, match="unknown module 'lm_head'"):
        EngineConfig(target_modules=("q_proj", "lm_head"))


# --- admission order -------------------------------------------------------------------------


class GatedBinding:
    """An adapter slot that becomes available only when the test opens the gate."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.gate = threading.Event()
        self.released = threading.Event()

    def try_acquire_slot(self) -> int | None:
        return self.slot if self.gate.is_set() else None

    def release(self) -> None:
        self.released.set()


def test_waiting_request_is_passed_then_protected_by_aging(make_engine, tokenizer):
    engine = make_engine(aging_limit_s=0.3)
    gated = GatedBinding(slot=2)
    blocked = engine.submit(GenerationRequest(prompt(tokenizer, 18),
                                              SamplingParams(max_new_tokens=2), adapter=gated))
    passer = engine.submit(greedy(prompt(tokenizer, 19), n=2))
    assert passer.result(30).completion_tokens == 2  # FCFS among admissible: it passed
    assert not blocked.done.is_set()
    submitted = blocked.request_id and time.monotonic()
    wait_for(lambda: time.monotonic() - submitted > 0.35)  # the blocked request ages
    held = engine.submit(greedy(prompt(tokenizer, 20), n=2))
    rounds = engine.stats()["admission_rounds"]
    wait_for(lambda: engine.stats()["admission_rounds"] >= rounds + 5)
    assert not held.done.is_set()  # nobody passes a request that has waited too long
    gated.gate.set()
    assert blocked.result(30).completion_tokens == 2
    assert held.result(30).completion_tokens == 2
    assert gated.released.is_set()
