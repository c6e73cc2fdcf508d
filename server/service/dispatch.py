"""From a validated call to a running engine request: route, lease, template, submit.

This is the service's core in plain types (no protobuf): the gRPC layer converts a
request into a :class:`Call`, awaits :meth:`Dispatcher.start` and streams the returned
handle's events. Everything a response reports about *how* it was served (adapter and
version, route, fallback reason, template) is decided here, once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.adapters.cache import AdapterCache, AdapterLease
from server.engine.engine import Engine
from server.engine.request import Event, GenerationRequest, GenerationResult
from server.engine.sampling import SamplingParams
from server.errors import (
    AdapterIncompatible,
    AdapterNotFound,
    SwitchboardError,
)
from server.service.prompts import InputKind, PromptMaker, TemplateSource
from server.service.routing import Route, RouteDecision, RoutingTable

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Call:
    """One generation call, validated field by field (see ``calls.validate_call``)."""

    kind: InputKind
    text: str = ""
    """The utterance (TEXT) or the verbatim prompt (PROMPT)."""
    messages: tuple[tuple[str, str], ...] = ()
    dialect: str = ""
    caller_number: str = ""
    region: str = ""
    weight_scale: float | None = None
    adapters: tuple[tuple[str, float | None], ...] = ()
    """A composition the call names (exclusive with ``dialect``)."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    deadline: float | None = None
    """``time.monotonic()`` by which the client stops waiting."""
    received_at: float = field(default_factory=time.monotonic)
    """When the service took the call: every latency it reports starts here."""
    user: str = ""
    """The end-user id a client sent (HTTP ``user``); logs hold only its hash."""


@dataclass(frozen=True)
class CallTimings:
    """Where a call's time went, each part measured once, from receipt at the service."""

    adapter_wait_s: float
    """Receipt to the adapter leased (a cold load from disk is here, not in decoding)."""
    queue_s: float
    """Submission to admission into the batch (includes a slot copy's wait)."""
    ttft_s: float | None
    """Receipt to the first token."""
    tpot_s: float | None
    """Mean time per token after the first."""
    total_s: float


class CallHandle(Protocol):
    """A running call's events and its cancel: an engine ``RequestHandle`` here, a
    replica's stream in a cluster."""

    def stream(self) -> AsyncIterator[Event]: ...

    def cancel(self) -> None: ...


@dataclass
class Dispatched:
    """A call on its way through the engine, and how it is being served."""

    handle: CallHandle
    adapter: str | None
    """The (first) adapter, or None for the base model."""
    version: str
    route: Route
    route_detail: str
    fallback_reason: str
    template_source: TemplateSource
    prompt_template: str
    weight_scale: float
    prompt_tokens: int
    received_at: float
    adapter_wait_s: float
    adapters: tuple[tuple[str, str, float], ...] = ()
    """Every adapter that serves the call: (name, version, scale), in order."""
    metric_label: str = ""
    """The ``adapter`` label of its metrics: the name, ``a+b`` for a composition the
    routing table names, ``composed`` for any other (labels stay bounded)."""
    replica: str = ""
    """The cluster replica that served the call ('' in a single server)."""

    def timings(self, result: GenerationResult) -> CallTimings:
        first = result.first_token_at
        tokens = result.completion_tokens
        return CallTimings(
            adapter_wait_s=self.adapter_wait_s, queue_s=result.queue_time_s,
            ttft_s=None if first is None else first - self.received_at,
            tpot_s=(result.finished_at - first) / (tokens - 1)
            if first is not None and tokens > 1 else None,
            total_s=result.finished_at - self.received_at)


def route_call(table: RoutingTable, call: Call) -> RouteDecision:
    """Which adapters serve ``call`` by ``table`` (nothing leased); InvalidRequest for a
    malformed number or region."""
    return table.route(call.dialect, call.caller_number, call.region, call.adapters)


