"""The soak (bench/soak.py) for 90 seconds: a real server on the default model under
every call class at once, over gRPC and the HTTP API; `make soak DURATION=600` is the
full run."""

from __future__ import annotations

import pytest

from bench.soak import ALLOWED, run


@pytest.mark.slow
def test_soak_90_seconds(tmp_path):
    report = run(duration=90, burst_every=30, out=tmp_path / "soak.json", quiet=True)
    assert report["problems"] == [], report["problems"]
    assert report["disallowed_outcomes"] == 0
    assert report["streams_without_final_status"] == 0
    assert not any(report["left_after_traffic"].values()), report["left_after_traffic"]
    assert report["server_alive_after"] and report["server_exit_code"] == 0
    # every class ran, and the bursts really went over the queue limit
    assert set(report["calls_by_class"]) == {*ALLOWED, "malformed"}, report["calls_by_class"]
    assert report["bursts"] and all(b["resource_exhausted"] > 0 for b in report["bursts"])
    # a share of these classes went over the HTTP API, under the same outcome table
    for kind in ("valid", "malformed", "cancel", "deadline"):
        assert report["calls_by_protocol"][kind].get("http", 0) > 0, report["calls_by_protocol"]


@pytest.mark.slow
def test_soak_through_a_cluster_with_a_replica_killed(tmp_path):
    pytest.importorskip("ray.serve", reason="the cluster extra is not installed")
    report = run(duration=60, burst_every=30, out=tmp_path / "soak_cluster.json", quiet=True,
                 cluster=True)
    assert report["problems"] == [], report["problems"]
    assert report["disallowed_outcomes"] == 0
    assert not any(report["left_after_traffic"].values()), report["left_after_traffic"]
    assert report["server_exit_code"] == 0
    assert set(report["calls_by_class"]) == {*ALLOWED, "malformed"}, report["calls_by_class"]
    kill = report["replica_kill"]
    assert kill is not None and kill["replaced_after_s"] <= 60, kill


def test_the_verdict_names_each_failure():
    """The soak's verdict (``bench/soak_report.py``) on a made-up report: nothing for a
    clean run, one named problem for each thing that went wrong."""
    from bench.soak_report import problems

    clean = {"driver_problems": [], "server_exit_code": 0, "disallowed_outcomes": 0,
             "disallowed_examples": [], "streams_without_final_status": 0,
             "anon_rss_mb": {"growth": 3.0}, "http_cancels": {"client": 2,
                                                              "server_recorded": 2},
             "left_after_traffic": {"switchboard_queue_depth": 0.0},
             "valid_call_after_traffic": "OK", "replica_kill": None, "cluster": False}
    assert problems(clean) == []
    assert problems({**clean, "server_exit_code": 1}) == [
        "the server exited with 1 after SIGTERM"]
    assert problems({**clean, "anon_rss_mb": {"growth": float("nan")}}) == [
        "anonymous RSS grew nan MB (limit 100.0)"]
    assert problems({**clean, "left_after_traffic": {"switchboard_queue_depth": 1.0}}) == [
        "left after the traffic: {'switchboard_queue_depth': 1.0}"]
    assert problems({**clean, "cluster": True}) == [
        "the killed replica was not replaced within 60 s: None"]
