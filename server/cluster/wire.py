"""What crosses from the ingress to a replica and back, in plain picklable types.

Times: ``time.monotonic()`` is per machine, so a call carries the ingress's clock reading
at sending and the replica moves every instant it receives or returns by the difference
(the transit time, a millisecond on one node, is the only error).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from server import errors
from server.engine.request import GenerationResult
from server.errors import InvalidRequest, SwitchboardError
from server.service.dispatch import Call, Dispatched


@dataclass(frozen=True)
class WireCall:
    call: Call
    """As the ingress validated it; its ``deadline`` and ``received_at`` in the ingress's
    clock."""
    sent_at: float
    """The ingress's ``time.monotonic()`` when it sent the call."""

    def clock_shift(self) -> float:
        """Add to a replica instant to get the ingress's (measured once per call)."""
        return self.sent_at - time.monotonic()

    def local_call(self, shift: float) -> Call:
        """The call with its instants in the replica's clock."""
        call = self.call
        return dataclasses.replace(
            call, received_at=call.received_at - shift,
            deadline=None if call.deadline is None else call.deadline - shift)


@dataclass(frozen=True)
class WireError:
    """A domain error raised in a replica, sent as data so the ingress raises the same
    class with the same one-line message (a raised one would arrive wrapped in Ray's
    error with the replica's traceback)."""

    kind: str
    message: str
    param: str | None = None

    @classmethod
    def of(cls, exc: SwitchboardError) -> WireError:
        return cls(type(exc).__name__, str(exc), getattr(exc, "param", None))

    def error(self) -> SwitchboardError:
        kind: Any = getattr(errors, self.kind, SwitchboardError)
        if not (isinstance(kind, type) and issubclass(kind, SwitchboardError)):
            kind = SwitchboardError
        if issubclass(kind, InvalidRequest):
            return kind(self.message, self.param)  # type: ignore[no-any-return]
        return kind(self.message)  # type: ignore[no-any-return]


def started(dispatched: Dispatched, replica: str) -> Dispatched:
    """The dispatch facts a replica reports before its first token (no engine handle)."""
    return dataclasses.replace(dispatched, handle=None, replica=replica)  # type: ignore[arg-type]


def shifted(result: GenerationResult, shift: float) -> GenerationResult:
    """A replica's result with its instants in the ingress's clock."""
    return dataclasses.replace(
        result, finished_at=result.finished_at + shift,
        first_token_at=None if result.first_token_at is None else result.first_token_at + shift)


def multiplex_key(names: list[str] | tuple[str, ...]) -> str:
    """Ray Serve's ``multiplexed_model_id`` for a set of adapters ('' for the base)."""
    return "+".join(names)


def key_names(key: str) -> list[str]:
    return [name for name in key.split("+") if name]
