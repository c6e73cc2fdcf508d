"""The fused decode path against the eager one (the PEFT oracle runs on both: see
test_engine_oracle.py), and how the engine chooses and reports its path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from server.basemodel import load_base_model
from server.engine.config import EngineConfig
from server.engine.engine import Engine, choose_decode_path
from server.engine.forward import Segment, StepInput
from server.engine.fused import FusedLlama
from server.engine.multi_lora import LoraSegment
from server.engine.peft_adapter import read_peft_adapter
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from server.errors import InvalidOption
from server.service.config import REPO_ROOT
from tests.lora_helpers import assert_same_greedy, top2_margins
from tests.support import ALL_TARGETS, make_random_adapter

REQUESTS = 32
SPECS = [(4, ("q_proj", "v_proj")), (8, ALL_TARGETS), (16, ALL_TARGETS), (8, ("q_proj",))]


def mixed_requests(tokenizer, new_tokens: int) -> list[GenerationRequest]:
    """32 requests: base rows and 4 adapters at several scales, prompts and lengths, so
    rows join mid-decode, leave early and hold KV rows out of order."""
    texts = ["Translate Wu dialect to English: 侬今朝吃饭伐?\n", "The weather today is",
             "Order number 4471 was delivered to", "你食咗飯未呀?", "Hello, my bill is"]
    requests = []
    for i in range(REQUESTS):
        ids = tokenizer.encode(texts[i % len(texts)] * (1 + i % 3), add_special_tokens=False)
        slot = i % (len(SPECS) + 1) - 1
        requests.append(GenerationRequest(
            ids, SamplingParams(max_new_tokens=new_tokens - i % 3, ignore_eos=True),
            adapter=None if slot < 0 else slot, weight_scale=(0.5, 1.0, 1.5)[i % 3],
            record_logits=True))
    return requests


def run_requests(model_dir: Path | str, adapters: list[Path], decode: str,
                 new_tokens: int) -> tuple[list, str]:
    loaded = load_base_model(model_dir, dtype="float32")
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(
        max_batch_size=12, max_model_len=160, max_loras=4, max_lora_rank=16,
        max_num_batched_tokens=64, prefill_chunk_size=24, decode=decode))
    try:
        for slot, path in enumerate(adapters):
            engine.slots.load(slot, read_peft_adapter(path))
        handles = [engine.submit(r) for r in mixed_requests(loaded.tokenizer, new_tokens)]
        return [h.result(timeout=600) for h in handles], engine.decode_path
    finally:
        engine.stop()


def compare_paths(model_dir: Path | str, tmp_path: Path, b_std: float,
                  new_tokens: int) -> int:
    adapters = [make_random_adapter(model_dir, tmp_path / f"a{i}", rank, targets, seed=i,
                                    b_std=b_std)
                for i, (rank, targets) in enumerate(SPECS)]
    eager, eager_path = run_requests(model_dir, adapters, "eager", new_tokens)
    fused, fused_path = run_requests(model_dir, adapters, "fused", new_tokens)
    assert (eager_path, fused_path) == ("eager", "fused")
    fragile = 0
    for ref, ours in zip(eager, fused, strict=True):
        fragile += assert_same_greedy(ref.token_ids, top2_margins(ref.logits), ours.token_ids)
    # Where the tokens agree, so do the logits (same math, other kernels' rounding).
    worst = max(float((a - b).abs().max())
                for ref, ours in zip(eager, fused, strict=True) if ref.token_ids == ours.token_ids
                for a, b in zip(ref.logits, ours.logits, strict=True))
    assert worst <= 1e-3, f"fused and eager logits differ by {worst:.2e}"
    assert fragile <= 2, f"{fragile} of {REQUESTS} requests diverged at fragile steps"
    return fragile


def test_fused_matches_eager_on_32_mixed_requests_tiny(tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    compare_paths(tiny_model_dir, tmp_path, b_std=0.5, new_tokens=8)


def test_fused_matches_eager_on_32_mixed_requests_default(tmp_path: Path) -> None:
    model_dir = Path(load_base_model("default").info.model_path)
    compare_paths(model_dir, tmp_path, b_std=0.02, new_tokens=6)


def test_fused_step_with_decode_rows_out_of_order_and_a_prefill(tiny_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    """One forward mixing decode rows whose KV rows are not a run (a gather), a prefill
    chunk after them and base rows between adapter rows: equal to the eager forward."""
    adapter = make_random_adapter(tiny_model_dir, tmp_path / "a", 8, ALL_TARGETS, seed=3,
                                  b_std=0.5)
    outputs = []
    for decode in ("eager", "fused"):
        loaded = load_base_model(tiny_model_dir, dtype="float32")
        engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(
            max_batch_size=8, max_model_len=64, max_loras=2, decode=decode), start=False)
        engine.slots.load(0, read_peft_adapter(adapter))
        assert isinstance(engine.runner, FusedLlama) == (decode == "fused")
        torch.manual_seed(0)
        prompt = torch.randint(0, 200, (8, 12))
        for row in range(8):  # fill every KV row with a 12-token prompt
            engine.slots.set_step([LoraSegment(0, 12, 0 if row % 2 == 0 else -1, 1.0)])
            engine.runner.forward(StepInput(prompt[row], [Segment(row, 0, 12, 0)], [0]))
        kv_rows, slots = [5, 2, 7], [0, -1, 0]
        segments = [Segment(r, i, 1, 12) for i, r in enumerate(kv_rows)]
        segments.append(Segment(3, 3, 5, 12))  # row 3 prefills 5 more tokens
        ids = torch.tensor([11, 12, 13, 20, 21, 22, 23, 24])
        engine.slots.set_step([LoraSegment(s.start, s.start + s.length, slot, 0.7)
                               for s, slot in zip(segments, [*slots, 0], strict=True)])
        outputs.append(engine.runner.forward(StepInput(ids, segments, [0, 1, 2, 3])))
        engine.slots.clear_step()
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-4


@pytest.mark.parametrize("decode", ["eager", "fused"])
def test_prompt_logprobs_equal_peft_through_chunked_prefill(decode: str, tiny_model_dir: Path,
                                                            tmp_path: Path) -> None:
    """Prompt scoring (perplexity through the serving path): each prompt token's
    log-probability, computed in prefill chunks of 24 beside decoding rows, equals PEFT's
    for base rows and for an adapter at scales 0.5 and 1.5."""
    from transformers import AutoModelForCausalLM

    from tests.lora_helpers import PeftOracle

    adapter = make_random_adapter(tiny_model_dir, tmp_path / "a", 8, ALL_TARGETS, seed=4,
                                  b_std=0.5)
    loaded = load_base_model(tiny_model_dir, dtype="float32")
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(
        max_batch_size=8, max_model_len=160, max_loras=2, max_lora_rank=16,
        max_num_batched_tokens=64, prefill_chunk_size=24, decode=decode))
    torch.manual_seed(0)
    cases = [(torch.randint(0, 200, (n,)).tolist(), slot, scale)
             for n, slot, scale in ((70, None, 0.0), (50, 0, 0.5), (2, 0, 1.5), (33, 0, 1.5))]
    try:
        engine.slots.load(0, read_peft_adapter(adapter))
        talker = engine.submit(GenerationRequest(  # decodes while the others prefill
            cases[0][0][:5], SamplingParams(max_new_tokens=40, ignore_eos=True)))
        handles = [engine.submit(GenerationRequest(
            ids, SamplingParams(max_new_tokens=2), adapter=slot, weight_scale=scale,
            prompt_logprobs=True)) for ids, slot, scale in cases]
        results = [h.result(timeout=120) for h in handles]
        assert talker.result(timeout=120).prompt_logprobs is None  # not asked for
    finally:
        engine.stop()
    oracle = PeftOracle(AutoModelForCausalLM.from_pretrained(tiny_model_dir,
                                                             dtype=torch.float32),
                        {"a": adapter})
    for (ids, slot, scale), result in zip(cases, results, strict=True):
        assert result.prompt_logprobs is not None
        ours = torch.tensor(result.prompt_logprobs)
        reference = oracle.prompt_logprobs(ids, None if slot is None else "a", scale)
        assert ours.shape == reference.shape == (len(ids) - 1,)
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_quantized_base_decodes_on_the_eager_path_and_says_why(tiny_model_dir: Path) -> None:
    loaded = load_base_model(tiny_model_dir, dtype="float32", quantize="nf4")
    path, note = choose_decode_path(loaded.model, "fused")
    assert path == "eager"
    assert "fused unavailable" in note and "quantized" in note
    fp32 = load_base_model(tiny_model_dir, dtype="float32")
    assert choose_decode_path(fp32.model, "fused")[0] == "fused"
    assert choose_decode_path(fp32.model, "eager") == ("eager", "eager (as configured)")


def test_unknown_decode_setting_is_refused() -> None:
    message = "decode must be one of fused, eager, compiled, got 'fast'"
    with pytest.raises(InvalidOption, match=message):
        EngineConfig(decode="fast")


def test_model_info_shows_the_decode_path(tiny_model_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "clients.cli", "model", "info", "--source", str(tiny_model_dir),
         "--dtype", "float32"], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=REPO_ROOT, check=True)
    assert "decode path" in out.stdout and "fused (" in out.stdout


def test_compiled_path_matches_eager_once_its_graphs_are_ready(tiny_model_dir: Path,
                                                               tmp_path: Path) -> None:
    """Graphs build in the background (the fused path serves meanwhile); once ready, the
    32 mixed requests through them give the eager path's tokens and logits."""
    adapters = [make_random_adapter(tiny_model_dir, tmp_path / f"a{i}", rank, targets, seed=i,
                                    b_std=0.5)
                for i, (rank, targets) in enumerate(SPECS)]
    eager, _ = run_requests(tiny_model_dir, adapters, "eager", 8)
    loaded = load_base_model(tiny_model_dir, dtype="float32")
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(
        max_batch_size=12, max_model_len=160, max_loras=4, max_lora_rank=16,
        max_num_batched_tokens=64, prefill_chunk_size=24, decode="compiled",
        compiled_batch_sizes=(4,)))
    try:
        assert engine.decode_path == "compiled"
        compiled = engine.runner.compiled  # type: ignore[attr-defined]
        assert compiled.buckets == [4, 12]
        for slot, path in enumerate(adapters):
            engine.slots.load(slot, read_peft_adapter(path))
        variants = [compiled.variant(rows, adapted) for rows in (4, 12)
                    for adapted in (False, True)]
        assert compiled.wait_ready(variants, timeout=900), compiled.failures
        frames = dict(counters["frames"])
        handles = [engine.submit(r) for r in mixed_requests(loaded.tokenizer, 8)]
        fused = [h.result(timeout=600) for h in handles]
        # Serving compiled nothing: rows at new context lengths reused the graphs.
        assert dict(counters["frames"]) == frames
        # Pure decode steps went through the graphs (prefill steps stay fused).
        assert compiled.steps_run >= 5, compiled.steps_run
    finally:
        engine.stop()
    for ref, ours in zip(eager, fused, strict=True):
        assert_same_greedy(ref.token_ids, top2_margins(ref.logits), ours.token_ids)
    worst = max(float((a - b).abs().max())
                for ref, ours in zip(eager, fused, strict=True) if ref.token_ids == ours.token_ids
                for a, b in zip(ref.logits, ours.logits, strict=True))
    assert worst <= 1e-3, f"compiled and eager logits differ by {worst:.2e}"


