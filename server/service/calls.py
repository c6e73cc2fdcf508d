"""A generation call's life, whatever the protocol: validate, admit, run, record.

Both front-ends (the gRPC servicer and the OpenAI-compatible HTTP API) are thin
translations around this module: they turn their request into :class:`CallFields` and
their transport facts into a :class:`CallContext`, iterate :meth:`CallRunner.run`, and
map the domain error it raises to their own status through one table each
(``status.py``). Deadlines and cancels become domain errors here too, so metrics and the
log line say the same thing for both protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from server.engine.request import FinishReason, GenerationResult, TokenChunk, new_request_id
from server.engine.sampling import SamplingParams
from server.errors import (
    CallCancelled,
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    ServiceUnavailable,
    SwitchboardError,
    quote,
)
from server.formats.manifest import ADAPTER_NAME_RE
from server.service.auth import KeyChecker
from server.service.dispatch import CHAT_ROLES, Call, Dispatched, Dispatcher, InputKind
from server.service.logs import redact_number
from server.service.metrics import BASE_LABEL, NO_ADAPTER_LABEL, NO_ROUTE_LABEL, ServiceMetrics
from server.service.routing import Route
from server.service.status import Status, status_of

log = logging.getLogger("switchboard.service")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_MESSAGES = 64


@dataclass(frozen=True)
class CallFields:
    """A generation request's fields as the client sent them (None: not set)."""

    text: str | None = None
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    dialect: str = ""
    caller_number: str = ""
    region: str = ""
    weight_scale: float | None = None
    adapters: tuple[tuple[str, float | None], ...] = ()
    """A composition: adapter names with their scales (None: the manifest's default)."""
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    """Generate max_new_tokens whatever the model says (benchmarks, load tests)."""
    min_tokens: int | None = None
    """No EOS and no stop string before this many tokens (vLLM's ``min_tokens``)."""
    request_id: str = ""
    timeout_s: float | None = None
    """A deadline from receipt the request itself sets (HTTP); gRPC's is the context's."""
    user: str = ""
    """An end-user id the client sent (HTTP ``user``): logged only as a hash."""


@dataclass(frozen=True)
class CallLimits:
    default_max_new_tokens: int
    max_new_tokens_limit: int
    max_weight_scale: float
    max_adapters: int = 4
    """Adapters one call may compose (max_adapters_per_request, at most max_loras)."""


def validate_call(fields: CallFields, limits: CallLimits, deadline: float | None) -> Call:
    """A validated :class:`Call`; raise InvalidRequest naming the first bad field."""
    request_id = fields.request_id or new_request_id()
    if not _REQUEST_ID_RE.match(request_id):
        raise InvalidRequest(f"request_id {quote(request_id, 40)} must be 1-64 characters "
                             "of letters, digits, '.', '_' or '-'", "request_id")
    given = [name for name, value in (("text", fields.text), ("prompt", fields.prompt),
                                      ("messages", fields.messages or None))
             if value is not None]
    if len(given) != 1:
        raise InvalidRequest(
            "exactly one of text, prompt and messages must be set, got "
            + (" and ".join(given) if given else "none"), given[-1] if given else "text")
    kind = InputKind(given[0])
    messages: tuple[tuple[str, str], ...] = ()
    if kind == InputKind.TEXT and not (fields.text or "").strip():
        raise InvalidRequest("text is empty", "text")
    if kind == InputKind.PROMPT and not fields.prompt:
        raise InvalidRequest("prompt is empty", "prompt")
    if kind == InputKind.MESSAGES:
        messages = fields.messages or ()
        if len(messages) > MAX_MESSAGES:
            raise InvalidRequest(f"messages: at most {MAX_MESSAGES} turns, "
                                 f"got {len(messages)}", "messages")
        for i, (role, content) in enumerate(messages):
            if role not in CHAT_ROLES:
                raise InvalidRequest(f"messages[{i}].role must be one of "
                                     f"{', '.join(CHAT_ROLES)}, got {quote(role, 20)}",
                                     "messages")
            if not content.strip():
                raise InvalidRequest(f"messages[{i}].content is empty", "messages")
    if fields.dialect and not ADAPTER_NAME_RE.fullmatch(fields.dialect):
        raise InvalidRequest(f"dialect {quote(fields.dialect, 40)} is not an adapter name "
                             "([a-z0-9][a-z0-9_-]{0,63})", "dialect")
    scale = fields.weight_scale
    if scale is not None:
        _check_scale(scale, "weight_scale", limits)
    if fields.adapters:
        _check_composition(fields, limits)
    sampling = SamplingParams(
        max_new_tokens=limits.default_max_new_tokens if fields.max_new_tokens is None
        else fields.max_new_tokens,
        temperature=0.0 if fields.temperature is None else fields.temperature,
        top_p=1.0 if fields.top_p is None else fields.top_p,
        top_k=0 if fields.top_k is None else fields.top_k,
        repetition_penalty=1.0 if fields.repetition_penalty is None
        else fields.repetition_penalty,
        seed=fields.seed,
        stop=tuple(fields.stop),
        ignore_eos=fields.ignore_eos,
        min_tokens=0 if fields.min_tokens is None else fields.min_tokens,
    )
    sampling.validate(limits.max_new_tokens_limit)
    text = (fields.text if kind == InputKind.TEXT else fields.prompt) or ""
    if fields.timeout_s is not None:
        own = time.monotonic() + fields.timeout_s
        deadline = own if deadline is None else min(deadline, own)
    return Call(kind=kind, text=text, messages=messages, dialect=fields.dialect,
                caller_number=fields.caller_number, region=fields.region,
                weight_scale=scale, adapters=fields.adapters, sampling=sampling,
                request_id=request_id,
                deadline=deadline, user=fields.user)


