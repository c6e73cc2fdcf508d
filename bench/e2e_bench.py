"""End to end: the load generator over gRPC versus the engine in-process, same workload.

1. A real server (`switchboard serve`, its own process) on the default model with two
   rank-8 adapters (wuyu, cantonese; q,v) and the shipped routing table.
2. `switchboard loadtest` (its own process): 32 concurrent clients, 96 requests, 16 new
   tokens each, dialects mixed wuyu=1, cantonese=1, base=1, unary calls, greedy.
3. The same 96 requests (same utterances, dialects, templates, settings: the load
   generator's ``workload_item``) submitted to an in-process engine with the same
   engine settings by 32 closed-loop threads.

Reported: tokens/s and requests/s of both, p50/p95 latency of both, and the ratio
gRPC / in-process (target ≥ 0.85). The two runs happen one after the other on the same
machine; the server is stopped before the in-process run starts.

    python -m bench.e2e_bench
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import device_description, print_table, target, write_results
from clients.loadtest import DEFAULT_UTTERANCES, workload_item
from server.adapters.cache import AdapterCache
from server.adapters.store import AdapterStore
from server.basemodel import load_base_model
from server.engine.engine import Engine
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from server.formats.prompt import build_prompt
from server.service.config import REPO_ROOT, load_config
from tests.support import add_manifest, make_random_adapter, spawn_server

CONCURRENCY = 32
REQUESTS = 96
NEW_TOKENS = 16
MIX = {"wuyu": 1.0, "cantonese": 1.0, "base": 1.0}
TEMPLATES = {"wuyu": "Translate Wu dialect to English: {text}\n",
             "cantonese": "Translate Cantonese to English: {text}\n"}
CONFIG = """
port: 0
metrics_port: -1
adapter_roots: [{root}]
preload: [all]
engine:
  max_batch_size: 16
  max_queue_size: 256
  max_model_len: 1024
  max_loras: 8
  max_lora_rank: 64
  max_new_tokens_limit: 512
"""


def make_adapters(root: Path) -> None:
    base = load_base_model("default", dtype="float32")
    for seed, name in enumerate(TEMPLATES):
        make_random_adapter(base.model, root / name, 8, ("q_proj", "v_proj"), seed=seed)
        add_manifest(root / name, base.base_fingerprint, prompt_template=TEMPLATES[name],
                     dialect=name)


def grpc_run(address: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "clients.cli", "loadtest", "--target", address,
         "--concurrency", str(CONCURRENCY), "--requests", str(REQUESTS),
         "--max-new-tokens", str(NEW_TOKENS), "--mix", ",".join(f"{k}={v}" for k, v in
                                                                MIX.items()),
         "--json", "--quiet"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def in_process_run(config_path: Path, root: Path) -> dict:
    config = load_config(config_path, environ={})
    base = load_base_model("default", dtype="float32")
    engine = Engine(base.model, base.tokenizer, config.engine)
    cache = AdapterCache(AdapterStore([root]), engine.slots, base.base_fingerprint)
    assert not cache.preload(list(TEMPLATES))
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS)
    base_template = "Translate to English: {text}\n"  # server/routing.yaml's template
    next_index, lock = [0], threading.Lock()
    latencies: list[float] = []
    tokens = [0]

    def worker() -> None:
        while True:
            with lock:
                index = next_index[0]
                if index >= REQUESTS:
                    return
                next_index[0] += 1
            text, dialect = workload_item(index, DEFAULT_UTTERANCES, MIX, 0)
            adapter = None if dialect == "base" else cache.lease(dialect)
            template = base_template if adapter is None else TEMPLATES[dialect]
            started = time.perf_counter()
            result = engine.generate(GenerationRequest(
                build_prompt(template, text, base.tokenizer), sampling, adapter=adapter,
                weight_scale=1.0), timeout=600)
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens[0] += result.completion_tokens

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    engine.stop()
    cache.close()
    ordered = sorted(latencies)
    return {"requests": len(latencies), "seconds": round(seconds, 3), "tokens": tokens[0],
            "tokens_per_s": round(tokens[0] / seconds, 2),
            "requests_per_s": round(len(latencies) / seconds, 3),
            "latency_ms": {"p50": round(statistics.median(ordered) * 1000, 1),
                           "p95": round(ordered[int(len(ordered) * 0.95)] * 1000, 1)},
            "device": device_description(base.model.device)}


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-e2e-bench-"))
    root = workdir / "adapters"
    print(f"making adapters in {root} ...", flush=True)
    make_adapters(root)
    config = workdir / "config.yaml"
    config.write_text(CONFIG.format(root=root))
    print("gRPC: server + load generator ...", flush=True)
    process, address, _ = spawn_server(["--config", str(config)], workdir / "server.log")
    try:
        over_grpc = grpc_run(address)
    finally:
        process.terminate()
        process.wait(120)
    assert over_grpc["errors"] == {}, over_grpc["errors"]
    print("in-process engine ...", flush=True)
    local = in_process_run(config, root)
    ratio = over_grpc["tokens_per_s"] / local["tokens_per_s"]
    payload = {
        "device": local["device"],
        "workload": {"concurrency": CONCURRENCY, "requests": REQUESTS,
                     "new_tokens": NEW_TOKENS, "mix": MIX, "greedy": True,
                     "adapters": "wuyu, cantonese: rank 8, q_proj+v_proj"},
        "grpc": {k: over_grpc[k] for k in ("requests", "ok", "seconds", "tokens",
                                           "tokens_per_s", "requests_per_s", "latency_ms",
                                           "ttft_ms", "errors", "retries")},
        "in_process": {k: v for k, v in local.items() if k != "device"},
        "grpc_vs_in_process": target(ratio, 0.85),
    }
    path = write_results("e2e", payload)
    print_table(f"end-to-end benchmark ({local['device']}) -> {path}", [
        ("gRPC tokens/s", f"{over_grpc['tokens_per_s']:.1f} "
                          f"({over_grpc['requests_per_s']:.2f} req/s)"),
        ("in-process tokens/s", f"{local['tokens_per_s']:.1f} "
                                f"({local['requests_per_s']:.2f} req/s)"),
        ("gRPC latency p50 / p95", f"{over_grpc['latency_ms']['p50']:.0f} / "
                                   f"{over_grpc['latency_ms']['p95']:.0f} ms"),
        ("in-process latency p50 / p95", f"{local['latency_ms']['p50']:.0f} / "
                                         f"{local['latency_ms']['p95']:.0f} ms"),
        ("ratio gRPC / in-process", f"{ratio:.2f} (target >= 0.85)"),
    ])


if __name__ == "__main__":
    main()
