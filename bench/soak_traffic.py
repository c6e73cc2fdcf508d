"""The soak's traffic: its call classes, the outcome each may have (``ALLOWED``), and the
driver that makes the calls (``Soak``) and counts every outcome (``Tally``).

The run (``bench/soak.py``) starts the server and hands this driver a stub; a quarter of
some classes go over the HTTP API (``bench/soak_http.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.soak_http import HttpCalls, http_malformed_requests, http_model
from clients.loadtest import DEFAULT_UTTERANCES
from protos.switchboard.v1 import switchboard_pb2 as pb
from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc
from tests.support import malformed_requests, publish

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
HTTP_SHARE = 0.25
"""Of the valid, malformed, cancel and deadline calls, the share sent over HTTP."""
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
