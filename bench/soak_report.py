"""The soak's verdict and report: what makes a run fail (``problems``), its table, and
that table in docs/reliability.md.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.common import print_table
from bench.soak_server import REPLACE_LIMIT_S
from bench.soak_traffic import OK
from server.formats.files import replace_marked_block
from server.service.config import REPO_ROOT

MAX_RSS_GROWTH_MB = 100.0
DOC = REPO_ROOT / "docs" / "reliability.md"
DOC_BEGIN, DOC_END = "<!-- soak-table:begin -->", "<!-- soak-table:end -->"
CLUSTER_DOC_BEGIN, CLUSTER_DOC_END = ("<!-- soak-cluster-table:begin -->",
                                      "<!-- soak-cluster-table:end -->")


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


def percentiles(seconds: list[float]) -> dict[str, float]:
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
