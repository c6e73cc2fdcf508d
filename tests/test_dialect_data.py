"""The shipped dialect datasets: sizes, format, and a test set training never saw."""

from __future__ import annotations

import pytest

from server.service.config import REPO_ROOT
from trainer.rows import read_rows

DIALECTS = ("wuyu", "cantonese")
MAX_JACCARD = 0.7


def grams(text: str) -> set[str]:
    return {text[i : i + 3] for i in range(len(text) - 2)} or {text}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b)


@pytest.mark.parametrize("name", DIALECTS)
def test_dataset_sizes_and_format(name):
    folder = REPO_ROOT / "adapters" / name / "data"
    splits = {split: read_rows(folder / f"{split}.csv") for split in ("train", "val", "test")}
    assert sum(len(rows) for rows in splits.values()) >= 300
    assert len(splits["test"]) >= 60
    texts = [row.text for rows in splits.values() for row in rows]
    assert len(texts) == len(set(texts)), "an utterance appears twice"
    assert (REPO_ROOT / "adapters" / name / "DATA.md").exists()


@pytest.mark.parametrize("name", DIALECTS)
def test_no_test_utterance_is_a_near_copy_of_a_training_one(name):
    folder = REPO_ROOT / "adapters" / name / "data"
    train = [grams(r.text) for r in read_rows(folder / "train.csv")]
    worst = max((jaccard(grams(r.text), t), r.text) for r in read_rows(folder / "test.csv")
                for t in train)
    assert worst[0] <= MAX_JACCARD, f"test utterance {worst[1]!r} has 3-gram Jaccard {worst[0]:.2f}"


def test_reproduce_comparison_passes_within_two_chrf_points(capsys):
    from trainer.dialect_eval import compare

    def result(scale_1: float, default: float) -> dict:
        return {"adapter": "wuyu", "rows": {"adapter_scale_1": {"chrf": scale_1},
                                            "adapter_default_scale": {"chrf": default}}}

    assert compare(result(20.0, 21.0), result(21.5, 19.2)) == 0
    assert "within 2 chrF points" in capsys.readouterr().out
    assert compare(result(20.0, 21.0), result(20.0, 18.9)) == 1
    assert "NOT within" in capsys.readouterr().out