def _check_scale(scale: float, field_name: str, limits: CallLimits) -> None:
    param = field_name.split("[", 1)[0]
    if not math.isfinite(scale) or scale < 0:
        raise InvalidRequest(f"{field_name} must be a finite number >= 0, got {scale}", param)
    if scale > limits.max_weight_scale:
        raise InvalidRequest(f"{field_name} {scale:g} exceeds the limit "
                             f"{limits.max_weight_scale}", param)


def _check_composition(fields: CallFields, limits: CallLimits) -> None:
    if fields.dialect:
        raise InvalidRequest("set either dialect or adapters, not both (adapters names "
                             "every adapter of the call)", "adapters")
    if fields.weight_scale is not None:
        raise InvalidRequest("weight_scale applies to dialect; with adapters, give each "
                             "adapter its own weight_scale", "weight_scale")
    if len(fields.adapters) > limits.max_adapters:
        raise InvalidRequest(f"adapters: at most {limits.max_adapters} per call, got "
                             f"{len(fields.adapters)}", "adapters")
    seen: set[str] = set()
    for i, (name, scale) in enumerate(fields.adapters):
        if not ADAPTER_NAME_RE.fullmatch(name):
            raise InvalidRequest(f"adapters[{i}].name {quote(name, 40)} is not an adapter "
                                 "name ([a-z0-9][a-z0-9_-]{0,63})", "adapters")
        if name in seen:
            raise InvalidRequest(f"adapters: {name} is given twice", "adapters")
        seen.add(name)
        if scale is not None:
            _check_scale(scale, f"adapters[{i}].weight_scale", limits)


@dataclass(frozen=True)
class CallContext:
    """What the transport knows of a call besides its fields."""

    protocol: str
    """``grpc`` or ``http``: the metrics' ``protocol`` label."""
    authorization: str | None
    """The ``authorization`` header or metadata value, if any."""
    deadline: float | None = None
    """``time.monotonic()`` by which the client stops waiting."""


@dataclass(frozen=True)
class Started:
    """The first item of a call: routed, leased and submitted (how it is being served)."""

    call: Call
    dispatched: Dispatched


@dataclass(frozen=True)
class Finished:
    """The last item of a successful call."""

    call: Call
    dispatched: Dispatched
    result: GenerationResult


class ServiceState:
    """What the front-ends need to know of the server's life: ready, draining, in flight."""

    def __init__(self) -> None:
        self.ready = False
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def check_open(self) -> None:
        if self.draining:
            raise ServiceUnavailable("the server is shutting down; retry on another instance")
        if not self.ready:
            raise ServiceUnavailable("the server is starting (loading the model and adapters)")

    def enter(self) -> None:
        self.check_open()
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
    status: Status = Status.OK
    message: str = ""
    recorded: bool = False
    finished: bool = False
    """Its last item (:class:`Finished`) was handed to the front-end."""
    started: float = field(default_factory=time.monotonic)


