"""Soak: a real server under mixed traffic, faults and admin churn; every outcome checked.

A `switchboard serve` process on loopback (the default model, four stable adapters and
three churned ones) and a driver whose call classes have their allowed outcomes fixed in
advance (``ALLOWED``, the same for gRPC and HTTP: a quarter of the valid, malformed,
cancel and deadline calls go through the OpenAI-compatible HTTP API with the official
``openai`` client, ``bench/soak_http.py``):

- ``valid``: unary and streaming calls over every route (explicit dialect, caller
  number, region, default), several adapters and scales, only on adapters that no admin
  traffic touches → OK, and every stream ends with its final message;
- ``cancel``: streams the client cancels after the first chunk → CANCELLED;
- ``deadline``: calls whose deadline expires before they can finish → DEADLINE_EXCEEDED;
- ``malformed`` (~5% of the calls): one invalid field each → exactly that field's status;
- ``churn_call``: calls on the churned adapters → OK, or FAILED_PRECONDITION while the
  files on disk are half-replaced and no version is in memory;
- ``admin``: reload, unload + load, load/unload from 8 callers at once, on the churned
  adapters, whose files are replaced every few seconds → OK or FAILED_PRECONDITION;
- ``burst``: every ``--burst-every`` seconds the other classes pause, and twice the
  queue limit of calls arrive at once → OK or RESOURCE_EXHAUSTED (only these may get it).

Reported (table + ``bench/results/soak.json``): calls by class and status, calls whose
outcome was not allowed, streams without a final status, pins/slots/queue entries left
when the traffic has stopped, the server's anonymous RSS (median of the first and last
minute after a warm-up that touches every adapter), and p50/p95 latency of the valid
calls under load against an idle run of the same calls one at a time.

With ``--cluster`` the server is ``switchboard serve --cluster`` (2 replicas of the
default model on a local Ray, 1 torch thread each): the same classes and checks through
the ingress, the pins, slots and queues left counted on every replica (the ingress's
``replica``-labelled gauges), the RSS summed over the replicas, and one replica killed
halfway: the calls it held may end UNAVAILABLE (only within ``KILL_WINDOW_S`` of the
kill, and counted), and Ray Serve must replace it within 60 s.

    python -m bench.soak --duration 600      # make soak DURATION=600
    python -m bench.soak --cluster --duration 300   # make soak ARGS=--cluster
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from bench.common import RESULTS, commit, device_description, print_table
from bench.soak_http import HttpCalls, http_malformed_requests, http_model
from clients.loadtest import DEFAULT_UTTERANCES
from protos.switchboard.v1 import switchboard_pb2 as pb
from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc
from server.formats.files import replace_marked_block
from server.service.config import REPO_ROOT
from server.service.metrics import anon_rss_mb
from tests.support import (
    ALL_TARGETS,
    add_manifest,
    make_random_adapter,
    malformed_requests,
    publish,
    spawn_server,
)

OK = "OK"
ALLOWED: dict[str, frozenset[str]] = {
    "valid": frozenset({OK}),
    "cancel": frozenset({"CANCELLED"}),
    "deadline": frozenset({"DEADLINE_EXCEEDED"}),
    "churn_call": frozenset({OK, "FAILED_PRECONDITION"}),
    "admin": frozenset({OK, "FAILED_PRECONDITION"}),
    "burst": frozenset({OK, "RESOURCE_EXHAUSTED"}),
    # "malformed": each case names its own single status (MALFORMED below)
}
STABLE = ("wuyu", "cantonese", "stable-r4", "stable-r16")
CHURNED = ("churn-0", "churn-1", "churn-2")
MAX_BATCH, MAX_QUEUE, MAX_LORAS = 16, 24, 4
MAX_RSS_GROWTH_MB = 100.0
HTTP_SHARE = 0.25
"""Of the valid, malformed, cancel and deadline calls, the share sent over HTTP."""
DOC = REPO_ROOT / "docs" / "reliability.md"
DOC_BEGIN, DOC_END = "<!-- soak-table:begin -->", "<!-- soak-table:end -->"
CLUSTER_DOC_BEGIN, CLUSTER_DOC_END = ("<!-- soak-cluster-table:begin -->",
                                      "<!-- soak-cluster-table:end -->")
CLUSTER_CONFIG = """
cluster:
  replicas: 2
  torch_threads: 1
  replica_metrics_port: -1
  app_name: switchboard-soak
