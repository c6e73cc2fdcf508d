"""API keys, admin key, message-size limits, queue-full, TLS and the start-up health state,
each on its own live server (tiny model)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.switchboard.v1 import switchboard_pb2 as pb
from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc
from server.engine.config import EngineConfig
from server.service.app import SwitchboardServer
from tests.polling import wait_for
from tests.service_fixtures import LiveServer, server_config, start_server

GEN_KEY, ADMIN_KEY = "gen-key-123456", "admin-key-654321"


@pytest.fixture(scope="module")
def guarded(tiny_model_dir, service_library):
    root, routing, _ = service_library
    server = start_server(server_config(
        tiny_model_dir, root, routing, api_keys=(GEN_KEY,), admin_key=ADMIN_KEY,
        max_message_bytes=16 * 1024, metrics_port=-1,
        engine=EngineConfig(max_batch_size=2, max_queue_size=2, max_model_len=256,
                            max_loras=2, max_lora_rank=16, max_new_tokens_limit=64)))
    yield server
    server.stop()


def key(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_generation_needs_an_api_key(guarded):
    stub = guarded.stub()
    req = pb.GenerateRequest(text="hello", dialect="wuyu")
    assert code_of(stub.Generate, req, timeout=30) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub.Generate, req, timeout=30, metadata=key("wrong")) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub.Generate, req, timeout=30, metadata=key(GEN_KEY)) == grpc.StatusCode.OK
    assert code_of(stub.Generate, req, timeout=30, metadata=key(ADMIN_KEY)) == \
        grpc.StatusCode.OK


def test_admin_rpcs_need_the_admin_key(guarded):
    stub = guarded.stub()
    req = pb.ListAdaptersRequest()
    assert code_of(stub.ListAdapters, req, timeout=30) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub.ListAdapters, req, timeout=30, metadata=key(GEN_KEY)) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert code_of(stub.ReloadAdapter, pb.ReloadAdapterRequest(name="wuyu"), timeout=30,
                   metadata=key(GEN_KEY)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(stub.ListAdapters, req, timeout=30, metadata=key(ADMIN_KEY)) == \
        grpc.StatusCode.OK


def test_health_needs_no_key(guarded):
    health = health_pb2_grpc.HealthStub(guarded.channel())
    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_oversized_message_is_refused(guarded):
    huge = pb.GenerateRequest(text="x" * 40_000, dialect="wuyu")
    assert code_of(guarded.stub().Generate, huge, timeout=30, metadata=key(GEN_KEY)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code_of(guarded.stub().Generate, pb.GenerateRequest(text="ok"), timeout=30,
                   metadata=key(GEN_KEY)) == grpc.StatusCode.OK


def test_queue_full_is_resource_exhausted_and_the_rest_complete(guarded):
    engine = guarded.engine
    gate = threading.Event()
    engine.fault_hook = lambda step: gate.wait(30)  # hold the batch; requests pile up
    stub = guarded.stub()
    req = pb.GenerateRequest(text="hello", max_new_tokens=4)
    try:
        with ThreadPoolExecutor(3) as pool:
            def send():
                return pool.submit(code_of, stub.Generate, req, timeout=60,
                                   metadata=key(GEN_KEY))
            held = [send()]  # admitted; the engine then holds in the step
            wait_for(lambda: engine.stats()["running"] == 1, 30)
            held += [send(), send()]  # the queue (size 2) fills
            wait_for(lambda: engine.stats()["waiting"] == 2, 30)
            try:
                stub.Generate(req, timeout=30, metadata=key(GEN_KEY))
                raise AssertionError("a request beyond the queue was accepted")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "queue is full" in error.details()
            gate.set()
            assert [f.result(60) for f in held] == [grpc.StatusCode.OK] * 3
    finally:
        engine.fault_hook = None
        gate.set()


@contextlib.contextmanager
def held_server(tiny_model_dir, service_library,
                **changes: Any) -> Iterator[tuple[LiveServer, threading.Event]]:
    """A server whose port is bound but whose model load waits for the yielded event
    (``changes``: settings, e.g. a given ``port``)."""
    root, routing, _ = service_library
    loop = asyncio.new_event_loop()
    release, bound = threading.Event(), threading.Event()
    changes.setdefault("metrics_port", -1)
    server = SwitchboardServer(server_config(tiny_model_dir, root, routing, **changes))
    real_load = server._load

    def held_load() -> None:
        bound.set()
        release.wait(60)
        real_load()

    server._load = held_load  # type: ignore[method-assign]

    async def main() -> None:
        await server.start()
        await server.wait_stopped()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    live = LiveServer(server, loop, thread)
    try:
        assert bound.wait(60)
        yield live, release
    finally:
        release.set()
        live.stop()


def test_health_is_not_serving_until_loaded(tiny_model_dir, service_library):
    """Start-up: the port answers at once, NOT_SERVING (and UNAVAILABLE for calls) while
    the model loads; SERVING after. The load is held on an event to observe that state."""
    with held_server(tiny_model_dir, service_library) as (live, release):
        health = health_pb2_grpc.HealthStub(live.channel())
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            live.stub().Generate(pb.GenerateRequest(text="hi"), timeout=10)
            raise AssertionError("a call was served before the model loaded")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "starting" in error.details()
        release.set()
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                 == health_pb2.HealthCheckResponse.SERVING, 60)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_tls(tiny_model_dir, service_library, tmp_path):
    root, routing, _ = service_library
    cert, private = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(private), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    server = start_server(server_config(tiny_model_dir, root, routing, metrics_port=-1,
                                        tls_cert=str(cert), tls_key=str(private)))
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        target = f"localhost:{server.server.port}"
        with grpc.secure_channel(target, credentials) as channel:
            reply = pb_grpc.SwitchboardStub(channel).Generate(
                pb.GenerateRequest(text="hello", dialect="wuyu"), timeout=30)
            assert reply.adapter.name == "wuyu"
        with grpc.insecure_channel(target) as channel:  # plaintext is not served
            assert code_of(pb_grpc.SwitchboardStub(channel).Generate,
                           pb.GenerateRequest(text="hello"), timeout=5) == \
                grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
