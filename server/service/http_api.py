"""The OpenAI-compatible HTTP API: FastAPI routes on uvicorn, in the server's own loop.

A thin translation, as the gRPC servicer is: a body becomes :class:`CallFields`
(``openai_api.py``), :class:`CallRunner` runs the call, and the domain error it raises
becomes an HTTP status and an OpenAI error body through one table (:data:`HTTP_ERRORS`).

- ``POST /v1/chat/completions``, ``POST /v1/completions``: unary JSON, or Server-Sent
  Events with ``stream: true`` (``data: {chunk}`` lines, then ``data: [DONE]``). An
  error before the first event is an HTTP error; one after it (a deadline) is a last
  ``data: {"error": ...}`` event.
- ``GET /v1/models``: the base model and every servable adapter.
- ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``: vLLM's runtime LoRA
  endpoints over the admin rpcs (admin key; ``lora_api.py``).
- ``GET /health`` (the process answers) and ``GET /ready`` (503 until the model and the
  preloaded adapters are in, and again while draining), for load balancers.

A client that goes away cancels its call: each response watches for the ASGI
``http.disconnect`` message while it runs, and cancels the call's task when it comes,
so the engine row leaves the batch at its next step (the same guarantee as a gRPC
cancel). Uvicorn runs in the gRPC server's event loop, so both front-ends share one
loop, one engine and one dispatcher; the Switchboard server, not uvicorn, owns SIGTERM.

With ``tls_cert``/``tls_key`` set the API is HTTPS only, with the gRPC port's
certificate (``tls.py``); plain HTTP on a network address is then refused at start.
A generation call's key is checked before a byte of its body is read: a caller without
a valid key gets 401 and a closed connection, and costs the server no body at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.sse import format_sse_event
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from server.adapters.cache import AdapterCache
from server.errors import InternalError, InvalidRequest, SwitchboardError
from server.service import openai_api
from server.service.calls import CallContext, CallFields, CallRunner, Finished, Started
from server.service.daemon_thread import READ_THREADS, BoundedDaemonThreads
from server.service.lora_api import LoraAdapterRoutes
from server.service.status import Status, status_of
from server.service.tls import TlsFiles, plain_http_refusal

log = logging.getLogger("switchboard.http")

HTTP_ERRORS: dict[Status, tuple[int, str]] = {
    Status.INVALID_ARGUMENT: (400, "invalid_request_error"),
    Status.NOT_FOUND: (404, "invalid_request_error"),
    Status.FAILED_PRECONDITION: (409, "invalid_request_error"),
    Status.UNAUTHENTICATED: (401, "authentication_error"),
    Status.PERMISSION_DENIED: (403, "permission_error"),
    Status.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    Status.UNAVAILABLE: (503, "service_unavailable"),
    Status.DEADLINE_EXCEEDED: (504, "timeout"),
    Status.CANCELLED: (499, "cancelled"),
    Status.INTERNAL: (500, "server_error"),
}
"""HTTP's table: a call's status → (HTTP status code, OpenAI error ``type``)."""
ERROR_CODES: dict[Status, str] = {
    Status.NOT_FOUND: "model_not_found", Status.FAILED_PRECONDITION: "adapter_unavailable",
    Status.RESOURCE_EXHAUSTED: "queue_full", Status.UNAVAILABLE: "unavailable",
    Status.DEADLINE_EXCEEDED: "deadline_exceeded", Status.INTERNAL: "internal_error",
}
RETRY_AFTER_S = 1
EXTRA_HEADERS: dict[int, dict[str, str]] = {
    429: {"Retry-After": str(RETRY_AFTER_S)},
    503: {"Retry-After": str(RETRY_AFTER_S)},
    # The openai clients retry 409 and every 5xx unless told not to: a refused adapter
    # stays refused, and a retry after a passed deadline would run the call again.
    409: {"x-should-retry": "false"},
    504: {"x-should-retry": "false"},
}
DRAIN_LIMIT_BYTES = 16 << 20
MAX_MESSAGE_CHARS = 500
_DONE = format_sse_event(data_str="[DONE]")


class HttpError(Exception):
    """A refusal at the HTTP layer itself (body too large, unknown route)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message[:MAX_MESSAGE_CHARS], "type": type_, "param": param,
                      "code": code}}


