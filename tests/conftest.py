"""Shared fixtures: the real default model (loaded once) and a tiny random LLaMA."""

from __future__ import annotations

import os

# Nothing may come from a model hub at test time; set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from server.basemodel import LoadedBaseModel, load_base_model
from tests.tiny_llama import build_tiny_llama


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def default_model() -> LoadedBaseModel:
    """SmolLM2-135M-Instruct, fp32 on the CPU (or the default device)."""
    return load_base_model("default", dtype="float32")


@pytest.fixture(scope="session")
def tokenizer(default_model: LoadedBaseModel):
    return default_model.tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="session")
def trainable_tiny_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A tiny LLaMA a LoRA can fit in a few steps (trainer tests)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-trainable"), tokenizer,
                            trainable=True)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> LoadedBaseModel:
    return load_base_model(tiny_model_dir, dtype="float32")


@pytest.fixture(scope="session")
def service_library(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
                    tiny_model: LoadedBaseModel) -> tuple[Path, Path, dict[str, Path]]:
    """Adapter root and routing table the shared live server serves (do not modify)."""
    from tests.service_fixtures import ROUTING_YAML, make_library

    folder = tmp_path_factory.mktemp("service")
    root = folder / "adapters"
    root.mkdir()
    library = make_library(root, tiny_model_dir, tiny_model.base_fingerprint)
    routing = folder / "routing.yaml"
    routing.write_text(ROUTING_YAML)
    return root, routing, library


@pytest.fixture(scope="session")
def live_server(tiny_model_dir: Path, service_library):
    """One real server on a free loopback port for the whole session (tiny model)."""
    from tests.service_fixtures import server_config, start_server

    root, routing, _ = service_library
    server = start_server(server_config(tiny_model_dir, root, routing))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def oracle(tiny_model_dir: Path, service_library):
    """PEFT over the tiny model with the service library's adapters."""
    from transformers import AutoModelForCausalLM

    from tests.lora_helpers import PeftOracle

    _, _, library = service_library
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return PeftOracle(model, library)


@pytest.fixture(scope="session")
def expected(oracle, tokenizer):
    """Reference text for (adapter, utterance, max_new_tokens, scale): PEFT alone, greedy,
    with the adapter's template and default scale; and its prefix before the first
    near-tie step (see ``service_fixtures.assert_matches``)."""
    from server.formats.prompt import build_prompt
    from tests.lora_helpers import MARGIN
    from tests.service_fixtures import SCALES, TEMPLATES

    memo: dict = {}
    eos = tokenizer.eos_token_id

    def reference(adapter: str | None, text: str, max_new_tokens: int = 8,
                  scale: float | None = None) -> tuple[str, str]:
        key = (adapter, text, max_new_tokens, scale)
        if key not in memo:
            prompt = build_prompt(TEMPLATES[adapter], text, tokenizer)
            run = oracle.greedy(prompt, adapter, SCALES.get(adapter, 1.0) if scale is None
                                else scale, max_new_tokens)
            tokens = [t for t in run.tokens if t != eos]
            margins = run.margins()
            unsure = next((i for i, m in enumerate(margins) if m < MARGIN), len(tokens))
            memo[key] = (tokenizer.decode(tokens), tokenizer.decode(tokens[:unsure]))
        return memo[key]

    return reference