"""
CLUSTER_REPLICAS = 2
KILL_WINDOW_S = 30.0
"""After a replica kill, UNAVAILABLE is allowed for this long (the calls it held)."""
REPLACE_LIMIT_S = 60.0
LEAK_GAUGES = ("switchboard_queue_depth", "switchboard_running_batch_size",
               "switchboard_adapter_version_pins", "switchboard_adapter_slot_pins",
               "switchboard_adapter_loads_in_progress")
CONFIG = """
host: 127.0.0.1
port: 0
metrics_port: 0
http_port: 0
adapter_roots: [{root}]
preload: [all]
routing_table: {routing}
poll_interval_s: 1.0
default_max_new_tokens: 16
grace_period_s: 10
log_level: warning
engine:
  max_batch_size: {batch}
  max_queue_size: {queue}
  max_model_len: 512
  max_loras: {loras}
  max_lora_rank: 16
  max_new_tokens_limit: 256
  max_weight_scale: 4.0
"""
ROUTING = """
default: base
fallback: base
prompt_template: "Translate to English: {text}\\n"
national_prefix: "+86"
caller_numbers: {"+8621": wuyu, "+852": cantonese, "+8620": stable-r4, "+8610": ghost}
regions: {CN-SH: wuyu, CN-GD: cantonese, CN-ZJ: stable-r16}
"""
VALID_ROUTES: tuple[dict[str, Any], ...] = (
    {"dialect": "wuyu"}, {"dialect": "cantonese"}, {"dialect": "wuyu", "weight_scale": 0.5},
    {"dialect": "cantonese", "weight_scale": 1.5}, {"dialect": "stable-r4"},
    {"dialect": "stable-r16", "weight_scale": 0.8}, {"caller_number": "+862155501234"},
    {"caller_number": "+85291234567"}, {"caller_number": "+862087650000"},
    {"region": "CN-SH"}, {"region": "CN-GD"}, {"region": "CN-ZJ", "weight_scale": 2.0},
    {}, {"region": "US-CA"}, {"caller_number": "+861066668888"},  # the last: fallback
)
LONG_PROMPT = "Once upon a time, in a small village by the sea, there lived"


# -- bookkeeping ---------------------------------------------------------------------------
@dataclass
class Tally:
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    by_protocol: Counter[tuple[str, str]] = field(default_factory=Counter)
    calls_http_cancelled: int = 0
    disallowed: list[str] = field(default_factory=list)
    streams_without_final: int = 0
    valid_latency: list[float] = field(default_factory=list)
    unavailable_until: float = 0.0
    """``time.monotonic()`` until which UNAVAILABLE is allowed (a replica was killed)."""
    lost_to_kill: int = 0

    def record(self, kind: str, status: str, allowed: frozenset[str], detail: str = "",
               protocol: str = "grpc") -> None:
        self.calls[(kind, status)] += 1
        self.by_protocol[(kind, protocol)] += 1
        if status == "UNAVAILABLE" and time.monotonic() <= self.unavailable_until:
            self.lost_to_kill += 1
            return
        if status not in allowed:
            self.disallowed.append(f"{kind} ({protocol}) {detail}: {status}")


class Gate:
    """Lets calls through unless a burst is under way; counts the calls in flight."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.open = asyncio.Event()
        self.open.set()
        self.in_flight = 0

    @contextlib.asynccontextmanager
    async def call(self) -> AsyncIterator[bool]:
        """Yields whether to make the call: False once the run has ended."""
        await self.open.wait()
        if self.stop.is_set():
            yield False
            return
        self.in_flight += 1
        try:
            yield True
        finally:
            self.in_flight -= 1

    async def close_and_drain(self, timeout: float) -> bool:
        """Hold new calls and wait for those in flight; False if they did not end in time."""
        self.open.clear()
        limit = time.monotonic() + timeout
        while self.in_flight:
            if time.monotonic() > limit:
                return False
            await asyncio.sleep(0.05)
        return True


def _code(exc: grpc.aio.AioRpcError) -> str:
    return str(exc.code().name)


async def unary(stub: pb_grpc.SwitchboardStub, request: pb.GenerateRequest,
                timeout: float | None = None) -> str:
    try:
        await stub.Generate(request, timeout=timeout)
        return OK
    except grpc.aio.AioRpcError as exc:
        return _code(exc)


