"""Incremental detokenization: never a broken character, stop strings held back."""

from __future__ import annotations

import pytest

from server.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer


def _stream(tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], str, bool]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    chunks = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        chunks.append(detok.add(token))
        if detok.stopped:
            break
    chunks.append(detok.finish())
    return [c for c in chunks if c], detok.text, detok.stopped


@pytest.mark.parametrize(
    "text",
    [
        "侬今朝吃饭伐？阿拉去外滩白相。",
        "你食咗飯未呀？我哋聽日喺銅鑼灣見。",
        "Order 4471 → 上海 ✓ done 🙂",
    ],
)
def test_multibyte_characters_are_never_split(tokenizer, text: str) -> None:
    # These characters span several byte-level tokens each.
    assert len(tokenizer.encode(text, add_special_tokens=False)) > len(text) // 2
    chunks, final, stopped = _stream(tokenizer, text)
    assert not stopped
    assert all(REPLACEMENT not in chunk for chunk in chunks)
    assert "".join(chunks) == final == text


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("Hello there. END of the call", ("END",), "Hello there. "),
        ("The answer is 42.\nQuestion: next", ("\nQuestion:",), "The answer is 42."),
        ("侬好，再会。下一位", ("再会",), "侬好，"),
        ("no stop string here", ("zzz", "yyy"), "no stop string here"),
        ("stop at the first of two: B then A", ("A", "B"), "stop at the first of two: "),
    ],
)
def test_stop_strings_are_excluded(tokenizer, text, stop, expected) -> None:
    chunks, final, stopped = _stream(tokenizer, text, stop)
    assert final == expected
    assert "".join(chunks) == expected
    assert stopped == (expected != text)


def test_possible_stop_prefix_is_held_back(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, ("ENDING",))
    emitted = "".join(detok.add(t) for t in tokenizer.encode("go END", add_special_tokens=False))
    assert emitted == "go "  # "END" might become "ENDING": not emitted yet
    assert detok.finish() == "END"  # generation ended without the stop string
    assert detok.text == "go END"


def test_windowed_decoding_equals_decoding_everything(tokenizer) -> None:
    import random

    rng = random.Random(0)
    texts = [
        "侬今朝吃饭伐？阿拉去外滩白相。Hello 🙂 world",
        "你食咗飯未呀？聽日喺銅鑼灣見。 12:30 → ok",
    ]
    for trial in range(200):
        if trial % 2:  # arbitrary token streams, broken characters included
            ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))]
        else:
            ids = tokenizer.encode(rng.choice(texts), add_special_tokens=False)
        detok = IncrementalDetokenizer(tokenizer)
        streamed = "".join(detok.add(t) for t in ids) + detok.finish()
        assert streamed == tokenizer.decode(ids, skip_special_tokens=True)
