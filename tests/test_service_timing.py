"""Where a call's time goes, and what a cold adapter costs everyone else.

* TTFT is measured from receipt at the service; a cold load's wait shows in TTFT and in
  the adapter-wait and load histograms, never in the time per output token.
* Copying adapters into device slots does not stall the asyncio loop: leases, submits,
  health checks and metrics go on while the engine thread copies.
* Nor does tokenizing: a 1 MiB prompt is refused by its length before any tokenizing,
  and a long one that is tokenized is tokenized off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.switchboard.v1 import switchboard_pb2 as pb
from server.engine.config import EngineConfig
from tests.service_fixtures import server_config, start_server
from tests.support import ALL_TARGETS, add_manifest, make_random_adapter

CALLERS = """
import json, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protos.switchboard.v1 import switchboard_pb2 as pb, switchboard_pb2_grpc as pb_grpc

address, names = sys.argv[1], sys.argv[2:]
channel = grpc.insecure_channel(address)
done, health = threading.Event(), []

def check():
    stub = health_pb2_grpc.HealthStub(channel)
    while not done.is_set():
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
            health.append(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            health.append(False)
        time.sleep(0.02)

checker = threading.Thread(target=check)
checker.start()
time.sleep(0.2)  # health checks before the loads start, too
stub = pb_grpc.SwitchboardStub(channel)
with ThreadPoolExecutor(len(names)) as pool:
    replies = list(pool.map(lambda n: stub.Generate(pb.GenerateRequest(
        text="侬好", dialect=n, max_new_tokens=2), timeout=120), names))
time.sleep(0.2)
done.set()
checker.join()
print(json.dumps({"adapters": [r.adapter.name for r in replies], "health": health}))
"""


LONG_PROMPTS = """
import json, sys, threading, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protos.switchboard.v1 import switchboard_pb2 as pb, switchboard_pb2_grpc as pb_grpc

channel = grpc.insecure_channel(sys.argv[1])
done, health = threading.Event(), []

def check():
    stub = health_pb2_grpc.HealthStub(channel)
    while not done.is_set():
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        health.append(reply.status == health_pb2.HealthCheckResponse.SERVING)
        time.sleep(0.01)

checker = threading.Thread(target=check)
checker.start()
stub = pb_grpc.SwitchboardStub(channel)
outcomes = []
for copies in (52_000, 2_500, 52_000):  # 1.04 MB of UTF-8; 20,000 characters; 1.04 MB
    try:
        stub.Generate(pb.GenerateRequest(text="侬今朝吃饭伐? " * copies, max_new_tokens=4),
                      timeout=60)
        outcomes.append(["OK", ""])
    except grpc.RpcError as error:
        outcomes.append([error.code().name, error.details()])
time.sleep(0.1)
done.set()
checker.join()
print(json.dumps({"outcomes": outcomes, "health": health}))
"""


def test_long_prompts_do_not_stall_the_event_loop(live_server):
    """A 1 MiB prompt while a 1 ms heartbeat runs on the server's loop and a client
    checks health: refused INVALID_ARGUMENT by its length, the loop never stalls 20 ms,
    health stays SERVING. A 20,000-character prompt (under the character bound, so it is
    tokenized, on the tokenizing threads) is refused by the token count of its first
    1,024 characters, the rest never tokenized."""
    callers = subprocess.Popen([sys.executable, "-c", LONG_PROMPTS, live_server.address],
                               stdout=subprocess.PIPE, text=True)
    try:
        with loop_stalls(live_server.loop) as stalls:
            out, _ = callers.communicate(timeout=120)
    finally:
        callers.kill()
    assert callers.returncode == 0
    replies = json.loads(out)
    (huge, huge_why), (long, long_why), (again, _) = replies["outcomes"]
    assert huge == long == again == "INVALID_ARGUMENT", replies["outcomes"]
    assert "characters cannot fit max_model_len 256" in huge_why, huge_why
    assert "exceeds max_model_len 256" in long_why, long_why
    assert replies["health"] and all(replies["health"])
    print(f"max loop stall {max(stalls) * 1000:.2f} ms over {len(stalls)} beats")
    assert max(stalls) < 0.020, f"event loop stalled {max(stalls) * 1000:.1f} ms"


@contextlib.contextmanager
def loop_stalls(loop: asyncio.AbstractEventLoop) -> Iterator[list[float]]:
    """A 1 ms heartbeat on ``loop`` for the length of the block: the list it yields fills
    with how late each beat woke (a stall of the loop shows as a late beat)."""
    stalls: list[float] = []
    stop = threading.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stalls.append(now - last - 0.001)
            last = now

    beat = asyncio.run_coroutine_threadsafe(heartbeat(), loop)
    try:
        yield stalls
    finally:
        stop.set()
        beat.result(10)


def histogram(url: str, name: str, adapter: str) -> tuple[float, float]:
    """(sum, count) of a histogram's series for ``adapter``."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("adapter") == adapter and sample.name in (
                    f"{name}_sum", f"{name}_count"):
                found[sample.name.rsplit("_", 1)[1]] = sample.value
    return found.get("sum", 0.0), found.get("count", 0.0)


