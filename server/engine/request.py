"""Plain request/result types and the handle a caller streams events from.

The engine thread produces events; callers consume them from any thread (blocking
``events()``/``result()``) or from an asyncio loop (``async for`` over ``stream()``).
Protobuf never reaches this layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import torch

from server.engine.sampling import SamplingParams
from server.errors import EngineFault


class FinishReason(StrEnum):
    EOS = "eos"
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"


class AdapterBinding(Protocol):
    """How a request reaches its adapter when a cache manages the slots.

    ``try_acquire_slot`` is called on the engine thread at admission; ``None`` means
    "not resident yet", and the request waits while later ones may pass it.
    ``release`` is called exactly once when the request ends, however it ends (also
    when it never ran). If ``Engine.submit`` raises, the caller still owns the binding
    and must release it.
    """

    def try_acquire_slot(self) -> int | None: ...

    def try_acquire_slots_with(self, others: Sequence[AdapterBinding]) -> list[int] | None:
        """All or nothing, for a composed row: slots for this binding then ``others``
        (bindings of the same cache), or None with no slot pinned."""
        ...

    def release(self) -> None: ...


def new_request_id() -> str:
    """16 hex digits: short enough for log lines, unique enough to find one request."""
    return uuid.uuid4().hex[:16]


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: int | AdapterBinding | None = None
    """None: the base model; an int: a loaded slot; a binding: resolved at admission."""
    weight_scale: float = 1.0
    composed: tuple[tuple[int | AdapterBinding, float], ...] = ()
    """Further adapters on this row, each with its own scale (a dialect plus a terminology
    pack): the row's LoRA term is the sum of every adapter's, ``adapter`` first. The row
    is admitted only when all of them hold slots (acquired all or nothing). Either all
    are loaded slots (ints) or all are bindings of one cache."""
    request_id: str = field(default_factory=new_request_id)
    deadline: float | None = None
    """``time.monotonic()`` after which the request ends with finish reason ``deadline``."""
    forced_tokens: list[int] | None = None
    """Teacher forcing: emit these tokens instead of sampling (scoring, oracle tests)."""
    record_logits: bool = False
    """Keep each generated position's logits in the result (scoring, oracle tests)."""

    def adapter_uses(self) -> list[tuple[int | AdapterBinding, float]]:
        """Every adapter of the row with its scale, ``adapter`` first; [] for the base."""
        if self.adapter is None:
            return []
        return [(self.adapter, self.weight_scale), *self.composed]
    prompt_logprobs: bool = False
    """Return the log-probability of each prompt token after the first, given the tokens
    before it, computed in prefill (perplexity through the serving path)."""


@dataclass(frozen=True)
class TokenChunk:
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    queue_time_s: float
    """Submission to admission into the batch."""
    time_to_first_token_s: float | None
    """Submission to the first token (the engine's view; the service measures from receipt
    with ``first_token_at``)."""
    total_time_s: float
    logits: list[torch.Tensor] | None = None
    prompt_logprobs: tuple[float, ...] | None = None
    """``len(prompt_ids) - 1`` values when the request asked for them and its prefill ran."""
    error: str | None = None
    first_token_at: float | None = None
    """``time.monotonic()`` when the first token was chosen."""
    finished_at: float = 0.0
    """``time.monotonic()`` when the request ended."""


Event = TokenChunk | GenerationResult
_DONE = object()


class RequestHandle:
    """A submitted request: its event stream, its result, and a way to cancel it."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None):
        self.request = request
        self.request_id = request.request_id
        self._loop = loop
        self._sync: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._async: asyncio.Queue[object] | None = asyncio.Queue() if loop else None
        self._cancelled = threading.Event()
        self.done = threading.Event()
        self.final: GenerationResult | None = None

    # -- engine side ---------------------------------------------------------------------
    def _put(self, item: object) -> None:
        if self._loop is not None and self._async is not None:
            # RuntimeError: the caller's loop is closed, so nobody is listening.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
        else:
            self._sync.put(item)

    def emit(self, event: Event) -> None:
        if isinstance(event, GenerationResult):
            self.final = event
            self._put(event)
            self._put(_DONE)
            self.done.set()
        else:
            self._put(event)

    # -- caller side ---------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the engine to drop this request; it leaves the batch at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Blocking iterator (for callers without an event loop)."""
        while True:
            item = self._sync.get(timeout=timeout)
            if item is _DONE:
                return
            yield _checked(item)  # type: ignore[arg-type]

    async def stream(self) -> AsyncIterator[Event]:
        assert self._async is not None, "submit() was not called from an event loop"
        while True:
            item = await self._async.get()
            if item is _DONE:
                return
            yield _checked(item)  # type: ignore[arg-type]

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the final result (blocking callers)."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        assert self.final is not None
        return _checked(self.final)  # type: ignore[return-value]


def _checked(event: Event) -> Event:
    if isinstance(event, GenerationResult) and event.finish_reason == FinishReason.ERROR:
        raise EngineFault(event.error or "engine step failed")
    return event
