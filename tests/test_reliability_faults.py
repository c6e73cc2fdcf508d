"""Faults against a real server: deleted and corrupt adapters, failed reloads, an engine
fault, SIGTERM during a stuck load and while draining.

Every test asserts the exact status code of the calls it breaks, and that the server
still answers a valid call and holds no pin, row or queue entry afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from protos.switchboard.v1 import switchboard_pb2 as pb
from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc
from server.engine.config import EngineConfig
from server.formats.manifest import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from tests.polling import wait_for
from tests.service_fixtures import ROUTING_YAML, server_config, start_server
from tests.support import ALL_TARGETS, add_manifest, make_random_adapter, publish, spawn_server

UTTERANCE = "侬今朝吃饭伐?"
NAMES = ("steady", "other", "victim", "evicted", "reloadable")


def code_of(call, request, timeout: float = 60) -> grpc.StatusCode:
    """The status of a unary call, or of a stream read to its end."""
    try:
        result = call(request, timeout=timeout)
        if not isinstance(result, pb.GenerateResponse | pb.AdapterStatus):
            list(result)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def generate(dialect: str = "", **fields) -> pb.GenerateRequest:
    fields.setdefault("text", UTTERANCE)
    fields.setdefault("max_new_tokens", 6)
    return pb.GenerateRequest(dialect=dialect, **fields)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, tiny_model_dir, tiny_model):
    """A server of its own (tests here change its files): two slots, 0.2 s polling."""
    folder = tmp_path_factory.mktemp("reliability")
    root, sources = folder / "adapters", folder / "sources"
    root.mkdir()
    for seed, name in enumerate(NAMES, start=40):
        make_random_adapter(str(tiny_model_dir), sources / name, 8, ALL_TARGETS, seed=seed,
                            b_std=0.5)
        publish(sources / name, root / name, tiny_model.base_fingerprint)
    corrupt = root / "corrupt"  # a complete publish of a truncated weights file
    publish(sources / "steady", corrupt, None)
    data = (corrupt / ADAPTER_WEIGHTS_FILE).read_bytes()
    (corrupt / ADAPTER_WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    add_manifest(corrupt, tiny_model.base_fingerprint)
    routing = folder / "routing.yaml"
    routing.write_text(ROUTING_YAML)
    engine = EngineConfig(max_batch_size=8, max_queue_size=64, max_model_len=256, max_loras=2,
                          max_lora_rank=16, max_new_tokens_limit=64, aging_limit_s=0.5)
    server = start_server(server_config(tiny_model_dir, root, routing, engine=engine,
                                        preload=("steady",), poll_interval_s=0.2))
    server.root = root
    server.fingerprint = tiny_model.base_fingerprint
    server.sources = sources
    yield server
    server.stop()


def assert_still_serving(server) -> None:
    """A valid call succeeds, and once idle nothing is held: no pin, row or queue entry."""
    reply = server.stub().Generate(generate("steady"), timeout=60)
    assert reply.completion_tokens > 0 and reply.adapter.name == "steady"
    engine, cache = server.engine, server.cache
    wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0, 30)
    wait_for(lambda: engine.stats()["free_kv_rows"] == engine.config.max_batch_size, 30)
    wait_for(lambda: cache.usage()["version_pins"] == 0 and cache.usage()["slot_pins"] == 0, 30)


def hold_engine(engine) -> tuple[threading.Event, list[int]]:
    """Make the engine wait at its next step until the returned gate is set."""
    gate, held = threading.Event(), []
    engine.fault_hook = lambda step: (held.append(step), gate.wait(30))
    return gate, held


def test_adapter_deleted_while_in_use_finishes_then_not_found(faulty):
    stub, engine, cache = faulty.stub(), faulty.engine, faulty.cache
    gate, held = hold_engine(engine)  # the call below stays in flight until the gate opens
    try:
        stream = stub.GenerateStream(generate("victim", max_new_tokens=24), timeout=60)
        wait_for(lambda: bool(held) and cache.usage()["version_pins"] == 1, 30)
        shutil.rmtree(faulty.root / "victim")
        # New calls are refused as soon as the poller sees the folder gone ...
        wait_for(lambda: cache.info("victim").version is None, 30)
        assert code_of(stub.Generate, generate("victim"), 30) == grpc.StatusCode.NOT_FOUND
    finally:
        engine.fault_hook = None
        gate.set()
    # ... while the call in flight finishes on the version it started with.
    messages = list(stream)
    assert messages[-1].HasField("final") and messages[-1].final.adapter.name == "victim"
    assert messages[-1].final.completion_tokens > 0
    assert stream.code() == grpc.StatusCode.OK
    error = _error(stub.Generate, generate("victim"))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "victim" in error.details()
    assert "victim" not in [a.name for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters]
    assert_still_serving(faulty)


def test_adapter_deleted_after_eviction_is_not_found(faulty):
    stub = faulty.stub()

    def listed() -> dict[str, pb.AdapterStatus]:
        return {a.name: a for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters}

    for name in ("evicted", "steady", "other"):  # two device slots: the third call evicts
        assert code_of(stub.Generate, generate(name)) == grpc.StatusCode.OK
    assert listed()["evicted"].tier == pb.TIER_HOST  # out of its device slot
    status = stub.UnloadAdapter(pb.UnloadAdapterRequest(name="evicted"), timeout=30)
    assert status.tier == pb.TIER_DISK  # and out of host memory
    shutil.rmtree(faulty.root / "evicted")
    wait_for(lambda: "evicted" not in faulty.cache.store.names(), 30)
    assert code_of(stub.Generate, generate("evicted")) == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.LoadAdapter, pb.LoadAdapterRequest(name="evicted")) \
        == grpc.StatusCode.NOT_FOUND
    assert "evicted" not in listed()
    assert_still_serving(faulty)


def test_corrupt_adapter_loaded_50_times_during_live_traffic(faulty):
    stop, outcomes = threading.Event(), []

    def traffic(worker: int) -> None:
        stub, i = faulty.stub(), 0
        while not stop.is_set():
            dialect = ("steady", "other", "")[(worker + i) % 3]
            call = stub.Generate if i % 2 else stub.GenerateStream
            outcomes.append((dialect, code_of(call, generate(dialect))))
            i += 1

    threads = [threading.Thread(target=traffic, args=(w,)) for w in range(3)]
    for thread in threads:
        thread.start()
    try:
        admin = faulty.stub()
        wait_for(lambda: len(outcomes) >= 3, 60)  # the traffic is running
        before, loads, limit = len(outcomes), 0, time.monotonic() + 120
        # At least 50 loads, and on until 6 more calls completed meanwhile (a refused
        # load takes milliseconds, a call much longer).
        while loads < 50 or len(outcomes) < before + 6:
            assert time.monotonic() < limit, (loads, len(outcomes) - before)
            error = _error(admin.LoadAdapter, pb.LoadAdapterRequest(name="corrupt"))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "corrupt" in error.details()
            loads += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    failed = [o for o in outcomes if o[1] != grpc.StatusCode.OK]
    assert failed == [], failed[:5]
    assert_still_serving(faulty)


def test_failed_reload_keeps_the_old_version_serving(faulty):
    stub = faulty.stub()
    before = stub.Generate(generate("reloadable"), timeout=60)
    folder = faulty.root / "reloadable"
    (folder / ADAPTER_WEIGHTS_FILE).write_bytes(b"broken")  # a complete, broken publish
    add_manifest(folder, faulty.fingerprint)
    try:
        error = _error(stub.ReloadAdapter, pb.ReloadAdapterRequest(name="reloadable"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        after = stub.Generate(generate("reloadable"), timeout=60)
        assert after.adapter.version == before.adapter.version
        assert after.text == before.text
        listed = {a.name: a for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
        assert listed["reloadable"].version == before.adapter.version
        assert "safetensors" in listed["reloadable"].error
    finally:
        publish(faulty.sources / "reloadable", folder, faulty.fingerprint)
    assert_still_serving(faulty)


def test_engine_fault_ends_the_affected_streams_with_internal(faulty):
    stub, engine = faulty.stub(), faulty.engine
    streams = [stub.GenerateStream(generate(d, max_new_tokens=64, request_id=f"fault-{i}"),
                                   timeout=60)
               for i, d in enumerate(("steady", "other", ""))]
    for stream in streams:
        next(stream)  # all three are decoding
    gate, held = threading.Event(), []

    def explode(step: int) -> None:  # hold the step, then fail it
        engine.fault_hook = None
        held.append(step)
        gate.wait(30)
        raise RuntimeError("injected fault")

    engine.fault_hook = explode
    wait_for(lambda: bool(held), 30)
    assert engine.stats()["running"] == 3  # the failing step holds all three rows
    gate.set()
    for i, stream in enumerate(streams):
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert f"request id fault-{i}" in info.value.details()
    assert len(held) == 1
    assert_still_serving(faulty)


# -- SIGTERM (a `switchboard serve` process on the tiny model) ------------------------------
EXIT_MARGIN_S = 5.0
"""After the grace period: 1-2 s of gRPC grace for trailers, the engine's stop, the exit."""
PROCESS_CONFIG = """
port: 0
metrics_port: -1
http_port: -1
base_model: {base}
adapter_roots: [{root}]
preload: []
grace_period_s: {grace}
default_max_new_tokens: 16
engine:
  max_batch_size: 4
  max_model_len: 4096
  max_new_tokens_limit: 4000
"""


