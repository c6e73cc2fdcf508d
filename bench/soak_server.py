"""The soak's server: its configuration, its adapters (stable and churned ones), its
gauges, and, for a cluster, the replica the run kills halfway.
"""

from __future__ import annotations

import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.soak_traffic import CHURNED, Tally
from server.service.config import REPO_ROOT
from tests.support import ALL_TARGETS, add_manifest, make_random_adapter

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
