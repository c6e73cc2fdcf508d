"""The trainer on a real CSV and a tiny LLaMA: CLI end to end, exact resume, init_from,
the publish gate, and config/data errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from clients.cli import main as cli
from server.errors import InvalidOption
from server.formats.manifest import (
    MANIFEST_FILE,
    AdapterManifest,
    adapter_version,
    read_manifest,
)
from server.formats.prompt import build_prompt
from tests.adapter_fixtures import serve
from trainer.config import load_train_config
from trainer.data import collate, encode
from trainer.model import label_loss, load_for_training
from trainer.plan import plan_run
from trainer.rows import read_rows
from trainer.run import train

ROWS = [("侬今朝吃饭伐?", "Have you eaten today?"), ("阿拉明朝见", "See you tomorrow"),
        ("我張單幾時到期呀?", "When is my bill due?"), ("你食咗飯未呀?", "Have you eaten yet?"),
        ("唔該幫我查吓", "Please check for me"), ("侬好", "Hello"), ("谢谢侬", "Thank you"),
        ("再会", "Goodbye")]


def write_csv(path: Path, rows, header: str = "text,label") -> Path:
    lines = [header] + [f"{text},{label}" for text, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Run where a user would: relative outputs land in the test's folder, not the repo."""
    monkeypatch.chdir(tmp_path)


def make_config(folder: Path, base: Path, **keys) -> Path:
    """adapters-like layout: <folder>/train.yaml + data.csv (+ val.csv), named after it."""
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "data.csv", ROWS)
    write_csv(folder / "val.csv", ROWS[:3])
    settings = {"name": folder.name, "metadata_path": "data.csv", "val_path": "val.csv",
                "base_model": str(base),
                "prompt_template": "Translate Wu dialect to English: {text}\n",
                "target_modules": "all-linear", "lora_rank": 8, "lora_alpha": 16,
                "dropout": 0.0, "batch_size": 4, "epochs": 60, "learning_rate": 1e-2,
                "save_steps": 0, "eval_samples": 3, "eval_max_new_tokens": 12,
                "control_samples": 0,  # retention: tests/test_trainer_retention.py
                "publish_root": str(folder.parent / "published")}
    settings.update(keys)
    path = folder / "train.yaml"
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in settings.items()) + "\n")
    return path


def lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def test_train_cli_end_to_end(tmp_path, trainable_tiny_dir, capsys):
    config = make_config(tmp_path / "wuyu", trainable_tiny_dir)
    assert cli(["train", "--config", str(config), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "published wuyu" in out and "val_chrf_adapter" in out

    run = tmp_path / "runs" / "wuyu"  # output_dir's default, from the current directory
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_loss_final"] <= 0.5 * metrics["train_loss_initial"]
    assert (run / "loss.png").stat().st_size > 1000
    assert metrics["val_chrf_adapter"] > metrics["val_chrf_base"]

    published = tmp_path / "published" / "wuyu"
    for name in ("adapter_config.json", "adapter_model.safetensors", MANIFEST_FILE,
                 "README.md", "metrics.json", "loss.png"):
        assert (published / name).exists(), name
    manifest = read_manifest(published / MANIFEST_FILE)
    assert manifest.prompt_template == "Translate Wu dialect to English: {text}\n"
    assert manifest.metrics["val_chrf"] == metrics["val_chrf_adapter"]
    assert manifest.training_data_digest and manifest.training_config["lora_rank"] == 8

    # PEFT loads it, and a training row comes back word for word, ending with EOS
    tokenizer = AutoTokenizer.from_pretrained(trainable_tiny_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trainable_tiny_dir),
                                      published)
    text, label = ROWS[0]
    ids = torch.tensor([build_prompt(manifest.prompt_template, text, tokenizer)])
    out_ids = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    expected = [*tokenizer.encode(label, add_special_tokens=False), tokenizer.eos_token_id]
    assert out_ids == expected

    # and the server's adapter store validates and serves it
    served = serve(trainable_tiny_dir, published.parent)
    try:
        info = served.cache.load("wuyu")
        assert info.version == adapter_version(published) and info.rank == 8
    finally:
        served.close()


def test_vocabulary_projection_runs_on_exactly_the_label_tokens(tmp_path,
                                                               trainable_tiny_dir):
    config = load_train_config(make_config(tmp_path / "a", trainable_tiny_dir))
    base, model = load_for_training(config, plan_run(config))
    examples = encode(read_rows(tmp_path / "a" / "data.csv"), base.tokenizer,
                      config.prompt_template, config.max_seq_length, True).examples
    batch = collate(examples[:4], base.tokenizer.eos_token_id)
    rows: list[int] = []
    head = model.get_base_model().lm_head
    handle = head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    try:
        _, count = label_loss(model, batch)
    finally:
        handle.remove()
    answers = sum(len(e.input_ids) - e.prompt_len for e in examples[:4])
    assert rows == [count] and count == answers  # label + EOS tokens, nothing else


def test_resume_is_exact(tmp_path, trainable_tiny_dir):
    """6 steps in one run == 3 steps, checkpoint, resume for 3 (dropout on, so the RNG
    state must travel with the checkpoint)."""
    path = make_config(tmp_path / "r", trainable_tiny_dir, epochs=3, save_steps=3,
                       dropout=0.1, val_path="", val_split=0.0, eval_samples=0)
    whole = train(load_train_config(path), quiet=True)
    assert whole.metrics["steps"] == 6
    resumed = train(load_train_config(path, [
        f"resume_from={whole.output_dir / 'checkpoints' / 'step-3'}", "output_dir=runs/resumed"]),
        quiet=True)
    a, b = lora_weights(whole.adapter_dir), lora_weights(resumed.adapter_dir)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    with pytest.raises(InvalidOption, match="different batch_size"):
        train(load_train_config(path, [f"resume_from={whole.output_dir}/checkpoints/step-3",
                                       "output_dir=runs/mismatch", "batch_size=2"]),
              quiet=True)
    again = train(load_train_config(path, ["output_dir=runs/again"]), quiet=True)
    c = lora_weights(again.adapter_dir)
    assert all(torch.equal(a[k], c[k]) for k in a)  # same seed, same adapter


def test_init_from_continues_from_the_given_adapter(tmp_path, trainable_tiny_dir):
    first = train(load_train_config(make_config(tmp_path / "f", trainable_tiny_dir,
                                                eval_samples=0)), quiet=True)
    second = train(load_train_config(make_config(
        tmp_path / "g", trainable_tiny_dir, epochs=1, eval_samples=0,
        init_from=str(first.adapter_dir))), quiet=True)
    assert first.metrics["train_loss_initial"] > 5
    assert second.metrics["train_loss_initial"] < 0.2 * first.metrics["train_loss_initial"]


def test_publish_gate(tmp_path, trainable_tiny_dir, capsys):
    good = make_config(tmp_path / "gate", trainable_tiny_dir)
    assert cli(["train", "--config", str(good), "--quiet"]) == 0
    published = tmp_path / "published" / "gate"
    first_version = adapter_version(published)
    first_chrf = read_manifest(published / MANIFEST_FILE).metrics["val_chrf"]

    worse = ["--config", str(good), "--set", "epochs=1", "--set",
             "output_dir=runs/worse"]
    assert cli(["train", *worse]) == 3  # refused by the gate
    out = capsys.readouterr().out
    assert "not published" in out
    # the published version was scored in this run, at its own scale, on the same rows
    assert (f"the published version {first_version[:12]} at its weight_scale 1: validation "
            f"chrF {first_chrf:.2f} (measured now, on the same rows)") in out
    assert adapter_version(published) == first_version

    assert cli(["train", *worse, "--force"]) == 0
    assert read_manifest(published / MANIFEST_FILE).metrics["val_chrf"] < first_chrf
    assert adapter_version(published) != first_version
    assert adapter_version(published / "previous") == first_version  # kept for rollback


@pytest.mark.parametrize(("keys", "message"), [
    ({"lora_rnak": 8}, "unknown key 'lora_rnak'; did you mean 'lora_rank'"),
    ({"batch_size": "eight"}, "batch_size must be an integer"),
    ({"learning_rate": "fast"}, "learning_rate must be a number"),
    ({"target_modules": ["q_proj", "qq_proj"]}, "target_modules: unknown module"),
    ({"metadata_path": "missing.csv"}, "metadata_path: 'missing.csv' does not exist"),
    ({"max_seq_length": 4}, "cuts the whole answer of every training row"),
    ({"prompt_template": "no placeholder"}, "prompt_template"),
])
def test_config_errors_name_the_problem(tmp_path, trainable_tiny_dir, keys, message):
    path = make_config(tmp_path / "e", trainable_tiny_dir, **keys)
    with pytest.raises(InvalidOption, match=message):
        train(load_train_config(path), quiet=True)


def test_aliases_from_other_tools(tmp_path, trainable_tiny_dir):
    path = make_config(tmp_path / "al", trainable_tiny_dir)
    text = path.read_text().replace("lora_rank:", "lora_r:").replace("epochs:", "num_epochs:")
    path.write_text(text.replace("dropout: 0.0", "lora_dropout: 0.2"))
    config = load_train_config(path)
    assert (config.lora_rank, config.epochs, config.dropout) == (8, 60.0, 0.2)


@pytest.mark.parametrize(("content", "message"), [
    ("text,answer\nhi,there\n", "missing column 'label'"),
    ("text,label\nhi,there\nhello,\n", r"data.csv line 3: empty 'label'"),
    ("text,label\n", "no data rows"),
])
def test_data_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "data.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidOption, match=message):
        read_rows(path)


def test_data_accepts_bom_and_jsonl_and_refuses_bad_bytes(tmp_path):
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes("\ufefftext,label\n侬好,Hello\n".encode())
    assert [(r.text, r.label) for r in read_rows(csv_path)] == [("侬好", "Hello")]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"text": "侬好", "label": "Hello"}\n\n{"text": "再会", "label": "Bye"}\n')
    assert len(read_rows(jsonl)) == 2
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text,label\nok,fine\n\xff\xfe,oops\n")
    with pytest.raises(InvalidOption, match=r"bad\.csv line 3: not UTF-8"):
        read_rows(bad)