def _process(tmp_path: Path, tiny_model_dir: Path, grace: float):
    root = tmp_path / "adapters"
    root.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(PROCESS_CONFIG.format(base=tiny_model_dir, root=root, grace=grace))
    log_path = tmp_path / "server.log"
    process, address, *_ = spawn_server(["--config", str(config)], log_path)
    return process, address, root, log_path


def test_sigterm_while_an_adapter_load_is_stuck_exits_within_the_grace_period(
        tmp_path, tiny_model_dir, tiny_model):
    grace = 3.0
    process, address, root, log_path = _process(tmp_path, tiny_model_dir, grace)
    # An adapter whose config file is a FIFO nobody writes: reading it blocks, like a
    # file on a hung network disk.
    make_random_adapter(str(tiny_model_dir), tmp_path / "src", 4, ("q_proj",), seed=1)
    stuck = root / "stuck"
    stuck.mkdir()
    shutil.copy2(tmp_path / "src" / ADAPTER_WEIGHTS_FILE, stuck / ADAPTER_WEIGHTS_FILE)
    os.mkfifo(stuck / ADAPTER_CONFIG_FILE)
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.SwitchboardStub(channel)
    outcome: list[grpc.StatusCode] = []
    loader = threading.Thread(target=lambda: outcome.append(
        code_of(stub.LoadAdapter, pb.LoadAdapterRequest(name="stuck"), 60)))
    try:
        loader.start()
        wait_for(lambda: _reading_fifo(process.pid), 30)
        assert code_of(stub.Generate, generate()) == grpc.StatusCode.OK  # still serving
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(grace + 60)
        elapsed = time.monotonic() - signalled
        assert code == 0, log_path.read_text()[-2000:]
        assert elapsed < grace + EXIT_MARGIN_S, elapsed
        loader.join(30)
        assert outcome and outcome[0] in (grpc.StatusCode.UNAVAILABLE,
                                          grpc.StatusCode.CANCELLED), outcome
    finally:
        channel.close()
        if process.poll() is None:
            process.kill()
    assert "stopped" in log_path.read_text()


