"""Every way an adapter is refused: the exact error kind, and the cache serves on."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from server.errors import (
    AdapterBaseMismatch,
    AdapterConfigError,
    AdapterCorrupt,
    AdapterDigestMismatch,
    AdapterNonFinite,
    AdapterNotFound,
    AdapterPickleRefused,
    AdapterRankError,
    AdapterRefused,
    AdapterShapeMismatch,
    AdapterTargetMismatch,
    AdapterUnsupportedOption,
    InvalidAdapterName,
    ManifestError,
)
from server.formats.manifest import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE
from tests.adapter_fixtures import edit_config, serve
from tests.support import ALL_TARGETS, add_manifest, make_random_adapter

WEIGHTS = ADAPTER_WEIGHTS_FILE


@pytest.fixture(scope="module")
def template(tiny_model_dir: Path, tmp_path_factory) -> Path:
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("tpl") / "good",
                               rank=4, targets=("q_proj", "v_proj"), seed=1, b_std=0.5)


@pytest.fixture
def served(tiny_model_dir: Path, tmp_path: Path, template: Path):
    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copytree(template, root / "good")
    s = serve(tiny_model_dir, root)
    yield s
    s.close()


def _edit_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS)


def _first(tensors: dict[str, torch.Tensor], part: str) -> str:
    return next(k for k in sorted(tensors) if part in k)


def _rename_module(tensors: dict[str, torch.Tensor], old: str, new: str) -> None:
    for key in [k for k in tensors if old in k]:
        tensors[key.replace(old, new)] = tensors.pop(key)


def _nan(tensors):
    tensors[_first(tensors, "lora_B")][0, 0] = float("nan")


def _inf(tensors):
    tensors[_first(tensors, "lora_A")][0, 0] = float("inf")


def _wide(tensors):
    key = _first(tensors, "lora_A")
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)


def _truncate(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def _huge_header(folder: Path) -> None:
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", 2**40) + b"{}")


def _pickle(folder: Path) -> None:
    (folder / WEIGHTS).unlink()
    torch.save({"x": torch.zeros(2)}, folder / "adapter_model.bin")


CASES = [
    ("config missing", lambda f, fp: (f / ADAPTER_CONFIG_FILE).unlink(), AdapterConfigError,
     "no adapter_config.json"),
    ("config unparsable", lambda f, fp: (f / ADAPTER_CONFIG_FILE).write_text("{r: 4"),
     AdapterConfigError, "not valid JSON"),
    ("not lora", lambda f, fp: edit_config(f, peft_type="IA3"), AdapterConfigError,
     "only LoRA is served"),
    ("pickle weights", lambda f, fp: _pickle(f), AdapterPickleRefused,
     "pickle .* can run code .* convert them to adapter_model.safetensors"),
    ("truncated safetensors", lambda f, fp: _truncate(f), AdapterCorrupt,
     "unreadable safetensors"),
    ("huge safetensors header", lambda f, fp: _huge_header(f), AdapterCorrupt,
     "unreadable safetensors"),
    ("garbage safetensors", lambda f, fp: (f / WEIGHTS).write_bytes(b"\0" * 64), AdapterCorrupt,
     "unreadable safetensors"),
    ("digest mismatch", lambda f, fp: (add_manifest(f, fp), _edit_tensors(f, _nan)),
     AdapterDigestMismatch, "does not match the manifest"),
    ("unknown target", lambda f, fp: _edit_tensors(
        f, lambda t: _rename_module(t, "q_proj", "qq_proj")), AdapterTargetMismatch,
     r"targets 'model\.layers\.\d\.self_attn\.qq_proj'"),
    ("layer beyond base", lambda f, fp: _edit_tensors(
        f, lambda t: _rename_module(t, "layers.1.", "layers.7.")), AdapterTargetMismatch,
     "model.layers.7"),
    ("wrong shape", lambda f, fp: _edit_tensors(f, _wide), AdapterShapeMismatch,
     r"base needs A\(4, 64\)"),
    ("rank zero", lambda f, fp: edit_config(f, r=0), AdapterRankError,
     "a LoRA rank must be a positive integer"),
    ("rank negative", lambda f, fp: edit_config(f, r=-4), AdapterRankError,
     "r is -4"),
    ("nan weights", lambda f, fp: _edit_tensors(f, _nan), AdapterNonFinite, "NaN or infinite"),
    ("inf weights", lambda f, fp: _edit_tensors(f, _inf), AdapterNonFinite, "NaN or infinite"),
    ("other base", lambda f, fp: add_manifest(f, "0" * 64), AdapterBaseMismatch,
     "trained for base 000000000000"),
    ("dora", lambda f, fp: edit_config(f, use_dora=True), AdapterUnsupportedOption,
     r"DoRA \(use_dora\) is not supported"),
    ("modules_to_save", lambda f, fp: edit_config(f, modules_to_save=["lm_head"]),
     AdapterUnsupportedOption, "modules_to_save"),
    ("lora bias", lambda f, fp: edit_config(f, bias="all"), AdapterUnsupportedOption,
     r"bias \(trained base biases\)"),
    ("bad manifest", lambda f, fp: (f / MANIFEST_FILE).write_text('{"schema_version": 1}'),
     ManifestError, "field 'name' is missing"),
]


@pytest.mark.parametrize(("label", "breaker", "kind", "message"), CASES,
                         ids=[c[0] for c in CASES])
def test_refused_with_its_reason_and_others_still_served(
    served, template: Path, label, breaker, kind, message, tokenizer
) -> None:
    bad = served.root / "bad"
    shutil.copytree(template, bad)
    breaker(bad, served.loaded.base_fingerprint)
    with pytest.raises(kind, match=message):
        served.cache.lease("bad")
    assert served.cache.info("bad").error is not None
    # One bad adapter harms nobody: the good one still loads and generates.
    lease = served.cache.lease("good")
    result = served.engine.generate(GenerationRequest(
        tokenizer.encode("hello", add_special_tokens=False),
        SamplingParams(max_new_tokens=3), adapter=lease), timeout=60)
    assert result.completion_tokens == 3
    assert served.cache.usage()["version_pins"] == 0


def test_rank_above_max_is_refused(served, tiny_model_dir: Path) -> None:
    make_random_adapter(tiny_model_dir, served.root / "wide", rank=32, targets=("q_proj",),
                        seed=3)
    with pytest.raises(AdapterRankError, match=r"rank 32; ranks must be in 1\.\.16"):
        served.cache.lease("wide")


@pytest.mark.parametrize(
    "name", ["../x", "/etc/passwd", "a/../b", " ..", "x" * 10_000, "bad\0name", "", "UPPER"]
)
def test_hostile_names_are_invalid(served, name: str) -> None:
    with pytest.raises(InvalidAdapterName, match="invalid adapter name") as info:
        served.cache.lease(name)
    assert len(str(info.value)) < 160  # never echoes a long input back


def test_symlink_out_of_the_root_is_refused(served, template: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(template, outside)
    (served.root / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(AdapterRefused, match="link leading outside its root"):
        served.cache.lease("escape")
    inner = served.root / "good"
    (served.root / "alias").symlink_to(inner, target_is_directory=True)
    served.cache.lease("alias").release()  # a link inside the root is fine


def test_unknown_name_lists_what_exists(served) -> None:
    with pytest.raises(AdapterNotFound, match=r"no adapter named 'nope' \(available: good\)"):
        served.cache.lease("nope")


def test_other_files_in_the_folder_are_ignored(served) -> None:
    first = served.cache.lease("good")
    first.release()
    (served.root / "good" / "train.yaml").write_text("epochs: 3\n")
    (served.root / "good" / "data.csv").write_text("text,label\n")
    served.watcher.poll_now()
    again = served.cache.lease("good")
    assert again.version == first.version
    again.release()


def test_config_json_is_the_peft_one(served, template: Path) -> None:
    config = json.loads((template / ADAPTER_CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert set(ALL_TARGETS) >= set(config["target_modules"])


SUPPORTED_OPTIONS = {
    "patterns": dict(rank=4, targets=ALL_TARGETS, rank_pattern={"q_proj": 8, "down_proj": 2},
                     alpha_pattern={"v_proj": 32.0}),
    "layers": dict(rank=8, targets=("q_proj", "v_proj", "up_proj"), layers_to_transform=[1]),
    "rslora": dict(rank=16, targets=("k_proj", "o_proj"), use_rslora=True),
}


@pytest.mark.parametrize("option", sorted(SUPPORTED_OPTIONS))
def test_supported_peft_options_match_peft_exactly(option, tiny_model_dir, tmp_path, tokenizer):
    from server.basemodel import load_base_model
    from tests.lora_helpers import PeftOracle

    root = tmp_path / "adapters"
    spec = dict(SUPPORTED_OPTIONS[option])
    path = make_random_adapter(tiny_model_dir, root / option, rank=spec.pop("rank"),
                               targets=spec.pop("targets"), seed=5, b_std=0.5, **spec)
    s = serve(tiny_model_dir, root)
    try:
        prompt = tokenizer.encode("侬今朝吃饭伐?", add_special_tokens=False)
        oracle = PeftOracle(load_base_model(tiny_model_dir, dtype="float32").model,
                            {option: path})
        assert (oracle.logits(prompt, option, 1.0) - oracle.logits(prompt, None, 1.0)) \
            .abs().max() >= 0.1
        for scale in (0.5, 1.0):
            ref = oracle.greedy(prompt, option, scale, 6)
            result = s.engine.generate(GenerationRequest(
                prompt, SamplingParams(max_new_tokens=6), adapter=s.cache.lease(option),
                weight_scale=scale, forced_tokens=ref.tokens, record_logits=True), 60)
            worst = max(float((a - b).abs().max())
                        for a, b in zip(result.logits, ref.logits, strict=True))
            assert worst <= 1e-4, f"{option} at scale {scale}: max |Δlogit| {worst:.2e}"
    finally:
        s.close()
