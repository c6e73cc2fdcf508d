"""Admin rpcs that reach every replica, through one small Ray actor.

Ray Serve routes a call to *one* replica; load, unload and reload must reach *all* of
them, including a replica started later. The :class:`AdminBoard` actor keeps the ordered
log of admin commands. Each replica's :class:`AdminFollower` long-polls it, applies every
command to its own adapter cache in order and posts the result; the ingress's
:class:`ClusterAdapters` (what the admin rpcs call) submits a command and waits until
every live replica has answered. A replica that starts later replays the log's
load/unload/reload commands, so it serves what the operators asked for; read-only
commands (info, list, stats) leave the log once answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from server.adapters.cache import AdapterInfo
from server.cluster.wire import WireError
from server.errors import ServiceUnavailable, SwitchboardError
from server.service.metrics import anon_rss_mb, live_figures

log = logging.getLogger("switchboard.cluster")

BOARD_PREFIX = "switchboard-admin-"
NAMESPACE = "serve"
"""Ray Serve's namespace, where the deployments' actors (and so the board) live."""
POLL_S = 2.0
LIVE_S = 3 * POLL_S + 4.0
"""A replica not heard from (poll or heartbeat) for this long is taken for gone."""
FORGET_S = 60 * LIVE_S
MUTATING = ("load", "unload", "reload")
TIER_RANK = {"disk": 0, "host": 1, "device": 2}

Command = tuple[int, str, str, str | None]
"""(sequence number, op, adapter name, version)."""


@ray.remote(num_cpus=0)
class AdminBoard:
    """The admin log and the replicas' answers (an async actor: waits do not block).

    Restarted by Ray if its process dies, with an empty log and a new ``epoch``: the
    followers then start over from its first command."""

    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex
        self.commands: list[Command] = []
        self.seq = 0
        self.answers: dict[int, dict[str, Any]] = {}
        """Answers by command, while someone waits for them."""
        self.seen: dict[str, float] = {}
        self.gone: set[str] = set()
        self.changed = asyncio.Condition()

    def _heard(self, replica: str) -> None:
        if replica not in self.gone:
            self.seen[replica] = time.monotonic()

    async def heartbeat(self, replica: str) -> None:
        """A replica busy applying a long command is still alive."""
        self._heard(replica)

    async def poll(self, replica: str, after: int, timeout: float
                   ) -> tuple[str, list[Command]]:
        """This board's epoch and the commands after ``after`` (waiting up to
        ``timeout`` for one)."""
        self._heard(replica)
        async with self.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait_for(lambda: self.seq > after), timeout)
        self._heard(replica)
        return self.epoch, [c for c in self.commands if c[0] > after]

    async def submit(self, op: str, name: str, version: str | None) -> int:
        async with self.changed:
            self.seq += 1
            self.commands.append((self.seq, op, name, version))
            self.answers[self.seq] = {}
            self.changed.notify_all()
        return self.seq

    async def answer(self, replica: str, seq: int, result: Any) -> None:
        async with self.changed:
            self._heard(replica)
            if seq in self.answers:
                self.answers[seq][replica] = result
            self.changed.notify_all()

    async def leave(self, replica: str) -> None:
        async with self.changed:
            self.seen.pop(replica, None)
            self.gone.add(replica)
            self.changed.notify_all()

    def live(self) -> list[str]:
        now = time.monotonic()
        for replica in [r for r, at in self.seen.items() if now - at > FORGET_S]:
            del self.seen[replica]
        return sorted(r for r, at in self.seen.items() if now - at <= LIVE_S)

    async def results(self, seq: int, timeout: float) -> tuple[dict[str, Any], list[str]]:
        """The answers to ``seq`` and the live replicas that did not answer within
        ``timeout``; the command then leaves the log unless it changes state."""
        deadline = time.monotonic() + timeout
        answers = self.answers.get(seq, {})
        async with self.changed:
            while True:
                live = self.live()
                if live and all(r in answers for r in live):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                # Wake at least every second: a dead replica drops out of live().
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
            self.answers.pop(seq, None)
            self.commands = compact(self.commands, seq, set(self.answers))
        return answers, [r for r in self.live() if r not in answers]

    def replicas(self) -> list[str]:
        return self.live()


def compact(commands: list[Command], answered: int, waited_on: set[int]) -> list[Command]:
    """The log once ``answered`` is done: a read-only command leaves it, and a state
    change replaces the earlier ones on the same adapter that nobody still waits on (a
    replica that replays the log only needs each adapter's last state, and the log stays
    bounded)."""
    done = next((c for c in commands if c[0] == answered), None)
    if done is None:
        return commands
    if done[1] not in MUTATING:
        return [c for c in commands if c[0] != answered]
    return [c for c in commands
            if c[0] >= answered or c[2] != done[2] or c[0] in waited_on
            or c[1] not in MUTATING]


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
    """A replica's side: apply the board's commands to this replica's cache, in order."""

    def __init__(self, board_handle: Any, replica: str, cache: Any, engine: Any) -> None:
        self.board = board_handle
        self.replica = replica
        self.cache = cache
        self.engine = engine
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name="switchboard-admin", daemon=True),
            threading.Thread(target=self._beat, name="switchboard-admin-beat", daemon=True)]

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
            if op == "info":
                return self.cache.info(name)
            if op == "list":
                return self.cache.list_adapters()
            if op == "stats":
                return self.stats()
            return WireError("InternalError", f"unknown admin op {op!r}")
        except SwitchboardError as exc:
            return WireError.of(exc)
        except Exception as exc:
            log.exception("admin command failed")
            return WireError("InternalError",
                             f"{op} failed on replica {self.replica}: {type(exc).__name__}")


