"""Incremental detokenization that is UTF-8 safe and stop-string aware.

A Chinese character spans several byte-level BPE tokens in SmolLM2's tokenizer; until
its last byte arrives the decoded text ends in U+FFFD, so that tail is held back. Text
that could be the beginning of a stop string is held back too, so the streamed chunks
always concatenate to exactly the final (unary) text, stop string excluded.

With ``min_tokens`` (vLLM's semantics), a stop string ends the reply only if it is
completed after the first ``min_tokens`` tokens: one lying wholly in the text of those
tokens is part of the reply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


def _held_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = (),
                 min_tokens: int = 0) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._min_tokens = min_tokens
        self._stop_from = 0  # a stop string must end after this character to count
        self._max_stop = max((len(s) for s in stop), default=0)
        self.token_ids: list[int] = []
        self._emitted = 0  # characters of the decoded text already returned
        self._searched = 0  # stop strings cannot start before this character
        self.stopped = False
        self.text = ""  # everything emitted so far
        # Windowed decoding: text of token_ids[:_read] is final in _decoded; only the
        # window from _prefix on is decoded again (the prefix tokens give tokenizers that
        # treat a leading space specially the context they need). Decoding everything on
        # every token would cost O(n^2) per request on the engine thread.
        self._decoded = ""
        self._prefix = 0
        self._read = 0
        self._prefix_text: str | None = ""

    def _decode_ids(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def _decode(self) -> str:
        """All text so far; may end in U+FFFD while a character is incomplete."""
        if self._prefix_text is None:
            self._prefix_text = self._decode_ids(self.token_ids[self._prefix : self._read])
        window = self._decode_ids(self.token_ids[self._prefix :])
        tail = window[len(self._prefix_text) :]
        if tail and not tail.endswith(REPLACEMENT):  # the window ends on a whole character
            self._decoded += tail
            self._prefix, self._read = self._read, len(self.token_ids)
            self._prefix_text = None
            return self._decoded
        return self._decoded + tail

    def add(self, token_id: int) -> str:
        """Append a token; return the text that became safe to emit (maybe "")."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        decoded = self._decode()
        stable = decoded.rstrip(REPLACEMENT)  # an incomplete multi-byte character
        return self._advance(stable, final=False)

    def finish(self) -> str:
        """Flush what was held back (generation ended); return the remaining text."""
        if self.stopped:
            return ""
        return self._advance(self._decode(), final=True)

    def _advance(self, stable: str, final: bool) -> str:
        if self._stop:
            if len(self.token_ids) <= self._min_tokens:
                self._stop_from = len(stable)  # still within the first min_tokens tokens
            start = max(0, self._searched - self._max_stop + 1)
            hits = [i for s in self._stop
                    if (i := stable.find(s, max(start, self._stop_from - len(s) + 1))) != -1]
            if hits:
                self.stopped = True
                return self._emit(stable[: min(hits)])
            self._searched = len(stable)
            if not final:
                stable = stable[: len(stable) - _held_prefix_length(stable, self._stop)]
        return self._emit(stable)

    def _emit(self, upto: str) -> str:
        if len(upto) <= self._emitted:
            return ""
        chunk = upto[self._emitted :]
        self._emitted = len(upto)
        self.text += chunk
        return chunk