async def stream(stub: pb_grpc.SwitchboardStub, request: pb.GenerateRequest, tally: Tally,
                 timeout: float | None = None) -> str:
    """A streaming call's status; an OK stream without its final message is counted."""
    call = stub.GenerateStream(request, timeout=timeout)
    final = False
    try:
        async for message in call:
            final = final or message.HasField("final")
    except grpc.aio.AioRpcError as exc:
        return _code(exc)
    if not final:
        tally.streams_without_final += 1
        return "OK_WITHOUT_FINAL"
    return OK


# -- the driver ----------------------------------------------------------------------------
@dataclass
class Soak:
    stub: pb_grpc.SwitchboardStub
    adapters_root: Path
    variants: Path
    fingerprint: str
    seed: int = 0
    burst_every_s: float = 45.0
    tally: Tally = field(default_factory=Tally)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    bursts: list[dict[str, int]] = field(default_factory=list)
    mixed_calls: int = 0
    driver_problems: list[str] = field(default_factory=list)
    http: HttpCalls | None = None
    """The HTTP API's client; None: every call goes over gRPC."""

    def __post_init__(self) -> None:
        self.gate = Gate(self.stop)

    def over_http(self, rng: random.Random) -> bool:
        return self.http is not None and rng.random() < HTTP_SHARE

    def valid_request(self, rng: random.Random) -> pb.GenerateRequest:
        return pb.GenerateRequest(text=rng.choice(DEFAULT_UTTERANCES),
                                  max_new_tokens=rng.randint(4, 12), **rng.choice(VALID_ROUTES))

    async def either(self, rng: random.Random, request: pb.GenerateRequest,
                     timeout: float) -> str:
        """The request as a unary or a streaming call, at random."""
        if rng.random() < 0.5:
            return await unary(self.stub, request, timeout)
        return await stream(self.stub, request, self.tally, timeout)

    async def repeat(self, one_call: Callable[[], Awaitable[None]], pause_s: float = 0.0
                     ) -> None:
        """Make calls through the gate until the run ends."""
        while not self.stop.is_set():
            async with self.gate.call() as go:
                if not go:
                    return
                await one_call()
            if pause_s:
                await self.pause(pause_s)

    async def valid_call(self, rng: random.Random) -> None:
        if self.over_http(rng):
            await self.valid_http_call(rng)
            return
        request = self.valid_request(rng)
        started = time.perf_counter()
        status = await self.either(rng, request, 300)
        if status == OK:
            self.tally.valid_latency.append(time.perf_counter() - started)
        self.tally.record("valid", status, ALLOWED["valid"], str(request.dialect or "routed"))

    async def valid_http_call(self, rng: random.Random) -> None:
        assert self.http is not None
        model, extra = http_model(rng.choice(VALID_ROUTES))
        started = time.perf_counter()
        status = await self.http.completion(
            rng.random() < 0.5, model=model, prompt=rng.choice(DEFAULT_UTTERANCES),
            max_tokens=rng.randint(4, 12), extra_body=extra)
        if status == OK:
            self.tally.valid_latency.append(time.perf_counter() - started)
        self.tally.record("valid", status, ALLOWED["valid"], model, "http")

    async def mixed_worker(self, index: int) -> None:
        """Valid calls; every 20th call of these workers (5%) is a malformed one."""
        rng = random.Random(self.seed * 1000 + index)
        cases, http_cases = malformed_requests(), http_malformed_requests()

        async def one_call() -> None:
            self.mixed_calls += 1
            if self.mixed_calls % 20 != 10:
                await self.valid_call(rng)
                return
            nth = self.mixed_calls // 20
            if self.http is not None and nth % 4 == 1:  # a quarter, whatever the seed
                what, arguments, expected = http_cases[(nth // 4) % len(http_cases)]
                status = await self.http.completion(rng.random() < 0.5,
                                                    **{"max_tokens": 4, **arguments})
                self.tally.record("malformed", status, frozenset({expected}), what, "http")
                return
            what, request, expected = cases[nth % len(cases)]
            status = await self.either(rng, request, 60)
            self.tally.record("malformed", status, frozenset({expected}), what)

        await self.repeat(one_call)

    async def cancel_worker(self) -> None:
        calls = [0]

        async def one_call() -> None:
            calls[0] += 1
            if self.http is not None and calls[0] % 4 == 2:
                status = await self.http.cancel_after_first_chunk(LONG_PROMPT)
                self.tally.record("cancel", status, ALLOWED["cancel"], protocol="http")
                self.tally.calls_http_cancelled += status == "CANCELLED"
                return
            call = self.stub.GenerateStream(
                pb.GenerateRequest(prompt=LONG_PROMPT, max_new_tokens=200), timeout=300)
            status = "NO_CHUNK"
            try:
                async for _ in call:
                    call.cancel()
                    break
                status = str((await call.code()).name)
            except grpc.aio.AioRpcError as exc:
                status = _code(exc)
            except asyncio.CancelledError:
                status = "CANCELLED"
            self.tally.record("cancel", status, ALLOWED["cancel"])

        await self.repeat(one_call, pause_s=0.25)

    async def deadline_worker(self) -> None:
        rng = random.Random(self.seed + 7)

        calls = [0]

        async def one_call() -> None:
            calls[0] += 1
            if self.http is not None and calls[0] % 4 == 2:  # the body's own deadline
                status = await self.http.completion(
                    rng.random() < 0.5, model="base", prompt=LONG_PROMPT, max_tokens=200,
                    extra_body={"raw_prompt": True, "timeout_s": rng.uniform(0.1, 0.6)})
                self.tally.record("deadline", status, ALLOWED["deadline"], protocol="http")
                return
            request = pb.GenerateRequest(prompt=LONG_PROMPT, max_new_tokens=200)
            status = await self.either(rng, request, rng.uniform(0.1, 0.6))
            self.tally.record("deadline", status, ALLOWED["deadline"])

        await self.repeat(one_call, pause_s=0.25)

    async def churn_call_worker(self) -> None:
        rng = random.Random(self.seed + 11)

        async def one_call() -> None:
            request = pb.GenerateRequest(text=rng.choice(DEFAULT_UTTERANCES),
                                         dialect=rng.choice(CHURNED), max_new_tokens=6)
            status = await unary(self.stub, request, timeout=300)
            self.tally.record("churn_call", status, ALLOWED["churn_call"], request.dialect)

        await self.repeat(one_call)

    async def admin(self, name: str, call: Callable[..., Awaitable[Any]], request: Any) -> None:
        try:
            await call(request, timeout=120)
            status = OK
        except grpc.aio.AioRpcError as exc:
            status = _code(exc)
        self.tally.record("admin", status, ALLOWED["admin"], name)

    async def admin_worker(self) -> None:
        """Reload, unload + load, swap the files, 8 concurrent load/unload: on CHURNED."""
        rng = random.Random(self.seed + 13)
        flips = dict.fromkeys(CHURNED, 0)
        while not self.stop.is_set():
            name = rng.choice(CHURNED)
            action = rng.choice(("reload", "unload-load", "swap", "swap", "eight"))
            if action == "reload":
                await self.admin("reload", self.stub.ReloadAdapter,
                                 pb.ReloadAdapterRequest(name=name))
            elif action == "unload-load":
                await self.admin("unload", self.stub.UnloadAdapter,
                                 pb.UnloadAdapterRequest(name=name))
                await self.admin("load", self.stub.LoadAdapter, pb.LoadAdapterRequest(name=name))
            elif action == "swap":
                flips[name] ^= 1
                await asyncio.to_thread(self.swap_files, name, flips[name])
            else:
                await asyncio.gather(*(
                    self.admin("load", self.stub.LoadAdapter, pb.LoadAdapterRequest(name=name))
                    if i % 2 == 0 else
                    self.admin("unload", self.stub.UnloadAdapter,
                               pb.UnloadAdapterRequest(name=name))
                    for i in range(8)))
            await self.pause(rng.uniform(0.5, 2.0))

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the run ends."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    def swap_files(self, name: str, variant: int) -> None:
        """Publish the other variant's files the way the trainer does (manifest last)."""
        publish(self.variants / f"{name}-v{variant}", self.adapters_root / name,
                self.fingerprint)

    async def burst(self, new_tokens: int = 32) -> dict[str, int]:
        """Twice queue + batch calls at once; only these may get RESOURCE_EXHAUSTED."""
        size = 2 * (MAX_QUEUE + MAX_BATCH)
        statuses = await asyncio.gather(*(
            unary(self.stub, pb.GenerateRequest(text=DEFAULT_UTTERANCES[i % 8],
                                                max_new_tokens=new_tokens), timeout=300)
            for i in range(size)))
        for status in statuses:
            self.tally.record("burst", status, ALLOWED["burst"])
        return {"calls": size, "resource_exhausted": statuses.count("RESOURCE_EXHAUSTED")}

    async def burst_worker(self) -> None:
        """Every ``burst_every_s``: hold the other classes, let the calls in flight end,
        burst, reopen. Only this worker opens the gate, so no other call meets a burst."""
        try:
            while True:
                await self.pause(self.burst_every_s)
                if self.stop.is_set():
                    return
                if not await self.gate.close_and_drain(300):
                    self.driver_problems.append(
                        f"burst skipped: {self.gate.in_flight} calls still in flight after 300 s")
                else:
                    self.bursts.append(await self.burst())
                self.gate.open.set()
        finally:
            self.gate.open.set()


# -- the server and its gauges -------------------------------------------------------------
def gauges(metrics_url: str) -> dict[str, float]:
    """Every sample by its full key; a metric a cluster reports per ``replica`` label is
    also summed under its bare name (what the leak checks read)."""
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    per_replica: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("switchboard_") and " " in line:
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
            if '{replica="' in key:
                name = key.split("{", 1)[0]
                per_replica[name] = per_replica.get(name, 0.0) + float(value)
    for name, total in per_replica.items():
        values.setdefault(name, total)
    return values


def replica_ids(metrics_url: str) -> set[str]:
    """The replicas a cluster's ingress reports (by its per-replica gauges)."""
    return {key.split('"')[1] for key in gauges(metrics_url)
            if key.startswith('switchboard_replica_anon_rss_mb{replica="')}


def kill_a_replica(metrics_url: str, tally: Tally) -> dict[str, Any]:
    """Kill one replica actor of the cluster (through Ray, as a crash would), allow the
    calls it held to end UNAVAILABLE, and time Ray Serve's replacement."""
    import ray

    before = replica_ids(metrics_url)
    if not ray.is_initialized():
        ray.init(address="auto", log_to_driver=False)
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if "SwitchboardReplica" in a["name"])
    victim_name = names[0]
    victim = victim_name.rsplit("#", 1)[-1]
    tally.unavailable_until = time.monotonic() + KILL_WINDOW_S
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(victim_name, namespace="serve"), no_restart=True)
    replaced_after: float | None = None
    while time.monotonic() - killed_at < REPLACE_LIMIT_S + 30:
        now = replica_ids(metrics_url)
        if len(now - {victim}) >= len(before):
            replaced_after = round(time.monotonic() - killed_at, 1)
            break
        time.sleep(0.5)
    return {"replica": victim, "replaced_after_s": replaced_after}


