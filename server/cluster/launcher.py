"""``switchboard serve --cluster``: start or join a Ray cluster, run the application,
drain it on SIGTERM/SIGINT.

This process only drives: the ingress deployment serves the ports, the replica
deployment owns the models. On a signal it drains the ingress (calls in flight finish
within ``grace_period_s``), deletes the application (Ray Serve lets each replica finish
its calls and stop its engine), and leaves the cluster: exit status 0.

The signal may reach Ray too: a SIGTERM to the process group (``kill -- -PGID``,
``systemctl stop``) ends the raylet within seconds, and every call through Ray then
hangs. So the drain runs on a thread this process watches; it gives up when the raylet
or the GCS it started dies before the replicas are drained, or when the time is up, and
the command ends within ``grace_period_s`` + ``STOP_MARGIN_S`` all the same: it logs one
line naming what was lost, kills every Ray process it started (``processes.py``) and
exits 1.
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

from server.cluster import processes
from server.service.config import ServerConfig

log = logging.getLogger("switchboard.cluster")

START_TIMEOUT_S = 900.0
STOP_MARGIN_S = 15.0
"""After a signal the command ends within ``grace_period_s`` + this, whatever died."""
KILL_RESERVE_S = 5.0
"""Of that margin, what killing the processes left behind and exiting may take."""
DRAIN_MARGIN_S = 5.0
"""How long past its grace period the ingress's drain may take to answer."""
RUNTIME_LOST = "the Ray runtime stopped before the replicas were drained"
DRAINING, STOPPING_REPLICAS, LEAVING = ("draining the ingress", "stopping the replicas",
                                        "leaving Ray")


class Stopping:
    """How far :func:`stop` has got, and what was lost on the way (shared between the
    thread that stops and the one that watches it)."""

    def __init__(self) -> None:
        self.phase = DRAINING
        self._lost: list[str] = []
        self._lock = threading.Lock()

    def lose(self, what: str) -> None:
        with self._lock:
            if what not in self._lost:
                self._lost.append(what)

    @property
    def lost(self) -> str:
        """What was lost, in one line ('' while nothing was)."""
        with self._lock:
            return "; ".join(self._lost)


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


def stop(config: ServerConfig, handle: Any | None, progress: Stopping | None = None
         ) -> str:
    """Drain the ingress, then the replicas; remove the application and its board.
    Serve itself is shut down only on the Ray instance this command started (a joined
    cluster may run other applications). What was lost ('' after a clean drain);
    ``progress`` follows the phases."""
    import ray
    from ray import serve

    from server.cluster import admin

    progress = Stopping() if progress is None else progress
    if handle is not None:
        try:
            drained = handle.drain.remote().result(
                timeout_s=config.grace_period_s + DRAIN_MARGIN_S)
        except Exception as exc:
            reason = (str(exc).splitlines() or [""])[0][:200]
            progress.lose(f"the ingress stopped before its calls were drained "
                          f"({type(exc).__name__}: {reason})")
        else:
            if drained is False:
                progress.lose("the grace period ran out: the calls still running were cut")
    progress.phase = STOPPING_REPLICAS
    with contextlib.suppress(Exception):  # never deployed (a failed start)
        serve.delete(config.cluster.app_name)  # replicas finish their calls, then stop
    with contextlib.suppress(ValueError):  # ValueError: never created
        ray.kill(admin.board(config.cluster.app_name))
    if not config.cluster.address:
        serve.shutdown()
    progress.phase = LEAVING
    ray.shutdown()
    return progress.lost


def shut_down(config: ServerConfig, handle: Any, runtime: processes.LocalRuntime,
              local: bool) -> int:
    """:func:`stop` on a thread, watched: given up when the raylet or the GCS dies
    before the replicas are drained, or once ``grace_period_s`` + ``STOP_MARGIN_S`` -
    ``KILL_RESERVE_S`` have passed; then (``local``: this command started Ray) every
    Ray process still running is killed. 0 when no call was lost, else 1, after one
    line naming what was."""
    limit = config.grace_period_s + STOP_MARGIN_S - KILL_RESERVE_S
    deadline = time.monotonic() + limit
    progress = Stopping()
    worker = threading.Thread(target=stop, args=(config, handle, progress),
                              name="switchboard-stop", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
        if not worker.is_alive():
            break
        if progress.phase != LEAVING and not runtime.alive():
            progress.lose(RUNTIME_LOST)
            break
        if time.monotonic() > deadline:
            if progress.phase == DRAINING:
                progress.lose(f"the ingress was still draining {limit:.0f} s after the "
                              "signal: the calls still running were cut")
            else:  # every call had ended: only the replicas' own stop is cut short
                log.warning(f"the cluster was still {progress.phase} {limit:.0f} s after "
                            "the signal; stopping it at once")
            break
    if local:
        killed = processes.kill_descendants()
        if killed:
            log.info("killed the Ray processes left", extra={"fields": {
                "processes": ",".join(sorted(set(killed)))}})
    if progress.lost:
        log.error(progress.lost)
        return 1
    return 0


def run(config: ServerConfig, announce: bool = True) -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean drain, 1 when calls were cut or the
    runtime stopped under the drain (:func:`shut_down`)."""
    local = not config.cluster.address
    if local:  # orphaned Ray workers stay this command's, to be stopped with it
        processes.adopt_orphans()
    stop_requested = threading.Event()
    started = time.perf_counter()
    try:
        handle, addresses = start(config, on_signal=stop_requested.set)
    except BaseException:
        with contextlib.suppress(Exception):  # the start's own error is the one to report
            stop(config, None)  # leave nothing deployed on the cluster
        if local:
            processes.kill_descendants()
        raise
    runtime = processes.LocalRuntime.started_here() if local else processes.LocalRuntime({})
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
    code = shut_down(config, handle, runtime, local)
    log.info("stopped")
    return code
