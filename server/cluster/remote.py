"""The ingress's dispatcher: route here, run on the replica that holds the adapters.

Routing (the routing table, its fallbacks' first step) happens in the ingress, so the
routed adapter set becomes Ray Serve's ``multiplexed_model_id`` and Serve sends the call to
a replica that already holds it. The replica leases, templates and decodes
(``Dispatcher.run``) and streams its events back; :class:`RemoteHandle` gives the call's
runner the same ``stream``/``cancel`` an engine handle does, so every front-end, status
code and metric works unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from server.cluster.wire import WireCall, WireError, multiplex_key
from server.engine.request import Event, GenerationResult, TokenChunk
from server.errors import DeadlineExceeded, InternalError, QueueFull, ServiceUnavailable
from server.service.dispatch import Call, Dispatched, route_call
from server.service.routing import RouteDecision

REPLICA_LOST = (RayActorError, ActorUnavailableError, ReplicaUnavailableError,
                DeploymentUnavailableError)
"""A replica died or is unreachable: UNAVAILABLE, which clients may retry."""


async def next_item(responses: Any, call: Call) -> Any:
    """The replica's next item, within the call's deadline (enforced here, in the
    ingress's clock: the replica's copy of it is shifted by the time the call waited in
    Ray Serve's queue). Raises StopAsyncIteration at the end."""
    if call.deadline is None:
        return await responses.__anext__()
    try:
        return await asyncio.wait_for(responses.__anext__(), call.deadline - time.monotonic())
    except TimeoutError:
        responses.cancel()
        raise DeadlineExceeded(f"deadline passed (request id {call.request_id})") from None


class RemoteHandle:
    """A call running on a replica: its remaining events, and a cancel. The result's
    first-token and finish instants are when they reached the ingress (its clock)."""

    def __init__(self, responses: Any, replica: str, call: Call) -> None:
        self._responses = responses
        self.replica = replica
        self.call = call

    async def stream(self) -> AsyncIterator[Event]:
        first_token_at: float | None = None
        try:
            while True:
                try:
                    item = await next_item(self._responses, self.call)
                except StopAsyncIteration:
                    return
                if isinstance(item, WireError):
                    raise item.error()
                if isinstance(item, TokenChunk) and first_token_at is None:
                    first_token_at = time.monotonic()
                if isinstance(item, GenerationResult):
                    now = time.monotonic()
                    if first_token_at is None and item.first_token_at is not None:
                        first_token_at = now  # its text came with the end
                    item = dataclasses.replace(item, finished_at=now,
                                               first_token_at=first_token_at)
                yield item
        except REPLICA_LOST as exc:
            raise ServiceUnavailable(
                f"replica {self.replica} was lost mid-call (request id "
                f"{self.call.request_id}): {type(exc).__name__}") from None

    def cancel(self) -> None:
        """Cancel the replica's generator: it cancels its engine row."""
        self._responses.cancel()


class RemoteDispatcher:
    def __init__(self, replicas: Any, routing: Any, engine_config: Any,
                 on_dispatch: Callable[[str], None] | None = None,
                 by_adapter: bool = True) -> None:
        """``replicas``: the replica deployment's ``DeploymentHandle``; ``routing``: a
        :class:`RoutingTableFile`; ``engine_config``: the limits calls are checked
        against (every replica runs the same configuration); ``on_dispatch`` is told
        which replica took each call (metrics); ``by_adapter`` off drops the adapter
        affinity (Serve's plain least-busy choice)."""
        self.replicas = replicas
        self.routing = routing
        self.engine_config = engine_config
        self.on_dispatch = on_dispatch
        self.by_adapter = by_adapter

    def route(self, call: Call) -> RouteDecision:
        return route_call(self.routing.table, call)

    async def start(self, call: Call) -> Dispatched:
        decision = self.route(call)
        key = multiplex_key([name for name, _ in decision.uses]) if self.by_adapter else ""
        handle = self.replicas.options(stream=True, multiplexed_model_id=key)
        responses = handle.generate.remote(WireCall(call, time.monotonic()), decision)
        try:
            first = await next_item(responses, call)
        except StopAsyncIteration:
            raise InternalError(f"a replica ended call {call.request_id} without a reply") \
                from None
        except REPLICA_LOST as exc:
            raise ServiceUnavailable(f"no replica could take the call: {type(exc).__name__}") \
                from None
        except BackPressureError:
            raise QueueFull("every replica's queue is full; retry later") from None
        except BaseException:
            responses.cancel()  # cancelled while the replica leased: end it there too
            raise
        if isinstance(first, WireError):
            raise first.error()
        assert isinstance(first, Dispatched)
        if self.on_dispatch is not None:
            self.on_dispatch(first.replica)
        return dataclasses.replace(
            first, handle=RemoteHandle(responses, first.replica, call),
            received_at=call.received_at,
            adapter_wait_s=time.monotonic() - call.received_at)
