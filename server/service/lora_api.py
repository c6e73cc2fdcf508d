"""vLLM's runtime LoRA endpoints on the HTTP API, for tools written against vLLM (its
production stack, KServe, benchmark scripts) that load an adapter before sending it
traffic: ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``.

They are the gRPC admin rpcs ``LoadAdapter`` and ``UnloadAdapter`` under vLLM's names
and status codes, with the admin rpcs' key rule (``auth.py``: the admin key when one is
set; a generation key is refused) and the same error messages:

- 200 and a plain-text line on success, as vLLM answers;
- 400 for a bad body, a name that is not an adapter name, a ``lora_path`` outside the
  rule below, an adapter already loaded (unless ``load_inplace``, which reloads it), and
  an adapter refused by validation (pickle weights, another base...): vLLM answers 400
  when its engine cannot load an adapter;
- 404 when no adapter root holds ``lora_name`` (load), or the name is unknown (unload);
- 401 for a missing or unknown key, 403 for a generation key, 503 while starting or
  draining.

Error bodies are the API's ``{"error": {"message", "type", "param", "code"}}`` with the
HTTP status as ``code``, as vLLM's are.

``lora_path`` is checked, never opened: the server loads ``<root>/<lora_name>`` from its
own roots, exactly as for a request naming the adapter (``server/adapters/store.py``).
The rule: the path, made absolute (relative paths from the server's working directory)
with ``..`` folded, must end in ``lora_name``; its parent, links resolved, must be one of
the configured adapter roots; and that root must be the one the name resolves to (the
first root holding the name wins). vLLM loads whatever path it is given; Switchboard
never loads from a path a request names.

Unloading evicts the adapter from device and host memory, as ``UnloadAdapter`` does.
Unlike vLLM's, the adapter stays servable (the next request naming it loads it again),
and unloading an adapter that is on disk but not in memory is answered 200, as on gRPC.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.requests import ClientDisconnect

from server.adapters.cache import AdapterCache
from server.adapters.store import AdapterStore, validate_name
from server.errors import InvalidRequest, SwitchboardError, quote
from server.service.calls import CallRunner
from server.service.daemon_thread import run_in_daemon_thread
from server.service.status import Status, status_of

log = logging.getLogger("switchboard.http")

MAX_BODY_BYTES = 64 << 10
"""An admin body is two names; anything larger is refused unread."""
LOAD_FIELDS = ("lora_name", "lora_path", "load_inplace")
UNLOAD_FIELDS = ("lora_name",)
LORA_ERRORS: dict[Status, tuple[int, str]] = {
    Status.INVALID_ARGUMENT: (400, "invalid_request_error"),
    Status.FAILED_PRECONDITION: (400, "invalid_request_error"),
    Status.NOT_FOUND: (404, "not_found_error"),
    Status.UNAUTHENTICATED: (401, "authentication_error"),
    Status.PERMISSION_DENIED: (403, "permission_error"),
    Status.UNAVAILABLE: (503, "service_unavailable"),
}
"""These routes' table: a status → (HTTP status code, error ``type``), as vLLM answers;
anything else is 500."""


class LoraAdapterRoutes:
    """The two routes over one runner (keys, readiness, metrics) and the adapter cache,
    which ``cache`` returns once the server has built it."""

    def __init__(self, runner: CallRunner, cache: Callable[[], AdapterCache | None]) -> None:
        self.runner = runner
        self._cache = cache

    @property
    def cache(self) -> AdapterCache:
        cache = self._cache()
        assert cache is not None, "checked by state.check_open: the server is ready"
        return cache

    async def load(self, request: Request) -> Response:
        return await self._admin(request, "load_lora_adapter", LOAD_FIELDS, self._load)

    async def unload(self, request: Request) -> Response:
        return await self._admin(request, "unload_lora_adapter", UNLOAD_FIELDS, self._unload)

    async def _load(self, body: dict[str, Any]) -> str:
        name = validate_name(body["lora_name"])
        path = _required_str(body, "lora_path")
        inplace = body.get("load_inplace", False)
        if not isinstance(inplace, bool):
            raise InvalidRequest(f"load_inplace must be a boolean, got {quote(inplace, 24)}",
                                 "load_inplace")
        cache = self.cache
        await run_in_daemon_thread(check_lora_path, cache.store, name, path)
        if inplace:
            await run_in_daemon_thread(cache.reload, name)
            return f"Success: LoRA adapter '{name}' reloaded successfully."
        if cache.info(name).tier != "disk":
            raise InvalidRequest(f"the LoRA adapter '{name}' has already been loaded "
                                 "(load_inplace: true loads its folder again)", "lora_name")
        await run_in_daemon_thread(cache.load, name)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def _unload(self, body: dict[str, Any]) -> str:
        name = validate_name(body["lora_name"])
        await run_in_daemon_thread(self.cache.unload, name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    async def _admin(self, request: Request, route: str, fields: tuple[str, ...],
                     run: Callable[[dict[str, Any]], Awaitable[str]]) -> Response:
        """Key, readiness, body, then ``run``; its line or the error, counted and logged
        as the gRPC admin rpcs are."""
        name = ""
        try:
            # The key before a byte of the body is read, as for generation calls.
            self.runner.check_key(request.headers.get("authorization"), admin=True)
            self.runner.state.check_open()
            body = parse_body(await _read_body(request), fields)
            name = body["lora_name"]
            message = await run(body)
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            return Response(status_code=499)
        except SwitchboardError as exc:
            status = status_of(exc)
            self.runner.metrics.admin.labels(status.value).inc()
            log.warning("admin call refused", extra={"fields": {
                "rpc": route, "adapter": name[:64], "status": status.value,
                "error": str(exc)}})
            code, type_ = LORA_ERRORS.get(status, (500, "server_error"))
            param = exc.param if isinstance(exc, InvalidRequest) else None
            return JSONResponse({"error": {"message": str(exc)[:500], "type": type_,
                                           "param": param, "code": code}}, code)
        except Exception as exc:
            self.runner.metrics.admin.labels(Status.INTERNAL.value).inc()
            log.error("admin call failed", exc_info=exc, extra={"fields": {"rpc": route}})
            return JSONResponse({"error": {"message": f"internal error in {route}",
                                           "type": "server_error", "param": None,
                                           "code": 500}}, 500)
        self.runner.metrics.admin.labels(Status.OK.value).inc()
        log.info("admin call", extra={"fields": {"rpc": route, "adapter": name[:64]}})
        return PlainTextResponse(message)


def check_lora_path(store: AdapterStore, name: str, lora_path: str) -> None:
    """Raise unless ``lora_path`` is the folder ``<root>/<name>`` the store serves ``name``
    from (the rule in the module docstring); NotFound when no root holds ``name``."""
    if "\0" in lora_path:
        raise InvalidRequest("lora_path holds a NUL character", "lora_path")
    path = Path(os.path.normpath(os.path.abspath(os.path.expanduser(lora_path))))
    root = path.parent.resolve()
    if path.name != name or root not in store.roots:
        raise InvalidRequest(
            f"lora_path {quote(lora_path, 80)} is not <adapter root>/{name}: this server "
            f"loads adapters only from its configured adapter roots (adapter_roots)",
            "lora_path")
    served = store.locate(name)  # NotFound, or refused (a link leading outside the root)
    if served.root != root:
        raise InvalidRequest(
            f"lora_path {quote(lora_path, 80)}: adapter '{name}' is served from "
            f"{served.root / name} (the first adapter root holding the name wins)",
            "lora_path")


def parse_body(raw: bytes, fields: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object of an admin body, holding only ``fields`` and a ``lora_name``."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"the body is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise InvalidRequest(f"unknown field {quote(unknown[0], 40)} (valid: "
                             f"{', '.join(fields)})", unknown[0])
    _required_str(body, "lora_name")
    return body


def _required_str(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{field} must be a non-empty string", field)
    return value


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    too_large = InvalidRequest(f"the request body exceeds {MAX_BODY_BYTES} bytes")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
