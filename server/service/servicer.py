"""The ``switchboard.v1.Switchboard`` servicer (grpc.aio): protobuf in, protobuf out.

Per call: refuse while starting or draining (UNAVAILABLE), check the key, convert and
validate the request, hand it to the :class:`Dispatcher`, stream the engine's events,
and map any domain error to its status code (``status.py``). A client's deadline
becomes the engine request's deadline; a cancelled call cancels its engine request, so
its row leaves the batch at the next step. Anything unexpected is logged with its
traceback and answered INTERNAL with the request id; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from protos.switchboard.v1 import switchboard_pb2 as pb
from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc
from server.adapters.cache import AdapterCache
from server.engine.request import FinishReason, GenerationResult, TokenChunk
from server.errors import InvalidRequest, ServiceUnavailable, SwitchboardError
from server.service import convert
from server.service.auth import KeyChecker
from server.service.daemon_thread import run_in_daemon_thread
from server.service.dispatch import Call, Dispatched, Dispatcher
from server.service.logs import redact_number
from server.service.metrics import BASE_LABEL, NO_ADAPTER_LABEL, NO_ROUTE_LABEL, ServiceMetrics
from server.service.routing import Route
from server.service.status import status_for

log = logging.getLogger("switchboard.service")


class ServiceState:
    """What the servicer needs to know of the server's life: ready, draining, in flight."""

    def __init__(self) -> None:
        self.ready = False
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        if self.draining:
            raise ServiceUnavailable("the server is shutting down; retry on another instance")
        if not self.ready:
            raise ServiceUnavailable("the server is starting (loading the model and adapters)")
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


@dataclass
class _Outcome:
    """What one generation call did, for its metrics and its log line."""

    call: Call | None = None
    dispatched: Dispatched | None = None
    result: GenerationResult | None = None
    status: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    recorded: bool = False