class Dispatcher:
    def __init__(self, engine: Engine, cache: AdapterCache, tokenizer: Any,
                 routing: Any) -> None:
        """``routing`` has a ``table`` attribute (a :class:`RoutingTableFile` or alike), so
        a reloaded table takes effect at the next call."""
        self.engine = engine
        self.cache = cache
        self.tokenizer = tokenizer
        self.routing = routing
        self.prompts = PromptMaker(tokenizer, engine.config.max_model_len)

    @property
    def engine_config(self) -> Any:
        """The :class:`EngineConfig` whose limits every call is validated against."""
        return self.engine.config

    def close(self) -> None:
        self.prompts.close()

    async def start(self, call: Call) -> Dispatched:
        """Route, lease the adapters, build the prompt and submit; raise a domain error."""
        return await self.run(call, self.route(call))

    def route(self, call: Call) -> RouteDecision:
        """Which adapters serve ``call`` (the routing table's decision; nothing leased).
        Raise InvalidRequest for a malformed number or region."""
        return route_call(self.routing.table, call)

    async def run(self, call: Call, decision: RouteDecision) -> Dispatched:
        """Lease ``decision``'s adapters (falling back as the table says when a routed one
        cannot serve), build the prompt and submit. The routing step may have run
        elsewhere: a cluster's ingress routes, the replica holding the adapters runs."""
        table: RoutingTable = self.routing.table
        leases, fallback_reason, decision = await self._lease(decision, table)
        leased_at = time.monotonic()
        try:
            manifest = leases[0].manifest if leases else None
            prompt_ids, source, template = await self.prompts.tokens(
                call, manifest, table.prompt_template)
            scales = [self._scale(lease, asked, call) for lease, (_, asked)
                      in zip(leases, decision.uses, strict=True)]
            request = GenerationRequest(
                prompt_ids, call.sampling, adapter=leases[0] if leases else None,
                weight_scale=scales[0] if leases else 0.0,
                composed=tuple(zip(leases[1:], scales[1:], strict=True)),
                request_id=call.request_id, deadline=call.deadline)
            handle = self.engine.submit(request)
        except BaseException:
            for lease in leases:
                lease.release()  # submit did not take them: ours to release
            raise
        label = decision.label
        if len(leases) > 1 and label not in table.compositions():
            label = "composed"
        return Dispatched(
            handle=handle, adapter=leases[0].name if leases else None,
            version=leases[0].version if leases else "", route=decision.route,
            route_detail=decision.detail, fallback_reason=fallback_reason,
            template_source=source, prompt_template=template,
            weight_scale=scales[0] if leases else 0.0,
            prompt_tokens=len(prompt_ids), received_at=call.received_at,
            adapter_wait_s=leased_at - call.received_at,
            adapters=tuple((lease.name, lease.version, scale)
                           for lease, scale in zip(leases, scales, strict=True)),
            metric_label=label if leases else "",
        )

    @staticmethod
    def _scale(lease: AdapterLease, asked: float | None, call: Call) -> float:
        """The scale the call asked for this adapter, else the manifest's default."""
        if asked is not None:
            return asked
        if call.weight_scale is not None:  # a single adapter (validated: no composition)
            return call.weight_scale
        manifest = lease.manifest
        return manifest.default_weight_scale if manifest is not None else 1.0

    async def _lease(self, decision: RouteDecision, table: RoutingTable
                     ) -> tuple[list[AdapterLease], str, RouteDecision]:
        if not decision.uses:
            return [], "", decision
        try:
            return await self._lease_all(decision), "", decision
        except (AdapterNotFound, AdapterIncompatible) as exc:
            # NotFound already lists the adapters on disk (the store's lookup, made on
            # the cache's loader thread): nothing is scanned again here, on the loop.
            if decision.route == Route.EXPLICIT:
                raise
            problem: SwitchboardError = exc
        if table.fallback == "error":
            raise problem
        reason = f"{decision.route.value} route to '{decision.label}' failed: {problem}"
        return [], reason[:300], RouteDecision((), Route.FALLBACK, decision.detail)

    async def _lease_all(self, decision: RouteDecision) -> list[AdapterLease]:
        """A lease on every adapter of the decision, or none (an error releases those
        already taken)."""
        leases: list[AdapterLease] = []
        try:
            for name, _ in decision.uses:
                leases.append(await self.cache.lease_async(name))
        except BaseException:
            for lease in leases:
                lease.release()
            raise
        return leases
