"""Composition: several adapters with their own scales on one row, unmerged, in mixed
batches. The reference semantics, for a row with adapters (s1, c1) ... (sk, ck)::

    y = base(x) + sum_i c_i * scaling_i * B_i A_i x

is PEFT with every adapter of the row active at once, each scaled (``set_scale``).
One batch mixes compositions of 2 and 3 adapters of different ranks and targets at
scales 0.5 / 1.0 / 1.5 with single-adapter and base rows; teacher-forced along PEFT's
greedy path every step's logits must match within the oracle tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from server.basemodel import load_base_model
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.peft_adapter import read_peft_adapter
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from server.errors import InvalidRequest
from tests.lora_helpers import PeftOracle, assert_same_greedy
from tests.support import ALL_TARGETS, make_random_adapter, run_client_threads
from tests.test_engine_oracle import PROMPTS

SPECS = {"r4_qv": (4, ("q_proj", "v_proj")), "r8_all": (8, ALL_TARGETS),
         "r16_mlp": (16, ("gate_proj", "up_proj", "down_proj")), "r8_q": (8, ("q_proj",))}
# (adapters with scales, prompt index); () is the base model
CASES: list[tuple[tuple[tuple[str, float], ...], int]] = [
    ((("r4_qv", 1.0), ("r8_all", 0.5)), 0),
    ((("r8_all", 1.0),), 0),
    ((("r16_mlp", 1.5), ("r4_qv", 0.5), ("r8_q", 1.0)), 1),
    ((), 2),
    ((("r8_all", 1.5), ("r16_mlp", 1.0)), 2),
    ((("r4_qv", 0.5),), 3),
    ((("r8_q", 0.5), ("r8_all", 1.0), ("r4_qv", 1.5)), 3),
    ((("r16_mlp", 0.5), ("r8_q", 1.5)), 1),
]


@pytest.mark.parametrize("decode", ["fused", "eager"])
def test_compositions_match_peft_with_several_active_adapters(decode: str,
                                                              tiny_model_dir: Path,
                                                              tmp_path: Path) -> None:
    adapters = {name: make_random_adapter(tiny_model_dir, tmp_path / name, rank, targets,
                                          seed=i, b_std=0.5)
                for i, (name, (rank, targets)) in enumerate(SPECS.items())}
    served = load_base_model(tiny_model_dir, dtype="float32")
    tokenizer = served.tokenizer
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    oracle = PeftOracle(load_base_model(tiny_model_dir, dtype="float32").model, adapters)
    refs = [oracle.greedy_composed(prompts[p], uses, 8) if uses else
            oracle.greedy(prompts[p], None, 0.0, 8) for uses, p in CASES]
    # composing really adds: a pair differs from each of its parts
    pair = oracle.greedy_composed(prompts[0], [("r4_qv", 1.0), ("r8_all", 0.5)], 1).logits[0]
    for part in (("r4_qv", 1.0), ("r8_all", 0.5)):
        alone = oracle.greedy_composed(prompts[0], [part], 1).logits[0]
        assert (pair - alone).abs().max() > 0.1

    engine = Engine(served.model, tokenizer, EngineConfig(
        max_batch_size=len(CASES), max_model_len=128, max_loras=4, max_lora_rank=16,
        decode=decode))
    try:
        slot_of = {}
        for slot, (name, path) in enumerate(adapters.items()):
            engine.slots.load(slot, read_peft_adapter(path))
            slot_of[name] = slot

        def request(case: int, forced: list[int] | None) -> GenerationRequest:
            uses, p = CASES[case]
            first = uses[0] if uses else None
            return GenerationRequest(
                prompts[p], SamplingParams(max_new_tokens=8),
                adapter=None if first is None else slot_of[first[0]],
                weight_scale=first[1] if first else 1.0,
                composed=tuple((slot_of[n], c) for n, c in uses[1:]),
                forced_tokens=forced, record_logits=True)

        handles = [engine.submit(request(i, refs[i].tokens)) for i in range(len(CASES))]
        worst = 0.0
        for ref, handle in zip(refs, handles, strict=True):
            result = handle.result(timeout=300)
            assert result.token_ids == tuple(ref.tokens) and result.logits is not None
            for ours, theirs in zip(result.logits, ref.logits, strict=True):
                worst = max(worst, float((ours - theirs).abs().max()))
        assert worst <= 1e-4, f"max |Δlogit| {worst:.2e}"
        handles = [engine.submit(request(i, None)) for i in range(len(CASES))]
        for ref, handle in zip(refs, handles, strict=True):
            assert_same_greedy(ref.tokens, ref.margins(), handle.result(timeout=300).token_ids)
    finally:
        engine.stop()


def test_a_composition_beyond_the_limits_is_refused(tiny_model_dir: Path,
                                                    tmp_path: Path) -> None:
    served = load_base_model(tiny_model_dir, dtype="float32")
    adapter = read_peft_adapter(make_random_adapter(tiny_model_dir, tmp_path / "a", 4,
                                                    ("q_proj",), seed=0))
    engine = Engine(served.model, served.tokenizer, EngineConfig(
        max_batch_size=2, max_model_len=128, max_loras=8, max_adapters_per_request=16),
        start=False)
    for slot in range(8):
        engine.slots.load(slot, adapter)
    ids = [1, 2, 3]

    def composed(slots: list[int], scales: list[float] | None = None) -> GenerationRequest:
        scales = scales or [1.0] * len(slots)
        return GenerationRequest(ids, adapter=slots[0], weight_scale=scales[0],
                                 composed=tuple(zip(slots[1:], scales[1:], strict=True)))

    with pytest.raises(InvalidRequest, match="9 adapters on one request; at most 8"):
        engine.submit(composed([0, 1, 2, 3, 4, 5, 6, 7, 0]))
    with pytest.raises(InvalidRequest, match="composed twice"):
        engine.submit(composed([0, 1, 0]))
    with pytest.raises(InvalidRequest, match="weight_scale must be a finite number >= 0"):
        engine.submit(composed([0, 1], [1.0, -0.5]))
    engine.submit(composed(list(range(8))))  # eight is allowed
    engine.stop()


def test_200_composed_and_single_requests_over_8_slots_and_12_adapters(
        tiny_model_dir: Path, tmp_path: Path, tokenizer) -> None:
    """Client threads send single and composed requests (2-4 adapters) through the
    adapter cache: every slot acquisition is all or nothing, so nothing deadlocks, every
    answer matches PEFT with the same adapters active, and nothing stays pinned."""
    import random
    import time

    from tests.adapter_fixtures import serve

    root = tmp_path / "adapters"
    library = {f"c{i:02d}": make_random_adapter(
        tiny_model_dir, root / f"c{i:02d}", rank=(4, 8, 16)[i % 3],
        targets=ALL_TARGETS if i % 2 else ("q_proj", "v_proj"), seed=50 + i, b_std=0.5)
        for i in range(12)}
    names = sorted(library)
    served = serve(tiny_model_dir, root, max_loras=8, max_cpu_adapters=12)
    texts = ["侬今朝吃饭伐?", "Where is my parcel?", "你食咗飯未呀?", "Refund order 4471"]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    try:
        rng = random.Random(11)
        jobs = [(tuple((name, rng.choice([0.5, 1.0, 1.5]))
                       for name in rng.sample(names, rng.choice([1, 1, 2, 2, 3, 4]))),
                 rng.randrange(len(prompts))) for _ in range(200)]
        assert sum(len(uses) > 1 for uses, _ in jobs) > 100
        oracle = PeftOracle(load_base_model(tiny_model_dir, dtype="float32").model, library)
        references = {job: oracle.greedy_composed(prompts[job[1]], job[0], 4)
                      for job in set(jobs)}
        results: dict[int, tuple[int, ...]] = {}
        errors: list[BaseException] = []

        def client(indexes: list[int]) -> None:
            try:
                handles = []
                for i in indexes:
                    uses, p = jobs[i]
                    leases = [served.cache.lease(name) for name, _ in uses]
                    handles.append((i, served.engine.submit(GenerationRequest(
                        prompts[p], SamplingParams(max_new_tokens=4), adapter=leases[0],
                        weight_scale=uses[0][1],
                        composed=tuple((lease, c) for lease, (_, c) in
                                       zip(leases[1:], uses[1:], strict=True))))))
                for i, handle in handles:
                    results[i] = handle.result(timeout=300).token_ids
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        started = time.monotonic()
        run_client_threads(client, 200, threads=8, timeout=300)
        assert not errors, errors[0]
        assert len(results) == 200
        for i, job in enumerate(jobs):
            ref = references[job]
            assert_same_greedy(ref.tokens, ref.margins(), results[i])
        usage = served.cache.usage()
        assert usage["version_pins"] == 0 and usage["slot_pins"] == 0
        assert served.cache.stats.device_evictions > 0  # 12 adapters really shared 8 slots
        assert served.engine.stats()["free_kv_rows"] == 8
        print(f"200 requests in {time.monotonic() - started:.1f} s")
    finally:
        served.close()
