"""The adapter cache: disk → host memory (LRU) → device slots (LRU among unpinned).

Request path::

    lease = cache.lease("wuyu")          # host tier: loads on a miss, off the engine thread,
                                         # one load however many requests ask; pins the version
    engine.submit(GenerationRequest(..., adapter=lease))
    # at admission, on the engine thread: lease.try_acquire_slot() copies the adapter into
    # a free or evictable device slot (a few ms) and pins the slot, or returns None when
    # every slot is pinned: the request waits, later requests for resident adapters pass.
    # when the request ends, the engine calls lease.release() (exactly once).

Two pins, deliberately different: a *version pin* from lease to release keeps that
version in host memory (in-flight requests finish on the version they started with
across a hot reload); a *slot pin* from admission to release keeps its device slot.
Slot pins start only at admission because requests still in the queue must not hold
slots, or a request waiting for a slot could wait forever behind them.

Versions: each (name, version) is its own entry. A changed folder loads beside the old
version; new leases get the new one as soon as it is ready, old leases finish on the
old one, which then gives up its slot. The previous version stays in host memory for
rollback. A failed reload leaves the served version as it was.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from server.adapters.store import (
    AdapterStore,
    Signature,
    signature,
    validate_name,
)
from server.adapters.validate import ValidatedAdapter, load_validated
from server.engine.multi_lora import LoraSlots
from server.engine.request import AdapterBinding
from server.errors import AdapterNotFound, InvalidRequest, SwitchboardError
from server.formats.manifest import AdapterManifest

log = logging.getLogger(__name__)

Tier = Literal["disk", "host", "device"]


@dataclass
class CacheStats:
    host_hits: int = 0
    host_misses: int = 0
    device_hits: int = 0
    device_misses: int = 0
    host_evictions: int = 0
    device_evictions: int = 0
    loads: int = 0
    load_failures: int = 0
    load_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1024))


@dataclass
class _Entry:
    validated: ValidatedAdapter
    load_seconds: float
    signature: Signature
    """The folder's signature when this version was read (the watcher compares it)."""
    slot: int | None = None
    """The device slot holding this version: the one record of who owns a slot."""
    version_pins: int = 0
    slot_pins: int = 0
    last_used: float = field(default_factory=time.monotonic)
    requests_served: int = 0

    @property
    def name(self) -> str:
        return self.validated.name

    @property
    def version(self) -> str:
        return self.validated.version


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    version: str | None
    rank: int | None
    targets: tuple[str, ...]
    tier: Tier
    pinned: int
    last_used_s_ago: float | None
    requests_served: int
    load_seconds: float | None
    previous_version: str | None
    error: str | None
    manifest: AdapterManifest | None = None


class AdapterLease:
    """One request's hold on one adapter version (an engine ``AdapterBinding``)."""

    def __init__(self, cache: AdapterCache, entry: _Entry) -> None:
        self._cache = cache
        self._entry = entry
        self._slot_held = False
        self._released = False

    @property
    def name(self) -> str:
        return self._entry.name

    @property
    def version(self) -> str:
        return self._entry.version

    @property
    def manifest(self) -> AdapterManifest | None:
        return self._entry.validated.manifest

    def try_acquire_slot(self) -> int | None:
        return self._cache._acquire_slot(self)

    def try_acquire_slots_with(self, others: Sequence[AdapterBinding]) -> list[int] | None:
        leases = [self, *others]
        if not all(isinstance(o, AdapterLease) and o._cache is self._cache for o in leases):
            raise InvalidRequest("a composition's adapters must come from one cache")
        return self._cache._acquire_slots(leases)  # type: ignore[arg-type]

    def release(self) -> None:
        self._cache._release(self)


