"""``AsyncSwitchboardClient``: the asyncio twin of :class:`~clients.client.SwitchboardClient`.

    async with AsyncSwitchboardClient("127.0.0.1:50051") as client:
        result = await client.generate("侬今朝吃饭伐?", dialect="wuyu")
        async for item in client.stream("我張單幾時到期呀?", region="CN-HK"):
            if isinstance(item, StreamChunk):  # the last item is the GenerateResult
                print(item.text, end="", flush=True)

Same options, results, errors and retry rules as the blocking client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import (
    DEFAULT_TARGET,
    HEALTH_NAMES,
    WAIT_POLL_S,
    WAITED_CODES,
    ClientSettings,
    channel_options,
)
from clients.errors import from_rpc_error
from clients.messages import (
    AdapterStatus,
    GenerateResult,
    StreamChunk,
    adapter_status,
    generate_request,
    generate_result,
)
from clients.retry import is_not_grpc
from protos.switchboard.v1 import switchboard_pb2 as pb
from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc


class AsyncSwitchboardClient(ClientSettings):
    def __init__(self, target: str = DEFAULT_TARGET, **settings: Any) -> None:
        super().__init__(target, **settings)
        options = channel_options(self.max_message_bytes)
        if self.certificate is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.certificate)
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._stub = pb_grpc.SwitchboardStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncSwitchboardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any, *, admin: bool = False,
                     timeout: float | None = None) -> Any:
        attempts = self.attempts(timeout)
        while True:
            try:
                return await method(request, timeout=attempts.remaining(),
                                    metadata=self.metadata(admin))
            except grpc.RpcError as error:
                failure = from_rpc_error(error, self.address)
                wait = attempts.delay(failure.code, failure.details)
                if wait is None:
                    raise failure from None
                self.retries += 1
                await asyncio.sleep(wait)

    async def generate(self, text: str | None = None, *, timeout: float | None = None,
                       **options: Any) -> GenerateResult:
        """One whole reply; options as :meth:`SwitchboardClient.generate
        <clients.client.SwitchboardClient.generate>` (``ignore_eos``, ``min_tokens`` too)."""
        request = generate_request(text, **options)
        return generate_result(await self._unary(self._stub.Generate, request,
                                                 timeout=timeout))

    async def stream(self, text: str | None = None, *, timeout: float | None = None,
                     **options: Any) -> AsyncIterator[StreamChunk | GenerateResult]:
        """:class:`StreamChunk` items as the text is generated, then exactly one
        :class:`GenerateResult`, last, whose ``text`` is the whole answer again: print
        the chunks, read route, adapters and counts from the last item (as
        :meth:`SwitchboardClient.stream <clients.client.SwitchboardClient.stream>`).
        Retried only until the first message arrives."""
        request = generate_request(text, **options)
        attempts = self.attempts(timeout)
        while True:
            received = False
            try:
                call = self._stub.GenerateStream(request, timeout=attempts.remaining(),
                                                 metadata=self.metadata(False))
                try:
                    async for message in call:
                        received = True
                        if message.HasField("final"):
                            yield generate_result(message.final)
                        else:
                            yield StreamChunk(message.text, message.tokens)
                finally:
                    call.cancel()  # a consumer that stopped early frees the server's row
                return
            except grpc.RpcError as error:
                failure = from_rpc_error(error, self.address)
                wait = None if received else attempts.delay(failure.code, failure.details)
                if wait is None:
                    raise failure from None
                self.retries += 1
                await asyncio.sleep(wait)

    async def list_adapters(self, timeout: float | None = None) -> list[AdapterStatus]:
        reply = await self._unary(self._stub.ListAdapters, pb.ListAdaptersRequest(),
                                  admin=True, timeout=timeout)
        return [adapter_status(a) for a in reply.adapters]

    async def load_adapter(self, name: str, timeout: float | None = None) -> AdapterStatus:
        return adapter_status(await self._unary(self._stub.LoadAdapter,
                                                pb.LoadAdapterRequest(name=name), admin=True,
                                                timeout=timeout))

    async def unload_adapter(self, name: str, timeout: float | None = None) -> AdapterStatus:
        return adapter_status(await self._unary(self._stub.UnloadAdapter,
                                                pb.UnloadAdapterRequest(name=name),
                                                admin=True, timeout=timeout))

    async def reload_adapter(self, name: str, version: str | None = None,
                             timeout: float | None = None) -> AdapterStatus:
        request = pb.ReloadAdapterRequest(name=name, version=version or "")
        return adapter_status(await self._unary(self._stub.ReloadAdapter, request,
                                                admin=True, timeout=timeout))

    async def health(self, service: str = "", timeout: float | None = 10.0) -> str:
        reply = await self._unary(self._health.Check,
                                  health_pb2.HealthCheckRequest(service=service),
                                  timeout=timeout)
        return HEALTH_NAMES.get(reply.status, "UNKNOWN")

    async def wait_serving(self, timeout: float, service: str = "") -> str:
        """Poll the health service until ``SERVING`` or ``timeout`` seconds pass; as
        :meth:`SwitchboardClient.wait_serving <clients.client.SwitchboardClient.wait_serving>`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = WAIT_POLL_S[0]
        while True:
            left = deadline - loop.time()
            try:
                reply = await self._health.Check(
                    health_pb2.HealthCheckRequest(service=service),
                    timeout=max(0.05, min(10.0, left)), metadata=self.metadata(False))
                status, failure = HEALTH_NAMES.get(reply.status, "UNKNOWN"), None
            except grpc.RpcError as error:
                failure = from_rpc_error(error, self.address)
                if failure.code not in WAITED_CODES or is_not_grpc(failure.details):
                    raise failure from None
                status = "UNKNOWN"
            left = deadline - loop.time()
            if status == "SERVING" or left <= 0:
                if failure is not None:
                    raise failure
                return status
            await asyncio.sleep(min(pause, left))
            pause = min(WAIT_POLL_S[1], pause * 2)
