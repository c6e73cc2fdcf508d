"""The ingress's dispatcher: route here, run on the replica that holds the adapters.

Routing (the routing table, its fallbacks' first step) happens in the ingress, so the
routed adapter set becomes Ray Serve's ``multiplexed_model_id`` and Serve sends the call to
a replica that already holds it. The replica leases, templates and decodes
(``Dispatcher.run``) and streams its events back; :class:`RemoteHandle` gives the call's
runner the same ``stream``/``cancel`` an engine handle does, so every front-end, status
code and metric works unchanged.
"""

from __future__ import annotations

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
from server.engine.request import Event
from server.errors import InternalError, ServiceUnavailable
from server.service.dispatch import Call, Dispatched, route_call
from server.service.routing import RouteDecision

REPLICA_LOST = (RayActorError, ActorUnavailableError, ReplicaUnavailableError,
                DeploymentUnavailableError, BackPressureError)
"""A replica died, is unreachable, or none can take the call: UNAVAILABLE, retryable."""


class RemoteHandle:
    """A call running on a replica: its remaining events, and a cancel."""

    def __init__(self, responses: Any, replica: str, request_id: str) -> None:
        self._responses = responses
        self.replica = replica
        self.request_id = request_id

    async def stream(self) -> AsyncIterator[Event]:
        try:
            async for item in self._responses:
                if isinstance(item, WireError):
                    raise item.error()
                yield item
        except REPLICA_LOST as exc:
            raise ServiceUnavailable(
                f"replica {self.replica} was lost mid-call (request id {self.request_id}): "
                f"{type(exc).__name__}") from None

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
            first = await responses.__anext__()
        except StopAsyncIteration:
            raise InternalError(f"a replica ended call {call.request_id} without a reply") \
                from None
        except REPLICA_LOST as exc:
            raise ServiceUnavailable(f"no replica could take the call: {type(exc).__name__}") \
                from None
        except BaseException:
            responses.cancel()  # cancelled while the replica leased: end it there too
            raise
        if isinstance(first, WireError):
            raise first.error()
        assert isinstance(first, Dispatched)
        if self.on_dispatch is not None:
            self.on_dispatch(first.replica)
        return dataclasses.replace(
            first, handle=RemoteHandle(responses, first.replica, call.request_id),
            received_at=call.received_at)
