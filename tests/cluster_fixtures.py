"""A Switchboard cluster on a local Ray instance in the test process: the real ingress
and replica deployments, the tiny model, 2 replicas of 1 CPU and 1 torch thread each."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc
from server.cluster.settings import ClusterConfig, RayActorOptions
from server.service.config import ServerConfig
from tests.service_fixtures import server_config


def cluster_config(base_dir: Path, root: Path, routing: Path, **changes: Any) -> ServerConfig:
    cluster = changes.pop("cluster", ClusterConfig(
        replicas=2, ray_actor_options=RayActorOptions(num_cpus=1), torch_threads=1,
        replica_metrics_port=-1, admin_timeout_s=30.0, app_name="switchboard-test"))
    return server_config(base_dir, root, routing, cluster=cluster, metrics_port=0,
                         **changes)


@dataclass
class LiveCluster:
    config: ServerConfig
    handle: Any
    """The ingress deployment's handle."""
    address: str
    http_url: str
    metrics_port: int
    channels: list[grpc.Channel] = field(default_factory=list)

    def channel(self) -> grpc.Channel:
        channel = grpc.insecure_channel(self.address)
        self.channels.append(channel)
        return channel

    def stub(self) -> pb_grpc.SwitchboardStub:
        return pb_grpc.SwitchboardStub(self.channel())

    @property
    def adapters(self) -> Any:
        """The ingress's admin view over every replica (:class:`ClusterAdapters`)."""
        from server.cluster import admin

        return admin.ClusterAdapters(admin.board(self.config.cluster.app_name),
                                     self.config.cluster.admin_timeout_s)

    def stats(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Every live replica's figures; while a lost replica still counts as live (its
        last sign of life is under ``admin.LIVE_S`` old) the board answers UNAVAILABLE,
        so this polls until every live replica answers."""
        from server.errors import ServiceUnavailable

        deadline = time.monotonic() + timeout
        while True:
            try:
                return sorted(self.adapters.replica_stats(), key=lambda s: s["replica"])
            except ServiceUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        import ray

        from server.cluster import launcher

        for channel in self.channels:
            channel.close()
        launcher.stop(self.config, self.handle)
        assert not ray.is_initialized()


def start_cluster(config: ServerConfig) -> LiveCluster:
    import ray

    from server.cluster import launcher

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    handle, addresses = launcher.start(config)
    return LiveCluster(config, handle, addresses["address"], addresses["http_url"],
                       addresses["metrics_port"])


def replace_cluster(config: ServerConfig, **changes: Any) -> ServerConfig:
    return dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, **changes))