class AdapterCache:
    def __init__(self, store: AdapterStore, slots: LoraSlots, base_fingerprint: str, *,
                 max_cpu_adapters: int = 32, loader_threads: int = 2) -> None:
        if max_cpu_adapters < 1:
            raise ValueError("max_cpu_adapters must be >= 1")
        self.store = store
        self.slots = slots
        self.base_fingerprint = base_fingerprint
        self.max_cpu_adapters = max_cpu_adapters
        self.stats = CacheStats()
        self.load_hook: Callable[[str], None] | None = None
        """Called on the loader thread before each disk load (tests inject delays)."""
        self.on_load: Callable[[str, float], None] | None = None
        """Called after each successful disk load with its seconds (metrics)."""
        self._lock = threading.RLock()
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._current: dict[str, _Entry] = {}
        self._previous: dict[str, _Entry] = {}
        self._loading: dict[str, Future[_Entry]] = {}
        self._failures: dict[str, tuple[str, Signature]] = {}
        """The last refused load of a name: its message and the folder's signature."""
        self._held: dict[str, int] = {}
        """Names kept resident by an outside decision (a cluster replica's multiplexing
        LRU): their served version is never the host LRU's victim."""
        self._executor = ThreadPoolExecutor(loader_threads, thread_name_prefix="adapter-load")

    # -- leases (request path) ---------------------------------------------------------------
    def lease(self, name: str, timeout: float | None = None) -> AdapterLease:
        """Pin the served version of ``name``, loading it first on a miss (blocking)."""
        while True:
            entry = self._entry_future(name).result(timeout)
            lease = self._make_lease(entry)
            if lease is not None:
                return lease

    async def lease_async(self, name: str) -> AdapterLease:
        """As :meth:`lease`, awaiting the load without blocking the event loop."""
        while True:
            # shield: cancelling this caller must not cancel the load other callers share
            entry = await asyncio.shield(asyncio.wrap_future(self._entry_future(name)))
            lease = self._make_lease(entry)
            if lease is not None:
                return lease

    def _entry_future(self, name: str) -> Future[_Entry]:
        validate_name(name)
        with self._lock:
            entry = self._current.get(name)
            if entry is not None:
                self.stats.host_hits += 1
                done: Future[_Entry] = Future()
                done.set_result(entry)
                return done
            self.stats.host_misses += 1
            return self._start_load(name)

    def _start_load(self, name: str) -> Future[_Entry]:
        """A load of the folder's current contents; joins one already under way.

        The folder is looked up on the loader thread, not here: callers hold no disk
        work under the lock (a slow adapter root would stall the engine thread, which
        takes the lock to claim slots and release leases) and the event loop awaiting a
        lease does none either. An unknown name fails its future with NotFound."""
        with self._lock:
            future = self._loading.get(name)
            if future is None or future.cancelled():
                future = self._executor.submit(self._load, name)
                self._loading[name] = future
            return future

    def _make_lease(self, entry: _Entry) -> AdapterLease | None:
        with self._lock:
            if self._entries.get((entry.name, entry.version)) is not entry:
                return None  # dropped between load and lease: look again
            entry.version_pins += 1
            return AdapterLease(self, entry)

    def _load(self, name: str) -> _Entry:
        started = time.perf_counter()
        try:
            location = self.store.locate(name)  # NotFound / Refused: not a load failure
        except BaseException:
            with self._lock:
                self._loading.pop(name, None)
            raise
        sig = signature(location.folder)
        try:
            if self.load_hook is not None:
                self.load_hook(name)
            validated = load_validated(location, self.slots, self.base_fingerprint)
        except SwitchboardError as exc:
            with self._lock:
                self._loading.pop(name, None)
                self._failures[name] = (str(exc), sig)
                self.stats.load_failures += 1
            log.warning("adapter %s refused: %s", name, exc)
            raise
        except BaseException:
            with self._lock:
                self._loading.pop(name, None)
            raise
        seconds = time.perf_counter() - started
        with self._lock:
            self._loading.pop(name, None)
            key = (name, validated.version)
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry(validated, seconds, sig)
                self._entries[key] = entry
                self.stats.loads += 1
                self.stats.load_seconds.append(seconds)
                if self.on_load is not None:
                    self.on_load(name, seconds)
            entry.signature = sig  # the same version read again (files touched, not changed)
            self._set_current(name, entry)
            self._failures.pop(name, None)
            self._evict_host()
        log.info("adapter %s version %s ready in %.3f s", name, entry.version[:12], seconds)
        return entry

    # -- slots (engine thread) ---------------------------------------------------------------
    def _acquire_slot(self, lease: AdapterLease) -> int | None:
        slots = self._acquire_slots([lease])
        return None if slots is None else slots[0]

    def _acquire_slots(self, leases: list[AdapterLease]) -> list[int] | None:
        """Pin a device slot for each lease's adapter, copying cold ones in: all or none.

        The slots are chosen and pinned under the lock, and the copies run after it is
        let go: a cold slot load (tens of ms for a large adapter) must not block leases,
        admin calls or gauges. The pins keep every other thread off the slots meanwhile
        (eviction, unload and reload free only unpinned slots), and only the engine
        thread acquires, so no forward reads a slot before its copy is done. A composed
        request gets every slot or none, so two of them can never each hold half of what
        they need and wait for the other.
        """
        with self._lock:
            entries = [lease._entry for lease in leases]
            if any(lease._released for lease in leases):
                raise InvalidRequest("adapter lease used after release")
            if len({id(e) for e in entries}) != len(entries):
                raise InvalidRequest("the same adapter is composed twice")
            cold = [e for e in entries if e.slot is None]
            choices = self._evictable_slots(len(cold), keep=entries)
            if choices is None:
                return None  # not enough unpinned slots: wait
            for entry, (slot, victim) in zip(cold, choices, strict=True):
                if victim is not None:
                    victim.slot = None
                    self.stats.device_evictions += 1
                entry.slot = slot
                self.stats.device_misses += 1
            self.stats.device_hits += len(entries) - len(cold)
            now = time.monotonic()
            for lease, entry in zip(leases, entries, strict=True):
                entry.slot_pins += 1
                entry.last_used = now
                lease._slot_held = True
            held = [e.slot for e in entries]
        for entry in cold:
            try:
                assert entry.slot is not None
                self.slots.load(entry.slot, entry.validated.adapter)
            except BaseException:
                with self._lock:  # nothing usable is in the slots: give every pin back
                    for lease, pinned in zip(leases, entries, strict=True):
                        lease._slot_held = False
                        pinned.slot_pins -= 1
                    for failed in cold:
                        self._free_slot(failed)
                raise
        return [slot for slot in held if slot is not None]

    def _slot_owners(self) -> dict[int, _Entry]:
        """Slot → the version in it, read off the entries (every slot holder is one)."""
        return {e.slot: e for e in self._entries.values() if e.slot is not None}

    def _evictable_slots(self, count: int, keep: list[_Entry]
                         ) -> list[tuple[int, _Entry | None]] | None:
        """``count`` slots, each free or held by an unpinned version to evict (and that
        version), never one of ``keep``'s; None when there are not enough."""
        owners = self._slot_owners()
        free = [s for s in range(self.slots.num_slots) if s not in owners][:count]
        chosen: list[tuple[int, _Entry | None]] = [(s, None) for s in free]
        if len(chosen) < count:
            kept = {id(e) for e in keep}
            unpinned = [o for o in owners.values() if o.slot_pins == 0 and id(o) not in kept]
            # Old versions go first, then names nobody holds resident, then the least
            # recently used.
            unpinned.sort(key=lambda e: (self._current.get(e.name) is e, e.name in self._held,
                                         e.last_used))
            for victim in unpinned[: count - len(chosen)]:
                assert victim.slot is not None
                chosen.append((victim.slot, victim))
        return chosen if len(chosen) == count else None

    def _release(self, lease: AdapterLease) -> None:
        with self._lock:
            if lease._released:
                return
            lease._released = True
            entry = lease._entry
            entry.version_pins -= 1
            if lease._slot_held:
                lease._slot_held = False
                entry.slot_pins -= 1
                entry.requests_served += 1
                entry.last_used = time.monotonic()
            if entry.version_pins == 0 and not self._retained(entry):
                self._drop(entry)
            elif entry.slot_pins == 0 and entry.slot is not None \
                    and self._current.get(entry.name) is not entry:
                self._free_slot(entry)  # an old version's last request: free its slot

    # -- residency decided elsewhere ------------------------------------------------------
    def hold(self, names: Sequence[str]) -> None:
        """Keep ``names`` resident until :meth:`let_go`: in a cluster, Ray Serve's
        multiplexing decides which adapters a replica holds and this cache follows, so
        the two never run competing LRUs."""
        with self._lock:
            for name in names:
                self._held[name] = self._held.get(name, 0) + 1

    def let_go(self, names: Sequence[str]) -> None:
        """End a :meth:`hold`: a name no longer held is the first whose device slot is
        taken when one is needed (its slot stays loaded until then, so a late call for
        it still hits) and becomes the host LRU's to evict. A slot in use is never
        taken."""
        with self._lock:
            for name in names:
                count = self._held.get(name, 0) - 1
                if count > 0:
                    self._held[name] = count
                else:
                    self._held.pop(name, None)
            self._evict_host()

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    # -- bookkeeping -------------------------------------------------------------------------
    def _retained(self, entry: _Entry) -> bool:
        return (self._current.get(entry.name) is entry
                or self._previous.get(entry.name) is entry)

    def _free_slot(self, entry: _Entry) -> None:
        if entry.slot is not None:
            self.slots.clear(entry.slot)
            entry.slot = None

    def _drop(self, entry: _Entry) -> None:
        self._free_slot(entry)
        if self._entries.pop((entry.name, entry.version), None) is not None:
            self.stats.host_evictions += 1

    def _set_current(self, name: str, entry: _Entry) -> None:
        old = self._current.get(name)
        self._current[name] = entry
        if old is None or old is entry:
            return
        older = self._previous.get(name)
        self._previous[name] = old
        if older is not None and older is not entry and older.version_pins == 0:
            self._drop(older)
        if old.slot_pins == 0:
            self._free_slot(old)

    def _evict_host(self) -> None:
        while len(self._entries) > self.max_cpu_adapters:
            candidates = [e for e in self._entries.values() if e.version_pins == 0
                          and not (e.name in self._held and self._current.get(e.name) is e)]
            if not candidates:
                return  # everything is pinned by requests: over the limit until they end
            victim = min(candidates,
                         key=lambda e: (self._current.get(e.name) is e, e.last_used))
            if self._current.get(victim.name) is victim:
                del self._current[victim.name]
            if self._previous.get(victim.name) is victim:
                del self._previous[victim.name]
            self._drop(victim)

    # -- admin -------------------------------------------------------------------------------
    def load(self, name: str, timeout: float | None = None) -> AdapterInfo:
        """Make ``name`` resident in host memory (a no-op when it already is)."""
        self._entry_future(name).result(timeout)
        return self.info(name)

    def reload(self, name: str, version: str | None = None,
               timeout: float | None = None) -> AdapterInfo:
        """Load the folder's current contents now, or roll back to a kept ``version``."""
        validate_name(name)
        if version is None:
            self._start_load(name).result(timeout)
            return self.info(name)
        with self._lock:
            kept = [e for (n, v), e in self._entries.items() if n == name and v.startswith(version)]
            if len(kept) != 1:
                versions = [v[:12] for (n, v) in self._entries if n == name]
                raise AdapterNotFound(
                    f"adapter '{name}' has no kept version {version[:16]!r} "
                    f"(kept: {', '.join(versions) or 'none'})"
                )
            self._set_current(name, kept[0])  # the next poll reloads if the disk differs
            self._failures.pop(name, None)
        return self.info(name)

    def unload(self, name: str) -> None:
        """Evict ``name`` from device and host; in-flight requests finish first."""
        validate_name(name)
        with self._lock:
            entries = [e for e in (self._current.pop(name, None),
                                   self._previous.pop(name, None)) if e is not None]
            for entry in entries:
                if entry.version_pins == 0:
                    self._drop(entry)
                elif entry.slot_pins == 0:
                    self._free_slot(entry)
        if not entries:
            self.store.locate(name)  # NotFound for names that do not exist (off the lock)

    def preload(self, names: list[str], timeout: float | None = None) -> dict[str, str]:
        """Load each adapter; returns the errors by name (a bad one does not stop others)."""
        futures = {}
        for name in names:
            try:
                futures[name] = self._entry_future(name)
            except SwitchboardError as exc:
                futures[name] = Future()
                futures[name].set_exception(exc)
        errors = {}
        for name, future in futures.items():
            try:
                future.result(timeout)
            except SwitchboardError as exc:
                errors[name] = str(exc)
        return errors

    # -- what the watcher (server/adapters/watcher.py) reads and drives -------------------
    def watched(self) -> dict[str, tuple[Signature | None, Signature | None, bool]]:
        """Per name the cache knows: (served version's signature, last refused
        signature, a load under way)."""
        with self._lock:
            names = set(self._current) | set(self._failures)
            return {name: (self._current[name].signature if name in self._current else None,
                           self._failures[name][1] if name in self._failures else None,
                           name in self._loading) for name in names}

    def refresh(self, name: str) -> None:
        """Start loading the folder's current contents (a new version), if not under way."""
        self._start_load(name)

    def retire(self, name: str) -> None:
        """The folder is gone: stop serving ``name``; in-flight requests finish."""
        with self._lock:
            for entry in (self._current.pop(name, None), self._previous.pop(name, None)):
                if entry is not None and entry.version_pins == 0:
                    self._drop(entry)
            self._failures.pop(name, None)
        log.info("adapter %s retired: its folder is gone", name)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- introspection -----------------------------------------------------------------------
    def info(self, name: str) -> AdapterInfo:
        with self._lock:
            entry = self._current.get(name)
            previous = self._previous.get(name)
            if entry is None:
                return AdapterInfo(name, None, None, (), "disk", 0, None, 0, None,
                                   previous.version if previous else None, self._error(name))
            pinned = sum(e.version_pins for (n, _), e in self._entries.items() if n == name)
            adapter = entry.validated.adapter
            return AdapterInfo(
                name=name, version=entry.version, rank=adapter.rank,
                targets=tuple(adapter.target_names),
                tier="device" if entry.slot is not None else "host", pinned=pinned,
                last_used_s_ago=time.monotonic() - entry.last_used,
                requests_served=sum(e.requests_served for (n, _), e in self._entries.items()
                                    if n == name),
                load_seconds=entry.load_seconds,
                previous_version=previous.version if previous else None,
                error=self._error(name),
                manifest=entry.validated.manifest,
            )

    def _error(self, name: str) -> str | None:
        failure = self._failures.get(name)
        return failure[0] if failure else None

    def list_adapters(self) -> list[AdapterInfo]:
        """Every adapter on disk or in memory. The disk scan runs without the lock: on a
        network file system it can take long, and the engine thread must not wait."""
        on_disk = self.store.names()
        with self._lock:
            names = set(on_disk) | set(self._current)
        return [self.info(name) for name in sorted(names)]

    def usage(self) -> dict[str, int]:
        """Gauges: entries in host memory, slots in use, pins held (0 when idle)."""
        with self._lock:
            return {
                "host_entries": len(self._entries),
                "slots_in_use": len(self._slot_owners()),
                "version_pins": sum(e.version_pins for e in self._entries.values()),
                "slot_pins": sum(e.slot_pins for e in self._entries.values()),
                "loading": len(self._loading),
            }