def build_library(workdir: Path) -> tuple[Path, Path, str]:
    """The adapters root (shipped wuyu and cantonese, random stable and churned ones), the
    churned adapters' two variants each, and the base fingerprint."""
    from server.basemodel import load_base_model

    root, variants = workdir / "adapters", workdir / "variants"
    base = load_base_model("default", dtype="float32")
    fingerprint = base.base_fingerprint
    for name in ("wuyu", "cantonese"):
        target = root / name
        target.mkdir(parents=True)
        for file in ("adapter_config.json", "adapter_model.safetensors", "switchboard.json"):
            shutil.copy2(REPO_ROOT / "adapters" / name / file, target / file)
    for seed, (name, rank) in enumerate((("stable-r4", 4), ("stable-r16", 16)), start=10):
        make_random_adapter(base.model, root / name, rank, ALL_TARGETS, seed=seed, b_std=0.05)
        add_manifest(root / name, fingerprint, prompt_template="Translate: {text}\n")
    for index, name in enumerate(CHURNED):
        for variant in (0, 1):
            folder = variants / f"{name}-v{variant}"
            make_random_adapter(base.model, folder, 8, ("q_proj", "v_proj"),
                                seed=100 + 2 * index + variant, b_std=0.05)
            add_manifest(folder, fingerprint, name=name, prompt_template="Translate: {text}\n")
        shutil.copytree(variants / f"{name}-v0", root / name)
    del base
    return root, variants, fingerprint


