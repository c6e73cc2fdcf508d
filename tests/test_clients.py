"""The Python clients and the `switchboard` client commands against live servers."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from clients.aio import AsyncSwitchboardClient
from clients.callcenter import read_calls
from clients.cli import main as cli
from clients.client import SwitchboardClient
from clients.errors import SwitchboardError
from clients.messages import GenerateResult, StreamChunk, reported_scale
from clients.retry import NO_RETRY, Attempts, RetryPolicy, is_retryable, is_starting
from protos.switchboard.v1 import switchboard_pb2 as pb
from server.engine.config import EngineConfig
from server.service.config import REPO_ROOT
from tests.polling import wait_for
from tests.service_fixtures import server_config, start_server

FAST_RETRY = RetryPolicy(max_attempts=50, initial_backoff_s=0.02, max_backoff_s=0.1)
ADMIN_KEY, GEN_KEY = "admin-key-abcdef", "gen-key-abcdef"


@pytest.fixture(scope="module")
def small_queue(tiny_model_dir, service_library):
    """One row, one queue place, keys required: queue-full and admin-key tests."""
    root, routing, _ = service_library
    server = start_server(server_config(
        tiny_model_dir, root, routing, api_keys=(GEN_KEY,), admin_key=ADMIN_KEY,
        metrics_port=-1,
        engine=EngineConfig(max_batch_size=1, max_queue_size=1, max_model_len=256, max_loras=2,
                            max_lora_rank=16, max_new_tokens_limit=64)))
    yield server
    server.stop()


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli(args)
    out, err = capsys.readouterr()
    return code, out, err


# -- library ------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "adapter", "route"), [
    ({"dialect": "wuyu"}, "wuyu", "explicit"),
    ({"caller_number": "+86 21 5555 1234"}, "wuyu", "caller_number"),
    ({"region": "CN-GD"}, "cantonese", "region"),
    ({"caller_number": "+86 138 0000 1111"}, "", "default"),
])
def test_blocking_and_async_clients_route(live_server, options, adapter, route):
    with SwitchboardClient(live_server.address) as client:
        result = client.generate("侬今朝吃饭伐?", **options)
    assert (result.adapter, result.route) == (adapter, route)
    assert result.completion_tokens > 0 and result.text

    async def run() -> tuple[GenerateResult, list]:
        async with AsyncSwitchboardClient(live_server.address) as client:
            unary = await client.generate("侬今朝吃饭伐?", **options)
            items = [item async for item in client.stream("侬今朝吃饭伐?", **options)]
            return unary, items

    unary, items = asyncio.run(run())
    assert (unary.adapter, unary.route, unary.text) == (adapter, route, result.text)
    final = items[-1]
    assert isinstance(final, GenerateResult) and final.text == result.text
    assert "".join(i.text for i in items[:-1] if isinstance(i, StreamChunk)) == result.text


def test_stream_concatenation_equals_the_unary_answer_with_the_same_seed(live_server):
    options = dict(dialect="cantonese", temperature=0.9, top_p=0.95, seed=1234,
                   max_new_tokens=24)
    with SwitchboardClient(live_server.address) as client:
        unary = client.generate("我張單幾時到期呀?", **options)
        items = list(client.stream("我張單幾時到期呀?", **options))
    chunks = [i for i in items if isinstance(i, StreamChunk)]
    assert len(chunks) >= 2 and isinstance(items[-1], GenerateResult)
    assert "".join(c.text for c in chunks) == items[-1].text == unary.text


def test_cli_stream_prints_every_token_in_order(live_server, capsys):
    args = ["--target", live_server.address, "--dialect", "wuyu", "--seed", "5",
            "--temperature", "0.7", "--max-new-tokens", "16", "我今朝有眼勿适意"]
    code, unary_out, _ = run_cli(["generate", *args], capsys)
    assert code == 0
    code, streamed_out, err = run_cli(["generate", "--stream", *args], capsys)
    assert code == 0
    assert streamed_out == unary_out  # the tokens, in order, then one newline
    assert "wuyu" in err and "explicit" in err
    code, as_json, _ = run_cli(["generate", "--json", *args], capsys)
    assert code == 0 and json.loads(as_json)["text"] + "\n" == unary_out


def test_cli_errors_are_one_line_with_the_status_as_exit_code(live_server, capsys):
    code, _, err = run_cli(["generate", "--target", live_server.address, "--dialect",
                            "klingon", "hello"], capsys)
    assert code == grpc.StatusCode.NOT_FOUND.value[0] == 5
    assert err.count("\n") == 1 and err.startswith("error: NOT_FOUND: ") and "klingon" in err
    code, _, err = run_cli(["generate", "--target", live_server.address,
                            "--max-new-tokens", "0", "hello"], capsys)
    assert code == 3 and "max_new_tokens must be > 0" in err
    code, _, err = run_cli(["generate", "--target", "127.0.0.1:9", "--retries", "0",
                            "--timeout", "5", "hello"], capsys)
    assert code == 14 and err.count("\n") == 1
    assert "cannot reach the Switchboard server at 127.0.0.1:9" in err


# -- retries ------------------------------------------------------------------------------
def test_queue_full_is_retried_until_admitted(small_queue):
    engine = small_queue.engine
    registry = small_queue.server.metrics.registry
    labels = {"adapter": "(none)", "route": "none", "status": "RESOURCE_EXHAUSTED",
              "protocol": "grpc"}

    def refused() -> float:
        return registry.get_sample_value("switchboard_requests_total", labels) or 0.0

    gate = threading.Event()
    engine.fault_hook = lambda step: gate.wait(30)
    before = refused()
    client = SwitchboardClient(small_queue.address, api_key=GEN_KEY, retry=FAST_RETRY,
                               timeout=60)
    filler = SwitchboardClient(small_queue.address, api_key=GEN_KEY, retry=RetryPolicy(1))
    try:
        with ThreadPoolExecutor(3) as pool:
            held = [pool.submit(filler.generate, "hello", max_new_tokens=2)]
            wait_for(lambda: engine.stats()["running"] == 1, 30)
            held.append(pool.submit(filler.generate, "hello", max_new_tokens=2))
            wait_for(lambda: engine.stats()["waiting"] == 1, 30)  # row and queue are full
            retried = pool.submit(client.generate, "hello", max_new_tokens=2)
            wait_for(lambda: client.retries >= 3, 30)
            gate.set()
            assert retried.result(60).completion_tokens > 0
            assert all(f.result(60).completion_tokens > 0 for f in held)
    finally:
        engine.fault_hook = None
        gate.set()
        client.close()
        filler.close()
    assert client.retries >= 3
    assert refused() - before == client.retries  # one server refusal per retry


def test_invalid_argument_and_not_found_are_not_retried(live_server):
    with SwitchboardClient(live_server.address, retry=FAST_RETRY) as client:
        for options, code in (({"max_new_tokens": -1}, grpc.StatusCode.INVALID_ARGUMENT),
                              ({"dialect": "klingon"}, grpc.StatusCode.NOT_FOUND)):
            with pytest.raises(SwitchboardError) as info:
                client.generate("hello", **options)
            assert info.value.code == code
        assert client.retries == 0


def test_oversized_messages_are_not_retried():
    assert not is_retryable(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            "Received message larger than max (40000 vs. 16384)")
    assert is_retryable(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "the wait queue is full (2 requests); retry later")
    assert is_retryable(grpc.StatusCode.UNAVAILABLE, "failed to connect")
    assert not is_retryable(grpc.StatusCode.INVALID_ARGUMENT, "x")


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_a_stream_is_retried_before_its_first_message_and_never_after():
    """Unit test with a fake stub: UNAVAILABLE before any message is retried; after one
    chunk has arrived it is raised (a replay would repeat text already shown)."""
    client = SwitchboardClient("127.0.0.1:9", retry=FAST_RETRY)
    chunk = pb.GenerateStreamResponse(text="Hel", tokens=1)
    final = pb.GenerateStreamResponse(final=pb.GenerateResponse(text="Hello"))
    script = [[_FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect")],
              [chunk, final]]

    def fake_stream(request, timeout=None, metadata=None):
        for item in script.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item

    client._stub.GenerateStream = fake_stream  # type: ignore[method-assign]
    items = list(client.stream("hello"))
    assert [getattr(i, "text", None) for i in items] == ["Hel", "Hello"]
    assert client.retries == 1

    script[:] = [[chunk, _FakeRpcError(grpc.StatusCode.UNAVAILABLE, "server went away")],
                 [chunk, final]]
    seen = []
    with pytest.raises(SwitchboardError) as info:
        for item in client.stream("hello"):
            seen.append(item)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(seen) == 1 and client.retries == 1  # no replay
    client.close()


def test_a_starting_server_is_waited_for_past_the_retry_budget(tiny_model_dir,
                                                               service_library):
    """``generate`` right after ``make serve``: the server says it is starting for longer
    than the default policy's three retries last; the call waits (within its deadline)
    and is answered once the model is loaded."""
    from tests.test_service_security import held_server

    with held_server(tiny_model_dir, service_library) as (live, release), \
            SwitchboardClient(live.address, timeout=60) as client, ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.generate, "hello", dialect="wuyu", max_new_tokens=2)
        budget = RetryPolicy().max_attempts - 1
        wait_for(lambda: client.retries > budget or call.done(), 30)
        assert not call.done(), call.exception()  # refused past the budget, still waiting
        release.set()
        assert call.result(60).adapter == "wuyu"


def test_start_up_waits_are_bounded_and_do_not_use_up_attempts():
    starting = "the server is starting (loading the model and adapters)"
    attempts = Attempts(RetryPolicy(max_attempts=3), timeout=None)
    assert all(attempts.delay(grpc.StatusCode.UNAVAILABLE, starting) is not None
               for _ in range(20))
    refused = [attempts.delay(grpc.StatusCode.UNAVAILABLE, "failed to connect")
               for _ in range(3)]
    assert [wait is not None for wait in refused] == [True, True, False]  # 3 attempts in all
    assert Attempts(NO_RETRY, 60).delay(grpc.StatusCode.UNAVAILABLE, starting) is None
    assert Attempts(RetryPolicy(), 0.0).delay(grpc.StatusCode.UNAVAILABLE, starting) is None
    draining = "the server is shutting down; retry on another instance"
    assert not is_starting(grpc.StatusCode.UNAVAILABLE, draining)


def test_scales_read_back_as_the_caller_gave_them(live_server):
    """The proto carries scales as float32: 0.6 arrives as 0.6000000238418579, and the
    client reports the shortest decimal that is the same float32."""
    with SwitchboardClient(live_server.address) as client:
        single = client.generate("hello", dialect="wuyu", weight_scale=0.6, max_new_tokens=2)
        composed = client.generate("hello", adapters=["wuyu", "plain@0.3"], max_new_tokens=2)
        statuses = {status.name: status for status in client.list_adapters()}
    assert single.weight_scale == 0.6 and single.adapters[0].weight_scale == 0.6
    assert [a.weight_scale for a in composed.adapters] == [0.8, 0.3]  # 0.8: the manifest's
    assert statuses["wuyu"].default_weight_scale == 0.8
    rng = random.Random(0)
    for value in [rng.uniform(0, 4) for _ in range(2000)] + [1e-7, 3.4e38, 0.0, 1.0]:
        wire = struct.unpack("<f", struct.pack("<f", value))[0]
        shown = reported_scale(wire)
        assert struct.unpack("<f", struct.pack("<f", shown))[0] == wire  # the same float32
        assert len(repr(shown)) <= len(repr(wire))


# -- admin and health commands ------------------------------------------------------------
def test_admin_commands_need_the_admin_key(small_queue, capsys):
    target = ["--target", small_queue.address]
    code, _, err = run_cli(["adapters", "list", *target], capsys)
    assert code == 16 and err.count("\n") == 1 and "admin key" in err
    code, _, err = run_cli(["adapters", "list", *target, "--admin-key", GEN_KEY], capsys)
    assert code == 7 and "needs the admin key" in err
    code, out, _ = run_cli(["adapters", "list", *target, "--admin-key", ADMIN_KEY], capsys)
    assert code == 0 and out.splitlines()[0].split()[:4] == ["NAME", "VERSION", "RANK", "TIER"]
    assert any(line.startswith("wuyu ") for line in out.splitlines())
    code, out, _ = run_cli(["adapters", "unload", "plain", *target, "--admin-key", ADMIN_KEY,
                            "--json"], capsys)
    assert code == 0 and json.loads(out)[0]["tier"] == "disk"
    code, out, _ = run_cli(["adapters", "load", "plain", *target, "--admin-key", ADMIN_KEY,
                            "--json"], capsys)
    assert code == 0 and json.loads(out)[0]["tier"] in ("host", "device")
    code, out, _ = run_cli(["adapters", "reload", "plain", *target, "--admin-key", ADMIN_KEY],
                           capsys)
    assert code == 0 and "plain" in out
    code, _, err = run_cli(["adapters", "load", "klingon", *target, "--admin-key", ADMIN_KEY],
                           capsys)
    assert code == 5 and "klingon" in err
    code, out, _ = run_cli(["health", *target], capsys)
    assert code == 0 and out.strip() == "SERVING"


def test_health_wait_waits_through_a_closed_port_and_the_model_load(
        tiny_model_dir, service_library, capsys, monkeypatch):
    """``switchboard health --wait``: for scripts that start a server and then call it.
    The checks the command makes are recorded (the real ones, passed through) to see it
    wait through each phase: port not open yet, open but loading, serving."""
    from tests.test_service_security import held_server

    with socket.socket() as probe:  # a free port, for the server to bind later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    seen: list[str] = []
    check = SwitchboardClient._health_once

    def recorded(self, service: str, timeout: float) -> str:
        try:
            status = check(self, service, timeout)
        except SwitchboardError as error:
            seen.append(error.code.name)
            raise
        seen.append(status)
        return status

    monkeypatch.setattr(SwitchboardClient, "_health_once", recorded)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(cli, ["health", "--wait", "120", "--target", f"127.0.0.1:{port}"])
        wait_for(lambda: seen.count("UNAVAILABLE") >= 2 or waiting.done(), 30)
        assert not waiting.done(), waiting.exception()  # nothing listens yet: it waits
        with held_server(tiny_model_dir, service_library, port=port) as (_, release):
            wait_for(lambda: "NOT_SERVING" in seen or waiting.done(), 30)
            assert not waiting.done()  # open, but the model is loading: it waits
            release.set()
            assert waiting.result(60) == 0
    assert capsys.readouterr().out == "SERVING\n" and seen[-1] == "SERVING"
    code, _, err = run_cli(["health", "--wait", "0.5", "--target", "127.0.0.1:9"], capsys)
    assert code == 14 and "cannot reach" in err  # a deadline, not a hang


# -- call-center demo and load generator --------------------------------------------------
def test_callcenter_demo_routes_each_example_call(live_server, capsys):
    calls = Path(REPO_ROOT / "clients/examples/calls.csv")
    code, out, _ = run_cli(["callcenter", str(calls), "--target", live_server.address,
                            "--max-new-tokens", "8", "--json"], capsys)
    assert code == 0
    answered = json.loads(out)
    expected = {"+86 21": "wuyu", "+86 512": "wuyu", "+86 20": "cantonese",
                "+852": "cantonese", "+853": "cantonese", "+86 138": "base", "+1 ": "base"}
    assert len(answered) == len(read_calls(calls)) == 8
    for call in answered:
        prefix = next(p for p in expected if call["caller_number"].startswith(p))
        assert call["adapter"] == expected[prefix], call
        assert call["route"] == ("caller_number" if expected[prefix] != "base" else "default")
    code, out, _ = run_cli(["callcenter", str(calls), "--target", live_server.address,
                            "--max-new-tokens", "4"], capsys)
    assert code == 0 and "DIALECT" in out and "agent:" in out


def test_loadtest_in_its_own_process(live_server):
    result = subprocess.run(
        [sys.executable, "-m", "clients.cli", "loadtest", "--target", live_server.address,
         "--requests", "24", "--concurrency", "6", "--max-new-tokens", "4",
         "--mix", "wuyu=2,cantonese=1,base=1", "--stream", "--json"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["requests"] == report["ok"] == 24 and report["errors"] == {}
    assert report["tokens"] > 0 and set(report["latency_ms"]) == {"p50", "p95", "p99"}
    # the server's own arrival-to-end time, never more than what the client waited
    assert set(report["server_ms"]) == {"p50", "p95", "p99"}
    assert 0 < report["server_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert "done" in result.stderr  # the progress bar


def test_clients_never_import_torch_or_the_server(live_server):
    code = (
        "import sys\n"
        "from clients.cli import main\n"
        "import clients.client, clients.aio, clients.callcenter, clients.loadtest\n"
        f"assert main(['health', '--target', '{live_server.address}']) == 0\n"
        f"assert main(['generate', '--target', '{live_server.address}', 'hi']) == 0\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', "
        "'server', 'transformers')))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
