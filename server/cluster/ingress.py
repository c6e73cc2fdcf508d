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
from collections.abc import Iterator
from typing import Any

import ray
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.cluster import admin
from server.cluster.remote import RemoteDispatcher
from server.errors import ServiceUnavailable
from server.service.app import SwitchboardServer
from server.service.config import ServerConfig
from server.service.metrics import live_metrics
from server.service.routing import RoutingTableFile
from server.service.stack import Backend, base_model_id, base_source

log = logging.getLogger("switchboard.cluster")

FIRST_REPLICA_TIMEOUT_S = 900.0

class ReplicaCollector(Collector):
    """Every live replica's engine and cache figures on the ingress's page, under the
    single server's names labelled ``replica``, plus each replica's memory; from the
    views the replicas post (about a second old, ``views.py``): a scrape reads memory,
    it never waits on a replica nor queues on the admin log."""

    def __init__(self, adapters: admin.ClusterAdapters) -> None:
        self.adapters = adapters

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.adapters.replica_stats()
        except Exception:  # no views: the page still serves the call metrics
            log.warning("replica gauges unavailable", exc_info=True)
            return
        yield from live_metrics([([stat["replica"]], stat) for stat in stats], ["replica"])
        memory = GaugeMetricFamily("switchboard_replica_anon_rss_mb",
                                   "Anonymous resident memory of the replica process",
                                   labels=["replica"])
        for stat in stats:
            memory.add_metric([stat["replica"]], stat["anon_rss_mb"])
        yield memory


class IngressServer(SwitchboardServer):
    def __init__(self, config: ServerConfig, replicas: Any) -> None:
        super().__init__(config)
        self.replicas = replicas
        self.replica_calls = Counter(
            "switchboard_replica_calls", "Generation calls by the replica that ran them",
            ["replica"], registry=self.metrics.registry)

    def _open_backend(self) -> Backend:
        """Blocking until one replica follows the admin board and has posted its view:
        SERVING then means a call and a read can be served."""
        cfg = self.config
        routing = RoutingTableFile(cfg.resolve(cfg.routing_table))
        board = admin.board(cfg.cluster.app_name, create=True)
        deadline = time.monotonic() + FIRST_REPLICA_TIMEOUT_S
        while not ray.get(board.views_of.remote())[0]:
            if self.state.draining or time.monotonic() > deadline:
                raise ServiceUnavailable("no replica came up")
            time.sleep(0.2)
        dispatcher = RemoteDispatcher(self.replicas, routing, cfg.engine,
                                      on_dispatch=self._count,
                                      by_adapter=cfg.cluster.route_by_adapter)
        adapters = admin.ClusterAdapters(board, cfg.cluster.admin_timeout_s)
        self.metrics.registry.register(ReplicaCollector(adapters))
        return Backend(dispatcher, adapters, base_model_id(base_source(cfg)), routing.check,
                       lambda: None, routing=routing)

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
        error = self._start_error()
        if error is not None:
            ready.cancel()
            raise error
        await ready
        return {"address": self.server.address, "http_url": self.server.http_url,
                "metrics_port": self.server.metrics_port}

    async def drain(self, grace: float | None = None) -> bool:
        """Stop taking calls, let those in flight finish (``grace_period_s``), stop;
        whether they all did (False: the rest were cut)."""
        return await self.server.shutdown(grace)

    async def check_health(self) -> None:
        error = self._start_error()
        if error is not None:
            raise RuntimeError(f"the ingress failed to start: {error}")

    def _start_error(self) -> BaseException | None:
        if not self._start.done():
            return None
        if self._start.cancelled():
            return RuntimeError("the ingress's start was cancelled")
        return self._start.exception()

    async def __del__(self) -> None:
        await self.server.shutdown()