def build_biased_llama(folder: Path, model_dir: Path, tokenizer) -> Path:
    """The tiny LLaMA with a bias on every projection (``attention_bias`` and ``mlp_bias``,
    as some HF bases have; Qwen2 has q/k/v biases), each random: transformers initialises
    biases to zero, which a path that drops them would still match."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(model_dir)
    config.attention_bias, config.mlp_bias = True, True
    torch.manual_seed(5)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        biases = [m.bias for m in model.modules()
                  if isinstance(m, torch.nn.Linear) and m.bias is not None]
        assert len(biases) == 7 * config.num_hidden_layers
        for bias in biases:
            bias.normal_(std=0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def decode_biased(model_dir: Path, decode: str, gemm: str, prompts: list[list[int]],
                  forced: list[list[int]] | None) -> tuple[list, str, int]:
    """Greedy (or teacher-forced) runs of ``prompts`` in one batch on ``decode``: the
    results, the path the engine took and how many steps went through compiled graphs."""
    loaded = load_base_model(model_dir, dtype="float32")
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(
        max_batch_size=2, max_model_len=64, max_loras=1, decode=decode, gemm=gemm,
        compiled_batch_sizes=(2,)))
    try:
        compiled = getattr(engine.runner, "compiled", None)
        if compiled is not None:  # the one base graph, before any step needs it
            assert compiled.wait_ready([compiled.variant(2, False)], timeout=900), \
                compiled.failures
        handles = [engine.submit(GenerationRequest(
            ids, SamplingParams(max_new_tokens=6, ignore_eos=True),
            forced_tokens=None if forced is None else forced[i], record_logits=True))
            for i, ids in enumerate(prompts)]
        results = [h.result(timeout=600) for h in handles]
        return results, engine.decode_path, 0 if compiled is None else compiled.steps_run
    finally:
        engine.stop()


@pytest.mark.parametrize(("decode", "gemm"), [
    ("fused", "auto"), ("fused", "onednn"), ("fused", "aten"), ("compiled", "auto")])
def test_projection_biases_count_on_every_decode_path(decode: str, gemm: str,
                                                      tiny_model_dir: Path, tokenizer,
                                                      tmp_path: Path) -> None:
    """A base with ``attention_bias`` and ``mlp_bias`` (random, non-zero) decodes to the
    eager path's logits on the fused path's GEMM kernels and through the compiled graph,
    which once took only the weights and dropped every bias."""
    from transformers import AutoModelForCausalLM

    model_dir = build_biased_llama(tmp_path / "biased", tiny_model_dir, tokenizer)
    prompts = [tokenizer.encode(text, add_special_tokens=False)
               for text in ("The weather today is", "Order number 4471 was delivered to")]
    # The biases matter: zeroing them moves the reference's logits.
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        ids = torch.tensor([prompts[0]])
        with_bias = hf(ids).logits
        for module in hf.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.zero_()
        assert (hf(ids).logits - with_bias).abs().max() > 0.05
    eager, eager_path, _ = decode_biased(model_dir, "eager", gemm, prompts, None)
    ours, path, steps_run = decode_biased(model_dir, decode, gemm, prompts,
                                          [list(r.token_ids) for r in eager])
    assert (eager_path, path) == ("eager", decode)
    if decode == "compiled":
        assert steps_run > 0, "no step went through the compiled graph"
    for ref, res in zip(eager, ours, strict=True):
        assert res.token_ids == ref.token_ids
        worst = max(float((a - b).abs().max())
                    for a, b in zip(ref.logits, res.logits, strict=True))
        assert worst <= 1e-4, f"{decode} ({gemm}) and eager logits differ by {worst:.2e}"
