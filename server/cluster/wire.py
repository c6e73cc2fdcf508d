"""What crosses from the ingress to a replica and back, in plain picklable types.

Times: ``time.monotonic()`` is per machine, so a call carries the ingress's clock reading
at sending, and the replica moves the call's instants (receipt, deadline) by the
difference from its own clock at arrival. That difference also holds the time the call
waited in Ray Serve's queue, so the replica's deadline is later than the caller's by that
wait: the ingress enforces the caller's deadline itself, and times first token and finish
when they reach it (``remote.py``); the replica's deadline only frees the engine row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from server import errors
from server.errors import InvalidRequest, SwitchboardError
from server.service.dispatch import Call, Dispatched


@dataclass(frozen=True)
class WireCall:
    call: Call
    """As the ingress validated it; its ``deadline`` and ``received_at`` in the ingress's
    clock."""
    sent_at: float
    """The ingress's ``time.monotonic()`` when it sent the call."""

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


def multiplex_key(names: list[str] | tuple[str, ...]) -> str:
    """Ray Serve's ``multiplexed_model_id`` for a set of adapters ('' for the base): the
    set, in any order, is one id."""
    return "+".join(sorted(names))


def key_names(key: str) -> list[str]:
    return [name for name in key.split("+") if name]
