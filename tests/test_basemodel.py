"""Base-model provisioning and loading: the real default model, quantized and not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clients.cli import main as cli_main
from server.basemodel import LORA_TARGET_MODULES, LoadedBaseModel, load_base_model
from server.basemodel.gguf_cache import prepare_gguf
from server.basemodel.quality import perplexity
from server.basemodel.source import default_gguf_path
from server.errors import (
    BaseModelNotFound,
    DeviceUnavailable,
    InvalidOption,
    UnsupportedArchitecture,
)

# Perplexity of the fp32 conversion of SmolLM2-135M-Instruct.Q4_1.gguf on
# quality.REFERENCE_PARAGRAPH, measured once on 2026-11-28 (transformers 5.24, torch 2.13).
RECORDED_FP32_PERPLEXITY = 20.947


@pytest.fixture(scope="module")
def nf4_model() -> LoadedBaseModel:
    return load_base_model("default", quantize="nf4", dtype="float32")


def test_default_model_is_smollm2_llama(default_model: LoadedBaseModel) -> None:
    info = default_model.info
    assert default_model.model.config.model_type == "llama"
    assert info.num_parameters == 134_515_008
    assert (info.dtype, info.quantize) == ("float32", "none")
    names = {name.rsplit(".", 1)[-1] for name, _ in default_model.model.named_modules()}
    assert set(LORA_TARGET_MODULES) <= names
    # The chat template travelled with the tokenizer through the conversion.
    rendered = default_model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_converted_model_perplexity_matches_record(default_model: LoadedBaseModel) -> None:
    ppl = perplexity(default_model.model, default_model.tokenizer)
    assert ppl == pytest.approx(RECORDED_FP32_PERPLEXITY, rel=0.05)


def test_nf4_close_to_fp32_and_much_smaller(
    default_model: LoadedBaseModel, nf4_model: LoadedBaseModel
) -> None:
    fp32_ppl = perplexity(default_model.model, default_model.tokenizer)
    nf4_ppl = perplexity(nf4_model.model, nf4_model.tokenizer)
    assert nf4_ppl == pytest.approx(fp32_ppl, rel=0.15)
    assert nf4_model.info.memory_bytes < 0.45 * default_model.info.memory_bytes
    assert nf4_model.info.num_parameters == default_model.info.num_parameters
    assert type(nf4_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_int8_loads_and_stays_close(default_model: LoadedBaseModel) -> None:
    int8 = load_base_model("default", quantize="int8", dtype="float32")
    fp32_ppl = perplexity(default_model.model, default_model.tokenizer)
    assert perplexity(int8.model, int8.tokenizer) == pytest.approx(fp32_ppl, rel=0.15)
    assert int8.base_fingerprint == default_model.base_fingerprint


def test_fingerprint_ignores_quantization_but_not_architecture(
    default_model: LoadedBaseModel, nf4_model: LoadedBaseModel, tiny_model: LoadedBaseModel
) -> None:
    assert len(default_model.base_fingerprint) == 64
    assert nf4_model.base_fingerprint == default_model.base_fingerprint
    assert tiny_model.base_fingerprint != default_model.base_fingerprint


def test_fingerprint_ignores_dtype(tiny_model_dir: Path, tiny_model: LoadedBaseModel) -> None:
    bf16 = load_base_model(tiny_model_dir, dtype="bfloat16")
    assert bf16.model.dtype == torch.bfloat16
    assert bf16.base_fingerprint == tiny_model.base_fingerprint


def test_second_load_is_a_cache_hit(default_model: LoadedBaseModel) -> None:
    again = load_base_model("default")
    assert again.info.cache_hit is True
    assert again.info.model_path == default_model.info.model_path
    assert again.info.source_digest == default_model.info.source_digest
    assert Path(again.info.model_path, "model.safetensors").is_file()


def test_tiny_model_is_tiny(tiny_model: LoadedBaseModel) -> None:
    assert tiny_model.model.config.num_hidden_layers == 2
    assert tiny_model.info.cache_hit is None  # an HF folder needs no conversion
    assert tiny_model.info.num_parameters < 4_000_000


# --- bad input: each one names the problem -------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(BaseModelNotFound, match=r"base model not found: .*nope \(expected an HF"):
        load_base_model(tmp_path / "nope")


def test_hub_id_is_not_downloaded() -> None:
    with pytest.raises(BaseModelNotFound, match=r"nothing is downloaded from a model hub"):
        load_base_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(BaseModelNotFound, match=r"has no config\.json"):
        load_base_model(tmp_path)


def _write_gguf(path: Path, architecture: str) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_unsupported_architecture(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "bert.gguf", "bert")
    message = r"GGUF architecture 'bert' is not supported \(supported: llama"
    with pytest.raises(UnsupportedArchitecture, match=message):
        load_base_model(path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"definitely not a gguf file")
    with pytest.raises(BaseModelNotFound, match="not a readable GGUF file"):
        load_base_model(path, cache_dir=tmp_path / "cache")


def test_hf_folder_of_other_architecture(tmp_path: Path, tokenizer) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer))
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture, match="GPT2LMHeadModel lacks the LLaMA linear"):
        load_base_model(tmp_path)


def test_hf_folder_of_unknown_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(UnsupportedArchitecture):
        load_base_model(tmp_path)


@pytest.mark.parametrize("value", ["nf5", "4bit", "NF4", ""])
def test_unknown_quantize(value: str) -> None:
    message = r"unknown quantize value .* \(valid: none, int8, nf4\)"
    with pytest.raises(InvalidOption, match=message):
        load_base_model("default", quantize=value)


def test_unknown_dtype_and_device() -> None:
    with pytest.raises(InvalidOption, match="unknown dtype 'float8'"):
        load_base_model("default", dtype="float8")
    with pytest.raises(InvalidOption, match=r"unknown device 'tpu' \(valid: auto, cpu, cuda"):
        load_base_model("default", device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_requested_without_gpu() -> None:
    with pytest.raises(DeviceUnavailable, match="CUDA is not available on this machine"):
        load_base_model("default", device="cuda")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "/no/such/model"], "error: base model not found: /no/such/model"),
        (["--quantize", "nf5"], "error: unknown quantize value 'nf5'"),
        (["--device", "tpu"], "error: unknown device 'tpu'"),
    ],
)
def test_cli_bad_input_is_one_line(args: list[str], message: str, capsys) -> None:
    assert cli_main(["model", "info", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)


def test_cli_unsupported_gguf_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_CACHE_DIR", str(tmp_path / "cache"))
    path = _write_gguf(tmp_path / "mamba.gguf", "mamba")
    assert cli_main(["model", "info", "--source", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: GGUF architecture 'mamba' is not supported (supported: llama)"]


def test_cli_model_info_reports_the_load() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clients", "model", "info", "--quantize", "nf4", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["quantize"] == "nf4" and info["dtype"] == "float32"
    assert info["num_parameters"] == 134_515_008
    assert 0 < info["memory_bytes"] < 0.45 * 4 * info["num_parameters"]
    assert info["load_seconds"] > 0 and info["cache_hit"] is True
    assert info["source_digest"] == prepare_gguf(default_gguf_path()).source_digest


# --- slow: a conversion from scratch ---------------------------------------------------


@pytest.mark.slow
def test_fresh_conversion_then_cache_hit_matches_gguf(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf_path = default_gguf_path()
    first = prepare_gguf(gguf_path, cache_dir=tmp_path)
    second = prepare_gguf(gguf_path, cache_dir=tmp_path)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert first.path == second.path
    converted = load_base_model(gguf_path, cache_dir=tmp_path).model.state_dict()
    direct = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).state_dict()
    assert converted.keys() == direct.keys()
    for name, tensor in direct.items():
        assert torch.equal(converted[name], tensor), name


# --- CUDA ------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_bf16_and_nf4(default_model: LoadedBaseModel) -> None:
    bf16 = load_base_model("default", device="auto")
    assert bf16.info.device.startswith("cuda") and bf16.info.dtype == "bfloat16"
    nf4 = load_base_model("default", device="cuda", quantize="nf4")
    fp32_ppl = perplexity(default_model.model, default_model.tokenizer)
    assert perplexity(bf16.model, bf16.tokenizer) == pytest.approx(fp32_ppl, rel=0.05)
    assert perplexity(nf4.model, nf4.tokenizer) == pytest.approx(fp32_ppl, rel=0.15)
    assert bf16.base_fingerprint == nf4.base_fingerprint == default_model.base_fingerprint
