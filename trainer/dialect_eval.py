"""Evaluate shipped dialect adapters on their held-out test sets (``make eval``).

For each adapter ``adapters/<name>/`` with ``data/test.csv``, chrF and BLEU (sacrebleu)
and the share of distinct outputs for:

1. the base model with the adapter's prompt template;
2. the base model with a 5-shot prompt (five training pairs, seeded, then the item);
3. the best constant answer: the one training label that scores highest on the test set;
4. the adapter at weight scale 1.0;
5. the adapter at its manifest's ``default_weight_scale``;
6. each other shipped adapter on this test set (routing to the wrong dialect).

Before that, the scale curve (``trainer.scale_choice``): validation chrF on
``data/val.csv`` and retention on the control sets (``trainer.retention``) at every
candidate scale of the adapter's ``train.yaml``, with its limits; ``scale.png`` beside
the adapter.

Generation and scoring are ``trainer.scoring``'s, the same as the trainer's publish gate
(the server's own engine, batched, greedy, ``max_new_tokens`` 48, every output cut at its
first newline), so what is measured is what the server would answer. ``--choose-scale``
writes the scale with the best validation chrF within the retention limits to the
manifest as ``default_weight_scale`` before the test-set runs.
Results go to ``adapters/<name>/eval.json`` and the table in ``adapters/README.md``.

    python -m trainer.dialect_eval [--adapter wuyu] [--choose-scale]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from server.basemodel import load_base_model
from server.formats.files import replace_marked_block
from server.formats.manifest import (
    MANIFEST_FILE,
    adapter_version,
    read_manifest,
    write_manifest,
)
from server.formats.prompt import build_prompt, render_prompt
from server.service.config import REPO_ROOT
from trainer.config import load_train_config
from trainer.publish import model_card
from trainer.retention import load_control_sets
from trainer.rows import Row, read_rows
from trainer.scale_choice import RetentionLimits, plot_scale_curve, scale_curve, summary_line
from trainer.scoring import EngineGenerator, scores, sentence_chrf

ROOT = REPO_ROOT / "adapters"
MAX_NEW_TOKENS = 48
SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)
TABLE_BEGIN = "<!-- eval-table:begin -->"
TABLE_END = "<!-- eval-table:end -->"


def open_generator() -> EngineGenerator:
    """The default base model, served by the engine over ``adapters/``."""
    base = load_base_model("default", dtype="float32")
    return EngineGenerator(base.model, base.tokenizer, base.base_fingerprint, [ROOT],
                           MAX_NEW_TOKENS)


def few_shot_prompt(template: str, shots: list[Row], text: str) -> str:
    examples = "".join(render_prompt(template, s.text) + s.label + "\n" for s in shots)
    return examples + render_prompt(template, text)


def best_constant(train: list[Row], references: list[str]) -> tuple[str, dict[str, float]]:
    best_label, best = "", {"chrf": -1.0}
    for label in sorted({r.label for r in train}):
        result = scores([label] * len(references), references)
        if result["chrf"] > best["chrf"]:
            best_label, best = label, result
    return best_label, best


def scale_settings(folder: Path) -> tuple[RetentionLimits, list[float], int | None]:
    """The retention limits, candidate scales and control rows from the adapter's
    ``train.yaml`` (the trainer's defaults when it has none)."""
    config = load_train_config(folder / "train.yaml") if (folder / "train.yaml").exists() \
        else None
    if config is None:
        return RetentionLimits(), sorted({*SCALES, 1.0}), None
    limits = RetentionLimits.from_config(config)
    return limits, sorted({*config.scale_candidates, 1.0}), config.control_samples or None


def measure_scale_curve(gen: EngineGenerator, name: str) -> dict[str, Any]:
    """Validation chrF (``data/val.csv``) and retention at every candidate scale, the
    choice under the limits, and ``scale.png``."""
    folder = ROOT / name
    manifest = read_manifest(folder / MANIFEST_FILE)
    limits, scales, samples = scale_settings(folder)
    curve = scale_curve(gen, manifest.prompt_template, name, read_rows(folder / "data" /
                                                                       "val.csv"),
                        load_control_sets(), scales, limits, samples=samples)
    plot_scale_curve(folder / "scale.png", curve,
                     f"{name}: validation chrF and retention by weight_scale")
    for scale in scales:
        print(f"{name}: {summary_line(curve, scale)}", flush=True)
    return curve


def chosen_metrics(curve: dict[str, Any], scale: float) -> dict[str, float]:
    """The manifest's figures at ``scale``, as the trainer records them at the scale it
    publishes: a manifest's ``val_chrf`` is always at its ``default_weight_scale``."""
    point = curve["by_scale"][f"{scale:g}"]
    out = {"weight_scale": scale, "val_chrf": point["val_chrf"],
           "control_mandarin_chrf_drop": point["mandarin_chrf_drop"],
           "control_english_chrf_drop": point["english_chrf_drop"],
           "perplexity_increase_pct": point["perplexity_increase_pct"]}
    if "domain_perplexity_increase_pct" in point:
        out["domain_perplexity_increase_pct"] = point["domain_perplexity_increase_pct"]
    return out


def choose_scale(gen: EngineGenerator, name: str, curve: dict[str, Any]) -> float:
    """Write the curve's chosen scale into the manifest, with the figures at it (kept as is
    when none is within the limits); the model card follows."""
    folder = ROOT / name
    manifest = read_manifest(folder / MANIFEST_FILE)
    chosen = curve["chosen_scale"]
    if chosen is None:
        print(f"{name}: {curve['choice']}; default_weight_scale stays "
              f"{manifest.default_weight_scale:g}", flush=True)
        return manifest.default_weight_scale
    metrics = {**manifest.metrics, **chosen_metrics(curve, float(chosen))}
    if chosen != manifest.default_weight_scale or metrics != manifest.metrics:
        write_manifest(folder, replace(manifest, default_weight_scale=chosen, metrics=metrics))
        gen.cache.reload(name)  # the manifest changed: a new version
        if (folder / "train.yaml").exists():
            card = model_card(load_train_config(folder / "train.yaml"), metrics,
                              adapter_version(folder), float(chosen))
            (folder / "README.md").write_text(card, encoding="utf-8")
    print(f"{name}: {curve['choice']}; default_weight_scale = {chosen:g}", flush=True)
    return float(chosen)


def evaluate(gen: EngineGenerator, name: str, others: list[str],
             curve: dict[str, Any]) -> dict[str, Any]:
    folder = ROOT / name
    manifest = read_manifest(folder / MANIFEST_FILE)
    template = manifest.prompt_template
    train = read_rows(folder / "data" / "train.csv")
    test = read_rows(folder / "data" / "test.csv")
    refs = [r.label for r in test]
    prompts = [build_prompt(template, r.text, gen.tokenizer) for r in test]
    shots = random.Random(0).sample(train, min(5, len(train)))
    few_shot = [gen.tokenizer.encode(few_shot_prompt(template, shots, r.text),
                                     add_special_tokens=False) for r in test]
    pending = {  # every system submitted before any is collected: full batches
        "base": gen.submit(prompts, None, 0.0),
        "base_5shot": gen.submit(few_shot, None, 0.0),
        "adapter_scale_1": gen.submit(prompts, name, 1.0),
        "adapter_default_scale": gen.submit(prompts, name, manifest.default_weight_scale),
    }
    for other in others:
        other_template = read_manifest(ROOT / other / MANIFEST_FILE).prompt_template
        other_prompts = [build_prompt(other_template, r.text, gen.tokenizer) for r in test]
        pending[f"wrong_adapter_{other}"] = gen.submit(other_prompts, other, 1.0)
    outputs = {key: gen.collect(handles) for key, handles in pending.items()}
    constant_label, constant = best_constant(train, refs)
    rows = {key: scores(value, refs) for key, value in outputs.items()}
    rows["best_constant"] = constant
    base_out, adapter_out = outputs["base"], outputs["adapter_default_scale"]
    per_item = [(sentence_chrf(a, ref) - sentence_chrf(b, ref), i)
                for i, (a, b, ref) in enumerate(zip(adapter_out, base_out, refs, strict=True))]
    wins = [i for gain, i in sorted(per_item, reverse=True)[:3] if gain > 0]
    fails = sorted(range(len(test)), key=lambda i: max(sentence_chrf(adapter_out[i], refs[i]),
                                                       sentence_chrf(base_out[i], refs[i])))[:3]

    def sample(i: int) -> dict[str, str]:
        return {"text": test[i].text, "reference": refs[i], "base": base_out[i],
                "adapter": adapter_out[i]}

    result = {"adapter": name, "version_manifest_scale": manifest.default_weight_scale,
              "test_rows": len(test), "max_new_tokens": MAX_NEW_TOKENS, "rows": rows,
              "best_constant_label": constant_label, "shots": [s.text for s in shots],
              "adapter_right_base_wrong": [sample(i) for i in wins],
              "both_fail": [sample(i) for i in fails], "scale_curve": curve,
              "outputs": outputs}
    (folder / "eval.json").write_text(json.dumps(result, ensure_ascii=False, indent=2))
    return result


def table(results: list[dict[str, Any]]) -> str:
    labels = [("base", "(1) base model, same prompt"), ("base_5shot", "(2) base model, 5-shot"),
              ("best_constant", "(3) best constant answer"),
              ("adapter_scale_1", "(4) adapter, scale 1.0"),
              ("adapter_default_scale", "(5) adapter, default scale")]
    lines = ["| test set | system | chrF | BLEU | distinct outputs |",
             "| --- | --- | --- | --- | --- |"]
    for result in results:
        name = result["adapter"]
        rows = result["rows"]
        entries = [(key, label) for key, label in labels]
        entries += [(k, f"(6) `{k.removeprefix('wrong_adapter_')}` adapter (wrong dialect)")
                    for k in rows if k.startswith("wrong_adapter_")]
        for key, label in entries:
            r = rows[key]
            scale = f" ({result['version_manifest_scale']:g})" if key.endswith("default_scale") \
                else ""
            lines.append(f"| {name} ({result['test_rows']}) | {label}{scale} | {r['chrf']:.1f} | "
                         f"{r['bleu']:.1f} | {r['distinct'] * 100:.0f}% |")
    return "\n".join(lines)


def curve_table(results: list[dict[str, Any]]) -> str:
    """Validation chrF and retention per scale, each adapter's chosen scale in bold."""
    lines = ["| adapter | weight_scale | val chrF | Mandarin control chrF (Δ) | "
             "English control chrF (Δ) | in-domain perplexity (Δ) | general-prose "
             "perplexity (Δ) | within limits |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        curve, name = result["scale_curve"], result["adapter"]
        base = curve["base"]
        lines.append(f"| {name} | base model | {base['val_chrf']:.1f} | "
                     f"{base['mandarin_chrf']:.1f} | {base['english_chrf']:.1f} | "
                     f"{base.get('domain_perplexity', float('nan')):.2f} | "
                     f"{base['perplexity']:.2f} | |")
        for key in sorted(curve["by_scale"], key=float):
            p = curve["by_scale"][key]
            scale = f"**{key}** (chosen)" if curve["chosen_scale"] is not None and \
                float(key) == curve["chosen_scale"] else key
            lines.append(
                f"| {name} | {scale} | {p['val_chrf']:.1f} | {p['mandarin_chrf']:.1f} "
                f"({-p['mandarin_chrf_drop']:+.1f}) | {p['english_chrf']:.1f} "
                f"({-p['english_chrf_drop']:+.1f}) | "
                f"{p.get('domain_perplexity', float('nan')):.2f} "
                f"({p.get('domain_perplexity_increase_pct', float('nan')):+.1f}%) | "
                f"{p['perplexity']:.2f} ({p['perplexity_increase_pct']:+.1f}%) | "
                f"{'yes' if p['within_limits'] else 'no'} |")
    return "\n".join(lines)


def samples_markdown(results: list[dict[str, Any]]) -> str:
    parts = []
    for result in results:
        for key, title in (("adapter_right_base_wrong", "adapter right, base wrong"),
                           ("both_fail", "both fail")):
            parts.append(f"\n**{result['adapter']}: {title}**\n")
            parts.append("| caller said | reference | base | adapter |\n| --- | --- | --- | --- |")
            for s in result[key]:
                cells = [s[k].replace("|", "\\|") for k in ("text", "reference", "base",
                                                            "adapter")]
                parts.append("| " + " | ".join(cells) + " |")
    return "\n".join(parts)


def update_readme(results: list[dict[str, Any]]) -> None:
    """Replace the text between the markers in ``adapters/README.md`` (or append it)."""
    readme = ROOT / "README.md"
    limits = results[0]["scale_curve"]["limits"]
    plots = " ".join(f"![{r['adapter']}]({r['adapter']}/scale.png)" for r in results)
    rules = []
    for key, what in (("max_domain_perplexity_increase_pct", "in-domain"),
                      ("max_general_perplexity_increase_pct", "general-prose")):
        limit = limits.get(key)
        rules.append(f"{what} perplexity reported, not binding" if limit is None
                     else f"{what} perplexity increase ≤ {limit:g}%")
    block = (f"{TABLE_BEGIN}\n\n{table(results)}\n\n"
             f"Validation chrF (`data/val.csv`) and retention by `weight_scale`: chrF on the "
             f"control sets through the adapter's template (Δ against the base model), "
             f"perplexity on the in-domain dialogue and on general prose; limits (each "
             f"adapter's `train.yaml`, the trainer's defaults): control chrF drop ≤ "
             f"{limits['max_control_chrf_drop']:g} points, {rules[0]}, {rules[1]}. The "
             f"chosen scale is the one the manifest serves by default.\n\n"
             f"{curve_table(results)}\n\n{plots}\n\n"
             f"Samples (default scale; outputs cut at the first newline):\n"
             f"{samples_markdown(results)}\n\n{TABLE_END}")
    replace_marked_block(readme, TABLE_BEGIN, TABLE_END, block, "Evaluation on the test sets")


def shipped() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir()
                  if (p / MANIFEST_FILE).exists() and (p / "data" / "test.csv").exists())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.dialect_eval")
    parser.add_argument("--adapter", action="append", help="default: every shipped adapter")
    parser.add_argument("--choose-scale", action="store_true",
                        help="write the scale with the best validation chrF within the "
                             "retention limits (train.yaml) into the manifest")
    parser.add_argument("--compare-with", type=Path, metavar="EVAL_JSON",
                        help="an earlier eval.json of the same adapter: print the test chrF "
                             "difference, exit 1 if it is over 2 points (make reproduce)")
    args = parser.parse_args(argv)
    names = args.adapter or shipped()
    if not names:
        print("error: no adapter with a manifest and data/test.csv in adapters/",
              file=sys.stderr)
        return 2
    gen = open_generator()
    try:
        curves = {name: measure_scale_curve(gen, name) for name in names}
        if args.choose_scale:
            for name in names:
                choose_scale(gen, name, curves[name])
        everyone = shipped()
        results = [evaluate(gen, name, [o for o in everyone if o != name], curves[name])
                   for name in names]
    finally:
        gen.close()
    if sorted(names) == everyone:
        update_readme(results)
    print(table(results))
    if args.compare_with is not None:
        return compare(json.loads(args.compare_with.read_text(encoding="utf-8")), results[0])
    return 0


def compare(before: dict[str, Any], after: dict[str, Any], tolerance: float = 2.0) -> int:
    """Print how a retrained adapter's test chrF compares with the earlier one's."""
    worst = 0.0
    for key in ("adapter_scale_1", "adapter_default_scale"):
        old, new = before["rows"][key]["chrf"], after["rows"][key]["chrf"]
        worst = max(worst, abs(new - old))
        print(f"{after['adapter']} {key}: test chrF {old:.2f} before, {new:.2f} now "
              f"({new - old:+.2f})")
    verdict = "within" if worst <= tolerance else "NOT within"
    print(f"{after['adapter']}: reproduced {verdict} {tolerance:g} chrF points")
    return 0 if worst <= tolerance else 1


if __name__ == "__main__":
    raise SystemExit(main())
