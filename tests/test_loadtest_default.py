"""The load generator against the default server (`switchboard serve` with the shipped
settings, default model), 200 requests at concurrency 16 over a wuyu/cantonese/base mix,
zero errors. The test serves random rank-8 adapters of those names from a temporary root,
so that what it measures does not change when the shipped adapters are retrained. Slow
tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from server.service.config import REPO_ROOT
from tests.support import add_manifest, make_random_adapter, spawn_server


@pytest.mark.slow
def test_loadtest_200_requests_at_concurrency_16_has_no_errors(tmp_path, default_model):
    root = tmp_path / "adapters"
    for seed, name in enumerate(("wuyu", "cantonese")):
        make_random_adapter(default_model.model, root / name, 8, ("q_proj", "v_proj"), seed)
        add_manifest(root / name, default_model.base_fingerprint, dialect=name)
    process, address, *_ = spawn_server(["--port", "0", "--metrics-port", "-1",
                                         "--http-port", "-1", "--adapters", str(root)],
                                        tmp_path / "server.log")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "clients.cli", "loadtest", "--target", address,
             "--requests", "200", "--concurrency", "16", "--max-new-tokens", "16", "--json",
             "--quiet"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=1200,
            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    finally:
        process.terminate()
        assert process.wait(120) == 0
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    print(json.dumps(report, indent=2))
    assert report["requests"] == report["ok"] == 200 and report["errors"] == {}
    assert report["tokens_per_s"] > 0 and report["latency_ms"]["p99"] > 0
    # The start-up log names the decode path the shipped settings take on this base.
    log = (tmp_path / "server.log").read_text()
    assert "decode path ready" in log and "fused (" in log