async def idle_run(stub: pb_grpc.SwitchboardStub, calls: int, seed: int) -> list[float]:
    rng, tally = random.Random(seed), Tally()
    soak = Soak(stub, Path(), Path(), "", seed, tally=tally)
    for _ in range(calls):
        await soak.valid_call(rng)
    if tally.disallowed:
        raise AssertionError(f"idle run failed: {tally.disallowed[:5]}")
    return tally.valid_latency


async def drive(address: str, metrics_url: str, http_url: str, pid: int, root: Path,
                variants: Path, fingerprint: str, duration: float, burst_every: float,
                seed: int, progress: Callable[[str], None], cluster: bool = False
                ) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.SwitchboardStub(channel)
        progress("warm-up: every adapter once")
        for name in (*STABLE, *CHURNED, ""):
            status = await unary(stub, pb.GenerateRequest(text="侬好", dialect=name,
                                                          max_new_tokens=2), timeout=300)
            if status != OK:
                raise AssertionError(f"warm-up call on {name or 'base'!r} failed: {status}")
        progress("idle run: 24 valid calls one at a time")
        idle = await idle_run(stub, 24, seed)

        soak = Soak(stub, root, variants, fingerprint, seed, burst_every_s=burst_every,
                    http=HttpCalls(http_url))
        progress("warm-up burst (its memory belongs in the RSS baseline)")
        warm_up_burst = await soak.burst()
        rss: list[tuple[float, dict[str, float]]] = []
        kill: dict[str, Any] = {}

        def rss_now() -> dict[str, float]:
            """Anonymous RSS by process: the server, or each replica of a cluster."""
            if not cluster:
                return {"server": anon_rss_mb(pid)}
            prefix = 'switchboard_replica_anon_rss_mb{replica="'
            return {key[len(prefix):-2]: mb for key, mb in gauges(metrics_url).items()
                    if key.startswith(prefix)}

        async def sample_rss() -> None:
            while not soak.stop.is_set():
                rss.append((time.monotonic(), await asyncio.to_thread(rss_now)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(soak.stop.wait(), 2.0)

        async def kill_halfway() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(soak.stop.wait(), duration / 2)
            if not soak.stop.is_set():
                progress("killing one replica")
                kill.update(await asyncio.to_thread(kill_a_replica, metrics_url, soak.tally))
                progress(f"replica {kill['replica']} replaced after "
                         f"{kill['replaced_after_s']} s")

        progress(f"soak: {duration:.0f} s of mixed traffic")
        started = time.monotonic()
        tasks = [asyncio.create_task(t) for t in (
            *(soak.mixed_worker(i) for i in range(6)), soak.cancel_worker(),
            soak.deadline_worker(), soak.churn_call_worker(), soak.admin_worker(),
            soak.burst_worker(), sample_rss(), *([kill_halfway()] if cluster else []))]
        while time.monotonic() - started < duration:
            await asyncio.sleep(1.0)
            failed = [t for t in tasks if t.done() and t.exception() is not None]
            if failed:
                soak.stop.set()
                raise RuntimeError("a driver task failed") from failed[0].exception()
        soak.stop.set()  # the burst worker reopens the gate once its burst, if any, ends
        stopped = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), 600)
        ran_s = time.monotonic() - started

        progress("after the traffic: leak gauges and one more valid call")
        left: dict[str, float] = {}
        limit = time.monotonic() + 30
        while time.monotonic() < limit:
            values = await asyncio.to_thread(gauges, metrics_url)
            left = {name: values.get(name, -1.0) for name in LEAK_GAUGES}
            replicas = CLUSTER_REPLICAS if cluster else 1
            left["kv_rows_in_use"] = MAX_BATCH * replicas - values.get(
                "switchboard_kv_rows_free", -1.0)
            if not any(left.values()):
                break
            await asyncio.sleep(0.2)
        after = await unary(stub, pb.GenerateRequest(text="侬好", dialect="wuyu",
                                                     max_new_tokens=4), timeout=120)
        server_http_cancels = sum(
            value for key, value in gauges(metrics_url).items()
            if key.startswith("switchboard_requests_total{") and 'protocol="http"' in key
            and 'status="CANCELLED"' in key)
        assert soak.http is not None
        tally_streams_http = soak.http.streams_without_final
        await soak.http.close()

    window = min(60.0, duration / 3)
    first_by, last_by = rss_windows(rss, started, stopped, window)
    # Growth of the processes that lived through both windows (a cluster's replacement
    # replica starts small; it must not hide the survivor's growth).
    lived = sorted(set(first_by) & set(last_by))
    first = [statistics.median(first_by[p]) for p in lived] or [float("nan")]
    last = [statistics.median(last_by[p]) for p in lived] or [float("nan")]
    tally = soak.tally
    by_class: dict[str, dict[str, int]] = {}
    for (kind, status), count in sorted(tally.calls.items()):
        by_class.setdefault(kind, {})[status] = count
    by_protocol: dict[str, dict[str, int]] = {}
    for (kind, protocol), count in sorted(tally.by_protocol.items()):
        by_protocol.setdefault(kind, {})[protocol] = count
    under_load = sorted(tally.valid_latency)
    return {
        "duration_s": round(stopped - started, 1),
        "wind_down_s": round(ran_s - (stopped - started), 1),
        "calls": sum(tally.calls.values()),
        "calls_by_class": by_class,
        "calls_by_protocol": by_protocol,
        "http_cancels": {"client": tally.calls_http_cancelled,
                         "server_recorded": server_http_cancels},
        "disallowed_outcomes": len(tally.disallowed),
        "disallowed_examples": tally.disallowed[:20],
        "streams_without_final_status": tally.streams_without_final + tally_streams_http,
        "left_after_traffic": left,
        "valid_call_after_traffic": after,
        "bursts": soak.bursts,
        "warm_up_burst": warm_up_burst,
        "driver_problems": soak.driver_problems,
        "anon_rss_mb": {"window_s": window,
                        "first_median": round(sum(first), 1),
                        "last_median": round(sum(last), 1),
                        "growth": round(max(b - a for a, b in zip(first, last, strict=True)),
                                        1),
                        "processes": lived, "samples": len(rss)},
        "replica_kill": kill or None,
        "calls_lost_to_kill": tally.lost_to_kill,
        "latency_ms": {"idle": _percentiles(idle), "under_load": _percentiles(under_load)},
    }


