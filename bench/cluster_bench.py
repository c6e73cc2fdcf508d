"""Cluster: adapter-affine routing (Ray Serve multiplexing) vs plain least-busy routing.

A local Ray cluster of 2 replicas (tiny random LLaMA, 1 CPU and 1 torch thread each)
serves 300 gRPC calls whose adapters follow a Zipf popularity (s = 1.1) over 8 rank-8
adapters, from 8 client threads, 8 new tokens each. Nothing is preloaded. The same call
sequence runs with ``cluster.route_by_adapter`` on (the routed adapter is the call's
``multiplexed_model_id``) and off, in two sizings:

- ``fits``: 4 device slots per replica: together the replicas hold every adapter once,
  one alone cannot (the acceptance case: affine routing needs at most half the slot loads);
- ``tight``: 2 slots per replica: together they cannot hold every adapter.

``cold_loads`` counts loads into device slots over both replicas; ``host_loads`` counts
loads from disk; ``slot_hit_rate`` is the share of adapter uses that found their slot
loaded. Tokens/s and client-side p50/p95 latency are reported for each run.

    python -m bench.cluster_bench
"""

from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from bench.common import commit, print_table, target, write_results
from protos.switchboard.v1 import switchboard_pb2 as pb
from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc
from server.basemodel import load_base_model
from server.engine.config import EngineConfig
from server.formats.files import replace_marked_block
from server.service.cluster_settings import ClusterConfig, RayActorOptions
from server.service.config import REPO_ROOT, ServerConfig
from tests.support import make_random_adapter
from tests.tiny_llama import build_tiny_llama

ADAPTERS = 8
CALLS = 300
THREADS = 8
NEW_TOKENS = 8
ZIPF_S = 1.1
SIZINGS = {"fits": 4, "tight": 2}
DOC = REPO_ROOT / "docs" / "cluster.md"
DOC_BEGIN, DOC_END = "<!-- cluster-bench:begin -->", "<!-- cluster-bench:end -->"
UTTERANCES = ("侬今朝吃饭伐?", "我張單幾時到期呀?", "阿拉屋里向个电费单子寄错地址了。",
              "你哋幾點收工? 我想聽日過嚟攞貨。")


def zipf_sequence(names: list[str], count: int, seed: int = 7) -> list[str]:
    weights = [1.0 / (rank + 1) ** ZIPF_S for rank in range(len(names))]
    return random.Random(seed).choices(names, weights=weights, k=count)


def totals(stats: list[dict[str, Any]]) -> dict[str, int]:
    keys = ("device_misses", "device_hits", "host_misses", "loads", "device_evictions")
    return {key: sum(s["cache"][key] for s in stats) for key in keys}


def run_traffic(address: str, sequence: list[str]) -> dict[str, Any]:
    latencies: list[float] = []
    tokens = [0]
    by_replica: dict[str, int] = {}
    lock = threading.Lock()
    failures: list[str] = []

    def client(k: int) -> None:
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.SwitchboardStub(channel)
        for i in range(k, len(sequence), THREADS):
            request = pb.GenerateRequest(text=UTTERANCES[i % len(UTTERANCES)],
                                         dialect=sequence[i], max_new_tokens=NEW_TOKENS)
            started = time.perf_counter()
            try:
                response = stub.Generate(request, timeout=120)
            except grpc.RpcError as exc:
                with lock:
                    failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens[0] += response.completion_tokens
                by_replica[response.replica] = by_replica.get(response.replica, 0) + 1
        channel.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} calls failed, first: {failures[0]}")
    latencies.sort()
    return {"calls": len(latencies), "tokens_per_s": round(tokens[0] / wall, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 1),
            "p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))] * 1000, 1),
            "calls_by_replica": dict(sorted(by_replica.items()))}


