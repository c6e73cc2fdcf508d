"""The cluster's front door: the single server's gRPC service, OpenAI HTTP API, health,
auth, validation and routing, with a backend that runs each call on a replica.

It is the same :class:`SwitchboardServer` (one proto, one set of status codes, one
metrics page) with :meth:`_open_backend` swapped: calls go to the replica deployment
through :class:`RemoteDispatcher`, admin rpcs to every replica through the admin board,
and only the routing table is polled here (each replica polls its adapter folders).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray
from prometheus_client import Counter

from server.cluster import admin
from server.cluster.remote import RemoteDispatcher
from server.errors import ServiceUnavailable
from server.service.app import Backend, SwitchboardServer, base_model_id
from server.service.config import ServerConfig
from server.service.routing import RoutingTableFile
from server.service.stack import base_source

log = logging.getLogger("switchboard.cluster")

FIRST_REPLICA_TIMEOUT_S = 900.0


class IngressServer(SwitchboardServer):
    def __init__(self, config: ServerConfig, replicas: Any) -> None:
        super().__init__(config)
        self.replicas = replicas
        self.replica_calls = Counter(
            "switchboard_replica_calls", "Generation calls by the replica that ran them",
            ["replica"], registry=self.metrics.registry)

    def _open_backend(self) -> Backend:
        """Blocking until one replica follows the admin board: SERVING then means a call
        can be served."""
        cfg = self.config
        routing = RoutingTableFile(cfg.resolve(cfg.routing_table))
        board = admin.board(create=True)
        deadline = time.monotonic() + FIRST_REPLICA_TIMEOUT_S
        while not ray.get(board.replicas.remote()):
            if self.state.draining or time.monotonic() > deadline:
                raise ServiceUnavailable("no replica came up")
            time.sleep(0.2)
        dispatcher = RemoteDispatcher(self.replicas, routing, cfg.engine,
                                      on_dispatch=self._count,
                                      by_adapter=cfg.cluster.route_by_adapter)
        return Backend(dispatcher, admin.ClusterAdapters(board, cfg.cluster.admin_timeout_s),
                       base_model_id(base_source(cfg)), routing.check, lambda: None,
                       routing=routing)

    def _count(self, replica: str) -> None:
        self.replica_calls.labels(replica).inc()


class SwitchboardIngress:
    """The ingress deployment (one replica): it starts the front-ends in its
    constructor, on the replica's event loop, and drains them when told to."""

    # Ray Serve awaits an async constructor.
    async def __init__(self, config: ServerConfig, replicas: Any) -> None:  # type: ignore[misc]
        self.server = IngressServer(config, replicas)
        self._start = asyncio.get_running_loop().create_task(self.server.start())

    async def ready(self) -> dict[str, Any]:
        """Wait until SERVING; the addresses the front-ends listen on."""
        ready = asyncio.ensure_future(self.server.ready.wait())
        await asyncio.wait({ready, self._start}, return_when=asyncio.FIRST_COMPLETED)
        if self._start.done() and self._start.exception() is not None:
            ready.cancel()
            raise self._start.exception()  # type: ignore[misc]
        await ready
        return {"address": self.server.address, "http_url": self.server.http_url,
                "metrics_port": self.server.metrics_port}

    async def drain(self, grace: float | None = None) -> None:
        """Stop taking calls, let those in flight finish (``grace_period_s``), stop."""
        await self.server.shutdown(grace)

    async def check_health(self) -> None:
        if self._start.done() and self._start.exception() is not None:
            raise RuntimeError(f"the ingress failed to start: {self._start.exception()}")

    async def __del__(self) -> None:
        await self.server.shutdown()