def test_early_stopping_publishes_the_best_checkpoint(tmp_path, trainable_tiny_dir):
    """Validation rows that contradict the training labels: the validation loss rises as
    training memorizes, so training stops early and the best (earliest) point is kept."""
    folder = tmp_path / "es"
    path = make_config(folder, trainable_tiny_dir, eval_every=4, early_stopping_patience=2,
                       eval_samples=0)
    labels = [label for _, label in ROWS]
    write_csv(folder / "val.csv", [(text, labels[(i + 3) % len(labels)])
                                   for i, (text, _) in enumerate(ROWS)])
    result = train(load_train_config(path), quiet=True)
    metrics = result.metrics
    assert metrics["steps"] < 120  # 60 epochs x 2 steps, stopped well before
    assert metrics["best_step"] < metrics["steps"]
    assert metrics["val_loss_best"] < metrics["val_loss_final"]
    best = lora_weights(result.output_dir / "best")
    served = lora_weights(result.adapter_dir)
    assert all(torch.equal(best[k], served[k]) for k in best)


def test_a_running_server_picks_up_a_published_adapter(tmp_path, trainable_tiny_dir):
    from protos.switchboard.v1 import switchboard_pb2 as pb
    from tests.service_fixtures import server_config, start_server

    routing = tmp_path / "routing.yaml"
    routing.write_text("default: base\n")
    root = tmp_path / "published"
    root.mkdir()
    server = start_server(server_config(trainable_tiny_dir, root, routing, metrics_port=-1))
    try:
        path = make_config(tmp_path / "fresh", trainable_tiny_dir, eval_samples=0)
        assert cli(["train", "--config", str(path), "--quiet"]) == 0
        server.watcher.poll_now()  # what the server's poller does every poll_interval_s
        text, label = ROWS[1]
        reply = server.stub().Generate(pb.GenerateRequest(text=text, dialect="fresh",
                                                          max_new_tokens=12), timeout=30)
        assert reply.adapter.version == adapter_version(root / "fresh")
        assert reply.text.strip() == label and reply.finish_reason == pb.FINISH_REASON_EOS
    finally:
        server.stop()


