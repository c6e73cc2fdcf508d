"""vLLM's runtime LoRA endpoints (``POST /v1/load_lora_adapter``, ``POST
/v1/unload_lora_adapter``) by plain HTTP against a live server (tiny model) with its own
two adapter roots: vLLM's status codes and plain-text success lines, the admin key, the
``lora_path`` rule, and the same messages as the gRPC admin rpcs."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from protos.switchboard.v1 import switchboard_pb2 as pb
from tests.service_fixtures import LiveServer, server_config, start_server
from tests.support import ALL_TARGETS, make_random_adapter

ADMIN_KEY, GEN_KEY = "lora-admin-key-123456", "lora-gen-key-123456"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def roots(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[Path, Path, Path]:
    """Two adapter roots (alpha in both, beta only in the second, a pickle adapter in
    the first) and a folder outside them holding a valid adapter, gamma."""
    top = tmp_path_factory.mktemp("lora-endpoints")
    first, second, outside = top / "first", top / "second", top / "outside"
    make_random_adapter(str(tiny_model_dir), first / "alpha", 4, ALL_TARGETS, seed=21)
    make_random_adapter(str(tiny_model_dir), second / "alpha", 4, ALL_TARGETS, seed=22)
    make_random_adapter(str(tiny_model_dir), second / "beta", 4, ALL_TARGETS, seed=23)
    make_random_adapter(str(tiny_model_dir), outside / "gamma", 4, ALL_TARGETS, seed=24)
    pickled = first / "pickled"
    pickled.mkdir()
    shutil.copy(first / "alpha" / "adapter_config.json", pickled)
    torch.save({"x": torch.zeros(2)}, pickled / "adapter_model.bin")
    (first / "linked").symlink_to(outside / "gamma")
    return first, second, outside


@pytest.fixture(scope="module")
def lora_server(tiny_model_dir: Path, service_library, roots):
    _, routing, _ = service_library
    first, second, _ = roots
    server = start_server(server_config(
        tiny_model_dir, first, routing, adapter_roots=(str(first), str(second)), preload=(),
        api_keys=(GEN_KEY,), admin_key=ADMIN_KEY, metrics_port=-1))
    yield server
    server.stop()


def post(server: LiveServer, path: str, body: Any, headers: dict[str, str] | None = None
         ) -> tuple[int, str, Any]:
    """(status, content type, body: text on success, the parsed JSON error otherwise)."""
    url = server.server.http_url.removesuffix("/v1") + path
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "content-type": "application/json", **(ADMIN if headers is None else headers)})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers["content-type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["content-type"], json.loads(error.read())


def load(server: LiveServer, name: str, path: str | Path, **extra: Any
         ) -> tuple[int, str, Any]:
    return post(server, "/v1/load_lora_adapter",
                {"lora_name": name, "lora_path": str(path), **extra})


def grpc_details(server: LiveServer, rpc: str, name: str) -> tuple[grpc.StatusCode, str]:
    request = (pb.LoadAdapterRequest if rpc == "LoadAdapter" else pb.UnloadAdapterRequest)(
        name=name)
    with pytest.raises(grpc.RpcError) as caught:
        getattr(server.stub(), rpc)(request, timeout=60,
                                    metadata=[("authorization", f"Bearer {ADMIN_KEY}")])
    return caught.value.code(), caught.value.details()


def tier(server: LiveServer, name: str) -> str:
    return server.cache.info(name).tier


def test_load_and_unload_answer_as_vllm_does(lora_server, roots):
    first, second, _ = roots
    status, kind, text = load(lora_server, "alpha", first / "alpha")
    assert (status, text) == (200, "Success: LoRA adapter 'alpha' added successfully.")
    assert kind.startswith("text/plain") and tier(lora_server, "alpha") == "host"

    status, _, error = load(lora_server, "alpha", first / "alpha")
    assert status == 400 and "already been loaded" in error["error"]["message"]
    assert error["error"]["param"] == "lora_name"
    status, _, text = load(lora_server, "alpha", first / "alpha", load_inplace=True)
    assert (status, text) == (200, "Success: LoRA adapter 'alpha' reloaded successfully.")

    status, _, text = post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "alpha"})
    assert (status, text) == (200, "Success: LoRA adapter 'alpha' removed successfully.")
    assert tier(lora_server, "alpha") == "disk"
    # A name only the second root holds loads from there.
    assert load(lora_server, "beta", second / "beta")[0] == 200
    assert tier(lora_server, "beta") == "host"
    assert post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "beta"})[0] == 200


def test_unknown_adapters_are_404_with_the_grpc_message(lora_server, roots):
    first, _, _ = roots
    status, _, error = load(lora_server, "nothere", first / "nothere")
    code, details = grpc_details(lora_server, "LoadAdapter", "nothere")
    assert (status, code) == (404, grpc.StatusCode.NOT_FOUND)
    assert error["error"]["message"] == details and "no adapter named 'nothere'" in details
    status, _, error = post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "nothere"})
    code, details = grpc_details(lora_server, "UnloadAdapter", "nothere")
    assert (status, code) == (404, grpc.StatusCode.NOT_FOUND)
    assert error["error"]["message"] == details


def test_a_pickle_adapter_is_400_with_the_grpc_message(lora_server, roots):
    first, _, _ = roots
    status, _, error = load(lora_server, "pickled", first / "pickled")
    code, details = grpc_details(lora_server, "LoadAdapter", "pickled")
    assert (status, code) == (400, grpc.StatusCode.FAILED_PRECONDITION)
    assert error["error"]["message"] == details and "pickle" in details
    assert tier(lora_server, "pickled") == "disk"


def test_paths_other_than_root_slash_name_are_refused_and_nothing_loads(lora_server, roots):
    first, second, outside = roots
    loads = lora_server.cache.stats.loads
    refused = [
        ("gamma", outside / "gamma", "is not <adapter root>/gamma"),  # outside every root
        ("gamma", f"{first}/../outside/gamma", "is not <adapter root>/gamma"),
        ("alpha", first / "beta", "is not <adapter root>/alpha"),  # another name's folder
        ("alpha", first, "is not <adapter root>/alpha"),  # the root itself
        ("alpha", second / "alpha", "served from"),  # the first root holding alpha wins
        ("alpha", "first/alpha", "is not <adapter root>/alpha"),  # relative to the cwd
    ]
    for name, path, why in refused:
        status, _, error = load(lora_server, name, path)
        assert status == 400 and why in error["error"]["message"], (path, error)
        assert error["error"]["param"] == "lora_path"
    # A link inside a root leading outside it: refused as the store refuses it (gRPC).
    status, _, error = load(lora_server, "linked", first / "linked")
    assert status == 400 and "outside its root" in error["error"]["message"]
    assert lora_server.cache.stats.loads == loads
    assert {tier(lora_server, name) for name in ("alpha", "gamma", "linked")} == {"disk"}


@pytest.mark.parametrize("route", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"])
def test_the_admin_key_is_required(lora_server, roots, route):
    first, _, _ = roots
    body = {"lora_name": "alpha", "lora_path": str(first / "alpha")}
    if route.endswith("unload_lora_adapter"):
        body = {"lora_name": "alpha"}
    for headers, expected in (({}, 401), ({"authorization": "Bearer wrong-key"}, 401),
                              ({"authorization": f"Bearer {GEN_KEY}"}, 403)):
        status, _, error = post(lora_server, route, body, headers)
        assert status == expected, (headers, error)
        assert "admin key" in error["error"]["message"]
    assert tier(lora_server, "alpha") == "disk"


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    ([], None),
    ({"lora_path": "/x"}, "lora_name"),
    ({"lora_name": "alpha"}, "lora_path"),
    ({"lora_name": "alpha", "lora_path": ""}, "lora_path"),
    ({"lora_name": "../alpha", "lora_path": "/x/../alpha"}, None),
    ({"lora_name": "alpha", "lora_path": "/x", "load_inplace": "yes"}, "load_inplace"),
    ({"lora_name": "alpha", "lora_path": "/x", "lora_int_id": 1}, "lora_int_id"),
    ({"lora_name": "alpha", "lora_path": "/x\u0000"}, "lora_path"),
])
def test_bad_bodies_are_400_naming_the_field(lora_server, body, param):
    status, _, error = post(lora_server, "/v1/load_lora_adapter", body)
    assert status == 400 and error["error"]["param"] == param, error
    assert "\n" not in error["error"]["message"]


def test_unloading_an_adapter_not_in_memory_is_200_as_on_grpc(lora_server):
    assert tier(lora_server, "alpha") == "disk"
    status, _, text = post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "alpha"})
    assert (status, text) == (200, "Success: LoRA adapter 'alpha' removed successfully.")
    reply = lora_server.stub().UnloadAdapter(
        pb.UnloadAdapterRequest(name="alpha"), timeout=60,
        metadata=[("authorization", f"Bearer {ADMIN_KEY}")])
    assert reply.name == "alpha" and reply.tier == pb.TIER_DISK
