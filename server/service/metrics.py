"""Prometheus metrics, served as text over HTTP (``metrics_port``).

Labels are ``adapter``, ``route``, ``status`` and ``protocol`` (``grpc`` or ``http``)
only: never a caller number, request id or anything a caller typed, and ``adapter`` is
the adapter that served (``(base)`` for
the base model, ``(none)`` when the call failed before routing), never a requested name,
so a client cannot grow the label set. Gauges and cache counters are read from the engine
and the adapter cache at scrape time (one source of truth, no double bookkeeping).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from server.service.dispatch import CallTimings

BASE_LABEL = "(base)"
NO_ADAPTER_LABEL = "(none)"
NO_ROUTE_LABEL = "none"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


LIVE_METRICS: tuple[tuple[str, str, bool, tuple[str, ...]], ...] = (
    # (name, help, is a counter, where in :func:`live_figures`)
    ("switchboard_queue_depth", "Requests waiting for admission to the batch", False,
     ("engine", "waiting")),
    ("switchboard_running_batch_size", "Requests in the running batch", False,
     ("engine", "running")),
    ("switchboard_kv_rows_free", "KV-cache rows free", False, ("engine", "free_kv_rows")),
    ("switchboard_adapter_host_hits", "Adapter leases served from host memory", True,
     ("cache", "host_hits")),
    ("switchboard_adapter_host_misses", "Adapter leases that had to load from disk", True,
     ("cache", "host_misses")),
    ("switchboard_adapter_device_hits", "Admissions whose adapter was already in a device slot",
     True, ("cache", "device_hits")),
    ("switchboard_adapter_device_misses", "Admissions that copied their adapter into a slot",
     True, ("cache", "device_misses")),
    ("switchboard_adapter_host_evictions", "Adapters evicted from host memory", True,
     ("cache", "host_evictions")),
    ("switchboard_adapter_device_evictions", "Adapters evicted from a device slot", True,
     ("cache", "device_evictions")),
    ("switchboard_adapter_load_failures", "Adapter loads refused by validation or failed", True,
     ("cache", "load_failures")),
    ("switchboard_adapter_slots_in_use", "Device slots holding an adapter", False,
     ("cache", "slots_in_use")),
    ("switchboard_adapter_slots", "Device slots in all", False, ("slots",)),
    ("switchboard_adapters_in_host_memory", "Adapter versions held in host memory", False,
     ("cache", "host_entries")),
    # Leak checks (the soak test) read these three: all 0 when no call is in flight.
    ("switchboard_adapter_version_pins", "Leases holding an adapter version (calls in flight)",
     False, ("cache", "version_pins")),
    ("switchboard_adapter_slot_pins", "Admitted calls holding a device slot", False,
     ("cache", "slot_pins")),
    ("switchboard_adapter_loads_in_progress", "Adapter loads from disk under way", False,
     ("cache", "loading")),
)
"""The engine's and the adapter cache's live figures, one definition for a server's page
and (labelled by replica) a cluster ingress's."""


def live_figures(engine: Any, cache: Any) -> dict[str, Any]:
    """What :data:`LIVE_METRICS` reads, as plain data (it also crosses to a cluster's
    ingress)."""
    counters = dataclasses.asdict(cache.stats)
    counters.pop("load_seconds", None)
    return {"engine": engine.stats(), "cache": {**counters, **cache.usage()},
            "slots": cache.slots.num_slots}


def live_metrics(figures: list[tuple[list[str], dict[str, Any]]],
                 label_names: list[str]) -> Iterator[Metric]:
    """:data:`LIVE_METRICS` for each (label values, :func:`live_figures`) pair."""
    for name, help_text, counter, path in LIVE_METRICS:
        family: CounterMetricFamily | GaugeMetricFamily = (
            CounterMetricFamily(name, help_text, labels=label_names) if counter
            else GaugeMetricFamily(name, help_text, labels=label_names))
        for labels, figure in figures:
            value: Any = figure
            for key in path:
                value = value[key]
            family.add_metric(labels, float(value))
        yield family


def anon_rss_mb(pid: int | str = "self") -> float:
    """A process's anonymous resident memory (the soak's leak measure); NaN if unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class _LiveCollector(Collector):
    """Engine gauges and adapter-cache counters, read when Prometheus scrapes."""

    def __init__(self, engine: Any, cache: Any) -> None:
        self.engine = engine
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        yield from live_metrics([([], live_figures(self.engine, self.cache))], [])


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("switchboard_requests", "Generation calls by outcome",
                                ["adapter", "route", "status", "protocol"], registry=r)
        self.latency = Histogram("switchboard_request_duration_seconds",
                                 "End-to-end generation latency",
                                 ["adapter", "route", "status", "protocol"],
                                 buckets=_LATENCY_BUCKETS,
                                 registry=r)
        self.ttft = Histogram("switchboard_time_to_first_token_seconds",
                              "Receipt at the service to the first generated token",
                              ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("switchboard_time_per_output_token_seconds",
                              "Mean time per generated token after the first (first token "
                              "to the last)", ["adapter"], buckets=_TOKEN_BUCKETS, registry=r)
        self.adapter_wait = Histogram("switchboard_adapter_wait_seconds",
                                      "Receipt to the call's adapter leased (a cold load "
                                      "from disk shows here)", ["adapter"],
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("switchboard_queue_seconds",
                               "Submission to admission into the running batch", ["adapter"],
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("switchboard_generated_tokens", "Tokens generated",
                              ["adapter"], registry=r)
        self.adapter_load = Histogram("switchboard_adapter_load_seconds",
                                      "Disk to validated-in-host-memory adapter load time",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.admin = Counter("switchboard_admin_requests", "Admin calls by outcome",
                             ["status"], registry=r)
        self._http: Any = None

    def watch(self, engine: Any, cache: Any) -> None:
        """Export the engine's and the cache's live figures (once both exist)."""
        self.registry.register(_LiveCollector(engine, cache))
        cache.on_load = lambda _name, seconds: self.adapter_load.observe(seconds)

    def observe_call(self, adapter: str, route: str, status: str, seconds: float,
                     protocol: str = "grpc", timings: CallTimings | None = None,
                     tokens: int = 0) -> None:
        """One finished call; ``timings`` when the engine ran it (see ``CallTimings``)."""
        self.requests.labels(adapter, route, status, protocol).inc()
        self.latency.labels(adapter, route, status, protocol).observe(seconds)
        if tokens:
            self.tokens.labels(adapter).inc(tokens)
        if timings is None:
            return
        self.adapter_wait.labels(adapter).observe(timings.adapter_wait_s)
        self.queue.labels(adapter).observe(timings.queue_s)
        if timings.ttft_s is not None:
            self.ttft.labels(adapter).observe(timings.ttft_s)
        if timings.tpot_s is not None:
            self.tpot.labels(adapter).observe(timings.tpot_s)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; return the port it listens on."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
