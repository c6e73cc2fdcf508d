"""``switchboard loadtest``: drive a server with concurrent clients and report figures.

Runs in its own process (the CLI's), with ``--concurrency`` asyncio workers sharing one
channel. Each request picks a dialect from ``--mix`` (weights; ``base`` means no dialect,
so the routing default answers) and an utterance from the prompt set, round robin.
Prints requests/s and tokens/s, latency p50/p95/p99, time-to-first-token p50/p95
(client-measured with ``--stream``; server-reported otherwise) and errors by status.
``--ignore-eos`` makes every reply exactly ``--max-new-tokens`` long, so that routes and
servers whose models stop at different points are compared on the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clients.aio import AsyncSwitchboardClient
from clients.cli_common import add_connection_flags
from clients.errors import SwitchboardError
from clients.messages import GenerateResult, StreamChunk
from clients.retry import RetryPolicy

DEFAULT_UTTERANCES = (
    "侬今朝吃饭伐?", "阿拉屋里向个电费单子寄错地址了。", "我今朝有眼勿适意，想请个假。",
    "我張單幾時到期呀?", "你哋幾點收工? 我想聽日過嚟攞貨。", "唔該幫我查吓個包裹去咗邊。",
    "你好，我想查一下我的订单。", "Hello, I would like to check my bill.",
)


@dataclass
class Outcome:
    ok: bool
    latency_s: float
    ttft_s: float | None = None
    tokens: int = 0
    status: str = "OK"
    server_s: float | None = None  # the server's own arrival-to-end time (Timings.total_ms)


@dataclass
class Report:
    requests: int
    ok: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    tokens: int
    latency_ms: dict[str, float]
    server_ms: dict[str, float]
    ttft_ms: dict[str, float]
    ttft_source: str
    errors: dict[str, int]
    retries: int
    concurrency: int
    stream: bool
    mix: dict[str, float] = field(default_factory=dict)
    ignore_eos: bool = False


def workload_item(index: int, utterances: tuple[str, ...], mix: dict[str, float],
                  seed: int) -> tuple[str, str]:
    """Request ``index``'s utterance and dialect: a function of the index alone, so a run
    is the same workload whatever the concurrency (``bench/e2e_bench.py`` replays it)."""
    dialect = random.Random(f"{seed}-{index}").choices(list(mix), list(mix.values()))[0]
    return utterances[index % len(utterances)], dialect


def parse_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        try:
            mix[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad weight in --mix: {part!r}") from None
        if mix[name.strip()] < 0:
            raise argparse.ArgumentTypeError(f"negative weight in --mix: {part!r}")
    if not mix or sum(mix.values()) <= 0:
        raise argparse.ArgumentTypeError("--mix needs at least one positive weight")
    return mix


def percentiles(samples: list[float], points: tuple[int, ...]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)
    return {f"p{p}": round(ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] * 1000,
                           1) for p in points}


class Progress:
    """A one-line progress bar on stderr, redrawn at most 4 times a second."""

    def __init__(self, total: int | None, duration: float | None, enabled: bool) -> None:
        self.total, self.duration, self.enabled = total, duration, enabled
        self.started = time.monotonic()
        self.last = 0.0

    def update(self, done: int, errors: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < 0.25):
            return
        self.last = now
        elapsed = now - self.started
        fraction = (done / self.total if self.total else
                    min(1.0, elapsed / self.duration) if self.duration else 0.0)
        bar = "#" * int(fraction * 30)
        sys.stderr.write(f"\r[{bar:<30}] {done} done, {errors} errors, "
                         f"{done / elapsed if elapsed else 0:.1f} req/s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


async def one_request(client: AsyncSwitchboardClient, text: str, dialect: str, stream: bool,
                      max_new_tokens: int, ignore_eos: bool = False) -> Outcome:
    dialect = "" if dialect == "base" else dialect
    options: dict[str, Any] = {"dialect": dialect, "max_new_tokens": max_new_tokens,
                               "ignore_eos": ignore_eos}
    started = time.perf_counter()
    try:
        if stream:
            first: float | None = None
            result: GenerateResult | None = None
            async for item in client.stream(text, **options):
                if isinstance(item, StreamChunk):
                    if first is None and item.text:
                        first = time.perf_counter() - started
                else:
                    result = item
            assert result is not None
            return Outcome(True, time.perf_counter() - started, first, result.completion_tokens,
                           server_s=result.total_ms / 1000)
        result = await client.generate(text, **options)
        return Outcome(True, time.perf_counter() - started,
                       result.time_to_first_token_ms / 1000, result.completion_tokens,
                       server_s=result.total_ms / 1000)
    except SwitchboardError as error:
        return Outcome(False, time.perf_counter() - started, status=error.code.name)


async def load(args: argparse.Namespace) -> Report:
    utterances = (tuple(line.strip() for line in Path(args.prompts).read_text(
        encoding="utf-8").splitlines() if line.strip()) if args.prompts else DEFAULT_UTTERANCES)
    if not utterances:
        raise SystemExit("error: the prompt file holds no utterances")
    outcomes: list[Outcome] = []
    issued = 0
    deadline = None if args.duration is None else time.monotonic() + args.duration
    progress = Progress(args.requests if args.duration is None else None, args.duration,
                        not args.quiet)
    client = AsyncSwitchboardClient(args.target, api_key=args.api_key,
                                    root_certificate=args.tls_root_cert, timeout=args.timeout,
                                    retry=RetryPolicy(max_attempts=max(1, args.retries + 1)))

    def take() -> int | None:
        nonlocal issued
        if deadline is not None and time.monotonic() >= deadline:
            return None
        if deadline is None and issued >= args.requests:
            return None
        issued += 1
        return issued - 1

    async def worker() -> None:
        while (index := take()) is not None:
            text, dialect = workload_item(index, utterances, args.mix, args.seed)
            outcome = await one_request(client, text, dialect, args.stream,
                                        args.max_new_tokens, args.ignore_eos)
            outcomes.append(outcome)
            progress.update(len(outcomes), sum(not o.ok for o in outcomes))

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    finally:
        seconds = time.perf_counter() - started
        progress.update(len(outcomes), sum(not o.ok for o in outcomes), force=True)
        progress.close()
        await client.close()
    good = [o for o in outcomes if o.ok]
    errors: dict[str, int] = {}
    for outcome in outcomes:
        if not outcome.ok:
            errors[outcome.status] = errors.get(outcome.status, 0) + 1
    tokens = sum(o.tokens for o in good)
    return Report(
        requests=len(outcomes), ok=len(good), seconds=round(seconds, 3),
        requests_per_s=round(len(good) / seconds, 3), tokens=tokens,
        tokens_per_s=round(tokens / seconds, 2),
        latency_ms=percentiles([o.latency_s for o in good], (50, 95, 99)),
        server_ms=percentiles([o.server_s for o in good if o.server_s is not None], (50, 95, 99)),
        ttft_ms=percentiles([o.ttft_s for o in good if o.ttft_s is not None], (50, 95)),
        ttft_source="client (first chunk)" if args.stream else "server-reported",
        errors=errors, retries=client.retries, concurrency=args.concurrency,
        stream=args.stream, mix=args.mix, ignore_eos=args.ignore_eos)


def render(report: Report) -> str:
    lat, ttft, server = report.latency_ms, report.ttft_ms, report.server_ms
    lines = [
        f"requests      {report.ok}/{report.requests} ok in {report.seconds:.1f} s "
        f"(concurrency {report.concurrency}, {'streaming' if report.stream else 'unary'}"
        f"{', ignore_eos' if report.ignore_eos else ''})",
        f"throughput    {report.requests_per_s:.2f} requests/s, {report.tokens_per_s:.1f} tokens/s",
        f"latency       p50 {lat.get('p50', 0):.0f} ms, p95 {lat.get('p95', 0):.0f} ms, "
        f"p99 {lat.get('p99', 0):.0f} ms (client)",
        f"server time   p50 {server.get('p50', 0):.0f} ms, p95 {server.get('p95', 0):.0f} ms "
        "(arrival to end, server-reported)",
        f"first token   p50 {ttft.get('p50', 0):.0f} ms, p95 {ttft.get('p95', 0):.0f} ms "
        f"({report.ttft_source})",
        "errors        " + (", ".join(f"{k} {v}" for k, v in sorted(report.errors.items()))
                            or "none") + f"; retries {report.retries}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchboard loadtest",
                                     description="Load a Switchboard server and report "
                                                 "throughput, latency and errors.")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=200, help="requests in all")
    parser.add_argument("--duration", type=float, help="run for this many seconds instead")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix("wuyu=1,cantonese=1,base=1"),
                        help="dialect weights, e.g. wuyu=3,cantonese=2,base=1")
    parser.add_argument("--prompts", help="file with one utterance per line")
    parser.add_argument("--stream", action="store_true", help="use GenerateStream")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--ignore-eos", action="store_true",
                        help="every reply exactly --max-new-tokens long (past EOS)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dialect draw")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_connection_flags(parser)
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv[1:])
    if args.concurrency < 1 or args.requests < 1 or (args.duration or 1) <= 0:
        parser.error("--concurrency, --requests and --duration must be positive")
    report = asyncio.run(load(args))
    print(json.dumps(asdict(report), indent=2) if args.json else render(report))
    return 0 if report.ok == report.requests else 1
