"""The ``switchboard.v1.Switchboard`` servicer (grpc.aio): protobuf in, protobuf out.

Generation is a thin translation around :class:`CallRunner` (``calls.py``, shared with
the HTTP API): the request becomes plain fields, the call's deadline and key its
context, and the domain error the runner raises becomes a status code through gRPC's
table (``status.py``). A cancelled call cancels its engine request, so its row leaves
the batch at the next step; anything unexpected is answered INTERNAL with the request
id, and the server keeps serving.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc

from protos.switchboard.v1 import switchboard_pb2 as pb
from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc
from server.adapters.cache import AdapterCache
from server.engine.request import TokenChunk
from server.errors import InvalidRequest, SwitchboardError
from server.service import convert
from server.service.auth import authorization_header
from server.service.calls import CallContext, CallRunner, Finished, Started
from server.service.daemon_thread import READ_THREADS, BoundedDaemonThreads, run_in_daemon_thread
from server.service.status import status_for

log = logging.getLogger("switchboard.service")


class SwitchboardServicer(pb_grpc.SwitchboardServicer):
    def __init__(self, runner: CallRunner) -> None:
        """Generation goes through ``runner``; :meth:`attach` supplies the adapter cache."""
        self.runner = runner
        self.state = runner.state
        self.metrics = runner.metrics
        self.cache: AdapterCache | None = None
        self.reads = BoundedDaemonThreads(READ_THREADS, "switchboard-list")

    def attach(self, cache: AdapterCache) -> None:
        self.cache = cache

    # -- generation ----------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        response: pb.GenerateResponse | None = None
        async with contextlib.aclosing(self._serve(request, context)) as items:
            async for item in items:
                if isinstance(item, Finished):
                    response = await self._respond(context, item, _response)
        assert response is not None
        return response

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.GenerateStreamResponse]:
        # aclosing: when the client goes away, grpc closes this generator (GeneratorExit
        # at a yield); closing the runner's generator cancels the engine request.
        async with contextlib.aclosing(self._serve(request, context)) as items:
            async for item in items:
                if isinstance(item, Finished):
                    yield pb.GenerateStreamResponse(
                        final=await self._respond(context, item, _response))
                elif isinstance(item, TokenChunk):
                    yield pb.GenerateStreamResponse(text=item.text, tokens=len(item.token_ids))

    async def _serve(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                     ) -> AsyncGenerator[Started | TokenChunk | Finished, None]:
        """One generation call for either rpc, through the runner; a domain error ends the
        call with its status code."""
        remaining = context.time_remaining()
        call_context = CallContext(
            protocol="grpc", authorization=authorization_header(context.invocation_metadata()),
            deadline=None if remaining is None else time.monotonic() + remaining)
        try:
            async with contextlib.aclosing(
                    self.runner.run(call_context, convert.call_fields(request))) as items:
                async for item in items:
                    yield item
        except SwitchboardError as exc:
            await context.abort(status_for(exc), str(exc)[:500])

    async def _respond(self, context: grpc.aio.ServicerContext, item: Finished,
                       build: Any) -> Any:
        """``build(item)``; a failure there is INTERNAL with the request id, not grpc's
        UNKNOWN with the exception's text."""
        try:
            return build(item)
        except Exception as exc:
            request_id = item.call.request_id
            log.error("internal error", exc_info=exc,
                      extra={"fields": {"request_id": request_id}})
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error (request id {request_id}); see the server log")

    # -- admin ---------------------------------------------------------------------------
    async def ListAdapters(self, request: pb.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListAdaptersResponse:
        async def run() -> pb.ListAdaptersResponse:
            assert self.cache is not None
            infos = await self.reads.run(self.cache.list_adapters)
            return pb.ListAdaptersResponse(adapters=[convert.adapter_status(i) for i in infos])
        return await self._admin(context, "ListAdapters", "", run)

    async def LoadAdapter(self, request: pb.LoadAdapterRequest,
                          context: grpc.aio.ServicerContext) -> pb.AdapterStatus:
        async def run() -> pb.AdapterStatus:
            assert self.cache is not None
            info = await run_in_daemon_thread(self.cache.load, _name(request.name))
            return convert.adapter_status(info)
        return await self._admin(context, "LoadAdapter", request.name, run)

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> pb.AdapterStatus:
        async def run() -> pb.AdapterStatus:
            assert self.cache is not None
            name = _name(request.name)
            await run_in_daemon_thread(self.cache.unload, name)
            return convert.adapter_status(await run_in_daemon_thread(self.cache.info, name))
        return await self._admin(context, "UnloadAdapter", request.name, run)

    async def ReloadAdapter(self, request: pb.ReloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> pb.AdapterStatus:
        async def run() -> pb.AdapterStatus:
            assert self.cache is not None
            info = await run_in_daemon_thread(self.cache.reload, _name(request.name),
                                           request.version or None)
            return convert.adapter_status(info)
        return await self._admin(context, "ReloadAdapter", request.name, run)

    async def _admin(self, context: grpc.aio.ServicerContext, rpc: str, name: str,
                     run: Any) -> Any:
        try:
            self.runner.check_key(authorization_header(context.invocation_metadata()),
                                  admin=True)
            self.state.check_open()  # starting or shutting down: each says which
            response = await run()
        except SwitchboardError as exc:
            code = status_for(exc)
            self.metrics.admin.labels(code.name).inc()
            log.warning("admin call refused", extra={"fields": {
                "rpc": rpc, "adapter": name[:64], "status": code.name, "error": str(exc)}})
            await context.abort(code, str(exc)[:500])
        except Exception as exc:
            self.metrics.admin.labels("INTERNAL").inc()
            log.error("admin call failed", exc_info=exc, extra={"fields": {"rpc": rpc}})
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {rpc}")
        self.metrics.admin.labels("OK").inc()
        log.info("admin call", extra={"fields": {"rpc": rpc, "adapter": name[:64]}})
        return response


def _response(item: Finished) -> pb.GenerateResponse:
    return convert.generate_response(item.call, item.dispatched, item.result)


def _name(name: str) -> str:
    if not name:
        raise InvalidRequest("name is empty: admin rpcs take an adapter name")
    return name