class CallRunner:
    """Runs generation calls for every front-end over one dispatcher."""

    def __init__(self, state: ServiceState, keys: KeyChecker, metrics: ServiceMetrics,
                 settings: Any) -> None:
        """``settings`` is the ServerConfig; :meth:`attach` supplies the parts built later."""
        self.state = state
        self.keys = keys
        self.metrics = metrics
        self.settings = settings
        self.dispatcher: Dispatcher | None = None

    def attach(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def limits(self) -> CallLimits:
        assert self.dispatcher is not None
        engine_config = self.dispatcher.engine_config
        return CallLimits(self.settings.default_max_new_tokens,
                          engine_config.max_new_tokens_limit, engine_config.max_weight_scale,
                          min(engine_config.max_adapters_per_request, engine_config.max_loras))

    def check_key(self, authorization: str | None, *, admin: bool = False) -> None:
        metadata = [] if authorization is None else [("authorization", authorization)]
        self.keys.check(metadata, admin=admin)

    async def run(self, context: CallContext, fields: CallFields | Callable[[], CallFields]
                  ) -> AsyncGenerator[Started | TokenChunk | Finished, None]:
        """Yield :class:`Started`, the call's chunks, then :class:`Finished`; raise a
        domain error.

        ``fields`` may be a function that parses them: it runs after the key check and
        admission, and its InvalidRequest is recorded like any other.
        Closing the generator early (the client went away) cancels the engine request,
        so its row leaves the batch at the next step. A failure that is not a domain
        error is logged with its traceback and raised as :class:`InternalError`.
        """
        outcome = _Outcome()
        try:
            self.check_key(context.authorization)
            self.state.enter()
            try:
                async with contextlib.aclosing(self._run(context, fields, outcome)) as items:
                    async for item in items:
                        yield item
            finally:
                self.state.leave()
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            deadline = outcome.call.deadline if outcome.call else context.deadline
            if outcome.finished:  # closed after its last item: it was served
                pass
            elif deadline is not None and time.monotonic() >= deadline:  # ... at its deadline
                outcome.status, outcome.message = Status.DEADLINE_EXCEEDED, "deadline"
            else:
                outcome.status, outcome.message = Status.CANCELLED, "client cancelled"
            self._record(context, outcome)
            raise
        except SwitchboardError as exc:
            outcome.status, outcome.message = status_of(exc), str(exc)
            if outcome.status == Status.INTERNAL:
                raise self._internal(context, outcome, exc) from None
            self._record(context, outcome)
            raise
        except Exception as exc:
            raise self._internal(context, outcome, exc) from None
        self._record(context, outcome)

    async def _run(self, context: CallContext, fields: CallFields | Callable[[], CallFields],
                   outcome: _Outcome) -> AsyncGenerator[Started | TokenChunk | Finished, None]:
        assert self.dispatcher is not None
        if callable(fields):
            fields = fields()
        call = validate_call(fields, self.limits(), context.deadline)
        outcome.call = call
        dispatched = await self.dispatcher.start(call)
        outcome.dispatched = dispatched
        handle = dispatched.handle
        try:
            yield Started(call, dispatched)
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
            raise DeadlineExceeded(f"deadline passed after {result.completion_tokens} tokens "
                                   f"(request id {call.request_id})")
        if result.finish_reason == FinishReason.CANCELLED:
            raise CallCancelled("cancelled")
        outcome.finished = True
        yield Finished(call, dispatched, result)

    def _internal(self, context: CallContext, outcome: _Outcome,
                  exc: BaseException) -> InternalError:
        request_id = outcome.call.request_id if outcome.call else "-"
        log.error("internal error", exc_info=exc, extra={"fields": {"request_id": request_id}})
        outcome.status = Status.INTERNAL
        outcome.message = f"internal error (request id {request_id}); see the server log"
        self._record(context, outcome)
        return InternalError(outcome.message)

    def _record(self, context: CallContext, outcome: _Outcome) -> None:
        if outcome.recorded:
            return
        outcome.recorded = True
        dispatched, result, call = outcome.dispatched, outcome.result, outcome.call
        adapter = NO_ADAPTER_LABEL
        route = NO_ROUTE_LABEL
        if dispatched is not None:
            adapter = dispatched.metric_label or BASE_LABEL
            route = dispatched.route.value
        seconds = time.monotonic() - (dispatched.received_at if dispatched else outcome.started)
        status = outcome.status.value
        self.metrics.observe_call(
            adapter, route, status, seconds, protocol=context.protocol,
            timings=dispatched.timings(result) if dispatched and result else None,
            tokens=result.completion_tokens if result else 0)
        fields: dict[str, Any] = {
            "request_id": call.request_id if call else "-", "status": status,
            "protocol": context.protocol, "adapter": adapter, "route": route,
            "ms": round(seconds * 1000, 1),
        }
        if call is not None and call.user:
            fields["user"] = hash_user(call.user)
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


_USER_KEY = secrets.token_bytes(16)


def hash_user(user: str) -> str:
    """What a log may say about an end-user id: a keyed hash that groups one server
    run's calls by user; the key is random per process, so ids cannot be guessed back."""
    return hmac.new(_USER_KEY, user.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:12]
