"""Hostile input against a real server: path-like adapter names, links out of the adapter
root, a lying safetensors header, oversized stop strings, token counts and messages.

Each case asserts the exact status code, that the error message quotes no more than a
bounded slice of the input, and that the server still answers a valid call afterwards.
"""

from __future__ import annotations

import json
import struct
import time

import grpc
import pytest

from protos.switchboard.v1 import switchboard_pb2 as pb
from server.formats.manifest import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from tests.service_fixtures import ROUTING_YAML, server_config, start_server
from tests.support import add_manifest, make_random_adapter, publish

UTTERANCE = "侬今朝吃饭伐?"
LONG_NAME = "a" * 10_000
HOSTILE_NAMES = ["../x", "/etc/passwd", "a/../b", " ..", LONG_NAME, "wu\0yu", "..", "Wuyu",
                 "wuyu/", "~root", "wuyu\n"]
MAX_DETAILS = 500
"""No error message may be longer than this, whatever the input's size."""


def outcome(call, request, timeout: float = 60) -> tuple[grpc.StatusCode, str]:
    try:
        result = call(request, timeout=timeout)
        if not isinstance(result, pb.GenerateResponse | pb.AdapterStatus):
            list(result)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        return error.code(), error.details() or ""


def assert_refused(call, request, code: grpc.StatusCode, *echo_guard: str) -> str:
    got, details = outcome(call, request)
    assert got == code, (got, details[:200])
    assert len(details) <= MAX_DETAILS, len(details)
    for text in echo_guard:  # the message does not carry the hostile input whole
        assert len(text) < 100 or text not in details
    return details


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_model_dir, tiny_model):
    folder = tmp_path_factory.mktemp("hostile")
    root, outside = folder / "adapters", folder / "outside"
    root.mkdir()
    make_random_adapter(str(tiny_model_dir), folder / "src", 8, ("q_proj", "v_proj"), seed=7,
                        b_std=0.5)
    publish(folder / "src", root / "good", tiny_model.base_fingerprint)
    publish(folder / "src", outside / "secret", tiny_model.base_fingerprint)
    routing = folder / "routing.yaml"
    routing.write_text(ROUTING_YAML)
    server = start_server(server_config(tiny_model_dir, root, routing, preload=("good",),
                                        poll_interval_s=3600.0))
    server.root, server.outside, server.src = root, outside, folder / "src"
    server.fingerprint = tiny_model.base_fingerprint
    yield server
    server.stop()


def still_serves(server) -> None:
    reply = server.stub().Generate(pb.GenerateRequest(text=UTTERANCE, dialect="good",
                                                      max_new_tokens=4), timeout=60)
    assert reply.completion_tokens > 0


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=lambda n: repr(n)[:20])
def test_path_like_adapter_names_are_invalid_argument_in_admin_calls(hostile, name):
    stub = hostile.stub()
    for call, request in ((stub.LoadAdapter, pb.LoadAdapterRequest(name=name)),
                          (stub.UnloadAdapter, pb.UnloadAdapterRequest(name=name)),
                          (stub.ReloadAdapter, pb.ReloadAdapterRequest(name=name))):
        details = assert_refused(call, request, grpc.StatusCode.INVALID_ARGUMENT, name)
        assert "adapter name" in details
    still_serves(hostile)


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=lambda n: repr(n)[:20])
def test_path_like_dialects_are_invalid_argument(hostile, name):
    stub = hostile.stub()
    request = pb.GenerateRequest(text=UTTERANCE, dialect=name, max_new_tokens=4)
    for call in (stub.Generate, stub.GenerateStream):
        details = assert_refused(call, request, grpc.StatusCode.INVALID_ARGUMENT, name)
        assert "dialect" in details
    still_serves(hostile)


def test_empty_dialect_routes_normally(hostile):
    reply = hostile.stub().Generate(pb.GenerateRequest(text=UTTERANCE, dialect="",
                                                       max_new_tokens=4), timeout=60)
    assert reply.route == pb.ROUTE_DEFAULT and reply.completion_tokens > 0


