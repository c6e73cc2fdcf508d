"""Engine throughput: continuous multi-LoRA batching vs serving adapters the PEFT way.

Workload (issue #3): 16 concurrent requests arriving staggered, 8 distinct rank-8
adapters targeting q_proj and v_proj (what the trainer makes by default), prompt
lengths from ~20 to ~200 tokens, 64 new tokens each (EOS ignored so every setup does
the same work), the default base model. A second engine run with 8 rank-8 adapters on
all seven linear layers is reported beside it (``mixed_all_targets``), and one where
half the rows compose two of the q,v adapters on one request (``mixed_composed``, a
dialect plus a terminology pack).

  (a) engine, no adapters        (b) engine, 8 mixed adapters in one batch
  (c) naive PEFT: set_adapter + generate, one request at a time
  (d) PEFT mixed batch: generate(adapter_names=...) as one static, padded batch

plus the p50 time-to-first-token of requests arriving while a batch is decoding.
All four run in one process, side by side, after an untimed warm-up pass, so the
ratios are what to read.

    python -m bench.engine_bench [--device auto] [--dtype float32] [--quantize none]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.common import device_description, print_table, target, write_results
from server.basemodel import load_base_model
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.peft_adapter import read_peft_adapter
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from tests.support import ALL_TARGETS, make_random_adapter

QV_TARGETS = ("q_proj", "v_proj")
NUM_REQUESTS = 16
NUM_ADAPTERS = 8
RANK = 8
NEW_TOKENS = 64
ARRIVAL_GAP_S = 0.05
PROBES = 5
ROUNDS = 2

SENTENCES = [
    "Translate Wu dialect to English: 侬今朝吃饭伐?\n",
    "The customer called about a parcel that was delivered to the wrong address in Pudong. ",
    "Translate Cantonese to English: 我張單幾時到期呀? 我想改地址。\n",
    "Please summarise the following call for the agent: the caller's bill doubled this month "
    "and she wants a refund for the extra charge, which she says she never agreed to. ",
]


def make_prompts(tokenizer) -> list[list[int]]:
    prompts = []
    for i in range(NUM_REQUESTS):
        ids: list[int] = []
        target_len = 20 + (i * 181) // (NUM_REQUESTS - 1)  # 20 .. 201 tokens
        j = i
        while len(ids) < target_len:
            ids += tokenizer.encode(SENTENCES[j % len(SENTENCES)], add_special_tokens=False)
            j += 1
        prompts.append(ids[:target_len])
    return prompts


def run_engine(engine: Engine, prompts: list[list[int]], use_adapters: bool,
               compose: bool = False) -> dict:
    """``compose``: every other row adds the next slot's adapter at scale 0.6."""
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    handles = []

    def arrivals() -> None:
        for i, ids in enumerate(prompts):
            adapter = i % NUM_ADAPTERS if use_adapters else None
            composed = ((((i + 1) % NUM_ADAPTERS, 0.6),) if compose and i % 2 == 0 else ())
            handles.append(engine.submit(GenerationRequest(ids, sampling, adapter=adapter,
                                                           weight_scale=1.0,
                                                           composed=composed)))
            time.sleep(ARRIVAL_GAP_S)  # staggered arrivals are part of the workload

    started = time.perf_counter()
    submitter = threading.Thread(target=arrivals)
    submitter.start()
    submitter.join()
    results = [h.result(timeout=1800) for h in handles]
    elapsed = time.perf_counter() - started
    tokens = sum(r.completion_tokens for r in results)
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def load_slots(engine: Engine, paths: list[Path]) -> None:
    for slot, path in enumerate(paths):
        engine.slots.load(slot, read_peft_adapter(path))


def combine(runs: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "per_round_tokens_per_s": [round(r["tokens_per_s"], 2) for r in runs]}


