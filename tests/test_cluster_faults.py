"""The cluster under faults and changes: a replica killed mid-stream, a trainer-style
publish to the shared adapter root, SIGTERM to ``switchboard serve --cluster`` (alone, and
to its whole process group, Ray's processes included). Its own
cluster (own adapter root, long generations so a kill lands mid-stream)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from protos.switchboard.v1 import switchboard_pb2 as pb
from server.engine.config import EngineConfig
from tests.polling import wait_for
from tests.service_fixtures import ROUTING_YAML, UTTERANCE, make_library
from tests.support import publish, spawn_server

pytest.importorskip("ray.serve", reason="the cluster extra is not installed")

POLL_S = 1.0
LONG = 1000
"""Tokens of a call that is still running when the test acts (seconds on the tiny model)."""


def long_engine() -> EngineConfig:
    return EngineConfig(max_batch_size=16, max_queue_size=64, max_model_len=1100, max_loras=4,
                        max_lora_rank=16, max_new_tokens_limit=LONG, aging_limit_s=0.5)


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model_dir, tiny_model) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cluster-faults")
    root = folder / "adapters"
    root.mkdir()
    make_library(root, tiny_model_dir, tiny_model.base_fingerprint)
    routing = folder / "routing.yaml"
    routing.write_text(ROUTING_YAML)
    return root, routing


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, library):
    from tests.cluster_fixtures import cluster_config, start_cluster

    root, routing = library
    live = start_cluster(cluster_config(tiny_model_dir, root, routing, engine=long_engine(),
                                        poll_interval_s=POLL_S))
    yield live
    live.stop()


def versions(cluster, name: str) -> list[str]:
    """The served version of ``name`` on each live replica."""
    return [info.version for info in cluster.infos(name)]


def test_publish_reaches_every_replica_and_running_calls_keep_their_version(
        cluster, library, tiny_model):
    root, _ = library
    stub = cluster.stub()
    old = versions(cluster, "wuyu")
    assert len(old) == 2 and len(set(old)) == 1
    running = stub.GenerateStream(pb.GenerateRequest(text=UTTERANCE, dialect="wuyu",
                                                     max_new_tokens=LONG), timeout=120)
    assert not next(running).HasField("final")  # decoding on the old version

    publish(root / "plain", root / "wuyu", tiny_model.base_fingerprint)
    published = time.monotonic()
    wait_for(lambda: set(versions(cluster, "wuyu")).isdisjoint(old), timeout=30)
    took = time.monotonic() - published
    assert took <= 2 * POLL_S + 1.0, f"every replica served the publish after {took:.1f} s"
    new = versions(cluster, "wuyu")[0]
    for fields in ({"dialect": "wuyu"}, {"region": "CN-SH"}, {"caller_number": "+86 21 1"}):
        response = stub.Generate(pb.GenerateRequest(text=UTTERANCE, max_new_tokens=4,
                                                    **fields), timeout=60)
        assert response.adapter.version == new
    finals = [m.final for m in running if m.HasField("final")]
    assert finals[0].adapter.version == old[0]
    assert finals[0].completion_tokens == LONG


def test_a_deadline_ends_the_call_and_frees_the_replica(cluster):
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({"model": "wuyu", "prompt": UTTERANCE, "max_tokens": LONG,
                       "timeout_s": 0.5}).encode()
    call = urllib.request.Request(f"{cluster.http_url}/completions", data=body,
                                  headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(call, timeout=60)
    assert caught.value.code == 504
    error = rpc_error_code(cluster, pb.GenerateRequest(prompt="late", max_new_tokens=LONG),
                           timeout=0.5)
    assert error == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: all(s["engine"]["running"] == s["cache"]["version_pins"] == 0
                         for s in cluster.stats()), timeout=30)


def rpc_error_code(cluster, request: pb.GenerateRequest, timeout: float) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        list(cluster.stub().GenerateStream(request, timeout=timeout))
    return caught.value.code()


def test_a_killed_replica_ends_only_its_calls_and_is_replaced(cluster):
    import ray

    stub = cluster.stub()
    outcomes: list[tuple[str, str]] = [("", "")] * 16
    yielded = [threading.Event() for _ in outcomes]

    def call(i: int) -> None:
        try:
            final = None
            for message in stub.GenerateStream(pb.GenerateRequest(
                    prompt=f"caller {i} says", max_new_tokens=LONG), timeout=120):
                yielded[i].set()
                if message.HasField("final"):
                    final = message.final
            assert final is not None
            outcomes[i] = ("OK", final.replica)
        except grpc.RpcError as exc:
            outcomes[i] = (exc.code().name, exc.details())
        finally:
            yielded[i].set()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(outcomes))]
    for thread in threads:
        thread.start()
    wait_for(lambda: all(event.is_set() for event in yielded), timeout=60)
    stats = cluster.stats()
    victim = max(stats, key=lambda s: s["engine"]["running"])["replica"]
    assert all(s["engine"]["running"] > 0 for s in stats), "both replicas hold calls"
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].endswith(victim) and "SwitchboardReplica" in a["name"]]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    after = stub.Generate(pb.GenerateRequest(text=UTTERANCE, max_new_tokens=4), timeout=30)
    assert after.replica != victim  # new calls succeed at once, on the survivor
    for thread in threads:
        thread.join(150)
    codes = [code for code, _ in outcomes]
    assert set(codes) <= {"OK", "UNAVAILABLE"}, outcomes
    lost = [detail for code, detail in outcomes if code == "UNAVAILABLE"]
    assert lost and all(victim in detail for detail in lost)
    assert all(replica != victim for code, replica in outcomes if code == "OK")

    killed_at = time.monotonic()
    wait_for(lambda: len({s["replica"] for s in cluster.stats()} - {victim}) == 2, timeout=60)
    replaced = {s["replica"] for s in cluster.stats()} - {victim}
    assert len(replaced) == 2, f"replacement serving after {time.monotonic() - killed_at:.0f} s"
    for stat in cluster.stats():  # nothing left behind on the survivors
        assert stat["engine"]["running"] == stat["engine"]["waiting"] == 0
        assert stat["cache"]["slot_pins"] == stat["cache"]["version_pins"] == 0


@pytest.mark.slow
def test_sigterm_drains_every_replica_and_exits_0(tiny_model_dir, library, tmp_path):
    root, routing = library
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"base_model: {tiny_model_dir}\nadapter_roots: [{root}]\nrouting_table: {routing}\n"
        "port: 0\nmetrics_port: -1\nhttp_port: -1\ngrace_period_s: 30\n"
        "default_max_new_tokens: 8\n"
        "engine: {max_model_len: 1100, max_new_tokens_limit: 1000, max_loras: 4}\n"
        "cluster: {replicas: 2, torch_threads: 1, replica_metrics_port: -1, "
        "app_name: sigterm-test}\n")
    server = spawn_server(["--cluster", "--config", str(config)], tmp_path / "cluster.log",
                          timeout=300)
    try:
        stub = pb_grpc_stub(server.address)
        running = stub.GenerateStream(pb.GenerateRequest(prompt="drain me",
                                                         max_new_tokens=300), timeout=120)
        assert not next(running).HasField("final")
        server.process.send_signal(signal.SIGTERM)
        finals = [m.final for m in running if m.HasField("final")]
        assert finals and finals[0].completion_tokens == 300  # it finished, not cut off
        assert server.process.wait(120) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
    log = (tmp_path / "cluster.log").read_text()
    assert "draining the cluster" in log and "stopped" in log


@pytest.mark.slow
def test_sigterm_to_the_process_group_ends_in_time_and_leaves_no_ray_process(
        tiny_model_dir, library, tmp_path):
    """What ``kill -- -PGID`` or ``systemctl stop`` does: the raylet, the GCS and the
    replicas get the SIGTERM too, so nothing can be drained. The command still ends
    within ``grace_period_s`` + 15 s, says what was lost, exits non-zero and leaves none
    of the Ray processes it started behind."""
    root, routing = library
    grace, tokens = 10, 4000  # no call can finish within the grace period
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"base_model: {tiny_model_dir}\nadapter_roots: [{root}]\nrouting_table: {routing}\n"
        f"port: 0\nmetrics_port: -1\nhttp_port: -1\ngrace_period_s: {grace}\n"
        f"engine: {{max_model_len: {tokens + 100}, max_new_tokens_limit: {tokens}, "
        "max_loras: 4}\n"
        "cluster: {replicas: 2, torch_threads: 1, replica_metrics_port: -1, "
        "app_name: group-sigterm-test}\n")
    server = spawn_server(["--cluster", "--config", str(config)], tmp_path / "cluster.log",
                          timeout=300, new_session=True)
    session = server.process.pid
    try:
        assert session_processes(session) - {session}, "Ray runs in the command's session"
        stub = pb_grpc_stub(server.address)
        streams = [stub.GenerateStream(pb.GenerateRequest(prompt=f"caller {i} says",
                                                          max_new_tokens=tokens), timeout=120)
                   for i in range(4)]
        for stream in streams:
            assert not next(stream).HasField("final")  # all four are decoding
        ended: list[str] = []

        def drain(stream) -> None:
            try:
                for _ in stream:
                    pass
                ended.append("OK")
            except grpc.RpcError as exc:
                ended.append(exc.code().name)

        readers = [threading.Thread(target=drain, args=(s,), daemon=True) for s in streams]
        for reader in readers:
            reader.start()
        os.killpg(session, signal.SIGTERM)
        signalled = time.monotonic()
        code = server.process.wait(grace + 15)
        took = time.monotonic() - signalled
        for reader in readers:
            reader.join(30)
        assert len(ended) == len(streams), "every stream ended"
        assert "OK" not in ended, ended  # cut, with an error status
        assert code != 0, "calls were cut, yet the command exited 0"
        assert took <= grace + 15
        wait_for(lambda: not session_processes(session), timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session, signal.SIGKILL)
    log = (tmp_path / "cluster.log").read_text()
    assert "the Ray runtime stopped before the replicas were drained" in log, log[-3000:]


def session_processes(session: int) -> set[int]:
    """The live processes in session ``session`` (zombies not counted): what the command
    started there, Ray's own processes included, wherever they were re-parented to."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # pid (comm) state ppid pgrp session ...: comm may hold spaces, so from ')'
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == session:
            found.add(int(entry.name))
    return found


def pb_grpc_stub(address: str):
    from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc

    return pb_grpc.SwitchboardStub(grpc.insecure_channel(address))
