"""End to end: gRPC and the OpenAI-compatible HTTP API versus the engine in-process.

1. A real server (`switchboard serve`, its own process) on the default model with two
   rank-8 adapters (wuyu, cantonese; q,v) and the shipped routing table.
2. `switchboard loadtest` (its own process): 32 concurrent clients, 96 requests, 16 new
   tokens each, dialects mixed wuyu=1, cantonese=1, base=1, unary calls, greedy.
3. The same 96 requests through the official ``openai`` async client (its own process,
   ``--http-client``): ``/v1/completions`` with ``model`` = the dialect, 32 at a time.
   Steps 2 and 3 alternate for ``ROUNDS`` rounds against the same server; the medians
   are reported (this machine's speed drifts by ±25% within minutes).
4. The same 96 requests (same utterances, dialects, templates, settings: the load
   generator's ``workload_item``) submitted to an in-process engine with the same
   engine settings by 32 closed-loop threads.

Reported: tokens/s and requests/s, p50/p95 latency of each, and the ratios
gRPC / in-process (target ≥ 0.85) and HTTP / gRPC (target ≥ 0.9). The server is
stopped before the in-process run starts.

    python -m bench.e2e_bench
"""

from __future__ import annotations

import argparse
import asyncio
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
ROUNDS = 2
NEW_TOKENS = 16
MIX = {"wuyu": 1.0, "cantonese": 1.0, "base": 1.0}
TEMPLATES = {"wuyu": "Translate Wu dialect to English: {text}\n",
             "cantonese": "Translate Cantonese to English: {text}\n"}
CONFIG = """
port: 0
metrics_port: -1
http_port: 0
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


def http_run(url: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "bench.e2e_bench", "--http-client", url],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


async def http_client(url: str) -> dict:
    """The gRPC load generator's workload through the official openai async client."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(REQUESTS):
        queue.put_nowait(index)
    latencies: list[float] = []
    tokens, errors = [0], [0]

    async def worker() -> None:
        while not queue.empty():
            text, dialect = workload_item(queue.get_nowait(), DEFAULT_UTTERANCES, MIX, 0)
            started = time.perf_counter()
            try:
                reply = await client.completions.create(
                    model=dialect, prompt=text, max_tokens=NEW_TOKENS, temperature=0)
            except Exception:
                errors[0] += 1
                continue
            latencies.append(time.perf_counter() - started)
            tokens[0] += reply.usage.completion_tokens if reply.usage else 0

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    seconds = time.perf_counter() - started
    await client.close()
    ordered = sorted(latencies) or [0.0]
    return {"requests": REQUESTS, "ok": len(latencies), "errors": errors[0],
            "seconds": round(seconds, 3), "tokens": tokens[0],
            "tokens_per_s": round(tokens[0] / seconds, 2),
            "requests_per_s": round(len(latencies) / seconds, 3),
            "latency_ms": {"p50": round(statistics.median(ordered) * 1000, 1),
                           "p95": round(ordered[int(len(ordered) * 0.95)] * 1000, 1)}}


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the slower of two), and every run's tokens/s
    beside it."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[(len(ordered) - 1) // 2],
            "tokens_per_s_by_round": [r["tokens_per_s"] for r in runs]}


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
    print("gRPC and HTTP: server + load generators ...", flush=True)
    process, address, _metrics, http_url = spawn_server(["--config", str(config)],
                                                        workdir / "server.log")
    grpc_runs, http_runs = [], []
    try:
        for round_index in range(ROUNDS):
            grpc_runs.append(grpc_run(address))
            http_runs.append(http_run(http_url))
            print(f"round {round_index + 1}: gRPC {grpc_runs[-1]['tokens_per_s']} tokens/s, "
                  f"HTTP {http_runs[-1]['tokens_per_s']} tokens/s", flush=True)
    finally:
        process.terminate()
        process.wait(120)
    over_grpc, over_http = median_run(grpc_runs), median_run(http_runs)
    assert all(r["errors"] == {} for r in grpc_runs), [r["errors"] for r in grpc_runs]
    assert all(r["errors"] == 0 for r in http_runs), [r["errors"] for r in http_runs]
    # Side by side in each round: the ratio of the two medians of per-round ratios.
    http_ratio = statistics.median(h["tokens_per_s"] / g["tokens_per_s"]
                                   for h, g in zip(http_runs, grpc_runs, strict=True))
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
                                           "ttft_ms", "errors", "retries",
                                           "tokens_per_s_by_round")},
        "http": over_http,
        "in_process": {k: v for k, v in local.items() if k != "device"},
        "grpc_vs_in_process": target(ratio, 0.85),
        "http_vs_grpc": target(http_ratio, 0.9),
    }
    path = write_results("e2e", payload)
    print_table(f"end-to-end benchmark ({local['device']}) -> {path}", [
        ("gRPC tokens/s", f"{over_grpc['tokens_per_s']:.1f} "
                          f"({over_grpc['requests_per_s']:.2f} req/s)"),
        ("in-process tokens/s", f"{local['tokens_per_s']:.1f} "
                                f"({local['requests_per_s']:.2f} req/s)"),
        ("HTTP (openai client) tokens/s", f"{over_http['tokens_per_s']:.1f} "
                                          f"({over_http['requests_per_s']:.2f} req/s)"),
        ("gRPC latency p50 / p95", f"{over_grpc['latency_ms']['p50']:.0f} / "
                                   f"{over_grpc['latency_ms']['p95']:.0f} ms"),
        ("HTTP latency p50 / p95", f"{over_http['latency_ms']['p50']:.0f} / "
                                   f"{over_http['latency_ms']['p95']:.0f} ms"),
        ("in-process latency p50 / p95", f"{local['latency_ms']['p50']:.0f} / "
                                         f"{local['latency_ms']['p95']:.0f} ms"),
        ("ratio gRPC / in-process", f"{ratio:.2f} (target >= 0.85)"),
        ("ratio HTTP / gRPC (median of rounds)", f"{http_ratio:.2f} (target >= 0.9)"),
    ])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-client", metavar="URL",
                        help="(internal) run the HTTP load against URL and print JSON")
    args = parser.parse_args()
    if args.http_client:
        print(json.dumps(asyncio.run(http_client(args.http_client))))
    else:
        main()