def domain_error(exc: SwitchboardError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, OpenAI error body, headers) of a domain error."""
    status = status_of(exc)
    code, type_ = HTTP_ERRORS[status]
    message = str(exc)
    param: str | None = None
    if isinstance(exc, InvalidRequest) and exc.param is not None:
        renamed = openai_api.PARAM_NAMES.get(exc.param, exc.param)
        if renamed != exc.param and message.startswith(exc.param):  # name it as sent
            message = renamed + message[len(exc.param):]
        param = renamed
    if status == Status.NOT_FOUND:
        param = "model"
    headers = dict(EXTRA_HEADERS.get(code, {}))
    return code, error_body(message, type_, param, ERROR_CODES.get(status)), headers


def error_response(exc: SwitchboardError | HttpError,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error response of a domain error or an HTTP-layer refusal."""
    if isinstance(exc, HttpError):
        return JSONResponse(error_body(exc.message, exc.type, code=exc.code), exc.status,
                            headers=headers)
    code, body, extra = domain_error(exc)
    return JSONResponse(body, code, headers={**(headers or {}), **extra})


def route_hint(app: FastAPI, method: str, path: str, status: int) -> str:
    """The message of a request no route takes: the route meant, when one is close.

    The common slip is a base URL without ``/v1`` (``http://HOST:8000`` for the openai
    client's ``base_url``), which sends ``/completions``; a bare "Not Found" does not say so.
    """
    routes = [(route, sorted(route.methods or ())) for route in app.routes
              if isinstance(route, APIRoute)]
    shown = repr(path[:80])
    if status == 405:
        allowed = sorted({m for r, methods in routes if r.path_regex.match(path)
                          for m in methods})
        return f"{method} is not served on {shown}; use {' or '.join(allowed) or 'another path'}"
    if not path.startswith("/v1/"):
        meant = [methods for r, methods in routes if r.path_regex.match("/v1" + path)]
        if meant:
            return (f"no route {shown}: the OpenAI API is under /v1 (base URL "
                    f"http://HOST:PORT/v1), e.g. {' or '.join(meant[0])} /v1{path[:80]}")
    listing = ", ".join(f"{' or '.join(methods)} {r.path}" for r, methods in routes)
    return f"no route {shown}; served: {listing}"


