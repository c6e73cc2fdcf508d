"""The single place where a caller's utterance becomes prompt tokens.

The trainer and the server both call :func:`build_prompt`, so they cannot disagree on
BOS, whitespace or where the answer starts. The rules:

* A template holds exactly one ``{text}`` placeholder; everything else is literal text
  (no ``str.format`` semantics, so braces in a template or an utterance are harmless).
* The utterance is stripped of surrounding whitespace before it is inserted.
* The filled template is tokenized as one string without special tokens; a BOS token
  is prepended only when the tokenizer is configured to add one (SmolLM2 is not).
* The answer starts right after the last prompt token. Training appends the answer's
  tokens (tokenized on their own, see :func:`build_answer`) and EOS, so prompt tokens
  are byte-for-byte the ones the server feeds at inference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.errors import PromptTemplateError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PLACEHOLDER = "{text}"
# Neutral on purpose: the fallback for a routing table or a training config that sets no
# template must not claim a dialect or a task (it is the caller's words and a newline).
DEFAULT_PROMPT_TEMPLATE = "{text}\n"


def validate_template(template: str) -> str:
    """Return ``template`` unchanged if it holds exactly one ``{text}``, else raise."""
    if not isinstance(template, str):
        kind = type(template).__name__
        raise PromptTemplateError(f"prompt template must be a string, got {kind}")
    count = template.count(PLACEHOLDER)
    if count != 1:
        raise PromptTemplateError(
            f"prompt template must contain {PLACEHOLDER} exactly once, found {count}"
        )
    return template


def render_prompt(template: str, text: str) -> str:
    """The prompt string: ``template`` with the stripped utterance in place of ``{text}``."""
    head, tail = validate_template(template).split(PLACEHOLDER)
    return head + text.strip() + tail


def _wants_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None


def build_prompt(template: str, text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of the prompt for utterance ``text`` wrapped in ``template``."""
    ids: list[int] = tokenizer.encode(render_prompt(template, text), add_special_tokens=False)
    if _wants_bos(tokenizer):
        ids.insert(0, int(tokenizer.bos_token_id))  # type: ignore[arg-type]
    return ids


def build_answer(label: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids the model should produce after the prompt: the label, then EOS."""
    if tokenizer.eos_token_id is None:
        raise PromptTemplateError("tokenizer has no EOS token; the model could not learn to stop")
    ids: list[int] = tokenizer.encode(label.strip(), add_special_tokens=False)
    ids.append(int(tokenizer.eos_token_id))
    return ids