def test_second_sigterm_while_draining_does_not_hang(tmp_path, tiny_model_dir, tiny_model):
    grace = 2.0
    process, address, _, log_path = _process(tmp_path, tiny_model_dir, grace)
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.SwitchboardStub(channel)
    started = [threading.Event() for _ in range(3)]
    outcomes: list[object] = [None] * 3

    def long_stream(i: int) -> None:  # longer than the grace period
        final = False
        try:
            for message in stub.GenerateStream(pb.GenerateRequest(
                    prompt=f"{i}", max_new_tokens=4000), timeout=120):
                started[i].set()
                final = final or message.HasField("final")
            outcomes[i] = "final" if final else "ended without final"
        except grpc.RpcError as error:
            outcomes[i] = error.code()
        finally:
            started[i].set()

    threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(3)]
    try:
        for thread in threads:
            thread.start()
        for event in started:
            assert event.wait(60)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining" in log_path.read_text(), 10)
        process.send_signal(signal.SIGTERM)  # impatient operator
        code = process.wait(grace + 60)
        elapsed = time.monotonic() - signalled
        for thread in threads:
            thread.join(30)
    finally:
        channel.close()
        if process.poll() is None:
            process.kill()
    assert code == 0, log_path.read_text()[-2000:]
    assert elapsed < grace + EXIT_MARGIN_S, elapsed
    # Every stream ended with a status: finished, or cut at the end of the grace period.
    for outcome in outcomes:
        assert outcome in ("final", grpc.StatusCode.UNAVAILABLE,
                           grpc.StatusCode.CANCELLED), outcomes


def _reading_fifo(pid: int) -> bool:
    """Whether a thread of the process is blocked opening or reading a FIFO."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "wchan").read_text().strip() in ("pipe_read", "wait_for_partner",
                                                         "fifo_open"):
                return True
        except OSError:
            continue
    return False


def _error(call, request, timeout: float = 60) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=timeout)
    return info.value
