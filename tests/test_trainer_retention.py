"""Retention in training, on the trainable tiny model: a deliberately over-fitted adapter
(learning rate 1e-2, 60 epochs on eight rows) costs the base model's other abilities;
the trainer measures that cost at every candidate scale, chooses a lower scale when one
keeps within the limits, and the gate refuses the adapter when none does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.cli import main as cli
from server.errors import InvalidOption
from server.formats.manifest import MANIFEST_FILE, read_manifest
from tests.test_trainer import make_config
from trainer.config import load_train_config
from trainer.scale_choice import RetentionLimits, choose


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def overfitted(folder: Path, base: Path, candidates: list[float]) -> Path:
    return make_config(folder, base, control_samples=12, scale_candidates=candidates)


def test_an_overfitted_adapter_is_published_at_a_lower_scale(tmp_path, trainable_tiny_dir,
                                                              capsys):
    config = overfitted(tmp_path / "loud", trainable_tiny_dir, [0.1, 0.25, 0.5, 1.0, 1.5])
    assert cli(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "loud"
    curve = json.loads((run / "scale_curve.json").read_text())
    at_one = curve["by_scale"]["1"]
    # the damage is detected at full scale, on every control set
    assert at_one["perplexity_increase_pct"] > 10 and not at_one["within_limits"], curve
    assert at_one["mandarin_chrf_drop"] > 2 and at_one["english_chrf_drop"] > 2, curve
    assert at_one["val_chrf"] > curve["base"]["val_chrf"]  # while the dialect is learned
    # a lower scale keeps within the limits, and the best of those is chosen
    chosen = curve["chosen_scale"]
    allowed = {s: p for s, p in curve["by_scale"].items() if p["within_limits"]}
    assert chosen is not None and chosen < 1 and f"{chosen:g}" in allowed
    assert curve["by_scale"][f"{chosen:g}"]["val_chrf"] == max(p["val_chrf"]
                                                               for p in allowed.values())
    # it is what the server will apply, and every report says so
    published = tmp_path / "published" / "loud"
    manifest = read_manifest(published / MANIFEST_FILE)
    assert manifest.default_weight_scale == chosen == manifest.metrics["weight_scale"]
    assert manifest.metrics["perplexity_increase_pct"] == \
        curve["by_scale"][f"{chosen:g}"]["perplexity_increase_pct"]
    for name in ("scale.png", "scale_curve.json", "metrics.json"):
        assert (published / name).stat().st_size > 100, name
    assert "loud: scale 1: val chrF 100.00" in out and "(over the limits)" in out
    assert f"publishing with weight_scale {chosen:g}" in out
    assert "published loud" in out and f"at weight_scale {chosen:g}" in out
    assert "perplexity_increase_pct" in out  # the summary table


def test_an_overfitted_adapter_with_no_safe_scale_is_refused(tmp_path, trainable_tiny_dir,
                                                             capsys):
    config = overfitted(tmp_path / "loud", trainable_tiny_dir, [1.0, 1.5])
    assert cli(["train", "--config", str(config), "--quiet"]) == 3
    out = capsys.readouterr().out
    assert "not published: no scale keeps the base model's abilities within the limits" in out
    assert "perplexity +" in out and "(use --force to publish anyway)" in out
    assert not (tmp_path / "published" / "loud").exists()

    assert cli(["train", "--config", str(config), "--quiet", "--force"]) == 0
    out = capsys.readouterr().out
    assert "published loud" in out and "(forced: no scale keeps" in out
    manifest = read_manifest(tmp_path / "published" / "loud" / MANIFEST_FILE)
    assert manifest.default_weight_scale == 1.0  # the configured one: nothing was chosen


def test_choice_rules() -> None:
    limits = RetentionLimits(max_control_chrf_drop=2, max_perplexity_increase_pct=10)

    def point(chrf: float, drop: float, ppl: float) -> dict[str, float]:
        return {"val_chrf": chrf, "mandarin_chrf_drop": drop, "english_chrf_drop": 0.0,
                "perplexity_increase_pct": ppl}

    curve = {"by_scale": {"0.5": point(30, 0, 1), "1": point(30, 1, 9),
                          "1.5": point(40, 2.5, 5)}}
    scale, why = choose(curve, limits)
    assert scale == 1.0 and "over the limits: 1.5" in why  # a tie goes to the scale nearest 1
    curve["by_scale"] = {"1": point(30, 0, 12), "1.5": point(40, 3, 5)}
    scale, why = choose(curve, limits)
    assert scale is None
    assert "1: perplexity +12.0% (limit 10%)" in why
    assert "1.5: Mandarin control chrF -3.0 (limit 2)" in why


@pytest.mark.parametrize("value, message", [
    ("[]", "scale_candidates must be a non-empty list"),
    ("[0.5, -1]", "scale_candidates must be a non-empty list"),
    ("[0.5, x]", "scale_candidates must be a number"),
])
def test_scale_candidates_are_checked(tmp_path, trainable_tiny_dir, value, message) -> None:
    config = make_config(tmp_path / "a", trainable_tiny_dir)
    with pytest.raises(InvalidOption, match=message.replace("[", r"\[")):
        load_train_config(config, [f"scale_candidates={value}"])
    assert load_train_config(config, ["scale_candidates=[0.5, 1]"]).scale_candidates == (0.5, 1.0)
