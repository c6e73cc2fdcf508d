"""A replica's serving stack: one base model, engine and adapter cache, run by the
replica deployment (``app.py``) with no transport of its own.

The calls it runs were validated and routed by the ingress; here they are leased,
templated and decoded exactly as in the single server (``Dispatcher.run``), and their
events go back as plain data (``wire.py``). A replica never binds the service's ports,
installs signal handlers or exits the process: Ray Serve owns its life.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import torch

from server.cluster.admin import AdminFollower
from server.cluster.wire import WireCall, WireError, key_names, started
from server.engine.request import GenerationResult
from server.errors import SwitchboardError
from server.service.config import ServerConfig
from server.service.metrics import ServiceMetrics
from server.service.routing import RouteDecision
from server.service.stack import ServingStack, build_stack

log = logging.getLogger("switchboard.cluster")


class Residency:
    """What Ray Serve's multiplexing LRU holds for one model id: the adapter cache keeps
    those adapters resident until Serve unloads the id (it calls ``__del__``); their
    slots are then the first the cache gives to another adapter (never one in use).
    Ray decides; the cache follows."""

    def __init__(self, cache: Any, names: list[str]) -> None:
        self._cache = cache
        self.names = names
        self._lock = threading.Lock()
        self._released = False
        cache.hold(names)

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._cache.let_go(self.names)

    def __del__(self) -> None:  # Ray Serve's unload hook, and garbage collection
        self.release()


class ReplicaServer:
    def __init__(self, config: ServerConfig, replica: str, board: Any) -> None:
        """Blocking (loads the base model): run it off the replica's event loop."""
        from server.adapters.watcher import AdapterWatcher

        torch.set_num_threads(config.cluster.threads())
        self.config = config
        self.replica = replica
        self.metrics = ServiceMetrics()
        self.stack: ServingStack = build_stack(config, self.metrics)
        self.metrics_port = -1
        if config.cluster.replica_metrics_port >= 0:
            self.metrics_port = self.metrics.serve(config.host,
                                                   config.cluster.replica_metrics_port)
        self.watcher = AdapterWatcher(self.stack.cache)
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="switchboard-poll",
                                        daemon=True)
        self._poller.start()
        self.follower = AdminFollower(board, replica, self.stack.cache, self.stack.engine)
        self.follower.start()
        log.info("replica serving", extra={"fields": {
            "replica": replica, "metrics_port": self.metrics_port,
            "decode_path": self.stack.engine.decode_note}})

    def _poll(self) -> None:
        """Adapter folders and the routing table every ``poll_interval_s``: a publish to
        the shared root reaches every replica this way. The ingress routes by its own
        copy of the table; this one decides fallbacks, the base model's template and
        composition labels, so both follow the same file."""
        while not self._stop.wait(self.config.poll_interval_s):
            try:
                self.watcher.poll_now()
                self.stack.routing.check()
            except Exception:
                log.exception("poll failed")

    def holdable(self, key: str) -> bool:
        """Whether every adapter of ``key`` is on disk and not refused: only then is it
        worth a place in Ray Serve's LRU (whose load evicts a held set first)."""
        cache = self.stack.cache
        for name in key_names(key):
            try:
                cache.store.locate(name)
            except SwitchboardError:
                return False
            info = cache.info(name)
            if info.version is None and info.error:
                return False
        return True

    async def hold(self, key: str) -> Residency:
        """Ray Serve's multiplexed loader: load the id's adapters into host memory (a
        cold load from disk is here) and keep them resident."""
        names = key_names(key)
        for name in names:
            lease = await self.stack.cache.lease_async(name)
            lease.release()
        return Residency(self.stack.cache, names)

    async def generate(self, wire: WireCall, decision: RouteDecision, arrived: float
                       ) -> AsyncIterator[Any]:
        """The dispatch facts, then the call's events, as plain data; a domain error is
        sent as a :class:`WireError`. A cancel (the ingress's client went away) cancels
        the engine row. ``arrived``: this replica's clock when the call reached it."""
        shift = wire.sent_at - arrived
        try:
            dispatched = await self.stack.dispatcher.run(wire.local_call(shift), decision)
        except SwitchboardError as exc:
            yield WireError.of(exc)
            return
        handle = dispatched.handle
        finished = False
        try:
            yield started(dispatched, self.replica)
            async for event in handle.stream():
                finished = isinstance(event, GenerationResult)  # re-timed by the ingress
                yield event
        except SwitchboardError as exc:
            yield WireError.of(exc)
        finally:
            if not finished:
                handle.cancel()

    def check_health(self) -> None:
        """Raise when this replica cannot serve (Ray Serve then replaces it)."""
        if not self.stack.engine.is_alive():
            raise RuntimeError(f"replica {self.replica}: the engine loop has stopped")

    def close(self) -> None:
        """Stop taking admin commands and polling, end the engine (finishing what runs
        within its grace) and the cache's loaders."""
        self._stop.set()
        self.follower.stop()
        self._poller.join(self.config.poll_interval_s + 30)
        self.stack.close(True, self.config.grace_period_s)
        self.metrics.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
