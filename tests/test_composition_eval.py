"""make eval-composition's scoring rules (trainer/composition_eval.py), and its data:
term accuracy counts expected terms case folded, the pack scale is the best term
accuracy among scale pairs that cost the dialect at most a chrF point on validation."""

from __future__ import annotations

from trainer.composition_eval import (
    DIALECTS,
    PACK,
    PACK_SCALES,
    ROOT,
    TermRow,
    choose_pair,
    composition_pairs,
    pair_key,
    read_term_rows,
    term_accuracy,
)


def test_term_accuracy_counts_every_expected_term() -> None:
    rows = [TermRow("a", "x", ("mobile data", "top-up")), TermRow("b", "y", ("plan",))]
    assert term_accuracy(["My Mobile Data ran out", "a new plan"], rows) == 66.67
    assert term_accuracy(["", ""], rows) == 0.0


def test_the_scales_keep_the_dialect_within_one_point() -> None:
    pairs = [(d, p) for d in (0.6, 0.5, 0.4) for p in (0.25, 0.5)]
    assert composition_pairs(0.6) == [(0.6, p) for p in PACK_SCALES]
    terms = {pair_key(d, p): {"term_accuracy": 100 * p + 10 * d} for d, p in pairs}
    own = {pair_key(d, p): {"chrf": 30.0 - 4 * p + 2 * (d - 0.6)} for d, p in pairs}
    own["dialect"] = {"chrf": 30.0}
    pair, why = choose_pair(pairs, terms, own)
    assert pair == (0.6, 0.25) and "validation term accuracy" in why  # 0.5 costs 2 points
    own = {key: {"chrf": 20.0} for key in own} | {"dialect": {"chrf": 30.0}}
    pair, why = choose_pair(pairs, terms, own)
    assert pair[1] == 0.25 and "no pair keeps" in why


def test_the_term_sets_are_complete() -> None:
    for dialect in DIALECTS:
        test = read_term_rows(ROOT / PACK / "data" / f"test_{dialect}.csv")
        val = read_term_rows(ROOT / PACK / "data" / f"val_{dialect}.csv")
        assert len(test) >= 40 and len(val) >= 20
        for row in test + val:
            assert row.terms and all(t.casefold() in row.label.casefold() for t in row.terms)
        assert not {r.text for r in test} & {r.text for r in val}
