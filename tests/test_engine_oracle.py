"""Batched multi-LoRA outputs equal PEFT running each adapter alone (the oracle).

One batch mixes base-only rows and adapters of ranks 4, 8 and 16 (q,v only and all
seven targets) at scales 0, 0.5, 1 and 1.5. Teacher-forced along PEFT's greedy path,
every step's logits must match; free-running greedy tokens must be identical except
after a step where PEFT's own top-2 margin is under 1e-3 (a coin flip in fp32).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from server.basemodel import LoadedBaseModel, load_base_model
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.peft_adapter import read_peft_adapter
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from tests.lora_helpers import PeftOracle, assert_same_greedy
from tests.support import ALL_TARGETS, make_random_adapter

ADAPTER_SPECS = {  # name: (rank, targets)
    "r4_qv": (4, ("q_proj", "v_proj")),
    "r8_all": (8, ALL_TARGETS),
    "r16_all": (16, ALL_TARGETS),
}
# (adapter or None for the base, weight_scale, prompt index)
CASES = [
    (None, 1.0, 0),
    ("r4_qv", 0.0, 0),  # scale 0 must equal the base row above exactly
    ("r4_qv", 0.5, 1),
    ("r8_all", 1.0, 2),
    ("r16_all", 1.5, 3),
    ("r8_all", 0.5, 0),
    ("r16_all", 1.0, 1),
    ("r4_qv", 1.5, 2),
    (None, 1.0, 3),
]
PROMPTS = [
    "Translate Wu dialect to English: 侬今朝吃饭伐?\n",
    "The weather in Shanghai today is",
    "Translate Cantonese to English: 你食咗飯未呀?\n",
    "Order number 4471 was delivered to",
]


def make_adapters(base_dir: Path, out: Path, b_std: float) -> dict[str, Path]:
    return {
        name: make_random_adapter(base_dir, out / name, rank, targets, seed=i, b_std=b_std)
        for i, (name, (rank, targets)) in enumerate(ADAPTER_SPECS.items())
    }


def run_oracle(
    served: LoadedBaseModel, oracle_base: torch.nn.Module, adapters: dict[str, Path],
    tolerance: float, max_new_tokens: int, decode: str = "fused",
) -> dict[str, float]:
    tokenizer = served.tokenizer
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    oracle = PeftOracle(oracle_base, adapters)

    # The adapters really change the output, and differ from each other.
    base_logits = oracle.logits(prompts[0], None, 1.0)
    adapted = {name: oracle.logits(prompts[0], name, 1.0) for name in adapters}
    for name, logits in adapted.items():
        assert (logits - base_logits).abs().max() >= 0.1, f"{name} barely changes the base"
    names = list(adapted)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (adapted[a] - adapted[b]).abs().max() >= 0.1, f"{a} and {b} are alike"

    refs = [oracle.greedy(prompts[p], name, scale, max_new_tokens) for name, scale, p in CASES]

    engine = Engine(served.model, tokenizer, EngineConfig(
        max_batch_size=len(CASES), max_model_len=128, max_loras=4, max_lora_rank=16,
        decode=decode,
        # one bucket: the compile thread builds its base graph, then the adapted one
        compiled_batch_sizes=(len(CASES),),
    ))
    try:
        slot_of = {}
        for slot, (name, path) in enumerate(adapters.items()):
            engine.slots.load(slot, read_peft_adapter(path))
            slot_of[name] = slot
        compiled = getattr(engine.runner, "compiled", None)
        if decode == "compiled":  # every case decodes in one batch: build that graph first
            assert compiled is not None
            variant = compiled.variant(len(CASES), adapted=True)
            assert compiled.wait_ready([variant], timeout=1800), compiled.failures

        def request(case_index: int, forced: list[int] | None) -> GenerationRequest:
            name, scale, p = CASES[case_index]
            return GenerationRequest(
                prompts[p], SamplingParams(max_new_tokens=max_new_tokens),
                adapter=None if name is None else slot_of[name], weight_scale=scale,
                forced_tokens=forced, record_logits=True,
            )

        # Teacher-forced along PEFT's greedy path, all cases in one batch.
        handles = [engine.submit(request(i, refs[i].tokens)) for i in range(len(CASES))]
        forced = [h.result(timeout=600) for h in handles]
        worst = 0.0
        for ref, res in zip(refs, forced, strict=True):
            assert res.token_ids == tuple(ref.tokens)
            assert res.logits is not None and len(res.logits) == len(ref.logits)
            for ours, theirs in zip(res.logits, ref.logits, strict=True):
                worst = max(worst, float((ours - theirs).abs().max()))
        assert worst <= tolerance, f"max |Δlogit| {worst:.2e} > {tolerance:.0e}"
        # Scale 0 is the base model, up to fp32 GEMM rounding at another batch position
        # (blocked BLAS kernels round rows differently): a tenth of the oracle tolerance.
        scale0 = max(float((a - b).abs().max())
                     for a, b in zip(forced[0].logits, forced[1].logits, strict=True))
        assert scale0 <= tolerance / 10, f"scale 0 differs from the base row by {scale0:.2e}"

        # Free-running greedy in one batch: same tokens unless PEFT's choice was fragile.
        handles = [engine.submit(request(i, None)) for i in range(len(CASES))]
        fragile = sum(
            assert_same_greedy(ref.tokens, ref.margins(), handle.result(timeout=600).token_ids)
            for ref, handle in zip(refs, handles, strict=True)
        )
        if compiled is not None:
            assert compiled.steps_run > 0, "no step went through the compiled graph"
        return {"max_abs_logit_diff": worst, "scale0_vs_base": scale0,
                "fragile_divergences": fragile}
    finally:
        engine.stop()


@pytest.mark.parametrize("decode", ["fused", "eager", "compiled"])
def test_oracle_tiny_fp32(decode: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    adapters = make_adapters(tiny_model_dir, tmp_path, b_std=0.5)
    served = load_base_model(tiny_model_dir, dtype="float32")
    oracle_base = load_base_model(tiny_model_dir, dtype="float32").model
    stats = run_oracle(served, oracle_base, adapters, tolerance=1e-4, max_new_tokens=8,
                       decode=decode)
    print(f"tiny fp32 oracle ({decode}):", stats)


def test_oracle_tiny_nf4(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapters = make_adapters(tiny_model_dir, tmp_path, b_std=0.5)
    served = load_base_model(tiny_model_dir, dtype="float32", quantize="nf4")
    oracle_base = load_base_model(tiny_model_dir, dtype="float32", quantize="nf4").model
    stats = run_oracle(served, oracle_base, adapters, tolerance=2e-3, max_new_tokens=8)
    print("tiny nf4 oracle:", stats)


@pytest.mark.parametrize("batch", [
    [("r16_all", 1.0, 0)],  # one slot of four in use: its stacks alone, a strided view
    [("r16_all", 1.5, 1), (None, 1.0, 0), ("r16_all", 0.5, 2)],  # one slot, a base row
    [("r4_qv", 1.0, 3), ("r8_all", 0.5, 1)],  # two slots of four: theirs gathered
])
def test_oracle_tiny_when_a_step_uses_some_slots(
        batch: list[tuple[str | None, float, int]], tiny_model_dir: Path,
        tmp_path: Path) -> None:
    """Decode steps whose rows use only some of the loaded slots read only those slots'
    stacks (LoraStep.used_slots); teacher-forced, they still match PEFT. (The eager
    path runs the same MultiLoraLinear.add_lora.)"""
    adapters = make_adapters(tiny_model_dir, tmp_path, b_std=0.5)
    served = load_base_model(tiny_model_dir, dtype="float32")
    oracle = PeftOracle(load_base_model(tiny_model_dir, dtype="float32").model, adapters)
    prompts = [served.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    refs = [oracle.greedy(prompts[p], name, scale, 6) for name, scale, p in batch]
    engine = Engine(served.model, served.tokenizer, EngineConfig(
        max_batch_size=4, max_model_len=128, max_loras=4, max_lora_rank=16))
    try:
        slot_of = {name: slot for slot, name in enumerate(adapters)}
        for name, path in adapters.items():
            engine.slots.load(slot_of[name], read_peft_adapter(path))
        handles = [engine.submit(GenerationRequest(
            prompts[p], SamplingParams(max_new_tokens=6),
            adapter=None if name is None else slot_of[name], weight_scale=scale,
            forced_tokens=ref.tokens, record_logits=True))
            for (name, scale, p), ref in zip(batch, refs, strict=True)]
        for ref, handle in zip(refs, handles, strict=True):
            result = handle.result(timeout=300)
            assert result.token_ids == tuple(ref.tokens)
            assert result.logits is not None
            worst = max(float((ours - theirs).abs().max())
                        for ours, theirs in zip(result.logits, ref.logits, strict=True))
            assert worst <= 1e-4, f"max |Δlogit| {worst:.2e}"
    finally:
        engine.stop()


def test_a_step_records_only_the_slots_its_rows_use(tiny_model_dir: Path,
                                                   tmp_path: Path) -> None:
    from server.engine.multi_lora import LoraSegment

    adapters = make_adapters(tiny_model_dir, tmp_path, b_std=0.5)
    served = load_base_model(tiny_model_dir, dtype="float32")
    engine = Engine(served.model, served.tokenizer, EngineConfig(max_loras=4),
                    start=False)
    for slot, path in enumerate(adapters.values()):
        engine.slots.load(slot, read_peft_adapter(path))
    slots = engine.slots
    slots.set_step([LoraSegment(0, 1, 2, 0.5), LoraSegment(1, 2, -1, 1.0),
                    LoraSegment(2, 3, 0, 1.0)])
    step = slots.state.step
    assert step is not None and step.used_slots == (0, 2)
    assert step.used_mask is not None and step.dense_mask is not None
    rank = step.rank  # rank-major: column r * used + j is used slot j's scale
    assert step.used_mask.shape == (3, rank * 2)
    assert step.used_mask[:, :2].tolist() == [[0.0, 0.5], [0.0, 0.0], [1.0, 0.0]]
    torch.testing.assert_close(step.used_mask, step.dense_mask.view(3, rank, 4)[:, :, [0, 2]]
                               .reshape(3, rank * 2))
    slots.set_step([LoraSegment(i, i + 1, i, 1.0) for i in range(4)])
    assert slots.state.step is not None and slots.state.step.used_slots is None  # all four


@pytest.mark.parametrize("decode", [
    "fused", "eager", pytest.param("compiled", marks=pytest.mark.slow)])
def test_oracle_default_fp32(decode: str, default_model: LoadedBaseModel,
                             tmp_path: Path) -> None:
    adapters = make_adapters(Path(default_model.info.model_path), tmp_path, b_std=0.02)
    served = load_base_model("default", dtype="float32")
    # PEFT injects its layers into the model it wraps: give it a copy of its own.
    oracle_base = load_base_model("default", dtype="float32").model
    stats = run_oracle(served, oracle_base, adapters, tolerance=1e-3, max_new_tokens=8,
                       decode=decode)
    print(f"default fp32 oracle ({decode}):", stats)


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_oracle_default_cuda(quantize: str, tmp_path: Path) -> None:
    # On a GPU machine without the default GGUF, the same architecture with random weights.
    source = os.environ.get("SWITCHBOARD_TEST_CUDA_BASE", "default")
    served = load_base_model(source, device="cuda", quantize=quantize)
    adapters = make_adapters(Path(served.info.model_path), tmp_path, b_std=0.02)
    oracle_base = load_base_model(source, device="cuda", quantize=quantize).model
    # bf16 rounding differs between the batched and per-request paths: looser bound.
    stats = run_oracle(served, oracle_base, adapters, tolerance=0.25, max_new_tokens=8)
    print(f"default cuda bf16 {quantize} oracle:", stats)
