"""The ``cluster:`` section of the server configuration (no Ray import here: the
single-process server reads the same file, and ``server.service`` never imports
``server.cluster``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from server.errors import InvalidOption


@dataclass(frozen=True)
class RayActorOptions:
    """Resources Ray reserves for each replica (its ``ray_actor_options``)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidOption(f"setting cluster.ray_actor_options.{name} must be a "
                                    f"number >= 0, got {value}")

    def as_dict(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


@dataclass(frozen=True)
class ClusterConfig:
    address: str = ""
    """Ray cluster to join: ``auto`` (the one started on this machine by ``ray start``),
    ``HOST:PORT``, or empty to start a local one for this command."""
    replicas: int = 2
    """Replicas of the base model (each owns an engine and an adapter cache)."""
    min_replicas: int = 0
    """With ``max_replicas``: autoscale between the two instead of a fixed ``replicas``."""
    max_replicas: int = 0
    target_ongoing_requests: float = 8.0
    """Autoscaling aims at this many calls in flight per replica."""
    ray_actor_options: RayActorOptions = field(default_factory=RayActorOptions)
    torch_threads: int = 0
    """torch threads per replica; 0: ``ray_actor_options.num_cpus`` rounded up."""
    adapters_per_replica: int = 0
    """Adapter sets a replica keeps resident (Ray Serve's multiplexing LRU, which the
    adapter cache follows); 0: the engine's ``max_loras``, so residents fit the slots."""
    route_by_adapter: bool = True
    """Send each call to a replica that holds its adapters (Ray Serve's multiplexing);
    off, calls go to the least busy replica whatever they need (for comparison)."""
    replica_metrics_port: int = 0
    """Each replica's own Prometheus page (engine and cache gauges); 0: a free port,
    logged at start (replicas on one node cannot share one); -1: off."""
    ingress_resource: str = ""
    """A Ray custom resource that places the ingress (and so the service's ports) on the
    node(s) offering it, e.g. the head (``ray start --resources '{"switchboard_ingress":
    1}'``); empty: any node (one machine)."""
    admin_timeout_s: float = 60.0
    """How long an admin rpc waits for every replica to apply it."""
    app_name: str = "switchboard"

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InvalidOption(f"setting cluster.replicas must be >= 1, got {self.replicas}")
        if (self.min_replicas > 0) != (self.max_replicas > 0) \
                or self.min_replicas > self.max_replicas:
            raise InvalidOption("settings cluster.min_replicas and cluster.max_replicas go "
                                "together, with 1 <= min_replicas <= max_replicas")
        if not math.isfinite(self.target_ongoing_requests) \
                or self.target_ongoing_requests <= 0:
            raise InvalidOption("setting cluster.target_ongoing_requests must be > 0")
        for name in ("torch_threads", "adapters_per_replica"):
            if getattr(self, name) < 0:
                raise InvalidOption(f"setting cluster.{name} must be >= 0")
        if not -1 <= self.replica_metrics_port <= 65535:
            raise InvalidOption("setting cluster.replica_metrics_port must be a port number")
        if not math.isfinite(self.admin_timeout_s) or self.admin_timeout_s <= 0:
            raise InvalidOption("setting cluster.admin_timeout_s must be > 0")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > 0

    def threads(self) -> int:
        return self.torch_threads or max(1, math.ceil(self.ray_actor_options.num_cpus))
