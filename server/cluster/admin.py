"""Admin rpcs that reach every replica, through one small Ray actor.

Ray Serve routes a call to *one* replica; load, unload and reload must reach *all* of
them, including a replica started later. The admin board actor (``board.py``) keeps the
ordered log of those changes. Each replica's :class:`AdminFollower` long-polls it,
applies every change to its own adapter cache in order and posts the result; the
ingress's :class:`ClusterAdapters` (what the admin rpcs call) submits a change and waits
until every live replica has answered. A replica that starts later replays the log, so
it serves what the operators asked for.

Reads (list, info, the metrics page's figures) never enter the log: each follower also
posts its replica's view to the board every ``SNAPSHOT_S``, and the ingress answers reads
from its copy of those views (``views.py``, which states the staleness).

Anything that can reach the Ray cluster can call this actor (docs/cluster.md, "Who can
reach the cluster"): Ray access is code execution, so the cluster's network is the trust
boundary, not the service's keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from server.adapters.cache import AdapterInfo
from server.cluster.board import POLL_S, Board
from server.cluster.views import SNAPSHOT_S, ReplicaView, ViewCache
from server.cluster.wire import WireError
from server.errors import ServiceUnavailable, SwitchboardError
from server.service.metrics import anon_rss_mb, live_figures

log = logging.getLogger("switchboard.cluster")

BOARD_PREFIX = "switchboard-admin-"
NAMESPACE = "serve"
"""Ray Serve's namespace, where the deployments' actors (and so the board) live."""
TIER_RANK = {"disk": 0, "host": 1, "device": 2}
READ_TIMEOUT_S = 5.0
"""How long the ingress waits for the board's views."""

AdminBoard = ray.remote(num_cpus=0)(Board)
"""The board as a Ray actor (one per application, detached, restarted if it dies)."""


def board(app_name: str, create: bool = False) -> Any:
    """The board of the application ``app_name`` (created by the first caller with
    ``create``); each application on a cluster has its own."""
    name = BOARD_PREFIX + app_name
    if create:
        return AdminBoard.options(  # type: ignore[attr-defined]
            name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
            max_restarts=-1).remote()
    return ray.get_actor(name, namespace=NAMESPACE)