def rss_windows(rss: list[tuple[float, dict[str, float]]], started: float, stopped: float,
                window: float) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each process's RSS samples in the first and in the last ``window`` seconds."""
    first: dict[str, list[float]] = {}
    last: dict[str, list[float]] = {}
    for at, by_process in rss:
        for process, mb in by_process.items():
            if at - started <= window:
                first.setdefault(process, []).append(mb)
            if at >= stopped - window:
                last.setdefault(process, []).append(mb)
    return first, last


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    if not ordered:
        return {"p50": 0.0, "p95": 0.0, "n": 0}
    return {"p50": round(statistics.median(ordered) * 1000, 1),
            "p95": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1000, 1),
            "n": len(ordered)}


def problems(report: dict[str, Any]) -> list[str]:
    """What makes a soak run fail (empty when it passed)."""
    found = list(report["driver_problems"])
    if report.get("server_exit_code") != 0:
        found.append(f"the server exited with {report.get('server_exit_code')} after SIGTERM")
    if report["disallowed_outcomes"]:
        found.append(f"{report['disallowed_outcomes']} disallowed outcomes, e.g. "
                     f"{report['disallowed_examples'][:3]}")
    if report["streams_without_final_status"]:
        found.append(f"{report['streams_without_final_status']} streams without a final status")
    growth = report["anon_rss_mb"]["growth"]
    if not growth < MAX_RSS_GROWTH_MB:  # also NaN: no samples
        found.append(f"anonymous RSS grew {growth} MB (limit {MAX_RSS_GROWTH_MB})")
    cancels = report["http_cancels"]
    if cancels["server_recorded"] < cancels["client"]:
        found.append(f"{cancels['client']} HTTP streams cancelled by the client, but the "
                     f"server recorded {cancels['server_recorded']} as CANCELLED")
    leaked = {k: v for k, v in report["left_after_traffic"].items() if v}
    if leaked:
        found.append(f"left after the traffic: {leaked}")
    if report["valid_call_after_traffic"] != OK:
        found.append(f"a valid call after the traffic got {report['valid_call_after_traffic']}")
    kill = report.get("replica_kill")
    if report.get("cluster") and (kill is None or kill["replaced_after_s"] is None
                                  or kill["replaced_after_s"] > REPLACE_LIMIT_S):
        found.append(f"the killed replica was not replaced within {REPLACE_LIMIT_S:g} s: {kill}")
    return found


