"""`switchboard train` run the way a new user runs it: the founding document's YAML in a
folder of its own, paths from the current directory, the name and the publish target
announced before training, checks before torch, and the gate against the base model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clients.cli import main as cli
from server.formats.manifest import MANIFEST_FILE, read_manifest
from server.formats.prompt import build_prompt
from server.service.config import REPO_ROOT
from trainer.config import load_train_config
from trainer.plan import plan_run
from trainer.rows import read_rows

ROWS = [("侬今朝吃饭伐?", "Have you eaten today?"), ("阿拉明朝见", "See you tomorrow"),
        ("我張單幾時到期呀?", "When is my bill due?"), ("你食咗飯未呀?", "Have you eaten yet?"),
        ("唔該幫我查吓", "Please check for me"), ("侬好", "Hello"), ("谢谢侬", "Thank you"),
        ("再会", "Goodbye"), ("侬几岁了?", "How old are you?"), ("我要充值", "I want to top up")]

# The founding document's config, key for key; base_model points at the tiny model.
FOUNDING_YAML = """\
train_data_dir: "./data/dialect_train"
metadata_path: "./data/dialect_train/metadata.csv"
base_model: {base}
task_type: "text-generation"
lora_rank: 8
batch_size: 2
epochs: 1
learning_rate: 1e-4
max_seq_length: 256
output_dir: "./output/wuyu_lora"
save_steps: 50
"""


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows),
                    encoding="utf-8")
    return path


def founding_layout(folder: Path, base: Path) -> Path:
    """<folder>/configs/dialect_lora.yaml and <folder>/data/dialect_train/metadata.csv."""
    write_csv(folder / "data" / "dialect_train" / "metadata.csv", ROWS)
    config = folder / "configs" / "dialect_lora.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(FOUNDING_YAML.format(base=json.dumps(str(base))))
    return config


def test_the_founding_yaml_trains_and_publishes_where_announced(
        tmp_path, trainable_tiny_dir, monkeypatch, capsys):
    founding_layout(tmp_path, trainable_tiny_dir)
    monkeypatch.chdir(tmp_path)
    # --force: this test is about paths and names; the gate has its own test below
    assert cli(["train", "--config", "configs/dialect_lora.yaml", "--quiet", "--force"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    published = tmp_path / "adapters" / "wuyu_lora"
    assert first.startswith("switchboard train: training adapter 'wuyu_lora' on 9 rows")
    assert f"publishes to {published}" in first and str(tmp_path / "output/wuyu_lora") in first
    assert read_manifest(published / MANIFEST_FILE).name == "wuyu_lora"
    assert (tmp_path / "output" / "wuyu_lora" / "metrics.json").exists()
    assert not (tmp_path / "adapters" / "configs").exists()
    assert not (REPO_ROOT / "adapters" / "configs").exists()
    assert not (REPO_ROOT / "adapters" / "wuyu_lora").exists()


def test_a_missing_data_file_names_every_place_tried(tmp_path, trainable_tiny_dir, monkeypatch,
                                                     capsys):
    config = founding_layout(tmp_path, trainable_tiny_dir)
    config.write_text(config.read_text().replace("metadata.csv", "metdata.csv"))
    monkeypatch.chdir(tmp_path)
    assert cli(["train", "--config", "configs/dialect_lora.yaml"]) == 2
    err = capsys.readouterr().err
    assert "metadata_path: './data/dialect_train/metdata.csv' does not exist" in err
    assert str(tmp_path / "data/dialect_train/metdata.csv") in err  # from here
    assert str(tmp_path / "configs/data/dialect_train/metdata.csv") in err  # beside the config


def test_the_shipped_configs_find_their_data_from_any_folder(tmp_path, monkeypatch):
    for folder in (REPO_ROOT, tmp_path):
        monkeypatch.chdir(folder)
        for name in ("wuyu", "cantonese"):
            config = load_train_config(REPO_ROOT / "adapters" / name / "train.yaml")
            plan = plan_run(config)
            data = REPO_ROOT / "adapters" / name / "data"
            assert plan.data_files == [data / "train.csv", data / "val.csv"]
            assert len(plan.train_rows) == len(read_rows(data / "train.csv"))
            assert config.name == name
            assert plan.publish_to == folder / "adapters" / name


@pytest.mark.parametrize(("keys", "name"), [
    ({"name": "telecom", "dialect": "wuyu", "output_dir": "out/x"}, "telecom"),
    ({"dialect": "wuyu", "output_dir": "out/x"}, "wuyu"),
    ({"output_dir": "./output/wuyu_lora/"}, "wuyu_lora"),
])
def test_the_adapter_name_never_comes_from_the_config_folder(tmp_path, keys, name):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = folder / "train.yaml"
    path.write_text(json.dumps({"metadata_path": "x.csv", **keys}))
    assert load_train_config(path).name == name


@pytest.mark.parametrize(("keys", "message"), [
    ({}, "no adapter name: set name"),
    ({"output_dir": "out/WuYu LoRA"}, "'WuYu LoRA' (from output_dir), which is not an adapter"),
])
def test_a_config_without_a_usable_name_says_so(tmp_path, keys, message):
    path = tmp_path / "train.yaml"
    path.write_text(json.dumps({"metadata_path": "x.csv", **keys}))
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_train_config(path)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda csv: csv.unlink(), "metadata_path: './data/dialect_train/metadata.csv' does not"),
    (lambda csv: csv.write_text("text,answer\nhi,there\n"), "missing column 'label'"),
    (lambda csv: csv.write_bytes(b"text,label\n\xff,oops\n"), "line 2: not UTF-8"),
])
def test_config_and_data_are_checked_before_torch_is_imported(tmp_path, trainable_tiny_dir,
                                                              damage, message):
    config = founding_layout(tmp_path, trainable_tiny_dir)
    damage(tmp_path / "data" / "dialect_train" / "metadata.csv")
    script = ("import sys\nfrom clients.cli import main\n"
              "code = main(['train', '--config', 'configs/dialect_lora.yaml'])\n"
              "print('torch imported' if 'torch' in sys.modules else 'no torch', code)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1",
                               "PATH": "/usr/bin:/bin"})
    assert config.exists()
    assert done.stdout.strip() == "no torch 2", done.stderr
    assert message in done.stderr


def test_an_adapter_worse_than_the_base_model_is_not_published(tmp_path, trainable_tiny_dir,
                                                               monkeypatch, capsys):
    """An adapter that answers in characters the English references never contain: first
    trained to that (no validation, not published), then continued for one small step
    against English validation rows, so even its best checkpoint answers that way. Its
    validation chrF falls below the base model's, and the gate says so with both."""
    write_csv(tmp_path / "data" / "cjk.csv", [(t, "阿拉阿拉阿拉阿拉") for t, _ in ROWS])
    write_csv(tmp_path / "data" / "val.csv", ROWS[:6])
    common = {"train_data_dir": "data", "base_model": str(trainable_tiny_dir),
              "lora_rank": 8, "target_modules": "all-linear", "batch_size": 5,
              "eval_max_new_tokens": 12, "save_steps": 0, "dropout": 0.0,
              "control_samples": 0}
    (tmp_path / "cjk.yaml").write_text(json.dumps({
        **common, "name": "cjk", "metadata_path": "cjk.csv", "val_split": 0.0,
        "epochs": 40, "learning_rate": 1e-2}))
    (tmp_path / "worse.yaml").write_text(json.dumps({
        **common, "name": "worse", "metadata_path": "cjk.csv", "val_path": "val.csv",
        "epochs": 1, "learning_rate": 1e-6, "init_from": "runs/cjk/adapter"}))
    monkeypatch.chdir(tmp_path)
    assert cli(["train", "--config", "cjk.yaml", "--quiet", "--no-publish"]) == 0
    assert cli(["train", "--config", "worse.yaml", "--quiet"]) == 3
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "runs" / "worse" / "metrics.json").read_text())
    adapter, base = metrics["val_chrf_adapter"], metrics["val_chrf_base"]
    assert adapter < base
    assert (f"not published: validation chrF {adapter:.2f} is below the base model's "
            f"{base:.2f} (use --force to publish anyway)") in out
    assert not (tmp_path / "adapters" / "worse").exists()
    assert cli(["train", "--config", "worse.yaml", "--quiet", "--force"]) == 0
    assert (tmp_path / "adapters" / "worse" / MANIFEST_FILE).exists()