class AdminFollower:
    """A replica's side: apply the board's commands to this replica's cache, in order,
    and post this replica's view."""

    def __init__(self, board_handle: Any, replica: str, cache: Any, engine: Any) -> None:
        self.board = board_handle
        self.replica = replica
        self.cache = cache
        self.engine = engine
        self._stop = threading.Event()
        # Liveness, views and commands on their own threads: a slow disk scan for a view
        # must not make a replica look dead, nor a long load delay its views.
        self._threads = [
            threading.Thread(target=self._run, name="switchboard-admin", daemon=True),
            threading.Thread(target=self._beat, name="switchboard-admin-beat", daemon=True),
            threading.Thread(target=self._report, name="switchboard-admin-view",
                             daemon=True)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Leave the board and stop (a command being applied finishes first)."""
        self._stop.set()
        with contextlib.suppress(Exception):  # the board is gone already (cluster shutdown)
            ray.get(self.board.leave.remote(self.replica), timeout=5)
        for thread in self._threads:
            thread.join(POLL_S + 15)

    def _beat(self) -> None:
        while not self._stop.wait(POLL_S):
            with contextlib.suppress(Exception):  # the poll loop reports an unreachable board
                self.board.heartbeat.remote(self.replica)

    def _report(self) -> None:
        while True:
            self.post_view()
            if self._stop.wait(SNAPSHOT_S):
                return

    def post_view(self) -> None:
        """Send this replica's view to the board (stamped before it is read: the board
        keeps the newest)."""
        try:
            taken = time.monotonic()
            view = ReplicaView(self.replica, tuple(self.cache.list_adapters()), self.stats())
            self.board.report.remote(self.replica, taken, view)
        except Exception:  # the poll loop reports an unreachable board
            log.debug("view not posted", exc_info=True)

    def _run(self) -> None:
        after, epoch = 0, ""
        while not self._stop.is_set():
            try:
                board_epoch, commands = ray.get(
                    self.board.poll.remote(self.replica, after, POLL_S), timeout=POLL_S + 10)
            except Exception:
                log.warning("admin board unreachable; retrying", exc_info=True)
                self._stop.wait(1.0)
                continue
            if board_epoch != epoch:  # a new (or restarted) board: its log starts over
                if epoch and after:
                    after = 0
                    continue
                epoch = board_epoch
            for seq, op, name, version in commands:
                if self._stop.is_set():
                    return
                result = self.apply(op, name, version)
                self.post_view()  # before the answer: a read after the rpc sees the change
                self.board.answer.remote(self.replica, seq, result)
                after = seq

    def stats(self) -> dict[str, Any]:
        """This replica's cache counters and gauges and its engine's gauges."""
        return {"replica": self.replica, **live_figures(self.engine, self.cache),
                "held": self.cache.held(), "anon_rss_mb": anon_rss_mb()}

    def apply(self, op: str, name: str, version: str | None) -> Any:
        try:
            if op == "load":
                return self.cache.load(name)
            if op == "unload":
                self.cache.unload(name)
                return self.cache.info(name)
            if op == "reload":
                return self.cache.reload(name, version)
            return WireError("InternalError", f"unknown admin op {op!r}")
        except SwitchboardError as exc:
            return WireError.of(exc)
        except Exception as exc:
            log.exception("admin command failed")
            return WireError("InternalError",
                             f"{op} failed on replica {self.replica}: {type(exc).__name__}")


class ClusterAdapters:
    """The admin rpcs' view of the adapters, over every replica (blocking calls: the
    servicer runs them on a worker thread, as it does an AdapterCache's). Changes go
    through the board's log; reads come from the ingress's copy of the replicas' views."""

    def __init__(self, board_handle: Any, timeout: float) -> None:
        self.board = board_handle
        self.timeout = timeout
        self.views = ViewCache(lambda: self._fetch_views(0.0)[0])

    def _ask(self, op: str, name: str, version: str | None = None) -> list[Any]:
        """Every live replica's answer to a change; UNAVAILABLE when the board cannot be
        reached or a live replica did not answer in time, a replica's domain error as
        itself."""
        timeout = self.timeout
        try:
            seq = ray.get(self.board.submit.remote(op, name, version), timeout=timeout)
            answers, missing = ray.get(self.board.results.remote(seq, timeout),
                                       timeout=timeout + 10)
        except (RayError, GetTimeoutError) as exc:
            raise ServiceUnavailable(f"the cluster's admin board did not answer {op}: "
                                     f"{type(exc).__name__}") from None
        finally:
            self.views.invalidate()
        if missing:
            raise ServiceUnavailable(f"replica(s) {', '.join(missing)} did not answer {op} "
                                     f"within {timeout:g} s")
        if not answers:
            raise ServiceUnavailable(f"no replica answered {op} within {timeout:g} s")
        for result in answers.values():
            if isinstance(result, WireError):
                raise result.error()
        return list(answers.values())

    def _fetch_views(self, fresh_timeout: float) -> tuple[list[ReplicaView], list[str]]:
        try:
            return ray.get(self.board.views_of.remote(fresh_timeout),  # type: ignore[no-any-return]
                           timeout=fresh_timeout + READ_TIMEOUT_S)
        except (RayError, GetTimeoutError) as exc:
            raise ServiceUnavailable("the cluster's admin board did not answer a read: "
                                     f"{type(exc).__name__}") from None

    def replica_views(self, fresh_within: float | None = None) -> list[ReplicaView]:
        """Each live replica's view: the ingress's copy (about a second old at most,
        ``views.py``), or with ``fresh_within``, views posted after this call, waiting up
        to that long (tests and benchmarks; UNAVAILABLE naming a replica that posted
        none)."""
        if fresh_within is None:
            views = self.views.get()
        else:
            views, late = self._fetch_views(fresh_within)
            if late:
                raise ServiceUnavailable(f"replica(s) {', '.join(late)} posted no view "
                                         f"within {fresh_within:g} s")
        if not views:
            raise ServiceUnavailable("no replica has reported its adapters yet")
        return views

    def load(self, name: str) -> AdapterInfo:
        return merge_infos(self._ask("load", name))

    def unload(self, name: str) -> None:
        self._ask("unload", name)

    def reload(self, name: str, version: str | None = None) -> AdapterInfo:
        return merge_infos(self._ask("reload", name, version))

    def info(self, name: str) -> AdapterInfo:
        """From the board's views as they are now, not the ingress's copy: UnloadAdapter
        answers with this right after its change (admin rpcs only, so never a flood)."""
        views, _ = self._fetch_views(0.0)
        if not views:
            raise ServiceUnavailable("no replica has reported its adapters yet")
        return merge_infos([view.info(name) for view in views])

    def replica_stats(self) -> list[dict[str, Any]]:
        """Each live replica's cache and engine figures (the metrics page)."""
        return [view.stats for view in self.replica_views()]

    def list_adapters(self) -> list[AdapterInfo]:
        by_name: dict[str, list[AdapterInfo]] = {}
        for view in self.replica_views():
            for info in view.adapters:
                by_name.setdefault(info.name, []).append(info)
        return [merge_infos(by_name[name]) for name in sorted(by_name)]


def merge_infos(infos: list[AdapterInfo]) -> AdapterInfo:
    """One adapter across replicas: the hottest replica's view (device over host over
    disk), with pins and requests served summed."""
    best = max(infos, key=lambda i: (TIER_RANK.get(i.tier, 0), i.version or ""))
    return dataclasses.replace(best, pinned=sum(i.pinned for i in infos),
                               requests_served=sum(i.requests_served for i in infos))
