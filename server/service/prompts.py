"""A call's prompt tokens, made off the event loop.

Tokenizing is the one CPU-heavy thing a call needs before it reaches the engine, and
inputs may be up to ``max_message_bytes`` (1 MiB): done on the asyncio loop that serves
gRPC, HTTP and health, a long input stalls every other call and health probe for as long
as the tokenizer runs. So the template is rendered and tokenized on a small bounded pool
of threads, and an input too long to fit ``max_model_len`` whatever its tokens is refused
by its length in characters before any tokenizing.

The character bound: no token of the vocabulary covers more than ``longest_token``
characters of text (a byte-level BPE token's string has one character per byte, a
SentencePiece piece one per character), so a text of more than ``max_model_len *
longest_token`` characters needs more than ``max_model_len`` tokens. A tokenizer that
normalizes its input may compose characters (NFC turns two code points into one); for
those the bound is widened by :data:`NORMALIZER_SLACK`. Tokenizers whose vocabulary
cannot be read get no bound (the engine's token check still applies).

Under that bound a text can still hold tens of thousands of tokens, and turning them into
Python ids holds the GIL (about 14 ms for 20,000 Chinese characters, a stall the loop
feels even from another thread). So a long text's first ``PREFIX_CHARS_PER_TOKEN *
max_model_len`` characters are tokenized first: when they alone give more than
``max_model_len`` tokens (plus :data:`CUT_SLACK` for the word the cut may split), the
whole cannot fit and the rest is never tokenized.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import Any

from server.errors import InvalidRequest, PromptTemplateError, SwitchboardError
from server.formats.prompt import build_prompt

NORMALIZER_SLACK = 4
"""How much a normalizing tokenizer's character bound is widened."""

PREFIX_CHARS_PER_TOKEN = 4
"""Characters per allowed token in the prefix tokenized first (see the docstring)."""
CUT_SLACK = 8
"""Tokens a cut in the middle of a word may add to the prefix's count."""

PROMPT_THREADS = 2
"""Threads that tokenize calls: tokenizing is CPU work, more threads than cores buy
nothing; a burst of calls waits its turn here instead of on the event loop."""


class InputKind(StrEnum):
    TEXT = "text"
    PROMPT = "prompt"
    MESSAGES = "messages"


class TemplateSource(StrEnum):
    ADAPTER = "adapter"
    ROUTING_TABLE = "routing_table"
    NONE = "none"
    CHAT = "chat"


def longest_token_chars(tokenizer: Any) -> int | None:
    """The most characters of text one token can cover (see the module's docstring),
    or None when the tokenizer's vocabulary cannot be read."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    if not vocab:
        return None
    longest = max(len(piece) for piece in vocab)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(backend, "normalizer", None) is not None:
        longest *= NORMALIZER_SLACK
    return longest


class PromptMaker:
    """Renders a call's input through its template into token ids on its own threads."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        longest = longest_token_chars(tokenizer)
        self.max_chars = None if longest is None else max_model_len * longest
        """Inputs longer than this many characters cannot fit ``max_model_len``."""
        self.max_model_len = max_model_len
        self._pool = ThreadPoolExecutor(PROMPT_THREADS, thread_name_prefix="tokenize")

    async def tokens(self, call: Any, manifest: Any, table_template: str
                     ) -> tuple[list[int], TemplateSource, str]:
        """The prompt ids of ``call`` (a dispatch ``Call``), where the template came from,
        and the template; InvalidRequest for an input that cannot fit."""
        self.check_length(call)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._tokens, call, manifest,
                                          table_template)

    def check_length(self, call: Any) -> None:
        """Refuse, by characters alone, an input that needs more than max_model_len
        tokens: nothing of it is tokenized."""
        if self.max_chars is None:
            return
        chars = len(call.text) + sum(len(content) for _, content in call.messages)
        if chars > self.max_chars:
            field = "messages" if call.messages else "text"
            raise InvalidRequest(
                f"{field}: {chars} characters cannot fit max_model_len "
                f"{self.max_model_len} tokens (at most {self.max_chars} characters)",
                param=field)

    def _check_prefix(self, text: str, field: str) -> None:
        """Refuse a long text whose prefix alone holds more than max_model_len tokens."""
        prefix = PREFIX_CHARS_PER_TOKEN * self.max_model_len
        if len(text) <= prefix:
            return
        counted = len(self.tokenizer.encode(text[:prefix], add_special_tokens=False))
        if counted > self.max_model_len + CUT_SLACK:
            raise InvalidRequest(
                f"{field}: more than {counted - CUT_SLACK} tokens in its first {prefix} of "
                f"{len(text)} characters exceeds max_model_len {self.max_model_len}",
                param=field)

    def _tokens(self, call: Any, manifest: Any, table_template: str
                ) -> tuple[list[int], TemplateSource, str]:
        if call.kind in (InputKind.TEXT, InputKind.PROMPT):
            self._check_prefix(call.text, call.kind.value)
        if call.kind == InputKind.TEXT:
            if manifest is not None:
                template, source = manifest.prompt_template, TemplateSource.ADAPTER
            else:
                template, source = table_template, TemplateSource.ROUTING_TABLE
            return self._templated(template, call.text), source, template
        if call.kind == InputKind.PROMPT:
            ids: list[int] = self.tokenizer.encode(call.text, add_special_tokens=False)
            return ids, TemplateSource.NONE, ""
        if manifest is not None:
            return self._adapter_chat(call.messages, manifest.prompt_template)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequest("messages: this base model's tokenizer has no chat template")
        chat = [{"role": role, "content": content} for role, content in call.messages]
        ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        return list(ids), TemplateSource.CHAT, ""

    def _adapter_chat(self, messages: tuple[tuple[str, str], ...], template: str
                      ) -> tuple[list[int], TemplateSource, str]:
        """A conversation for an adapter with a prompt template: the adapter was trained
        on single utterances in that template, not on the base model's chat format, so
        its last user message goes through the template, exactly as ``text`` would.
        System and earlier messages are not part of what it was trained on and are not
        sent to it."""
        last = next((content for role, content in reversed(messages) if role == "user"),
                    None)
        if last is None:
            raise InvalidRequest("messages: an adapter's template needs a user message; "
                                 "none was given", param="messages")
        return self._templated(template, last), TemplateSource.ADAPTER, template

    def _templated(self, template: str, text: str) -> list[int]:
        try:
            return build_prompt(template, text, self.tokenizer)
        except PromptTemplateError as exc:  # a bad template is the server's problem
            raise SwitchboardError(f"prompt template of the route is invalid: {exc}") \
                from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
