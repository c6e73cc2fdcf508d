"""A real Switchboard server on a free loopback port, for service, client and reliability
tests: the tiny random LLaMA as base, real PEFT adapters on disk, a routing table.

The server runs in-process on its own event loop thread (so tests can reach its engine
and cache to inject faults); ``tests/test_service_shutdown.py`` runs it as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc
from server.engine.config import EngineConfig
from server.service.app import SwitchboardServer
from server.service.config import ServerConfig
from tests.support import (
    ALL_TARGETS,
    add_manifest,
    make_random_adapter,
)

WUYU_TEMPLATE = "Translate Wu dialect to English: {text}\n"
CANTONESE_TEMPLATE = "Translate Cantonese to English: {text}\n"
TABLE_TEMPLATE = "Translate to English: {text}\n"
UTTERANCE = "侬今朝吃饭伐?"
TEMPLATES = {"wuyu": WUYU_TEMPLATE, "cantonese": CANTONESE_TEMPLATE, None: TABLE_TEMPLATE,
             "plain": TABLE_TEMPLATE}
SCALES = {"wuyu": 0.8, "cantonese": 1.0, "plain": 1.0}
"""Each library adapter's default scale (its manifest's; 1.0 without one)."""

ROUTING_YAML = f"""
default: base
fallback: base
prompt_template: {json.dumps(TABLE_TEMPLATE)}
national_prefix: "+86"
caller_numbers:
  "+8621": wuyu
  "+86512": wuyu
  "+8620": cantonese
  "+852": cantonese
  "+853": cantonese
  "+8610": ghost      # routed to an adapter that does not exist: falls back
  "+8699": broken     # routed to an adapter refused by validation: falls back
  "+8657": [wuyu, {{name: plain, scale: 0.5}}]   # a composition
regions:
  CN-SH: wuyu
  CN-GD: cantonese
  CN-HK: cantonese
"""


def make_library(root: Path, base_dir: Path, fingerprint: str) -> dict[str, Path]:
    """wuyu and cantonese (with manifests), plain (no manifest), broken (refused)."""
    library = {
        "wuyu": make_random_adapter(str(base_dir), root / "wuyu", 8, ALL_TARGETS, seed=1,
                                    b_std=0.5),
        "cantonese": make_random_adapter(str(base_dir), root / "cantonese", 4,
                                         ("q_proj", "v_proj"), seed=2, b_std=0.5),
        "plain": make_random_adapter(str(base_dir), root / "plain", 8, ALL_TARGETS, seed=3,
                                     b_std=0.5),
    }
    add_manifest(root / "wuyu", fingerprint, prompt_template=WUYU_TEMPLATE, dialect="wuyu",
                 default_weight_scale=0.8)
    add_manifest(root / "cantonese", fingerprint, prompt_template=CANTONESE_TEMPLATE,
                 dialect="cantonese")
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    (broken / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return library


def assert_matches(text: str, reference: tuple[str, str]) -> None:
    """The Engine's tolerance rule on text: equal, or equal up to a near-tie step."""
    full, sure = reference
    assert text == full or (sure != full and text.startswith(sure)), (text, full)


def server_config(base_dir: Path, root: Path, routing: Path, **changes: Any) -> ServerConfig:
    engine = changes.pop("engine", EngineConfig(
        max_batch_size=16, max_queue_size=64, max_model_len=256, max_loras=4,
        max_lora_rank=16, max_new_tokens_limit=64, aging_limit_s=0.5))
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, http_port=0,
                          base_model=str(base_dir),
                          adapter_roots=(str(root),), preload=("all",),
                          routing_table=str(routing), default_max_new_tokens=8,
                          poll_interval_s=3600.0, grace_period_s=10.0, engine=engine)
    return replace(config, **changes)


@dataclass
class LiveServer:
    server: SwitchboardServer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    @property
    def engine(self) -> Any:
        return self.server.engine

    @property
    def cache(self) -> Any:
        return self.server.cache

    @property
    def watcher(self) -> Any:
        return self.server.watcher

    def channel(self, **options: Any) -> grpc.Channel:
        channel = grpc.insecure_channel(self.address, options=list(options.items()))
        self.channels.append(channel)
        return channel

    def stub(self) -> pb_grpc.SwitchboardStub:
        return pb_grpc.SwitchboardStub(self.channel())

    def stop(self, grace: float = 10.0) -> None:
        for channel in self.channels:
            channel.close()
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.shutdown(grace), self.loop).result(60)
            self.thread.join(60)


def start_server(config: ServerConfig, timeout: float = 180.0) -> LiveServer:
    """Start a server on its own loop thread; return once it is SERVING (or raise)."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = SwitchboardServer(config)
        holder["server"] = server

        async def main() -> None:
            try:
                await server.start()
            except BaseException as exc:  # reported to the starting thread
                holder["error"] = exc
                started.set()
                await server.shutdown(0)
                return
            started.set()
            await server.wait_stopped()

        loop.run_until_complete(main())
        loop.close()

    thread = threading.Thread(target=run, name="test-server", daemon=True)
    thread.start()
    if not started.wait(timeout):
        raise TimeoutError("server did not start in time")
    if "error" in holder:
        thread.join(30)
        raise holder["error"]
    return LiveServer(holder["server"], loop, thread)
