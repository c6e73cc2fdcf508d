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
from server.service.cluster_settings import ClusterConfig, RayActorOptions
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
        """Every live replica's figures, as posted after this call."""
        return sorted((view.stats for view in self.views(timeout)),
                      key=lambda s: s["replica"])

    def infos(self, name: str, timeout: float = 60.0) -> list[Any]:
        """``name`` on every live replica, as posted after this call."""
        return [view.info(name) for view in self.views(timeout)]

    def views(self, timeout: float = 60.0) -> list[Any]:
        """Every live replica's view, posted after this call; while a lost replica still
        counts as live (its last sign of life is under ``board.LIVE_S`` old) it posts
        none, so this polls until every live replica has."""
        from server.errors import ServiceUnavailable

        deadline = time.monotonic() + timeout
        while True:
            try:
                return sorted(self.adapters.replica_views(fresh_within=5.0),
                              key=lambda v: v.replica)
            except ServiceUnavailable:
                if time.monotonic() > deadline:
                    raise

    def log_length(self) -> int:
        """How many changes the admin log has taken."""
        import ray

        from server.cluster import admin

        return int(ray.get(admin.board(self.config.cluster.app_name).sequence.remote()))

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


def ingress_pid() -> int:
    """The process of the ingress deployment's replica on this machine (Ray names its
    worker processes after the actor they run)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"ServeReplica" in command and b"SwitchboardIngress" in command:
            return int(entry.name)
    raise LookupError("no ingress process on this machine")


def thread_count(pid: int) -> int:
    """The threads of process ``pid`` now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise LookupError(f"process {pid} reports no thread count")


async def get_many(host: str, port: int, path: str, count: int, at_once: int,
                   answered: list[int]) -> list[int]:
    """``count`` plain HTTP/1.1 GETs of ``path``, ``at_once`` in flight; each one's
    status (0: no answer). ``answered`` (one counter) grows as answers arrive."""
    import asyncio

    gate = asyncio.Semaphore(at_once)

    async def one() -> int:
        async with gate:
            try:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
                             "Connection: close\r\n\r\n".encode())
                await writer.drain()
                head = await asyncio.wait_for(reader.readline(), 120)
                await asyncio.wait_for(reader.read(), 120)
                writer.close()
                return int(head.split()[1]) if head else 0
            except (OSError, TimeoutError, ValueError, IndexError):
                return 0
            finally:
                answered[0] += 1

    return list(await asyncio.gather(*(one() for _ in range(count))))