class _EventStream(StreamingResponse):
    """SSE that cancels its producer the moment the client disconnects (ASGI
    ``http.disconnect``), not at the next failed write, and always closes it."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], closing: AsyncGenerator[Any, None],
                 headers: dict[str, str]) -> None:
        """``closing``: the call's generator, closed whatever happens to ``content``."""
        super().__init__(content, headers=headers)
        self.closing = closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await _until_disconnect(self._send_all(send), receive)
        finally:  # also when the task was cancelled before it first ran
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            await self.closing.aclose()

    async def _send_all(self, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                data = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke under a write
            pass


async def _until_disconnect(work: Awaitable[Any], receive: Receive) -> Any:
    """Run ``work``; cancel it if the client disconnects first (then return None)."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


class HttpApi:
    """The FastAPI app over one :class:`CallRunner`; :meth:`attach` completes it once the
    model and the adapter cache exist."""

    def __init__(self, runner: CallRunner, settings: Any) -> None:
        self.runner = runner
        self.state = runner.state
        self.settings = settings
        self.cache: AdapterCache | None = None
        self.base_id = "base"
        self.created = int(time.time())
        self.reads = BoundedDaemonThreads(READ_THREADS, "switchboard-list")
        self.app = self._build_app()

    def attach(self, cache: AdapterCache, base_id: str) -> None:
        self.cache = cache
        self.base_id = base_id

    @property
    def base_ids(self) -> tuple[str, ...]:
        return ("base", self.base_id)

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="Switchboard", docs_url=None, redoc_url=None, openapi_url=None)
        if self.settings.cors_origins:
            app.add_middleware(CORSMiddleware, allow_origins=list(self.settings.cors_origins),
                               allow_methods=["GET", "POST"], allow_headers=["*"])

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            message = str(exc.detail)
            if message in ("Not Found", "Method Not Allowed"):  # the router's: say where to go
                message = route_hint(app, request.method, request.url.path, exc.status_code)
            return JSONResponse(error_body(message, kind), exc.status_code)

        @app.exception_handler(Exception)
        async def unexpected(_request: Request, exc: Exception) -> Response:
            log.error("internal error in the HTTP layer", exc_info=exc)
            return JSONResponse(error_body("internal error; see the server log",
                                           "server_error", code="internal_error"), 500)

        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/ready", self.ready, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/models/{model_id}", self.model, methods=["GET"])
        app.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        lora = LoraAdapterRoutes(self.runner, lambda: self.cache)
        app.add_api_route("/v1/load_lora_adapter", lora.load, methods=["POST"])
        app.add_api_route("/v1/unload_lora_adapter", lora.unload, methods=["POST"])
        return app

    # -- probes and models ---------------------------------------------------------------
    async def health(self) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self) -> Response:
        if self.state.ready and not self.state.draining:
            return JSONResponse({"status": "ready"})
        why = "draining" if self.state.draining else "starting"
        return JSONResponse({"status": why}, 503)

    async def models(self, request: Request) -> Response:
        return await self._guarded(request, self._models)

    async def model(self, request: Request, model_id: str) -> Response:
        async def one() -> Response:
            rows = await self._model_rows()
            wanted = self.base_id if model_id == "base" else model_id
            for row in rows:
                if row["id"] == wanted:
                    return JSONResponse(row)
            raise HttpError(404, f"model {model_id[:40]!r} does not exist",
                            code="model_not_found")
        return await self._guarded(request, one)

    async def _models(self) -> Response:
        return JSONResponse({"object": "list", "data": await self._model_rows()})

    async def _model_rows(self) -> list[dict[str, Any]]:
        assert self.cache is not None
        infos = await self.reads.run(self.cache.list_adapters)
        return [openai_api.model_entry(self.base_id, self.created, "switchboard",
                                       parent=None, aliases=["base"]),
                *openai_api.adapter_entries(infos, self.base_id, self.created)]

    async def _guarded(self, request: Request, run: Callable[[], Awaitable[Response]]
                       ) -> Response:
        """Key and readiness checks and error bodies for the non-generation routes."""
        try:
            self.runner.check_key(request.headers.get("authorization"))
            self.state.check_open()
            return await run()
        except (HttpError, SwitchboardError) as exc:
            return error_response(exc)

    # -- generation ----------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, chat: bool) -> Response:
        context = CallContext(protocol="http", authorization=request.headers.get("authorization"))
        try:
            self.runner.check_key(context.authorization)
        except SwitchboardError:
            return await self._refuse_unkeyed(context)
        try:
            raw = await self._read_body(request)
        except HttpError as exc:
            return error_response(exc)
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            return Response(status_code=499)
        parsed: list[openai_api.OpenAIRequest] = []

        def fields() -> Any:
            body = openai_api.parse_body(raw)
            parse = openai_api.parse_chat if chat else openai_api.parse_completion
            parsed.append(parse(body, self.base_ids))
            return parsed[0].fields

        items = self.runner.run(context, fields)
        try:
            started = await _until_disconnect(anext(items), request.receive)
        except SwitchboardError as exc:
            await items.aclose()
            return error_response(exc)
        except BaseException:
            await items.aclose()
            raise
        if started is None:  # the client left before the call started
            await items.aclose()
            return Response(status_code=499)
        assert isinstance(started, Started)
        shaper = openai_api.ResponseShaper(chat, self.base_id, started)
        headers = {"x-request-id": started.call.request_id}
        if parsed[0].stream:
            return _EventStream(self._events(items, shaper, parsed[0].include_usage),
                                items, headers)
        try:
            finished = await _until_disconnect(_last(items), request.receive)
        except SwitchboardError as exc:
            return error_response(exc, headers)
        finally:
            await items.aclose()
        if finished is None:
            return Response(status_code=499)
        return JSONResponse(shaper.response(finished), headers=headers)

    async def _refuse_unkeyed(self, context: CallContext) -> Response:
        """A generation call without a valid key, refused before its body is read.

        The runner refuses it as it refuses any call (its key check comes before it asks
        for the fields), so metrics and the log line count it as before. The response
        closes the connection: uvicorn would otherwise read and drop the rest of the
        body to keep the connection alive, at the cost of whatever the caller sends.
        """
        items = self.runner.run(context, _no_fields)
        try:
            await anext(items)
            raise InternalError("a call without a valid key was started")
        except SwitchboardError as exc:
            return error_response(exc, {"connection": "close"})
        finally:
            await items.aclose()

    async def _events(self, items: AsyncGenerator[Any, None], shaper: openai_api.ResponseShaper,
                      include_usage: bool) -> AsyncIterator[bytes]:
        async with contextlib.aclosing(items):
            first = shaper.first_chunk()
            if first is not None:
                yield _event(first)
            try:
                async for item in items:
                    if isinstance(item, Finished):
                        for chunk in shaper.last_chunks(item, include_usage):
                            yield _event(chunk)
                    else:
                        yield _event(shaper.chunk(item))
            except SwitchboardError as exc:  # after the headers: the stream's last event
                _code, body, _headers = domain_error(exc)
                yield _event(body)
                return
            yield _DONE

    async def _read_body(self, request: Request) -> bytes:
        """The body, up to ``http_max_body_bytes``; over it, 413. The excess is read and
        dropped up to :data:`DRAIN_LIMIT_BYTES`, so that a client still sending sees the
        413 rather than a reset connection; a larger body is cut off."""
        limit = self.settings.http_max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = HttpError(413, f"the request body exceeds {limit} bytes",
                              code="body_too_large")
        if declared.isdigit() and int(declared) > DRAIN_LIMIT_BYTES:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_LIMIT_BYTES:
                raise too_large
            if size <= limit:
                chunks.append(chunk)
        if size > limit:
            raise too_large
        return b"".join(chunks)


def _no_fields() -> CallFields:
    """The fields of a call refused for its key: never asked for."""
    raise InternalError("the fields of a call without a valid key were asked for")


async def _last(items: AsyncGenerator[Any, None]) -> Finished | None:
    last = None
    async for item in items:
        last = item
    return last if isinstance(last, Finished) else None


def _event(body: dict[str, Any]) -> bytes:
    return format_sse_event(data_str=json.dumps(body, ensure_ascii=False,
                                                separators=(",", ":")))


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside the Switchboard server's loop: it leaves signals to the server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class HttpServer:
    """Binds and serves :class:`HttpApi` until :meth:`stop`."""

    def __init__(self, api: HttpApi) -> None:
        self.api = api
        self.port = -1
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, tls: TlsFiles | None = None) -> int:
        """Bind (``port`` 0: a free one) and start serving, over TLS with ``tls``; return
        the bound port. Plain HTTP on a network address while the settings configure
        TLS is refused (``tls.plain_http_refusal``), before anything is bound."""
        refusal = None if tls is not None else plain_http_refusal(self.api.settings, host, port)
        if refusal is not None:
            raise OSError(refusal)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"HTTP port {host}:{port} cannot be bound: {exc.strerror}") from None
        sock.listen(128)
        sock.setblocking(False)

        def tls_context(_config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]
                        ) -> ssl.SSLContext:
            assert tls is not None
            return tls.context

        config = uvicorn.Config(self.api.app, log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2,
                                server_header=False,
                                ssl_context_factory=None if tls is None else tls_context)
        self._server = _EmbeddedUvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        self.port = int(sock.getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):  # a cancel of the caller still propagates
            await asyncio.wait_for(asyncio.shield(self._task), 10)
        self._server = None
