"""Graceful shutdown of a real `switchboard serve` process on the default model."""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.switchboard.v1 import switchboard_pb2 as pb
from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc
from tests.support import spawn_server

CONFIG = """
port: 0
metrics_port: -1
http_port: 0
base_model: default
adapter_roots: [{root}]
preload: []
grace_period_s: 120
default_max_new_tokens: 32
engine:
  max_batch_size: 8
  max_model_len: 256
  max_new_tokens_limit: 64
"""


def start_process(tmp_path: Path) -> tuple[subprocess.Popen, str, Path]:
    (tmp_path / "adapters").mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(root=tmp_path / "adapters"))
    log_path = tmp_path / "server.log"
    process, address, *_ = spawn_server(["--config", str(config)], log_path)
    return process, address, log_path


def test_sigterm_drains_in_flight_streams_and_exits_0(tmp_path):
    process, address, log_path = start_process(tmp_path)
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.SwitchboardStub(channel)
    first_chunks = [threading.Event() for _ in range(8)]
    finals: list[pb.GenerateResponse | BaseException | None] = [None] * 8
    signalled = threading.Event()
    finished_before_signal = []

    def stream(i: int) -> None:
        try:
            req = pb.GenerateRequest(prompt=f"Count from {i} to 100: {i}, {i + 1},",
                                     max_new_tokens=40)
            for message in stub.GenerateStream(req, timeout=300):
                first_chunks[i].set()
                if message.HasField("final"):
                    finals[i] = message.final
                    if not signalled.is_set():
                        finished_before_signal.append(i)
        except BaseException as exc:
            finals[i] = exc
            first_chunks[i].set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    try:
        for thread in threads:
            thread.start()
        for event in first_chunks:  # every stream has received a chunk
            assert event.wait(300)
        process.send_signal(signal.SIGTERM)
        signalled.set()

        health = health_pb2_grpc.HealthStub(channel)
        try:  # draining: NOT_SERVING, and new calls are refused
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub.Generate(pb.GenerateRequest(text="hello"), timeout=10)
            raise AssertionError("a new call was accepted while draining")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE

        for thread in threads:
            thread.join(300)
        assert process.wait(120) == 0, log_path.read_text()[-3000:]
    finally:
        channel.close()
        if process.poll() is None:
            process.kill()
    assert finished_before_signal == []  # all 8 were in flight when SIGTERM arrived
    for final in finals:
        assert isinstance(final, pb.GenerateResponse), final
        assert final.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
        assert final.completion_tokens > 1
    log = log_path.read_text()
    assert "draining" in log and "stopped" in log
