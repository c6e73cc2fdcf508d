"""The Ray Serve application: one ingress deployment in front of the replica deployment.

``build_app(config)`` is what ``switchboard serve --cluster`` runs; ``app_builder`` is the
same for ``serve run`` / a KubeRay RayService (``import_path: server.cluster.app:app_builder``
with ``args: {config: path}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve import Application

from server.cluster import admin
from server.cluster.ingress import SwitchboardIngress
from server.cluster.replica import ReplicaServer, Residency
from server.cluster.wire import WireCall
from server.errors import InvalidOption
from server.service.config import DEFAULT_CONFIG_PATH, ServerConfig, load_config
from server.service.routing import RouteDecision

INGRESS = "SwitchboardIngress"
REPLICA = "SwitchboardReplica"


def replica_class(resident_sets: int) -> type:
    """The replica deployment's class, with Ray Serve's multiplexing LRU sized to
    ``resident_sets`` adapter sets (a decorator argument, so the class is made here)."""

    class SwitchboardReplica:
        async def __init__(self, config: ServerConfig) -> None:  # type: ignore[misc]
            replica = serve.get_replica_context().replica_id.unique_id
            self.server: ReplicaServer | None = None
            self.server = await asyncio.to_thread(ReplicaServer, config, replica,
                                                  admin.board(config.cluster.app_name,
                                                              create=True))

        @serve.multiplexed(max_num_models_per_replica=resident_sets)
        async def hold(self, key: str) -> Residency:
            assert self.server is not None
            return await self.server.hold(key)

        async def generate(self, wire: WireCall, decision: RouteDecision
                           ) -> AsyncIterator[Any]:
            arrived = time.monotonic()
            assert self.server is not None
            key = serve.get_multiplexed_model_id()
            # Only a set that can load takes a place in Serve's LRU (its load evicts a
            # held set first); the run step reports what is wrong with another (or falls
            # back, as the routing table says). Shielded: a call cancelled meanwhile must
            # not leave Serve a load that never ends.
            if key and self.server.holdable(key):
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.hold(key))
            async for item in self.server.generate(wire, decision, arrived):
                yield item

        def check_health(self) -> None:
            if self.server is not None:
                self.server.check_health()

        async def __del__(self) -> None:
            if self.server is not None:
                await self.server.aclose()

    return SwitchboardReplica


def build_app(config: ServerConfig) -> Application:
    cluster = config.cluster
    engine = config.engine
    options: dict[str, Any] = {
        "name": REPLICA,
        "ray_actor_options": cluster.ray_actor_options.as_dict(),
        # The engine queues and batches; Serve only needs to pass that many through, and
        # holds at most a queue's worth more before refusing (RESOURCE_EXHAUSTED).
        "max_ongoing_requests": engine.max_batch_size + engine.max_queue_size,
        "max_queued_requests": engine.max_queue_size,
        "graceful_shutdown_timeout_s": config.grace_period_s + 5,
        "health_check_period_s": 5,
        "health_check_timeout_s": 30,
    }
    if cluster.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": cluster.min_replicas, "max_replicas": cluster.max_replicas,
            "target_ongoing_requests": cluster.target_ongoing_requests}
    else:
        options["num_replicas"] = cluster.replicas
    resident = cluster.adapters_per_replica or engine.max_loras
    if resident > config.max_cpu_adapters:
        raise InvalidOption(
            f"setting cluster.adapters_per_replica ({resident}) exceeds max_cpu_adapters "
            f"({config.max_cpu_adapters}): a replica could not keep what Ray Serve holds")
    replica = serve.deployment(**options)(replica_class(resident))
    ingress_options: dict[str, Any] = {"num_cpus": 0}
    if cluster.ingress_resource:
        ingress_options["resources"] = {cluster.ingress_resource: 0.01}
    ingress = serve.deployment(
        name=INGRESS, num_replicas=1, ray_actor_options=ingress_options,
        graceful_shutdown_timeout_s=config.grace_period_s + 5,
    )(SwitchboardIngress)
    return ingress.bind(config, replica.bind(config))


def app_builder(args: dict[str, Any]) -> Application:
    """For ``serve run server.cluster.app:app_builder config=...`` and RayService
    manifests: the configuration file (default server/config.yaml), environment
    variables applied as for ``switchboard serve``."""
    return build_app(load_config(args.get("config", DEFAULT_CONFIG_PATH)))
