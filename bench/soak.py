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

This module runs it (start the server, drive, stop, judge); the call classes and the
driver are in ``soak_traffic.py`` (HTTP calls: ``soak_http.py``), the server's
configuration, adapters, gauges and the replica kill in ``soak_server.py``, and the
verdict and its table in ``soak_report.py``.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import torch

from bench.common import RESULTS, commit, device_description
from bench.soak_http import HttpCalls
from bench.soak_report import percentiles, print_report, problems, rss_windows, update_doc
from bench.soak_server import (
    CLUSTER_CONFIG,
    CLUSTER_REPLICAS,
    CONFIG,
    LEAK_GAUGES,
    ROUTING,
    build_library,
    gauges,
    kill_a_replica,
)
from bench.soak_traffic import (
    ALLOWED,
    CHURNED,
    MAX_BATCH,
    MAX_LORAS,
    MAX_QUEUE,
    OK,
    STABLE,
    Soak,
    Tally,
    unary,
)
from protos.switchboard.v1 import switchboard_pb2 as pb
from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc
from server.service.metrics import anon_rss_mb
from tests.support import spawn_server

__all__ = ["ALLOWED", "main", "run"]


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
        "latency_ms": {"idle": percentiles(idle), "under_load": percentiles(under_load)},
    }


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
