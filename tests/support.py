"""What the tests and the benchmarks both build: random PEFT adapters, manifests, a
trainer-style publish, a `switchboard serve` process, and the malformed calls whose one
allowed status both check (``bench/soak.py`` sends them, ``tests/`` asserts them)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from protos.switchboard.v1 import switchboard_pb2 as pb
from server.formats.manifest import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterManifest,
    weight_file_digests,
    write_manifest,
)
from server.service.config import REPO_ROOT

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_random_adapter(
    base: torch.nn.Module | str | Path,
    out_dir: Path,
    rank: int,
    targets: Sequence[str],
    seed: int,
    b_std: float = 0.02,
    alpha: float | None = None,
    use_rslora: bool = False,
    **config_overrides: object,
) -> Path:
    """Save a PEFT LoRA adapter whose A and B are both random (so it changes outputs)."""
    model = (
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if isinstance(base, str | Path) else base
    )
    config = LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
        target_modules=list(targets), init_lora_weights=False, use_rslora=use_rslora,
        **config_overrides,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
    peft_model.save_pretrained(out_dir)
    peft_model.unload()  # restore the base modules if the caller passed a model object
    return out_dir


def add_manifest(folder: Path, fingerprint: str, name: str | None = None, **fields) -> None:
    fields.setdefault("prompt_template", "Translate: {text}\n")
    manifest = AdapterManifest(
        name=name or folder.name, base_fingerprint=fingerprint,
        files=weight_file_digests(folder), **fields,
    )
    write_manifest(folder, manifest)


def publish(source: Path, target: Path, fingerprint: str | None) -> None:
    """Publish like the trainer: weight files by temp file + os.replace, manifest last."""
    target.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as handle:
            handle.write((source / name).read_bytes())
        os.replace(tmp, target / name)
    if fingerprint is not None:
        add_manifest(target, fingerprint)


class SpawnedServer(NamedTuple):
    process: subprocess.Popen
    address: str
    metrics_url: str
    """Empty when the server exports no metrics (``--metrics-port -1``)."""
    http_url: str = ""
    """The OpenAI-compatible API's base URL; empty when it is off (``--http-port -1``)."""


def spawn_server(args: list[str], log_path: Path, timeout: float = 300.0,
                 new_session: bool = False) -> SpawnedServer:
    """`switchboard serve ARGS` as a process; returns it and its addresses once serving.
    ``new_session``: in a session (and process group) of its own, led by the server, so
    a test can signal the whole group as ``kill -- -PGID`` or systemd would."""
    process = subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "serve", *args], cwd=REPO_ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE,
        stderr=log_path.open("w"), text=True, start_new_session=new_session)
    serving: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if "serving on" in line:
                serving.append(line.strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not serving:
        process.kill()
        raise AssertionError("server did not start:\n" + log_path.read_text()[-3000:])
    # "switchboard: serving on HOST:PORT[, metrics on URL][, OpenAI API on URL]"
    parts = serving[0].split("serving on ")[1].split(", ")
    found = {part.split(" on ")[0]: part.split(" on ")[-1] for part in parts[1:]}
    return SpawnedServer(process, parts[0].strip(), found.get("metrics", ""),
                         found.get("OpenAI API", ""))


def malformed_requests() -> list[tuple[str, pb.GenerateRequest, str]]:
    """(what is wrong, the request, its one allowed status)."""
    bad = "INVALID_ARGUMENT"
    return [
        ("empty text", pb.GenerateRequest(text=" "), bad),
        ("empty prompt", pb.GenerateRequest(prompt=""), bad),
        ("empty message", pb.GenerateRequest(messages=[pb.ChatMessage(role="user")]), bad),
        ("65 messages", pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")] * 65), bad),
        ("max_new_tokens 0", pb.GenerateRequest(text="侬好", max_new_tokens=0), bad),
        ("top_k -1", pb.GenerateRequest(text="侬好", top_k=-1), bad),
        ("repetition_penalty 0", pb.GenerateRequest(text="侬好", repetition_penalty=0.0), bad),
        ("empty stop string", pb.GenerateRequest(text="侬好", stop=[""]), bad),
        ("300-byte stop string", pb.GenerateRequest(text="侬好", stop=["x" * 300]), bad),
        ("text and prompt", pb.GenerateRequest(text="a", prompt="b"), bad),
        ("no input", pb.GenerateRequest(dialect="wuyu"), bad),
        ("dialect ../x", pb.GenerateRequest(text="侬好", dialect="../x"), bad),
        ("dialect with NUL", pb.GenerateRequest(text="侬好", dialect="wu\0yu"), bad),
        ("unknown dialect", pb.GenerateRequest(text="侬好", dialect="klingon"), "NOT_FOUND"),
        ("negative scale", pb.GenerateRequest(text="侬好", weight_scale=-1.0), bad),
        ("scale over limit", pb.GenerateRequest(text="侬好", weight_scale=100.0), bad),
        ("max_new_tokens 1e9", pb.GenerateRequest(text="侬好", max_new_tokens=10**9), bad),
        ("temperature -1", pb.GenerateRequest(text="侬好", temperature=-1.0), bad),
        ("top_p 0", pb.GenerateRequest(text="侬好", top_p=0.0), bad),
        ("64 stop strings", pb.GenerateRequest(text="侬好", stop=[f"s{i}" for i in range(64)]),
         bad),
        ("bad role", pb.GenerateRequest(messages=[pb.ChatMessage(role="robot", content="hi")]),
         bad),
        ("bad request id", pb.GenerateRequest(text="侬好", request_id="bad id!"), bad),
        ("prompt over max_model_len",
         pb.GenerateRequest(prompt="word " * 600, max_new_tokens=8), bad),
    ]


def run_client_threads(client: Callable[[list[int]], None], jobs: int, threads: int,
                       timeout: float) -> None:
    """Run ``client`` on ``threads`` threads, thread ``k`` taking jobs ``k, k+threads, ...``;
    fail if any is still running after ``timeout`` seconds (a deadlock)."""
    workers = [threading.Thread(target=client, args=(list(range(k, jobs, threads)),))
               for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=timeout)
    assert not any(w.is_alive() for w in workers), "client threads still running: deadlocked"