class SwitchboardServicer(pb_grpc.SwitchboardServicer):
    def __init__(self, state: ServiceState, keys: KeyChecker, metrics: ServiceMetrics,
                 settings: Any) -> None:
        """``settings`` is the ServerConfig; ``attach`` supplies the parts built later."""
        self.state = state
        self.keys = keys
        self.metrics = metrics
        self.settings = settings
        self.dispatcher: Dispatcher | None = None
        self.cache: AdapterCache | None = None

    def attach(self, dispatcher: Dispatcher, cache: AdapterCache) -> None:
        self.dispatcher = dispatcher
        self.cache = cache

    # -- generation ----------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        response: pb.GenerateResponse | None = None
        async with contextlib.aclosing(self._serve(request, context)) as items:
            async for item in items:
                if isinstance(item, pb.GenerateResponse):
                    response = item
        assert response is not None
        return response

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.GenerateStreamResponse]:
        # aclosing: when the client goes away, grpc closes this generator (GeneratorExit
        # at a yield); closing _serve and _run cancels the engine request.
        async with contextlib.aclosing(self._serve(request, context)) as items:
            async for item in items:
                if isinstance(item, pb.GenerateResponse):
                    yield pb.GenerateStreamResponse(final=item)
                else:
                    yield pb.GenerateStreamResponse(text=item.text, tokens=len(item.token_ids))

    async def _serve(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                     ) -> AsyncGenerator[TokenChunk | pb.GenerateResponse, None]:
        """One generation call for either rpc: admission, the run, its status, metrics and
        log line; yields the chunks, then the final response."""
        outcome = _Outcome()
        started = time.monotonic()
        try:
            self._admit(context)
            try:
                async with contextlib.aclosing(self._run(request, context, outcome)) as items:
                    async for item in items:
                        yield item
            finally:
                self.state.leave()
        except BaseException as exc:  # mapped to a status, logged, re-raised
            await self._fail(exc, outcome, context, started)
        self._record(outcome, started)

    def _admit(self, context: grpc.aio.ServicerContext) -> None:
        self.keys.check(context.invocation_metadata(), admin=False)
        self.state.enter()

    async def _run(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                   outcome: _Outcome) -> AsyncGenerator[TokenChunk | pb.GenerateResponse, None]:
        assert self.dispatcher is not None
        remaining = context.time_remaining()
        engine_config = self.dispatcher.engine.config
        call = convert.parse_generate(
            request, self.settings.default_max_new_tokens, engine_config.max_new_tokens_limit,
            engine_config.max_weight_scale,
            None if remaining is None else time.monotonic() + remaining)
        outcome.call = call
        dispatched = await self.dispatcher.start(call)
        outcome.dispatched = dispatched
        handle = dispatched.handle
        try:
            async for event in handle.stream():
                if isinstance(event, TokenChunk):
                    yield event
                else:
                    outcome.result = event
        except BaseException:
            handle.cancel()  # the client went away or the call failed: free the row
            raise
        result = outcome.result
        assert result is not None
        if result.finish_reason == FinishReason.DEADLINE:
            raise _CallEnded(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"deadline passed after {result.completion_tokens} tokens "
                             f"(request id {call.request_id})")
        if result.finish_reason == FinishReason.CANCELLED:
            raise _CallEnded(grpc.StatusCode.CANCELLED, "cancelled")
        yield convert.generate_response(call, dispatched, result)

    async def _fail(self, exc: BaseException, outcome: _Outcome,
                    context: grpc.aio.ServicerContext, started: float) -> None:
        """Record and log a failed call, then end it with its status (raises)."""
        request_id = outcome.call.request_id if outcome.call else "-"
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):  # the client went away
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:  # ... because its deadline passed
                outcome.status, outcome.message = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"
            else:
                outcome.status, outcome.message = grpc.StatusCode.CANCELLED, "client cancelled"
            self._record(outcome, started)
            raise exc
        if isinstance(exc, _CallEnded):
            outcome.status, outcome.message = exc.code, exc.message
        elif isinstance(exc, SwitchboardError):
            outcome.status, outcome.message = status_for(exc), str(exc)
        else:
            outcome.status = grpc.StatusCode.INTERNAL
        if outcome.status == grpc.StatusCode.INTERNAL:
            log.error("internal error", exc_info=exc,
                      extra={"fields": {"request_id": request_id}})
            outcome.message = f"internal error (request id {request_id}); see the server log"
        self._record(outcome, started)
        await context.abort(outcome.status, outcome.message[:500])

    def _record(self, outcome: _Outcome, started: float) -> None:
        if outcome.recorded:
            return
        outcome.recorded = True
        dispatched, result, call = outcome.dispatched, outcome.result, outcome.call
        adapter = NO_ADAPTER_LABEL
        route = NO_ROUTE_LABEL
        if dispatched is not None:
            adapter = dispatched.adapter or BASE_LABEL
            route = dispatched.route.value
        seconds = time.monotonic() - (dispatched.received_at if dispatched else started)
        status = outcome.status.name
        self.metrics.observe_call(
            adapter, route, status, seconds,
            timings=dispatched.timings(result) if dispatched and result else None,
            tokens=result.completion_tokens if result else 0)
        fields: dict[str, Any] = {
            "request_id": call.request_id if call else "-", "status": status,
            "adapter": adapter, "route": route, "ms": round(seconds * 1000, 1),
        }
        if dispatched is not None:
            # A number route (also one that fell back) has the matched prefix as detail.
            detail = dispatched.route_detail
            matched = detail if detail.startswith("+") else None
            if call is not None and call.caller_number:
                fields["caller"] = redact_number(matched)
            if dispatched.route in (Route.REGION, Route.EXPLICIT):
                fields["route_detail"] = dispatched.route_detail
            if dispatched.fallback_reason:
                fields["fallback_reason"] = dispatched.fallback_reason
        if result is not None:
            fields.update(prompt_tokens=result.prompt_tokens,
                          completion_tokens=result.completion_tokens,
                          finish=result.finish_reason.value)
        if outcome.message:
            fields["error"] = outcome.message
        if self.settings.log_payloads and call is not None:
            fields["input"] = call.text or str(call.messages)
            if result is not None:
                fields["output"] = result.text
        log.info("generate", extra={"fields": fields})

    # -- admin ---------------------------------------------------------------------------
    async def ListAdapters(self, request: pb.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListAdaptersResponse:
        async def run() -> pb.ListAdaptersResponse:
            assert self.cache is not None
            infos = await run_in_daemon_thread(self.cache.list_adapters)
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
            self.keys.check(context.invocation_metadata(), admin=True)
            if not self.state.ready or self.state.draining:
                raise ServiceUnavailable("the server is starting or shutting down")
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


class _CallEnded(Exception):
    """The engine ended a call early (deadline, cancel): its status and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _name(name: str) -> str:
    if not name:
        raise InvalidRequest("name is empty: admin rpcs take an adapter name")
    return name
