"""Call-center demo: each call routed by the caller's number alone.

    switchboard callcenter clients/examples/calls.csv

Reads a CSV with columns ``caller_number,utterance``, sends every utterance as ``text``
with only the caller number for routing (no dialect, no region), and prints per call the
route the server took, the adapter that answered and the English rendering an agent
would read; then per dialect the number of calls and the median latency.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from clients.cli_common import add_connection_flags, connect, run, table, to_json
from clients.client import SwitchboardClient
from clients.messages import GenerateResult


@dataclass(frozen=True)
class Call:
    caller_number: str
    utterance: str


@dataclass(frozen=True)
class Answered:
    call: Call
    result: GenerateResult
    latency_ms: float

    @property
    def dialect(self) -> str:
        return self.result.adapter or "base"


def read_calls(path: Path) -> list[Call]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"caller_number", "utterance"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: needs columns caller_number,utterance "
                             f"(missing: {', '.join(sorted(missing))})")
        calls = [Call(row["caller_number"].strip(), row["utterance"].strip()) for row in reader]
    if not calls:
        raise ValueError(f"{path}: no calls")
    return calls


def answer_calls(client: SwitchboardClient, calls: list[Call],
                 max_new_tokens: int) -> list[Answered]:
    answered = []
    for call in calls:
        started = time.perf_counter()
        result = client.generate(call.utterance, caller_number=call.caller_number,
                                 max_new_tokens=max_new_tokens)
        answered.append(Answered(call, result, (time.perf_counter() - started) * 1000))
    return answered


def summarize(answered: list[Answered]) -> list[tuple[str, int, float]]:
    """(dialect, calls, p50 latency in ms), by dialect name."""
    by_dialect: dict[str, list[float]] = {}
    for item in answered:
        by_dialect.setdefault(item.dialect, []).append(item.latency_ms)
    return [(name, len(times), statistics.median(times))
            for name, times in sorted(by_dialect.items())]


def _run(args: argparse.Namespace) -> int:
    try:
        calls = read_calls(Path(args.calls))
    except (OSError, ValueError, csv.Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with connect(args) as client:
        answered = answer_calls(client, calls, args.max_new_tokens)
    if args.json:
        print(to_json([{"caller_number": a.call.caller_number, "route": a.result.route,
                        "route_detail": a.result.route_detail, "adapter": a.dialect,
                        "english": a.result.text.strip(), "latency_ms": a.latency_ms}
                       for a in answered]))
        return 0
    for i, item in enumerate(answered, 1):
        result = item.result
        route = result.route + (f" ({result.route_detail})" if result.route_detail else "")
        print(f"call {i}: {item.call.caller_number}  route: {route}  adapter: {item.dialect}"
              f"  {item.latency_ms:.0f} ms")
        print(f"  caller: {item.call.utterance}")
        print(f"  agent:  {' '.join(result.text.split())}")
        if result.fallback_reason:
            print(f"  note:   {result.fallback_reason}")
    print()
    print(table(("DIALECT", "CALLS", "P50_MS"),
                [(name, count, f"{p50:.0f}") for name, count, p50 in summarize(answered)]))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="switchboard callcenter",
        description="Route each call of a CSV (caller_number,utterance) by caller number "
                    "and print the English rendering for the agent.")
    parser.add_argument("calls", help="CSV file, e.g. clients/examples/calls.csv")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--json", action="store_true")
    add_connection_flags(parser)
    return run(_run, parser.parse_args(argv[1:]))