def test_the_gate_scores_with_the_generator_make_eval_uses(tmp_path, trainable_tiny_dir,
                                                           monkeypatch):
    """The chrF in the manifest is what trainer.scoring (make eval's path) gives for the
    published adapter on the same rows, at the scale it was published with."""
    from server.basemodel import load_base_model
    from trainer.scoring import EngineGenerator, scores

    write_csv(tmp_path / "data" / "train.csv", ROWS)
    write_csv(tmp_path / "data" / "val.csv", ROWS[:4])
    template = "Translate: {text}\n"
    config = tmp_path / "same.yaml"
    config.write_text(json.dumps({
        "dialect": "same", "train_data_dir": "data", "metadata_path": "train.csv",
        "val_path": "val.csv", "base_model": str(trainable_tiny_dir), "batch_size": 5,
        "epochs": 15, "learning_rate": 1e-2, "target_modules": "all-linear",
        "prompt_template": template, "eval_max_new_tokens": 12, "save_steps": 0}))
    monkeypatch.chdir(tmp_path)
    assert cli(["train", "--config", "same.yaml", "--quiet", "--force"]) == 0
    manifest = read_manifest(tmp_path / "adapters" / "same" / MANIFEST_FILE)
    base = load_base_model(trainable_tiny_dir, dtype="float32")
    generator = EngineGenerator(base.model, base.tokenizer, base.base_fingerprint,
                                [tmp_path / "adapters"], 12)
    try:
        prompts = [build_prompt(template, t, base.tokenizer) for t, _ in ROWS[:4]]
        result = scores(generator.run(prompts, "same", manifest.default_weight_scale),
                        [lab for _, lab in ROWS[:4]])
    finally:
        generator.close()
    assert manifest.metrics["val_chrf"] == result["chrf"]
    assert manifest.metrics["val_chrf_adapter"] > manifest.metrics["val_chrf_base"]  # learned