def run_once(config: ServerConfig, sequence: list[str]) -> dict[str, Any]:
    from tests.cluster_fixtures import start_cluster

    cluster = start_cluster(config)
    try:
        before = totals(cluster.stats())
        traffic = run_traffic(cluster.address, sequence)
        after = totals(cluster.stats())
    finally:
        cluster.stop()
    delta = {key: after[key] - before[key] for key in after}
    uses = delta["device_misses"] + delta["device_hits"]
    return {"cold_loads": delta["device_misses"], "host_loads": delta["loads"],
            "slot_evictions": delta["device_evictions"],
            "slot_hit_rate": round(delta["device_hits"] / uses, 3) if uses else None,
            **traffic}


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-cluster-bench-"))
    tokenizer = load_base_model("default", dtype="float32").tokenizer
    tiny = build_tiny_llama(workdir / "tiny", tokenizer)
    root = workdir / "adapters"
    names = [f"d{i}" for i in range(ADAPTERS)]
    for i, name in enumerate(names):
        make_random_adapter(str(tiny), root / name, 8, ("q_proj", "v_proj"), seed=100 + i)
    routing = workdir / "routing.yaml"
    routing.write_text('default: base\nfallback: base\nprompt_template: "Translate: {text}\\n"\n')
    sequence = zipf_sequence(names, CALLS)
    runs: dict[str, Any] = {}
    for sizing, slots in SIZINGS.items():
        for affine in (True, False):
            config = ServerConfig(
                host="127.0.0.1", port=0, metrics_port=-1, http_port=-1, base_model=str(tiny),
                adapter_roots=(str(root),), preload=(), routing_table=str(routing),
                default_max_new_tokens=NEW_TOKENS, poll_interval_s=3600.0,
                engine=EngineConfig(max_batch_size=16, max_model_len=128, max_loras=slots,
                                    max_lora_rank=16, max_new_tokens_limit=NEW_TOKENS),
                cluster=ClusterConfig(replicas=2, ray_actor_options=RayActorOptions(num_cpus=1),
                                      torch_threads=1, replica_metrics_port=-1,
                                      route_by_adapter=affine, app_name="cluster-bench"))
            label = f"{sizing}/{'multiplexed' if affine else 'round_robin'}"
            print(f"{label}: {CALLS} calls ...", flush=True)
            runs[label] = run_once(replace(config), sequence)
            print(f"  {runs[label]}", flush=True)
    fits = runs["fits/multiplexed"]["cold_loads"] / max(1, runs["fits/round_robin"]["cold_loads"])
    tight = runs["tight/multiplexed"]["cold_loads"] / max(
        1, runs["tight/round_robin"]["cold_loads"])
    payload = {
        "setup": {"replicas": 2, "adapters": ADAPTERS, "calls": CALLS, "threads": THREADS,
                  "new_tokens": NEW_TOKENS, "zipf_s": ZIPF_S, "model": "tiny random LLaMA",
                  "slots_per_replica": SIZINGS, "torch_threads_per_replica": 1},
        "runs": runs,
        "cold_loads_multiplexed_vs_round_robin": {
            "fits": target(round(fits, 3), 0.5, higher_is_better=False),
            "tight": round(tight, 3)},
    }
    path = write_results("cluster", payload)
    rows = [(label, f"slot loads {r['cold_loads']:4d}  host loads {r['host_loads']:3d}  "
             f"hit rate {r['slot_hit_rate']}  {r['tokens_per_s']:6.1f} tok/s  "
             f"p50 {r['p50_ms']:6.1f} ms  p95 {r['p95_ms']:6.1f} ms")
            for label, r in runs.items()]
    rows.append(("slot loads, multiplexed / round robin", f"fits {fits:.2f} (<= 0.5), "
                 f"tight {tight:.2f}"))
    print_table("cluster: adapter-affine routing", rows)
    write_doc_table(payload, commit())
    print(f"wrote {path} and the table in {DOC}")


def write_doc_table(payload: dict[str, Any], commit_id: str) -> None:
    """The runs as a table between the markers in docs/cluster.md."""
    sizings = {"fits": f"{SIZINGS['fits']} slots/replica (together they hold all "
                       f"{ADAPTERS})",
               "tight": f"{SIZINGS['tight']} slots/replica (they cannot)"}
    lines = [DOC_BEGIN, "| sizing | routing | slot loads | host loads | slot hit rate | "
             "tokens/s | p50 ms | p95 ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, run in payload["runs"].items():
        sizing, routing = label.split("/")
        lines.append(f"| {sizings[sizing]} | {routing.replace('_', ' ')} | {run['cold_loads']} "
                     f"| {run['host_loads']} | {run['slot_hit_rate']} | {run['tokens_per_s']} "
                     f"| {run['p50_ms']} | {run['p95_ms']} |")
    ratio = payload["cold_loads_multiplexed_vs_round_robin"]
    lines += ["", f"Slot loads, multiplexed / round robin: **{ratio['fits']['value']}** when "
              f"the replicas together hold every adapter (target <= 0.5), {ratio['tight']} "
              f"when they cannot (commit {commit_id}).", DOC_END]
    replace_marked_block(DOC, DOC_BEGIN, DOC_END, "\n".join(lines))


if __name__ == "__main__":
    main()
