"""The Ray Serve cluster (docs/cluster.md): a real ingress and 2 real replicas on a local
Ray instance (tiny model), driven by the gRPC client exactly like the single server."""

from __future__ import annotations

import grpc
import pytest

from protos.switchboard.v1 import switchboard_pb2 as pb
from tests.polling import wait_for
from tests.service_fixtures import UTTERANCE, assert_matches
from tests.test_service import (
    INVALID,
    ROUTES,
    assert_invalid_argument,
    request,
    rpc_error,
    stream_all,
)

pytest.importorskip("ray.serve", reason="the cluster extra is not installed")


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, service_library):
    from tests.cluster_fixtures import cluster_config, start_cluster

    root, routing, _ = service_library
    live = start_cluster(cluster_config(tiny_model_dir, root, routing))
    yield live
    live.stop()


@pytest.mark.parametrize(("label", "fields", "adapter", "route", "detail"), ROUTES,
                         ids=[r[0] for r in ROUTES])
def test_every_route_answers_as_the_single_server(cluster, live_server, expected, label,
                                                  fields, adapter, route, detail):
    stub, single = cluster.stub(), live_server.stub()
    unary = stub.Generate(request(**fields), timeout=60)
    streamed_text, final = stream_all(stub, request(**fields))
    reference = single.Generate(request(**fields), timeout=60)
    for response in (unary, final):
        assert response.replica != ""
        assert response.adapter.name == reference.adapter.name == (adapter or "")
        assert response.adapter.version == reference.adapter.version
        assert (response.route, response.route_detail) == (route, detail)
        assert response.template_source == reference.template_source
        assert response.weight_scale == reference.weight_scale
        assert response.text == reference.text
        assert_matches(response.text, expected(adapter, UTTERANCE))
    assert streamed_text == final.text == unary.text
    assert reference.replica == ""


@pytest.mark.parametrize(("req", "message"), INVALID, ids=[m for _, m in INVALID])
def test_malformed_calls_get_the_same_status(cluster, req, message):
    assert_invalid_argument(cluster.stub(), req, message)


def test_replica_errors_keep_their_status_and_message(cluster, live_server):
    for fields in ({"dialect": "klingon"}, {"dialect": "broken"}):
        got = rpc_error(cluster.stub().Generate, request(**fields), timeout=30)
        want = rpc_error(live_server.stub().Generate, request(**fields), timeout=30)
        assert got.code() == want.code() != grpc.StatusCode.OK
        assert got.details() == want.details()
        assert "\n" not in got.details()


def test_admin_rpcs_reach_every_replica(cluster):
    stub = cluster.stub()
    unloaded = stub.UnloadAdapter(pb.UnloadAdapterRequest(name="cantonese"), timeout=60)
    assert unloaded.tier == pb.TIER_DISK
    assert [i.tier for i in cluster.infos("cantonese")] == ["disk", "disk"]
    loaded = stub.LoadAdapter(pb.LoadAdapterRequest(name="cantonese"), timeout=60)
    assert loaded.tier in (pb.TIER_HOST, pb.TIER_DEVICE) and loaded.version
    infos = cluster.infos("cantonese")
    assert len(infos) == 2 and {i.version for i in infos} == {loaded.version}
    reloaded = stub.ReloadAdapter(pb.ReloadAdapterRequest(name="cantonese"), timeout=60)
    assert reloaded.version == loaded.version
    listed = {a.name: a for a in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=60).adapters}
    assert {"wuyu", "cantonese", "plain", "broken"} <= set(listed)
    assert "not valid JSON" in listed["broken"].error
    error = rpc_error(stub.LoadAdapter, pb.LoadAdapterRequest(name="klingon"), timeout=60)
    assert error.code() == grpc.StatusCode.NOT_FOUND and "klingon" in error.details()
    assert stub.Generate(request(dialect="cantonese"), timeout=60).adapter.name == "cantonese"


def test_the_serving_replica_holds_the_adapter_and_metrics_name_replicas(cluster):
    import urllib.request

    served = {cluster.stub().Generate(request(dialect="wuyu"), timeout=60).replica
              for _ in range(3)}
    stats = {s["replica"]: s for s in cluster.stats()}
    assert len(stats) == 2
    for replica in served:
        assert "wuyu" in stats[replica]["held"]  # Ray Serve's LRU holds it; the cache follows

    def page() -> str:
        return urllib.request.urlopen(
            f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=30).read().decode()

    # The page reads the views the replicas post, about a second old at most.
    wait_for(lambda: all(f'switchboard_adapter_slot_pins{{replica="{replica}"}} 0.0'
                         in page() for replica in stats), timeout=10)
    shown = page()
    for replica in stats:
        assert f'switchboard_running_batch_size{{replica="{replica}"}}' in shown
    assert any(f'switchboard_replica_calls_total{{replica="{r}"}}' in shown for r in served)