def run(duration: float, burst_every: float = 45.0, seed: int = 0,
        out: Path | None = None, quiet: bool = False, cluster: bool = False
        ) -> dict[str, Any]:
    def progress(message: str) -> None:
        if not quiet:
            print(message, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="switchboard-soak-"))
    try:
        progress(f"adapters and config in {workdir}")
        root, variants, fingerprint = build_library(workdir)
        (workdir / "routing.yaml").write_text(ROUTING)
        config = workdir / "config.yaml"
        config.write_text(CONFIG.format(root=root, routing=workdir / "routing.yaml",
                                        batch=MAX_BATCH, queue=MAX_QUEUE, loras=MAX_LORAS)
                          + (CLUSTER_CONFIG if cluster else ""))
        process, address, metrics_url, http_url = spawn_server(
            ["--cluster"] * cluster + ["--config", str(config)], workdir / "server.log",
            timeout=600)
        try:
            report = asyncio.run(drive(address, metrics_url, http_url, process.pid, root,
                                       variants, fingerprint, duration, burst_every, seed,
                                       progress, cluster))
            report["server_alive_after"] = process.poll() is None
        finally:
            process.terminate()
            try:
                exit_code: int | None = process.wait(180 if cluster else 60)
            except subprocess.TimeoutExpired:
                process.kill()
                exit_code = None
        report["server_exit_code"] = exit_code
        report.update(command=f"make soak DURATION={duration:g}"
                      + (" ARGS=--cluster" if cluster else ""), commit=commit(), cluster=cluster,
                      device=device_description(torch.device(
                          "cuda" if torch.cuda.is_available() else "cpu")),
                      settings={"max_batch_size": MAX_BATCH, "max_queue_size": MAX_QUEUE,
                                "max_loras": MAX_LORAS, "stable": STABLE, "churned": CHURNED,
                                "burst_every_s": burst_every, "seed": seed})
        report["problems"] = problems(report)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"area": "soak_cluster" if cluster else "soak",
                                       **report}, indent=2) + "\n")
        if not quiet:
            print_report(report, out)
        return report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def report_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    protocols = report.get("calls_by_protocol", {})
    rows = [(kind, ", ".join(f"{s} {n}" for s, n in statuses.items())
             + (f" (HTTP {protocols[kind]['http']})" if protocols.get(kind, {}).get("http")
                else ""))
            for kind, statuses in report["calls_by_class"].items()]
    rss, latency = report["anon_rss_mb"], report["latency_ms"]
    bursts = report["bursts"]
    rows += [
        ("bursts (calls / RESOURCE_EXHAUSTED)",
         ", ".join(f"{b['calls']}/{b['resource_exhausted']}" for b in bursts) or "none"),
        ("disallowed outcomes", str(report["disallowed_outcomes"])),
        ("streams without final status", str(report["streams_without_final_status"])),
        ("left after traffic", ", ".join(f"{k.removeprefix('switchboard_')} {v:g}"
                                          for k, v in report["left_after_traffic"].items())),
        ("anonymous RSS, first / last median", f"{rss['first_median']} / {rss['last_median']} "
                                               f"MB (growth {rss['growth']} MB; "
                                               f"{rss['window_s']:g} s windows)"),
        ("valid calls p50 / p95, idle", f"{latency['idle']['p50']:.0f} / "
                                        f"{latency['idle']['p95']:.0f} ms"),
        ("valid calls p50 / p95, under load", f"{latency['under_load']['p50']:.0f} / "
                                              f"{latency['under_load']['p95']:.0f} ms"),
        *([("replica killed halfway", f"{report['replica_kill']}; calls it ended "
                                        f"UNAVAILABLE: {report['calls_lost_to_kill']}")]
          if report.get("cluster") else []),
        ("server exit after SIGTERM", str(report["server_exit_code"])),
        ("result", "PASS" if not report["problems"] else "; ".join(report["problems"])),
    ]
    return rows