def test_a_cold_load_shows_in_ttft_and_adapter_wait_not_in_tpot(tmp_path, tiny_model_dir,
                                                                 service_library):
    root, routing, _ = service_library
    server = start_server(server_config(tiny_model_dir, root, routing, preload=()))
    delay = 1.0
    server.cache.load_hook = lambda _name: time.sleep(delay)
    try:
        reply = server.stub().Generate(pb.GenerateRequest(
            text="侬好", dialect="wuyu", max_new_tokens=6), timeout=60)
        assert reply.completion_tokens > 1
        assert reply.timings.time_to_first_token_ms >= delay * 1000
        assert reply.timings.total_ms >= reply.timings.time_to_first_token_ms
        url = server.metrics_url
        ttft, count = histogram(url, "switchboard_time_to_first_token_seconds", "wuyu")
        assert count == 1 and ttft >= delay
        wait, _ = histogram(url, "switchboard_adapter_wait_seconds", "wuyu")
        assert delay <= wait <= ttft
        tpot, count = histogram(url, "switchboard_time_per_output_token_seconds", "wuyu")
        assert count == 1 and tpot < delay / 10  # decoding only: the load is not in it
        queue, count = histogram(url, "switchboard_queue_seconds", "wuyu")
        assert count == 1 and queue < delay
        load_sum = sum(
            s.value for f in text_string_to_metric_families(
                urllib.request.urlopen(url, timeout=10).read().decode())
            for s in f.samples if s.name == "switchboard_adapter_load_seconds_sum")
        assert load_sum >= delay
    finally:
        server.stop()


@pytest.mark.slow  # the default model and eight 78 MB adapters: ~15 s
def test_cold_slot_loads_do_not_stall_the_event_loop(tmp_path, tmp_path_factory):
    """Eight rank-64 adapters on all seven targets of the default model (~78 MB each)
    copied into device slots while a 1 ms heartbeat runs on the server's loop and a
    client checks health: the loop never stalls for 10 ms, every health check answers."""
    from transformers import AutoModelForCausalLM

    from server.basemodel import load_base_model
    from server.basemodel.gguf_cache import prepare_gguf
    from server.basemodel.source import default_gguf_path

    base_dir = prepare_gguf(default_gguf_path()).path
    fingerprint = load_base_model("default", dtype="float32").base_fingerprint
    source = make_random_adapter(AutoModelForCausalLM.from_pretrained(base_dir),
                                 tmp_path / "source", 64, ALL_TARGETS, seed=5)
    root = tmp_path / "adapters"
    names = [f"big{i}" for i in range(8)]
    for name in names:
        shutil.copytree(source, root / name)
        add_manifest(root / name, fingerprint, prompt_template="{text}\n", dialect=name)
    routing = tmp_path / "routing.yaml"
    routing.write_text("default: base\n")
    server = start_server(server_config(
        Path("default"), root, routing, base_model="default", engine=EngineConfig(
            max_batch_size=8, max_model_len=128, max_loras=8, max_lora_rank=64,
            max_new_tokens_limit=8)))
    # The callers run in a process of their own, as real callers do, so that only the
    # server's own threads compete with its event loop.
    callers = subprocess.Popen([sys.executable, "-c", CALLERS, server.address, *names],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert all(info.tier == "host" for info in server.cache.list_adapters())
        with loop_stalls(server.loop) as stalls:
            out, _ = callers.communicate(timeout=300)
        replies = json.loads(out)
        assert callers.returncode == 0
        assert sorted(replies["adapters"]) == names
        assert server.cache.stats.device_misses == len(names)
        assert replies["health"] and all(replies["health"])
        print(f"max loop stall {max(stalls) * 1000:.2f} ms over {len(stalls)} beats")
        assert max(stalls) < 0.010, f"event loop stalled {max(stalls) * 1000:.1f} ms"
    finally:
        callers.kill()
        server.stop()


def test_a_flood_of_adapter_listings_runs_on_a_few_threads(live_server, monkeypatch):
    """200 concurrent `GET /v1/models` and 50 `ListAdapters` against an adapter root whose
    scan takes 50 ms: every one answers, and no more than READ_THREADS listing threads
    per front-end run at once (each read used to start a thread of its own)."""
    from concurrent.futures import ThreadPoolExecutor

    from server.service.daemon_thread import READ_THREADS

    real_names = live_server.cache.store.names

    def slow_names() -> list[str]:
        time.sleep(0.05)  # the injected slow file system
        return real_names()

    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            running = sum(t.name == "switchboard-list" for t in threading.enumerate())
            peak[0] = max(peak[0], running)
            time.sleep(0.002)

    monkeypatch.setattr(live_server.cache.store, "names", slow_names)
    url = live_server.server.http_url + "/models"
    stub = live_server.stub()

    def http_read(_: int) -> int:
        with urllib.request.urlopen(url, timeout=60) as response:
            return len(json.loads(response.read())["data"])

    def grpc_read(_: int) -> int:
        return len(stub.ListAdapters(pb.ListAdaptersRequest(), timeout=60).adapters)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(64) as pool:
            http_counts = list(pool.map(http_read, range(200)))
            grpc_counts = list(pool.map(grpc_read, range(50)))
    finally:
        done.set()
        watcher.join(10)
    assert set(http_counts) == {http_counts[0]} and http_counts[0] >= 3
    assert set(grpc_counts) == {grpc_counts[0]} and grpc_counts[0] >= 3
    assert 1 <= peak[0] <= 2 * READ_THREADS, peak[0]
