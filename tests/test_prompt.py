"""build_prompt: the one place an utterance becomes tokens, shared by trainer and server."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server.errors import PromptTemplateError
from server.formats.prompt import (
    DEFAULT_PROMPT_TEMPLATE,
    build_answer,
    build_prompt,
    render_prompt,
    validate_template,
)


@pytest.mark.parametrize(
    ("template", "count"),
    [("no placeholder", 0), ("{text} and {text}", 2), ("{TEXT}", 0), ("{ text }", 0)],
)
def test_template_needs_exactly_one_placeholder(template: str, count: int) -> None:
    with pytest.raises(PromptTemplateError, match=f"exactly once, found {count}"):
        validate_template(template)


def test_template_must_be_a_string() -> None:
    with pytest.raises(PromptTemplateError, match="must be a string, got int"):
        validate_template(3)  # type: ignore[arg-type]


def test_braces_are_literal_in_template_and_text() -> None:
    assert render_prompt("{{x}} {text} {y}", "a {text} {0}") == "{{x}} a {text} {0} {y}"


def test_utterance_whitespace_is_stripped() -> None:
    assert render_prompt("Q: {text}\nA:", "  侬好 \n") == "Q: 侬好\nA:"


def test_template_tokens(tokenizer) -> None:
    template = "Translate Wu dialect to English: {text}\n"
    ids = build_prompt(template, " 侬今朝吃饭伐? ", tokenizer)
    assert tokenizer.decode(ids) == "Translate Wu dialect to English: 侬今朝吃饭伐?\n"
    # SmolLM2 adds no BOS; the prompt is the rendered text and nothing else.
    assert ids[0] != tokenizer.bos_token_id
    assert ids == tokenizer.encode(render_prompt(template, "侬今朝吃饭伐?"),
                                   add_special_tokens=False)


def test_answer_ends_with_eos_and_follows_prompt(tokenizer) -> None:
    prompt = build_prompt(DEFAULT_PROMPT_TEMPLATE, "阿拉明朝见", tokenizer)
    answer = build_answer(" See you tomorrow. ", tokenizer)
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]) == "See you tomorrow."
    # Prompt tokens in a training row are exactly the tokens served at inference.
    assert (prompt + answer)[: len(prompt)] == prompt


def _fake_tokenizer(add_bos: bool, eos: int | None = 2) -> SimpleNamespace:
    return SimpleNamespace(
        add_bos_token=add_bos,
        bos_token_id=1,
        eos_token_id=eos,
        encode=lambda text, add_special_tokens: [ord(c) for c in text],
    )


def test_bos_prepended_only_when_tokenizer_adds_one() -> None:
    assert build_prompt("{text}", "ab", _fake_tokenizer(add_bos=True)) == [1, 97, 98]
    assert build_prompt("{text}", "ab", _fake_tokenizer(add_bos=False)) == [97, 98]


def test_answer_needs_an_eos_token() -> None:
    with pytest.raises(PromptTemplateError, match="no EOS token"):
        build_answer("x", _fake_tokenizer(add_bos=False, eos=None))