def test_adapter_folder_linked_outside_the_root_is_refused(hostile):
    (hostile.root / "linked").symlink_to(hostile.outside / "secret", target_is_directory=True)
    try:
        stub = hostile.stub()
        details = assert_refused(stub.LoadAdapter, pb.LoadAdapterRequest(name="linked"),
                                 grpc.StatusCode.FAILED_PRECONDITION)
        assert "outside its root" in details
        assert_refused(stub.Generate, pb.GenerateRequest(text=UTTERANCE, dialect="linked"),
                       grpc.StatusCode.FAILED_PRECONDITION)
        # A file linked out of an adapter folder that is itself inside the root: refused too.
        inner = hostile.root / "inner-link"
        publish(hostile.src, inner, hostile.fingerprint)
        (inner / ADAPTER_WEIGHTS_FILE).unlink()
        (inner / ADAPTER_WEIGHTS_FILE).symlink_to(hostile.outside / "secret"
                                                  / ADAPTER_WEIGHTS_FILE)
        details = assert_refused(stub.LoadAdapter, pb.LoadAdapterRequest(name="inner-link"),
                                 grpc.StatusCode.FAILED_PRECONDITION)
        assert "links outside its root" in details
    finally:
        (hostile.root / "linked").unlink()
    still_serves(hostile)


def test_safetensors_header_claiming_a_huge_size_is_refused_quickly(hostile):
    folder = hostile.root / "liar"
    publish(hostile.src, folder, None)
    header = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {
        "dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}
    raw = json.dumps(header).encode()
    (folder / ADAPTER_WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
    add_manifest(folder, hostile.fingerprint)
    # and a header length field that claims 2**63 bytes
    other = hostile.root / "liar-len"
    publish(hostile.src, other, None)
    (other / ADAPTER_WEIGHTS_FILE).write_bytes(struct.pack("<Q", 1 << 63) + b"{}")
    add_manifest(other, hostile.fingerprint)
    stub = hostile.stub()
    for name in ("liar", "liar-len"):
        started = time.monotonic()
        details = assert_refused(stub.LoadAdapter, pb.LoadAdapterRequest(name=name),
                                 grpc.StatusCode.FAILED_PRECONDITION)
        assert time.monotonic() - started < 10
        assert name in details
    still_serves(hostile)


def test_adapter_config_that_is_not_an_object_is_refused(hostile):
    folder = hostile.root / "odd-config"
    publish(hostile.src, folder, None)
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(["r", 8] * 1000))
    add_manifest(folder, hostile.fingerprint)
    assert_refused(hostile.stub().LoadAdapter, pb.LoadAdapterRequest(name="odd-config"),
                   grpc.StatusCode.FAILED_PRECONDITION)
    still_serves(hostile)


@pytest.mark.parametrize("fields, needle", [
    ({"stop": [f"s{i}" for i in range(64)]}, "stop strings"),
    ({"stop": ["x" * 1_000_000]}, "stop string"),
    ({"max_new_tokens": 10**9}, "max_new_tokens"),
    ({"max_new_tokens": -5}, "max_new_tokens"),
    ({"request_id": "r" * 5_000}, "request_id"),
    ({"text": "", "prompt": "p" * 100_000}, "text"),
], ids=["64-stops", "1MB-stop", "1e9-tokens", "negative-tokens", "5kB-request-id",
        "text-and-prompt"])
def test_oversized_fields_are_invalid_argument_with_a_bounded_message(hostile, fields, needle):
    fields = dict(fields)
    if "text" not in fields:
        fields["text"] = UTTERANCE
    request = pb.GenerateRequest(**fields)
    for call in (hostile.stub().Generate, hostile.stub().GenerateStream):
        details = assert_refused(call, request, grpc.StatusCode.INVALID_ARGUMENT,
                                 *[str(v) for v in fields.values()])
        assert needle in details
    still_serves(hostile)


def test_message_over_the_size_limit_is_resource_exhausted(hostile):
    request = pb.GenerateRequest(text="侬" * 400_000)  # 1.2 MB in UTF-8; the limit is 1 MiB
    for call in (hostile.stub().Generate, hostile.stub().GenerateStream):
        details = assert_refused(call, request, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "侬侬侬" not in details
    still_serves(hostile)


def test_the_soak_malformed_cases_get_their_one_allowed_status(live_server):
    """The soak (bench/soak.py) counts these as disallowed unless each gets its status."""
    from tests.support import malformed_requests

    stub = live_server.stub()
    for what, request, expected in malformed_requests():
        for call in (stub.Generate, stub.GenerateStream):
            got, details = outcome(call, request)
            assert got.name == expected, (what, got, details[:200])
            assert len(details) <= MAX_DETAILS
    reply = stub.Generate(pb.GenerateRequest(text=UTTERANCE, max_new_tokens=4), timeout=60)
    assert reply.completion_tokens > 0
