"""Shared setup for adapter-cache tests: an engine on a base, a store, a cache."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from server.adapters.cache import AdapterCache
from server.adapters.store import AdapterStore
from server.adapters.watcher import AdapterWatcher
from server.basemodel import LoadedBaseModel, load_base_model
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.formats.manifest import (
    ADAPTER_CONFIG_FILE,
)


@dataclass
class Served:
    loaded: LoadedBaseModel
    engine: Engine
    store: AdapterStore
    cache: AdapterCache
    root: Path
    watcher: AdapterWatcher

    def close(self) -> None:
        self.cache.close()
        self.engine.stop()


def serve(base: str | Path, root: Path, max_loras: int = 4, max_cpu_adapters: int = 16,
          max_lora_rank: int = 16, **engine_settings) -> Served:
    loaded = load_base_model(base, dtype="float32")
    settings = dict(max_batch_size=8, max_model_len=256, max_loras=max_loras,
                    max_lora_rank=max_lora_rank)
    settings.update(engine_settings)
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(**settings))
    store = AdapterStore([root])
    cache = AdapterCache(store, engine.slots, loaded.base_fingerprint,
                         max_cpu_adapters=max_cpu_adapters)
    return Served(loaded, engine, store, cache, root, AdapterWatcher(cache))


def edit_config(folder: Path, **changes) -> None:
    path = folder / ADAPTER_CONFIG_FILE
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