def ttft_mid_batch(engine: Engine, prompts: list[list[int]]) -> list[float]:
    """TTFT of probe requests submitted while 15 long requests are decoding."""
    long = SamplingParams(max_new_tokens=NEW_TOKENS * 2, ignore_eos=True)
    background = [engine.submit(GenerationRequest(p, long, adapter=i % NUM_ADAPTERS))
                  for i, p in enumerate(prompts[:-1])]
    start_step = engine.steps
    while engine.steps < start_step + len(prompts):  # everyone prefilled and decoding
        time.sleep(0.01)
    ttfts = []
    for k in range(PROBES):
        probe = engine.submit(GenerationRequest(
            prompts[k * 3 % len(prompts)], SamplingParams(max_new_tokens=1),
            adapter=k % NUM_ADAPTERS))
        result = probe.result(timeout=600)
        assert result.time_to_first_token_s is not None
        ttfts.append(result.time_to_first_token_s)
    for handle in background:
        handle.cancel()
    for handle in background:
        handle.result(timeout=600)
    return ttfts


def run_peft_sequential(peft_model, prompts, names, device) -> dict:
    tokens = 0
    started = time.perf_counter()
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            peft_model.set_adapter(names[i % NUM_ADAPTERS])
            out = peft_model.generate(
                input_ids=torch.tensor([ids], device=device), max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
            )
            tokens += out.shape[1] - len(ids)
    elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def run_peft_mixed_batch(peft_model, prompts, names, pad_id, device) -> dict:
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    started = time.perf_counter()
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad_id,
            adapter_names=[names[i % NUM_ADAPTERS] for i in range(len(prompts))],
        )
    elapsed = time.perf_counter() - started
    tokens = (out.shape[1] - width) * len(prompts)
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="default", help="base model (default, .gguf, HF dir)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--suffix", default="", help="results file suffix, e.g. _cuda_bf16")
    args = parser.parse_args()

    loaded = load_base_model(args.source, device=args.device, dtype=args.dtype,
                             quantize=args.quantize)
    tokenizer, device = loaded.tokenizer, loaded.model.device
    prompts = make_prompts(tokenizer)
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-bench-"))
    base_dir = Path(loaded.info.model_path)
    print(f"making 2 x {NUM_ADAPTERS} rank-{RANK} adapters in {workdir} ...", flush=True)
    adapters = [make_random_adapter(base_dir, workdir / f"qv{i}", RANK, QV_TARGETS, seed=i)
                for i in range(NUM_ADAPTERS)]
    adapters_all = [make_random_adapter(base_dir, workdir / f"all{i}", RANK, ALL_TARGETS,
                                        seed=100 + i) for i in range(NUM_ADAPTERS)]

    engine = Engine(loaded.model, tokenizer, EngineConfig(
        max_batch_size=NUM_REQUESTS, max_model_len=512, max_num_batched_tokens=512,
        max_loras=NUM_ADAPTERS, max_lora_rank=RANK,
    ))
    load_slots(engine, adapters)
    # Warm-up: one untimed pass of the mixed workload, so neither timed run pays for
    # first-use costs (allocator growth, kernel selection per shape on CUDA).
    print("engine: warm-up pass ...", flush=True)
    run_engine(engine, prompts, use_adapters=True)
    # The three engine setups run interleaved, ROUNDS times, so that a slow spell of
    # this shared machine does not land on one setup only; each figure sums its rounds.
    rounds: dict[str, list[dict]] = {"base_only": [], "mixed": [], "mixed_composed": [],
                                     "mixed_all_targets": []}
    for round_no in range(ROUNDS):
        print(f"engine round {round_no + 1}/{ROUNDS}: base, mixed, composed, all targets ...",
              flush=True)
        load_slots(engine, adapters)
        rounds["base_only"].append(run_engine(engine, prompts, use_adapters=False))
        rounds["mixed"].append(run_engine(engine, prompts, use_adapters=True))
        rounds["mixed_composed"].append(run_engine(engine, prompts, use_adapters=True,
                                                   compose=True))
        load_slots(engine, adapters_all)
        rounds["mixed_all_targets"].append(run_engine(engine, prompts, use_adapters=True))
    base_only, mixed, mixed_composed, mixed_all = (combine(rounds[k]) for k in rounds)
    load_slots(engine, adapters)
    print("engine: TTFT mid-batch ...", flush=True)
    ttfts = ttft_mid_batch(engine, prompts)
    engine.stop()
    del engine, loaded

    from peft import PeftModel

    reference = load_base_model(args.source, device=args.device, dtype=args.dtype,
                                quantize=args.quantize)
    names = [p.name for p in adapters]
    peft_model = PeftModel.from_pretrained(reference.model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(path, adapter_name=name)
    peft_model.eval()
    print("PEFT: sequential set_adapter + generate ...", flush=True)
    sequential = run_peft_sequential(peft_model, prompts, names, device)
    print("PEFT: mixed-batch generate(adapter_names=...) ...", flush=True)
    mixed_batch = run_peft_mixed_batch(peft_model, prompts, names,
                                       tokenizer.pad_token_id or 0, device)

    tps = {
        "base_only": round(base_only["tokens_per_s"], 2),
        "mixed": round(mixed["tokens_per_s"], 2),
        "peft_sequential": round(sequential["tokens_per_s"], 2),
        "peft_mixed_batch": round(mixed_batch["tokens_per_s"], 2),
        "mixed_all_targets": round(mixed_all["tokens_per_s"], 2),
        "mixed_composed": round(mixed_composed["tokens_per_s"], 2),
    }
    ratios = {
        "mixed_vs_base_only": target(tps["mixed"] / tps["base_only"], 0.85),
        "mixed_vs_peft_sequential": target(tps["mixed"] / tps["peft_sequential"], 5.0),
        "mixed_vs_peft_mixed_batch": target(tps["mixed"] / tps["peft_mixed_batch"], 1.0),
        "mixed_all_targets_vs_base_only": round(tps["mixed_all_targets"] / tps["base_only"], 4),
        "mixed_composed_vs_mixed": target(tps["mixed_composed"] / tps["mixed"], 0.9),
    }
    ttft_p50 = statistics.median(ttfts)
    payload = {
        "device": device_description(device),
        "dtype": reference.info.dtype,
        "quantize": args.quantize,
        "workload": {
            "requests": NUM_REQUESTS, "adapters": NUM_ADAPTERS, "rank": RANK,
            "targets": list(QV_TARGETS), "new_tokens": NEW_TOKENS,
            "prompt_tokens": [len(p) for p in prompts], "arrival_gap_s": ARRIVAL_GAP_S,
            "model": args.source,
        },
        "tokens_per_s": tps,
        "ratios": ratios,
        "ttft_mid_batch_p50_s": round(ttft_p50, 4),
        "ttft_mid_batch_s": [round(t, 4) for t in ttfts],
        "runs": {"base_only": base_only, "mixed": mixed, "peft_sequential": sequential,
                 "peft_mixed_batch": mixed_batch, "mixed_all_targets": mixed_all,
                 "mixed_composed": mixed_composed},
    }
    path = write_results("engine", payload, args.suffix)
    rows = [(f"tokens/s {k}", f"{v:.1f}") for k, v in tps.items()]
    rows += [(k, f"{v['value']:.2f} (target {v['direction']} {v['target']}: "
                 f"{'met' if v['met'] else 'NOT met'})" if isinstance(v, dict) else f"{v:.2f}")
             for k, v in ratios.items()]
    rows.append(("ttft mid-batch p50", f"{ttft_p50 * 1000:.0f} ms"))
    print_table(f"engine benchmark ({payload['device']}, {payload['dtype']}, "
                f"quantize={args.quantize}) -> {path}", rows)


if __name__ == "__main__":
    main()