def print_report(report: dict[str, Any], out: Path | None) -> None:
    print_table(f"soak, {report['duration_s']} s, {report['calls']} calls -> {out}",
                report_rows(report))


def update_doc(report: dict[str, Any], doc: Path = DOC) -> None:
    """Put the run's table between the markers in docs/reliability.md (the cluster
    soak's markers for a ``--cluster`` run)."""
    begin, end = (CLUSTER_DOC_BEGIN, CLUSTER_DOC_END) if report.get("cluster") else \
        (DOC_BEGIN, DOC_END)
    lines = [f"Latest run: `{report['command']}` at commit {report['commit']}, "
             f"{report['duration_s']} s of traffic (then {report['wind_down_s']} s for the "
             f"calls in flight to end), {report['calls']} calls, {report['device']}.", "",
             "| | |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in report_rows(report)]
    replace_marked_block(doc, begin, end, begin + "\n" + "\n".join(lines) + "\n" + end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--burst-every", type=float, default=45.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="results file (default bench/results/"
                        "soak.json, soak_cluster.json with --cluster)")
    parser.add_argument("--cluster", action="store_true",
                        help="soak `switchboard serve --cluster` (2 replicas, one killed)")
    parser.add_argument("--no-doc", action="store_true",
                        help="do not write the table into docs/reliability.md")
    args = parser.parse_args()
    out = args.out or RESULTS / ("soak_cluster.json" if args.cluster else "soak.json")
    report = run(args.duration, args.burst_every, args.seed, out, cluster=args.cluster)
    if not args.no_doc:
        update_doc(report)
    raise SystemExit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()
