"""What the cluster's reads are answered from: each replica's view of its adapters and
figures, which it posts to the admin board every ``SNAPSHOT_S`` (and after each change it
applies), and the ingress's copy of them (:class:`ViewCache`).

A read (``GET /v1/models``, ``ListAdapters``, a metrics scrape) used to append a command
to the admin log and block a thread until every replica had applied it: a flood of reads
queued the operators' changes behind it and held a thread each. Now it reads memory.

Staleness, bounded: a view is at most ``SNAPSHOT_S`` old when posted, the ingress re-reads
the board's at most every ``VIEW_S``, so a read shows each replica as it was about a
second ago. A replica posts its view before it answers a change, and the ingress's first
read after an admin rpc re-reads the views, so that read shows the change. When the board
does not answer, the ingress serves its last copy for up to ``STALE_S``, then answers
UNAVAILABLE.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.adapters.cache import AdapterInfo
from server.cluster.board import LIVE_S
from server.errors import ServiceUnavailable

SNAPSHOT_S = 0.5
"""How often a replica posts its view."""
VIEW_S = 0.5
"""How often, at most, the ingress re-reads the views from the board."""
STALE_S = LIVE_S
"""The oldest copy the ingress serves while the board does not answer."""
FIRST_WAIT_S = 10.0
"""How long a read waits for another thread's fetch when the ingress has no copy yet."""


@dataclass(frozen=True)
class ReplicaView:
    """One replica's adapters and figures, as plain data."""

    replica: str
    adapters: tuple[AdapterInfo, ...]
    """Every adapter on disk or in memory (``AdapterCache.list_adapters``)."""
    stats: dict[str, Any]
    """The cache's and engine's figures (``AdminFollower.stats``)."""

    def info(self, name: str) -> AdapterInfo:
        """``name`` on this replica; one it does not know is on disk only, as
        ``AdapterCache.info`` says of it."""
        for info in self.adapters:
            if info.name == name:
                return info
        return AdapterInfo(name=name, version=None, rank=None, targets=(), tier="disk",
                           pinned=0, last_used_s_ago=None, requests_served=0,
                           load_seconds=None, previous_version=None, error=None)


class ViewCache:
    """The ingress's copy of the replicas' views. One thread at a time re-reads them from
    the board, at most every ``fresh_s``; meanwhile the others return the copy they
    have (if under ``stale_s`` old) rather than wait, so a flood of reads costs the board
    one call per ``fresh_s`` and blocks no thread on it."""

    def __init__(self, fetch: Callable[[], list[ReplicaView]], fresh_s: float = VIEW_S,
                 stale_s: float = STALE_S, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        """``fetch``: the board's views now (raises :class:`ServiceUnavailable`)."""
        self._fetch = fetch
        self.fresh_s = fresh_s
        self.stale_s = stale_s
        self._clock = clock
        self._state = threading.Lock()
        self._fetching = threading.Lock()
        self._views: list[ReplicaView] | None = None
        self._at = -math.inf
        """When the fetch that got ``_views`` started."""
        self._invalid_before = -math.inf

    def invalidate(self) -> None:
        """A change was applied: the next read re-reads the views."""
        with self._state:
            self._invalid_before = self._clock()

    def get(self) -> list[ReplicaView]:
        views, fresh = self._copy()
        if fresh:
            return views  # type: ignore[return-value]
        if self._fetching.acquire(blocking=False):
            try:
                return self._refresh()
            finally:
                self._fetching.release()
        usable = self._usable()
        if usable is not None:
            return usable
        # No usable copy (the first read, or the board silent for long): wait briefly
        # for the fetch under way rather than start another.
        if self._fetching.acquire(timeout=FIRST_WAIT_S):
            self._fetching.release()
            usable = self._usable()
            if usable is not None:
                return usable
        raise ServiceUnavailable(self._age_note())

    def _copy(self) -> tuple[list[ReplicaView] | None, bool]:
        with self._state:
            fresh = (self._views is not None and self._at >= self._invalid_before
                     and self._clock() - self._at <= self.fresh_s)
            return self._views, fresh

    def _usable(self) -> list[ReplicaView] | None:
        with self._state:
            if self._views is not None and self._clock() - self._at <= self.stale_s:
                return self._views
            return None

    def _refresh(self) -> list[ReplicaView]:
        views, fresh = self._copy()  # another thread may have refreshed meanwhile
        if fresh:
            return views  # type: ignore[return-value]
        started = self._clock()
        try:
            got = self._fetch()
        except ServiceUnavailable:
            usable = self._usable()
            if usable is None:
                raise
            return usable
        with self._state:
            if started >= self._at:
                self._views, self._at = got, started
        return got

    def _age_note(self) -> str:
        with self._state:
            if self._views is None:
                return "the cluster's replicas have not reported their adapters yet"
            age = self._clock() - self._at
        return (f"the cluster's view of its replicas is {age:.0f} s old (limit "
                f"{self.stale_s:g} s): the admin board is not answering")
