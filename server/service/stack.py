"""The serving stack without a transport: base model, engine, adapter cache, routing
table and dispatcher, built from a :class:`ServerConfig`.

``SwitchboardServer`` wraps it (or a cluster's replicas: a :class:`Backend` either
way) in gRPC, HTTP, health and pollers; anything else that serves calls (a replica
process of a cluster) builds the same stack and drives its
:class:`~server.service.dispatch.Dispatcher` directly. Nothing here binds a port,
installs a signal handler or exits the process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.basemodel.source import DEFAULT_GGUF_NAME
from server.service.config import ServerConfig
from server.service.routing import RoutingTableFile

log = logging.getLogger("switchboard.server")


@dataclass
class ServingStack:
    base: Any
    """The :class:`~server.basemodel.LoadedBaseModel`."""
    engine: Any
    cache: Any
    routing: RoutingTableFile
    dispatcher: Any

    def close(self, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the engine (finishing what runs within ``timeout`` when ``drain``, else
        ending it), the cache's loader threads and the dispatcher's tokenizing threads."""
        self.engine.stop(drain, timeout)
        self.cache.close()
        self.dispatcher.close()


def base_model_id(source: str) -> str:
    """The base model's name in the HTTP API (``model`` and ``/v1/models``)."""
    if source == "default":
        return DEFAULT_GGUF_NAME.split(".")[0]
    return Path(source.rstrip("/")).name.removesuffix(".gguf")


@dataclass
class Backend:
    """What the front-ends serve from: the engine stack in this process, or a cluster's
    replicas. ``adapters`` answers the admin rpcs (an AdapterCache or alike)."""

    dispatcher: Any
    adapters: Any
    model_id: str
    """The base model's name in the HTTP API."""
    poll: Callable[[], object]
    """Adapter folders and the routing table, checked every ``poll_interval_s``."""
    close: Callable[[], None]
    routing: Any = None
    """The :class:`RoutingTableFile` the dispatcher routes by."""
    engine: Any = None
    cache: Any = None
    watcher: Any = None


def base_source(cfg: ServerConfig) -> str:
    """The base model setting as a path (or ``default``)."""
    return cfg.base_model if cfg.base_model == "default" else str(cfg.resolve(cfg.base_model))


def build_stack(cfg: ServerConfig, metrics: Any = None) -> ServingStack:
    """Load the base model, start the engine, open the adapter cache, preload the
    configured adapters (a failure is logged; that adapter stays refused) and read the
    routing table. ``metrics`` (a ``ServiceMetrics``) watches engine and cache if given.
    Blocking: run it off an event loop."""
    from server.adapters.cache import AdapterCache
    from server.adapters.store import AdapterStore
    from server.basemodel import load_base_model
    from server.engine.engine import Engine
    from server.service.dispatch import Dispatcher

    routing = RoutingTableFile(cfg.resolve(cfg.routing_table))
    base = load_base_model(base_source(cfg), device=cfg.device,
                           dtype=None if cfg.dtype == "auto" else cfg.dtype,
                           quantize=cfg.quantize)
    log.info("base model loaded", extra={"fields": {
        "source": base.info.source,
        "device": str(base.model.device), "dtype": base.info.dtype,
        "quantize": cfg.quantize, "fingerprint": base.base_fingerprint[:12]}})
    started = time.perf_counter()
    engine = Engine(base.model, base.tokenizer, cfg.engine)
    log.info("decode path ready", extra={"fields": {
        "decode_path": engine.decode_note,
        "warmup_s": round(time.perf_counter() - started, 2)}})
    roots = [cfg.resolve(root) for root in cfg.adapter_roots]
    cache = AdapterCache(AdapterStore(roots), engine.slots, base.base_fingerprint,
                         max_cpu_adapters=cfg.max_cpu_adapters)
    if metrics is not None:
        metrics.watch(engine, cache)
    names = list(cfg.preload)
    if "all" in names:
        names = sorted(set(cache.store.names()) | (set(names) - {"all"}))
    errors = cache.preload(names)
    for name, error in errors.items():
        log.error("preload failed; the adapter stays refused until its files change",
                  extra={"fields": {"adapter": name, "error": error}})
    log.info("adapters preloaded", extra={"fields": {
        "loaded": [n for n in names if n not in errors], "failed": sorted(errors)}})
    missing = sorted(routing.table.adapters() - set(cache.store.names()))
    if missing:
        log.warning("the routing table names adapters that are not on disk",
                    extra={"fields": {"missing": missing, "fallback": routing.table.fallback}})
    return ServingStack(base, engine, cache, routing,
                        Dispatcher(engine, cache, base.tokenizer, routing))