def test_admin_log_keeps_each_adapters_last_state_only():
    from server.cluster.board import compact

    log = [(1, "load", "a", None), (2, "unload", "b", None), (3, "load", "c", None),
           (4, "unload", "a", None), (5, "reload", "a", "v1"), (6, "load", "b", None)]
    assert compact(log, set()) == [(3, "load", "c", None), (5, "reload", "a", "v1"),
                                   (6, "load", "b", None)]
    # an earlier change someone still waits for stays until its own answers are in
    assert compact(log, {1, 4}) == [(1, "load", "a", None), (3, "load", "c", None),
                                    (4, "unload", "a", None), (5, "reload", "a", "v1"),
                                    (6, "load", "b", None)]
    assert compact([], set()) == []


def test_the_single_process_server_does_not_import_ray():
    import subprocess
    import sys

    check = ("import sys, server.service.app, clients.cli; "
             "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)


def test_the_python_client_and_the_cli_name_the_replica(cluster):
    import subprocess
    import sys

    from clients.client import SwitchboardClient

    with SwitchboardClient(cluster.address) as client:
        reply = client.generate(UTTERANCE, dialect="wuyu", max_new_tokens=4)
        streamed = [item for item in client.stream(UTTERANCE, region="CN-GD", max_new_tokens=4)]
    assert reply.replica and reply.adapter == "wuyu"
    assert streamed[-1].replica and streamed[-1].adapter == "cantonese"
    shown = subprocess.run(
        [sys.executable, "-m", "clients.cli", "generate", "--target", cluster.address,
         "--dialect", "wuyu", "--max-new-tokens", "4", UTTERANCE],
        capture_output=True, text=True, timeout=120, check=True)
    assert "· replica " in shown.stderr  # the summary line; the text is on stdout


def test_the_openai_api_answers_through_the_cluster(cluster, live_server):
    import json
    import urllib.request

    body = json.dumps({"model": "wuyu", "prompt": UTTERANCE, "max_tokens": 8}).encode()

    def complete(base_url: str) -> dict:
        call = urllib.request.Request(f"{base_url}/completions", data=body,
                                      headers={"content-type": "application/json"})
        with urllib.request.urlopen(call, timeout=60) as response:
            return json.loads(response.read())

    got, want = complete(cluster.http_url), complete(live_server.server.http_url)
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    assert got["model"] == want["model"] == "wuyu"
    assert got["switchboard"]["replica"] and "replica" not in want["switchboard"]


def test_a_replica_must_keep_what_ray_serve_holds(tiny_model_dir, service_library):
    from server.cluster.app import build_app
    from server.errors import InvalidOption
    from tests.cluster_fixtures import cluster_config, replace_cluster

    root, routing, _ = service_library
    config = replace_cluster(cluster_config(tiny_model_dir, root, routing, max_cpu_adapters=4),
                             adapters_per_replica=6)
    with pytest.raises(InvalidOption, match=r"adapters_per_replica \(6\) exceeds max_cpu_adapters"):
        build_app(config)


def test_a_flood_of_reads_does_not_hold_up_an_admin_change(cluster):
    """2,000 concurrent reads (``GET /v1/models`` and metrics scrapes, neither needs the
    admin key) while a LoadAdapter runs: reads are answered from the views the replicas
    post, so the load takes its normal time and the ingress's threads stay bounded. Each
    read once queued a command on the admin log and blocked a thread on it."""
    import asyncio
    import threading
    import time
    from urllib.parse import urlsplit

    from tests.cluster_fixtures import get_many, ingress_pid, thread_count

    stub = cluster.stub()

    def timed_load() -> float:
        stub.UnloadAdapter(pb.UnloadAdapterRequest(name="plain"), timeout=60)
        started = time.monotonic()
        stub.LoadAdapter(pb.LoadAdapterRequest(name="plain"), timeout=60)
        return time.monotonic() - started

    normal = timed_load()
    changes = cluster.log_length()
    pid = ingress_pid()
    threads = [thread_count(pid)]
    http = urlsplit(cluster.http_url)
    answered = [0]
    statuses: list[int] = []
    flooded = threading.Event()

    async def flood() -> None:
        models = get_many(http.hostname or "127.0.0.1", http.port or 80, "/v1/models",
                          1600, 800, answered)
        scrapes = get_many("127.0.0.1", cluster.metrics_port, "/metrics", 400, 16, answered)
        for part in await asyncio.gather(models, scrapes):
            statuses.extend(part)

    def sample() -> None:
        while not flooded.wait(0.02):
            threads.append(thread_count(pid))

    flooder = threading.Thread(target=lambda: asyncio.run(flood()))
    sampler = threading.Thread(target=sample)
    flooder.start()
    sampler.start()
    try:
        wait_for(lambda: answered[0] >= 800, timeout=120)  # the flood is under way
        during = timed_load()
        flooder.join(300)
    finally:
        flooded.set()
        sampler.join(10)
    assert not flooder.is_alive()
    assert answered[0] == 2000
    assert cluster.log_length() == changes + 2, "reads entered the admin log"
    assert during <= max(5 * normal, normal + 5.0), \
        f"LoadAdapter took {during:.1f} s under the flood ({normal:.2f} s without)"
    assert statuses.count(200) == 2000, \
        f"{2000 - statuses.count(200)} reads failed: {sorted(set(statuses))}"
    assert max(threads) <= threads[0] + 64, \
        f"the ingress grew from {threads[0]} to {max(threads)} threads"
