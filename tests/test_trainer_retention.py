"""Retention in training, on the trainable tiny model: a deliberately over-fitted adapter
(learning rate 1e-2, 60 epochs on eight rows) costs the base model's other abilities;
the trainer measures that cost at every candidate scale, chooses a lower scale when one
keeps within the limits, and the gate refuses the adapter when none does."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

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
    assert at_one["domain_perplexity_increase_pct"] > 10, curve  # in-domain text too
    assert curve["limits"]["max_general_perplexity_increase_pct"] == 10
    assert curve["limits"]["max_domain_perplexity_increase_pct"] is None  # reported only
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
    assert "in-domain perplexity +" in out and "general perplexity +" in out
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
    limits = RetentionLimits(max_control_chrf_drop=2, max_domain_perplexity_increase_pct=10)

    def point(chrf: float, drop: float, domain: float, general: float = 0.0
              ) -> dict[str, float]:
        return {"val_chrf": chrf, "mandarin_chrf_drop": drop, "english_chrf_drop": 0.0,
                "domain_perplexity_increase_pct": domain, "perplexity_increase_pct": general}

    curve = {"by_scale": {"0.5": point(30, 0, 1), "1": point(30, 1, 9),
                          "1.5": point(40, 2.5, 5)}}
    scale, why = choose(curve, limits)
    assert scale == 1.0 and "over the limits: 1.5" in why  # a tie goes to the scale nearest 1
    curve["by_scale"] = {"1": point(30, 0, 12), "1.5": point(40, 3, 5)}
    scale, why = choose(curve, limits)
    assert scale is None
    assert "1: in-domain perplexity +12.0% (limit 10%)" in why
    assert "1.5: Mandarin control chrF -3.0 (limit 2)" in why


def test_each_perplexity_limit_binds_when_set(tmp_path, trainable_tiny_dir) -> None:
    """The shipped curves at scale 1.0: general-prose perplexity +43%, in-domain (raw
    dialogue) +176%, every control chrF within its limit. By default general prose binds
    and in-domain perplexity is reported only (its measure is still open); a config that
    sets max_domain_perplexity_increase_pct makes it bind, and null for general prose
    (or the old key, max_perplexity_increase_pct, which names it) unbinds that."""
    at_one = {"val_chrf": 33.6, "mandarin_chrf_drop": -25.6, "english_chrf_drop": -7.4,
              "domain_perplexity_increase_pct": 176.2, "perplexity_increase_pct": 43.1}
    path = make_config(tmp_path / "a", trainable_tiny_dir)
    default = RetentionLimits.from_config(load_train_config(path))
    assert default == RetentionLimits() and default.max_domain_perplexity_increase_pct is None
    assert default.breaches(at_one) == ["general perplexity +43.1% (limit 10%)"]
    for key in ("max_general_perplexity_increase_pct", "max_perplexity_increase_pct"):
        limits = RetentionLimits.from_config(load_train_config(path, [f"{key}=null"]))
        assert limits.breaches(at_one) == [], key
    both = RetentionLimits.from_config(load_train_config(
        path, ["max_domain_perplexity_increase_pct=10"]))
    assert both.breaches(at_one) == ["in-domain perplexity +176.2% (limit 10%)",
                                     "general perplexity +43.1% (limit 10%)"]
    with pytest.raises(InvalidOption, match="max_domain_perplexity_increase_pct must be a "
                                            "finite number >= 0"):
        load_train_config(path, ["max_domain_perplexity_increase_pct=-1"])


def test_the_in_domain_dialogue_control_set() -> None:
    """A few hundred lines of customer-service dialogue in each script routed callers use,
    written for this project: none is a near copy of a row the adapters train, validate
    or test on, nor of the other control sets."""
    from server.service.config import REPO_ROOT
    from tests.test_dialect_data import MAX_JACCARD, grams, jaccard
    from trainer.retention import CONTROL_DIR, load_control_sets
    from trainer.rows import read_rows

    lines = [line for line in load_control_sets().domain.splitlines() if line.strip()]
    assert len(lines) >= 240 and len(set(lines)) == len(lines)
    def script(line: str) -> str:  # by marker characters: enough to count the sections
        if line.isascii():
            return "english"
        if any(c in line for c in "嘅咗唔係喺冇佢咩哋嚟啲個點電單幾畀嗰"):
            return "cantonese"
        wu = ("侬", "伐", "勿", "阿拉", "辣", "拨", "搿", "迭", "哪能", "辰光", "末", "个")
        if any(m in line for m in wu) and not any(c in line for c in "们这么的"):
            return "wu"
        return "mandarin"

    counts = {name: 0 for name in ("mandarin", "cantonese", "wu", "english")}
    for line in lines:
        counts[script(line)] += 1
    assert all(n >= 50 for n in counts.values()), counts
    others = [p for p in (REPO_ROOT / "adapters").glob("*/data/*.csv")]
    others += list(CONTROL_DIR.glob("*.csv"))
    seen = [grams(t) for p in others for r in read_rows(p) for t in (r.text, r.label)]
    worst = max((max(jaccard(grams(line), g) for g in seen), line) for line in lines)
    assert worst[0] <= MAX_JACCARD, worst


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


def test_choose_scale_records_the_figures_at_the_scale_it_writes(tmp_path, monkeypatch,
                                                                  trainable_tiny_dir) -> None:
    """``make eval --choose-scale`` used to change only default_weight_scale, leaving
    val_chrf at the scale it was trained at (the shipped wuyu: 33.57 at 1.0, served at
    0.6), which the publish gate then compared with the next run at its own scale. Now the
    manifest's figures are those at the scale it serves, and the model card says so."""
    import shutil

    import trainer.dialect_eval as dialect_eval
    from server.formats.manifest import AdapterManifest, weight_file_digests, write_manifest
    from tests.support import ALL_TARGETS, make_random_adapter

    folder = tmp_path / "wuyu"
    make_random_adapter(str(trainable_tiny_dir), folder, 8, ALL_TARGETS, seed=1)
    shutil.copyfile(make_config(tmp_path / "cfg", trainable_tiny_dir), folder / "train.yaml")
    write_manifest(folder, AdapterManifest(
        name="wuyu", prompt_template="Translate Wu dialect to English: {text}\n",
        base_fingerprint="0" * 64, files=weight_file_digests(folder), default_weight_scale=0.6,
        metrics={"val_chrf": 33.57, "val_chrf_adapter": 33.57, "steps": 222.0}))
    monkeypatch.setattr(dialect_eval, "ROOT", tmp_path)

    def point(chrf: float, domain: float) -> dict[str, float]:
        return {"val_chrf": chrf, "mandarin_chrf_drop": -20.0, "english_chrf_drop": -7.0,
                "perplexity_increase_pct": 19.0, "domain_perplexity_increase_pct": domain}

    curve = {"by_scale": {"0.6": point(27.33, 2.0), "0.8": point(30.26, 4.5),
                          "1": point(33.57, 12.0)},
             "chosen_scale": 0.8, "choice": "scale 0.8: validation chrF 30.26, the best "
                                            "within the retention limits (over the limits: 1)"}
    reloaded: list[str] = []
    gen = SimpleNamespace(cache=SimpleNamespace(reload=reloaded.append))
    assert dialect_eval.choose_scale(gen, "wuyu", curve) == 0.8  # type: ignore[arg-type]
    manifest = read_manifest(folder / MANIFEST_FILE)
    assert manifest.default_weight_scale == 0.8 == manifest.metrics["weight_scale"]
    assert manifest.metrics["val_chrf"] == 30.26  # not 33.57, the figure at 1.0
    assert manifest.metrics["val_chrf_adapter"] == 33.57 and manifest.metrics["steps"] == 222
    assert manifest.metrics["domain_perplexity_increase_pct"] == 4.5
    assert manifest.metrics["perplexity_increase_pct"] == 19.0
    assert reloaded == ["wuyu"]  # the evaluation goes on with the new version
    card = (folder / "README.md").read_text()
    assert "default weight scale: 0.8 (" in card and "| val_chrf | 30.26 |" in card
