"""``switchboard serve --cluster``: start or join a Ray cluster, run the application,
drain it on SIGTERM/SIGINT.

This process only drives: the ingress deployment serves the ports, the replica
deployment owns the models. On a signal it drains the ingress (calls in flight finish
within ``grace_period_s``), deletes the application (Ray Serve lets each replica finish
its calls and stop its engine), and leaves the cluster: exit status 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from server.service.config import ServerConfig

log = logging.getLogger("switchboard.cluster")

START_TIMEOUT_S = 900.0


def start(config: ServerConfig, on_signal: Callable[[], None] | None = None
          ) -> tuple[Any, dict[str, Any]]:
    """Join (or start) Ray, run the application; its ingress handle and addresses.
    ``on_signal`` becomes the SIGTERM/SIGINT handler once Ray is up (``ray.init``
    installs one that exits the process at once)."""
    import ray
    from ray import serve

    from server.cluster.app import build_app

    cluster = config.cluster
    if not ray.is_initialized():
        # Workers of a local cluster inherit this environment; ones of a cluster joined
        # by address get the settings that keep them off model hubs.
        runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
        ray.init(address=cluster.address or None, include_dashboard=False,
                 runtime_env=runtime_env if cluster.address else None,
                 log_to_driver=False)
    if on_signal is not None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: on_signal())
    serve.start(proxy_location="Disabled")
    handle = serve.run(build_app(config), name=cluster.app_name, route_prefix=None,
                       blocking=False)
    addresses = handle.ready.remote().result(timeout_s=START_TIMEOUT_S)
    return handle, addresses


def stop(config: ServerConfig, handle: Any | None) -> None:
    """Drain the ingress, then the replicas; remove the application and its board.
    Serve itself is shut down only on the Ray instance this command started (a joined
    cluster may run other applications)."""
    import ray
    from ray import serve

    from server.cluster import admin

    if handle is not None:
        try:
            handle.drain.remote().result(timeout_s=config.grace_period_s + 30)
        except Exception:
            log.exception("ingress drain failed")
    with contextlib.suppress(Exception):  # never deployed (a failed start)
        serve.delete(config.cluster.app_name)  # replicas finish their calls, then stop
    with contextlib.suppress(ValueError):  # ValueError: never created
        ray.kill(admin.board(config.cluster.app_name))
    if not config.cluster.address:
        serve.shutdown()
    ray.shutdown()


def run(config: ServerConfig, announce: bool = True) -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean drain."""
    stop_requested = threading.Event()
    started = time.perf_counter()
    try:
        handle, addresses = start(config, on_signal=stop_requested.set)
    except BaseException:
        with contextlib.suppress(Exception):  # the start's own error is the one to report
            stop(config, None)  # leave nothing deployed on the cluster
        raise
    cluster = config.cluster
    replicas = (f"{cluster.min_replicas}-{cluster.max_replicas} replicas (autoscaling)"
                if cluster.autoscaling else f"{cluster.replicas} replicas")
    log.info("cluster serving", extra={"fields": {
        **addresses, "replicas": replicas, "start_s": round(time.perf_counter() - started, 1),
        "pid": os.getpid()}})
    if announce:  # the single server's line, so scripts read both alike
        print(f"switchboard: Ray Serve cluster of {replicas} ready", flush=True)
        metrics = addresses["metrics_port"]
        print(f"switchboard: serving on {addresses['address']}"
              + (f", metrics on http://{config.host}:{metrics}/metrics" if metrics >= 0 else "")
              + (f", OpenAI API on {addresses['http_url']}" if addresses["http_url"] else ""),
              flush=True)
    stop_requested.wait()
    log.info("draining the cluster")
    stop(config, handle)
    log.info("stopped")
    return 0
