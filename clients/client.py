"""``SwitchboardClient``: the blocking Python client (``clients.aio`` has the asyncio one).

    with SwitchboardClient("127.0.0.1:50051") as client:
        print(client.generate("侬今朝吃饭伐?", dialect="wuyu").text)
        for item in client.stream("我張單幾時到期呀?", caller_number="+852 2345 6789"):
            if isinstance(item, StreamChunk):  # the text, as it is generated
                print(item.text, end="", flush=True)
            else:  # last: the GenerateResult, whose text is the whole answer again
                print(f"  [{item.adapter or 'base'}]")

Every failed call raises :class:`~clients.errors.SwitchboardError` with the gRPC status
and the server's message. Retries follow ``clients.retry`` (a server that is still
starting is waited for, within the call's deadline). Nothing here imports torch or the
server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.errors import SwitchboardError, from_rpc_error
from clients.messages import (
    AdapterStatus,
    GenerateResult,
    StreamChunk,
    adapter_status,
    generate_request,
    generate_result,
)
from clients.retry import Attempts, RetryPolicy, is_not_grpc
from protos.switchboard.v1 import switchboard_pb2 as pb
from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
HEALTH_NAMES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}


RECONNECT_BACKOFF_MS = 1000
"""Longest wait between reconnection attempts. gRPC's default grows to 120 s, so a
client that first found the port closed (the server still importing) would see it open
up to a minute after it did; one server, one address: a second is plenty."""
WAIT_POLL_S = (0.05, 1.0)
"""First and longest pause between health checks in :meth:`SwitchboardClient.wait_serving`."""
WAITED_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS)]


def read_certificate(root_certificate: bytes | str | Path | None) -> bytes | None:
    if root_certificate is None or isinstance(root_certificate, bytes):
        return root_certificate
    return Path(root_certificate).expanduser().read_bytes()


class ClientSettings:
    """What both clients share: address, keys, TLS, deadline and retry policy."""

    def __init__(self, target: str = DEFAULT_TARGET, *, api_key: str | None = None,
                 admin_key: str | None = None,
                 root_certificate: bytes | str | Path | None = None,
                 timeout: float | None = 120.0, retry: RetryPolicy | None = None,
                 max_message_bytes: int = 4 << 20) -> None:
        self.address = target
        self.api_key = api_key
        self.admin_key = admin_key
        self.certificate = read_certificate(root_certificate)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_message_bytes = max_message_bytes
        self.retries = 0
        """Retries made so far (all calls): for logs, tests and the load generator."""

    def metadata(self, admin: bool) -> list[tuple[str, str]]:
        key = self.admin_key if admin and self.admin_key else self.api_key
        return [("authorization", f"Bearer {key}")] if key else []

    def attempts(self, timeout: float | None) -> Attempts:
        return Attempts(self.retry, self.timeout if timeout is None else timeout)


class SwitchboardClient(ClientSettings):
    def __init__(self, target: str = DEFAULT_TARGET, **settings: Any) -> None:
        super().__init__(target, **settings)
        options = channel_options(self.max_message_bytes)
        if self.certificate is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.certificate)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.SwitchboardStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SwitchboardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: Any, request: Any, *, admin: bool = False,
               timeout: float | None = None) -> Any:
        attempts = self.attempts(timeout)
        while True:
            try:
                return method(request, timeout=attempts.remaining(),
                              metadata=self.metadata(admin))
            except grpc.RpcError as error:
                failure = from_rpc_error(error, self.address)
                wait = attempts.delay(failure.code, failure.details)
                if wait is None:
                    raise failure from None
                self.retries += 1
                time.sleep(wait)

    # -- generation ----------------------------------------------------------------------
    def generate(self, text: str | None = None, *, timeout: float | None = None,
                 **options: Any) -> GenerateResult:
        """One whole reply. ``text`` is the caller's utterance; options as the proto
        (``prompt``, ``messages``, ``dialect``, ``caller_number``, ``region``,
        ``weight_scale``, ``max_new_tokens``, ``temperature``, ``seed``, ``stop``,
        ``ignore_eos``, ``min_tokens`` ...)."""
        request = generate_request(text, **options)
        return generate_result(self._unary(self._stub.Generate, request, timeout=timeout))

    def stream(self, text: str | None = None, *, timeout: float | None = None,
               **options: Any) -> Iterator[StreamChunk | GenerateResult]:
        """:class:`StreamChunk` items as the text is generated, then exactly one
        :class:`GenerateResult`, last.

        The result's ``text`` is the whole answer again (the chunks joined), with the
        route, adapters, token counts and timings, so a loop that prints every item's
        ``text`` prints the answer twice: print the chunks (``isinstance(item,
        StreamChunk)``) and read the rest from the last item.

        Retried only until the first message arrives; after that a failure is raised,
        since replaying would repeat text the caller has already shown."""
        request = generate_request(text, **options)
        attempts = self.attempts(timeout)
        while True:
            received = False
            call = self._stub.GenerateStream(request, timeout=attempts.remaining(),
                                             metadata=self.metadata(False))
            try:
                for message in call:
                    received = True
                    if message.HasField("final"):
                        yield generate_result(message.final)
                    else:
                        yield StreamChunk(message.text, message.tokens)
                return
            except grpc.RpcError as error:
                failure = from_rpc_error(error, self.address)
                wait = None if received else attempts.delay(failure.code, failure.details)
                if wait is None:
                    raise failure from None
                self.retries += 1
                time.sleep(wait)
            finally:
                if hasattr(call, "cancel"):
                    call.cancel()  # a consumer that stopped early frees the server's row

    # -- admin ---------------------------------------------------------------------------
    def list_adapters(self, timeout: float | None = None) -> list[AdapterStatus]:
        reply = self._unary(self._stub.ListAdapters, pb.ListAdaptersRequest(), admin=True,
                            timeout=timeout)
        return [adapter_status(a) for a in reply.adapters]

    def load_adapter(self, name: str, timeout: float | None = None) -> AdapterStatus:
        return adapter_status(self._unary(self._stub.LoadAdapter,
                                          pb.LoadAdapterRequest(name=name), admin=True,
                                          timeout=timeout))

    def unload_adapter(self, name: str, timeout: float | None = None) -> AdapterStatus:
        return adapter_status(self._unary(self._stub.UnloadAdapter,
                                          pb.UnloadAdapterRequest(name=name), admin=True,
                                          timeout=timeout))

    def reload_adapter(self, name: str, version: str | None = None,
                       timeout: float | None = None) -> AdapterStatus:
        """Reload from disk now, or roll back to ``version`` (a kept previous version)."""
        request = pb.ReloadAdapterRequest(name=name, version=version or "")
        return adapter_status(self._unary(self._stub.ReloadAdapter, request, admin=True,
                                          timeout=timeout))

    def health(self, service: str = "", timeout: float | None = 10.0) -> str:
        """``SERVING``, ``NOT_SERVING`` ... of the server (``service``: one service)."""
        reply = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service),
                            timeout=timeout)
        return HEALTH_NAMES.get(reply.status, "UNKNOWN")

    def wait_serving(self, timeout: float, service: str = "") -> str:
        """Poll :meth:`health` until ``SERVING`` or ``timeout`` seconds pass; return the
        last status. For scripts that start a server and then call it: a port not yet
        open, ``NOT_SERVING`` (loading), UNAVAILABLE and a check past its deadline are
        waited through; any other failure, or one of those still there at the end, is
        raised."""
        deadline = time.monotonic() + timeout
        pause = WAIT_POLL_S[0]
        while True:
            left = deadline - time.monotonic()
            try:
                status = self._health_once(service, max(0.05, min(10.0, left)))
                failure = None
            except SwitchboardError as error:
                if error.code not in WAITED_CODES or is_not_grpc(error.details):
                    raise
                status, failure = "UNKNOWN", error
            left = deadline - time.monotonic()
            if status == "SERVING" or left <= 0:
                if failure is not None:
                    raise failure
                return status
            time.sleep(min(pause, left))
            pause = min(WAIT_POLL_S[1], pause * 2)

    def _health_once(self, service: str, timeout: float) -> str:
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                       timeout=timeout, metadata=self.metadata(False))
        except grpc.RpcError as error:
            raise from_rpc_error(error, self.address) from None
        return HEALTH_NAMES.get(reply.status, "UNKNOWN")


__all__ = [
    "AdapterStatus",
    "GenerateResult",
    "RetryPolicy",
    "StreamChunk",
    "SwitchboardClient",
    "SwitchboardError",
]