class ClusterAdapters:
    """The admin rpcs' view of the adapters, over every replica (blocking calls: the
    servicer runs them on a worker thread, as it does an AdapterCache's)."""

    def __init__(self, board_handle: Any, timeout: float) -> None:
        self.board = board_handle
        self.timeout = timeout

    def _ask(self, op: str, name: str = "", version: str | None = None,
             timeout: float | None = None) -> list[Any]:
        """Every live replica's answer; UNAVAILABLE when the board cannot be reached or a
        live replica did not answer in time, a replica's domain error as itself."""
        timeout = self.timeout if timeout is None else timeout
        try:
            seq = ray.get(self.board.submit.remote(op, name, version), timeout=timeout)
            answers, missing = ray.get(self.board.results.remote(seq, timeout),
                                       timeout=timeout + 10)
        except (RayError, GetTimeoutError) as exc:
            raise ServiceUnavailable(f"the cluster's admin board did not answer {op}: "
                                     f"{type(exc).__name__}") from None
        if missing:
            raise ServiceUnavailable(f"replica(s) {', '.join(missing)} did not answer {op} "
                                     f"within {timeout:g} s")
        if not answers:
            raise ServiceUnavailable(f"no replica answered {op} within {timeout:g} s")
        for result in answers.values():
            if isinstance(result, WireError):
                raise result.error()
        return list(answers.values())

    def load(self, name: str) -> AdapterInfo:
        return merge_infos(self._ask("load", name))

    def unload(self, name: str) -> None:
        self._ask("unload", name)

    def reload(self, name: str, version: str | None = None) -> AdapterInfo:
        return merge_infos(self._ask("reload", name, version))

    def info(self, name: str) -> AdapterInfo:
        return merge_infos(self._ask("info", name))

    def replica_stats(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Each live replica's cache and engine figures (metrics, benchmarks, leak
        checks)."""
        return self._ask("stats", timeout=timeout)

    def list_adapters(self) -> list[AdapterInfo]:
        by_name: dict[str, list[AdapterInfo]] = {}
        for infos in self._ask("list"):
            for info in infos:
                by_name.setdefault(info.name, []).append(info)
        return [merge_infos(by_name[name]) for name in sorted(by_name)]


def merge_infos(infos: list[AdapterInfo]) -> AdapterInfo:
    """One adapter across replicas: the hottest replica's view (device over host over
    disk), with pins and requests served summed."""
    best = max(infos, key=lambda i: (TIER_RANK.get(i.tier, 0), i.version or ""))
    return dataclasses.replace(best, pinned=sum(i.pinned for i in infos),
                               requests_served=sum(i.requests_served for i in infos))
