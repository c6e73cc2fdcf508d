"""The Ray Serve cluster (docs/cluster.md): a real ingress and 2 real replicas on a local
Ray instance (tiny model), driven by the gRPC client exactly like the single server."""

from __future__ import annotations

import grpc
import pytest

from tests.service_fixtures import UTTERANCE, assert_matches
from tests.test_service import INVALID, ROUTES, request, rpc_error, stream_all

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
    stub = cluster.stub()
    for call in (stub.Generate, stub.GenerateStream):
        error = rpc_error(call, req, timeout=30)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.details()


def test_replica_errors_keep_their_status_and_message(cluster, live_server):
    for fields in ({"dialect": "klingon"}, {"dialect": "broken"}):
        got = rpc_error(cluster.stub().Generate, request(**fields), timeout=30)
        want = rpc_error(live_server.stub().Generate, request(**fields), timeout=30)
        assert got.code() == want.code() != grpc.StatusCode.OK
        assert got.details() == want.details()
        assert "\n" not in got.details()
