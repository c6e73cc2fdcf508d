"""Adapter cache: cold-load latency and throughput when adapters outnumber device slots.

1. Cold load, disk → validated in host memory → copied into a device slot, for rank-8
   and rank-64 adapters on all seven linear layers of the default model (each sample
   starts from an adapter unloaded from host and device; the OS page cache stays warm,
   as on a server that has read the file before).
2. Mixed traffic: 96 requests (16 new tokens each, EOS ignored) whose adapters follow a
   Zipf popularity (s = 1.1), with 64 distinct adapters over 8 device slots versus 8
   adapters over the same 8 slots. Adapters are preloaded into host memory in both
   runs, so the comparison isolates slot traffic (evictions and copies).

    python -m bench.adapters_bench
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import device_description, print_table, target, write_results
from server.adapters.cache import AdapterCache
from server.adapters.store import AdapterStore
from server.basemodel import load_base_model
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from tests.support import ALL_TARGETS, make_random_adapter

LOAD_SAMPLES = 4  # adapters per rank; each loaded cold 3 times
REQUESTS = 96
NEW_TOKENS = 16
ZIPF_S = 1.1
SLOTS = 8


def cold_loads(cache: AdapterCache, names: list[str], repeats: int = 3) -> list[float]:
    samples = []
    for _ in range(repeats):
        for name in names:
            cache.unload(name)
            started = time.perf_counter()
            lease = cache.lease(name)  # disk -> host (validated)
            slot = lease.try_acquire_slot()  # host -> device slot (engine not running here)
            samples.append(time.perf_counter() - started)
            assert slot is not None
            lease.release()
    return samples


def zipf_choices(names: list[str], count: int, rng: random.Random) -> list[str]:
    weights = [1.0 / (rank + 1) ** ZIPF_S for rank in range(len(names))]
    return rng.choices(names, weights=weights, k=count)


def traffic(engine: Engine, cache: AdapterCache, names: list[str], prompts) -> dict:
    rng = random.Random(11)
    chosen = zipf_choices(names, REQUESTS, rng)
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    evictions_before = cache.stats.device_evictions
    started = time.perf_counter()
    handles = [engine.submit(GenerationRequest(prompts[i % len(prompts)], sampling,
                                               adapter=cache.lease(name)))
               for i, name in enumerate(chosen)]
    results = [h.result(timeout=1800) for h in handles]
    elapsed = time.perf_counter() - started
    tokens = sum(r.completion_tokens for r in results)
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
            "distinct_adapters_used": len(set(chosen)),
            "device_evictions": cache.stats.device_evictions - evictions_before}


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-adapters-bench-"))
    root = workdir / "adapters"
    base = load_base_model("default", dtype="float32")
    maker = load_base_model("default", dtype="float32").model  # PEFT wraps this one
    print(f"making adapters in {root} ...", flush=True)
    for i in range(LOAD_SAMPLES):
        make_random_adapter(maker, root / f"r8-{i}", 8, ALL_TARGETS, seed=i)
        make_random_adapter(maker, root / f"r64-{i}", 64, ALL_TARGETS, seed=50 + i)
    for i in range(64):
        make_random_adapter(maker, root / f"z{i:02d}", 8, ("q_proj", "v_proj"), seed=200 + i)

    engine = Engine(base.model, base.tokenizer, EngineConfig(
        max_batch_size=16, max_model_len=256, max_loras=SLOTS, max_lora_rank=64), start=False)
    cache = AdapterCache(AdapterStore([root]), engine.slots, base.base_fingerprint,
                         max_cpu_adapters=96)
    print("cold loads ...", flush=True)
    cold_loads(cache, ["r8-0"], repeats=2)  # warm-up: imports, allocator
    r8 = cold_loads(cache, [f"r8-{i}" for i in range(LOAD_SAMPLES)])
    r64 = cold_loads(cache, [f"r64-{i}" for i in range(LOAD_SAMPLES)])
    for name in [f"r8-{i}" for i in range(LOAD_SAMPLES)] + [f"r64-{i}" for i in range(4)]:
        cache.unload(name)
    engine.start()

    prompts = [base.tokenizer.encode(t, add_special_tokens=False) for t in (
        "Translate Wu dialect to English: 侬今朝吃饭伐?\n",
        "Translate Cantonese to English: 我張單幾時到期呀?\n",
        "Translate Wu dialect to English: 阿拉屋里向个电费单子寄错地址了。\n",
        "Translate Cantonese to English: 你哋幾點收工? 我想聽日過嚟攞貨。\n",
    )]
    many = [f"z{i:02d}" for i in range(64)]
    few = many[:SLOTS]
    errors = cache.preload(many)
    assert not errors, errors
    print("traffic: warm-up ...", flush=True)
    traffic(engine, cache, few, prompts)
    print("traffic: 8 adapters over 8 slots ...", flush=True)
    eight = traffic(engine, cache, few, prompts)
    print("traffic: 64 adapters over 8 slots ...", flush=True)
    sixty_four = traffic(engine, cache, many, prompts)
    engine.stop()
    cache.close()

    def pct(samples: list[float], q: float) -> float:
        ordered = sorted(samples)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    ratio = sixty_four["tokens_per_s"] / eight["tokens_per_s"]
    payload = {
        "device": device_description(base.model.device),
        "dtype": base.info.dtype,
        "cold_load_s": {
            "rank8": {"p50": round(statistics.median(r8), 4), "p95": round(pct(r8, 0.95), 4),
                      "samples": len(r8)},
            "rank64": {"p50": round(statistics.median(r64), 4),
                       "p95": round(pct(r64, 0.95), 4), "samples": len(r64)},
        },
        "cold_load_rank8_p50": target(statistics.median(r8), 0.050, higher_is_better=False),
        "traffic": {"adapters_8_over_8_slots": eight, "adapters_64_over_8_slots": sixty_four},
        "throughput_ratio_64_vs_8": target(ratio, 0.7),
        "workload": {"requests": REQUESTS, "new_tokens": NEW_TOKENS, "zipf_s": ZIPF_S,
                     "slots": SLOTS, "traffic_adapter_rank": 8,
                     "traffic_targets": ["q_proj", "v_proj"], "cold_load_targets": "all seven"},
    }
    path = write_results("adapters", payload)
    print_table(f"adapter cache benchmark ({payload['device']}) -> {path}", [
        ("cold load rank 8 p50 / p95",
         f"{statistics.median(r8) * 1000:.1f} / {pct(r8, 0.95) * 1000:.1f} ms (target p50 <= 50)"),
        ("cold load rank 64 p50 / p95",
         f"{statistics.median(r64) * 1000:.1f} / {pct(r64, 0.95) * 1000:.1f} ms"),
        ("tokens/s 8 adapters / 8 slots", f"{eight['tokens_per_s']:.1f}"),
        ("tokens/s 64 adapters / 8 slots",
         f"{sixty_four['tokens_per_s']:.1f} ({sixty_four['device_evictions']} evictions)"),
        ("ratio 64 vs 8", f"{ratio:.2f} (target >= 0.7)"),
    ])


if __name__ == "__main__":
    main()