def test_set_overrides_replace_aliases_and_keep_strings_verbatim(tmp_path, trainable_tiny_dir):
    path = make_config(tmp_path / "ov", trainable_tiny_dir)
    config = load_train_config(path, ["lr=0.001", "lora_r=4", "prompt_template=Q: {text} A:"])
    assert (config.learning_rate, config.lora_rank) == (0.001, 4)
    assert config.prompt_template == "Q: {text} A:"
    with pytest.raises(InvalidOption, match="not a valid value"):
        load_train_config(path, ["epochs=[1"])


def test_gate_refuses_a_run_without_a_score_over_a_scored_version():
    from trainer.publish import gate

    digest = "0" * 64
    scored = AdapterManifest(name="x", prompt_template="{text}", base_fingerprint=digest,
                             files={"adapter_config.json": digest,
                                    "adapter_model.safetensors": digest},
                             metrics={"val_chrf": 40.0})
    assert "no validation chrF" in gate(scored, None, force=False)
    assert gate(scored, None, force=True) is None


def test_gate_compares_like_with_like():
    """The published version is compared as measured now at the scale it serves, never
    by the figure its manifest records (the shipped wuyu recorded 33.57, its chrF at scale
    1.0, while serving 0.6, where a retrained identical adapter scores 27.33)."""
    from trainer.publish import PublishedScore, gate

    digest = "0" * 64
    shipped = AdapterManifest(name="wuyu", prompt_template="{text}", base_fingerprint=digest,
                              files={"adapter_config.json": digest,
                                     "adapter_model.safetensors": digest},
                              default_weight_scale=0.6, metrics={"val_chrf": 33.57})
    now = PublishedScore(version="ab" * 32, weight_scale=0.6, val_chrf=27.33)
    assert gate(shipped, 27.33, force=False, published=now, new_scale=0.6) is None
    assert gate(shipped, 29.0, force=False, published=now, new_scale=0.7) is None
    refusal = gate(shipped, 27.0, force=False, published=now, new_scale=0.6)
    assert refusal == ("not published: validation chrF 27.00 at weight_scale 0.6 is below "
                       "the published version's 27.33 at its weight_scale 0.6 (abababababab; "
                       "both measured now, on the same rows) (use --force to publish anyway)")
    # A version that could not be measured (another base model, damaged files) protects
    # nothing; its recorded figure is not compared.
    assert gate(shipped, 20.0, force=False, published=None, new_scale=0.6) is None


def test_published_adapter_config_does_not_depend_on_set_order():
    """PEFT saves target_modules in set order; two runs of one config must publish the
    same bytes (and so the same adapter version)."""
    import json

    from trainer.publish import canonical_adapter_config

    one = json.dumps({"r": 16, "target_modules": ["v_proj", "q_proj", "k_proj"]}).encode()
    two = json.dumps({"target_modules": ["k_proj", "v_proj", "q_proj"], "r": 16}).encode()
    assert canonical_adapter_config(one) == canonical_adapter_config(two)
    assert json.loads(canonical_adapter_config(one))["target_modules"] == [
        "k_proj", "q_proj", "v_proj"]
    regex = json.dumps({"r": 8, "target_modules": "^.*q_proj$"}).encode()
    assert json.loads(canonical_adapter_config(regex))["target_modules"] == "^.*q_proj$"
