"""Retries with exponential backoff and full jitter, only where they are safe.

Retried: UNAVAILABLE (server starting, draining, unreachable) and RESOURCE_EXHAUSTED
when the server's queue is full. Never: INVALID_ARGUMENT, NOT_FOUND, oversized messages
(also RESOURCE_EXHAUSTED, but retrying cannot help), a port that does not speak gRPC
(the HTTP API's, say: it will not start to), or anything else. And never once a response
message has arrived: a stream that already yielded tokens is not replayed.

A server that says it is starting (it has bound its port and is loading the model) is
waited for: those retries do not count against ``max_attempts``, only against the call's
deadline, since start-up takes seconds to a minute and the answer is then certain to come.
Without it, ``generate`` right after ``make serve`` gave up after the few hundred
milliseconds the attempts' backoff adds up to.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

QUEUE_FULL_MARKER = "queue is full"
STARTING_MARKER = "server is starting"
NOT_GRPC_MARKERS = ("Failed parsing HTTP/2", "Trying to connect an http1.x server")
"""What gRPC says when the port answers in HTTP/1 (or anything but HTTP/2)."""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    """Attempts in all, the first included; 1 turns retries off."""
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based): full jitter."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return (rng or random).uniform(0, cap)


NO_RETRY = RetryPolicy(max_attempts=1)


def is_retryable(code: grpc.StatusCode, details: str) -> bool:
    if code == grpc.StatusCode.UNAVAILABLE:
        return not is_not_grpc(details)
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and QUEUE_FULL_MARKER in details


def is_starting(code: grpc.StatusCode, details: str) -> bool:
    """The server is up but still loading: worth waiting for (see the module's notes)."""
    return code == grpc.StatusCode.UNAVAILABLE and STARTING_MARKER in details


def is_not_grpc(details: str) -> bool:
    """The address answered, but not in gRPC (e.g. the HTTP API's port)."""
    return any(marker in details for marker in NOT_GRPC_MARKERS)


class Attempts:
    """One call's retry budget: attempts left and the call's overall deadline.

    Each attempt gets what remains of ``timeout`` (the deadline covers retries too);
    :meth:`delay` says how long to wait before the next attempt, or None to give up.
    Waits for a starting server back off like any retry but do not use up attempts (a
    policy of one attempt still retries nothing); without a deadline they stop after
    ``STARTING_LIMIT_S``, so a server that never finishes starting is not waited on forever.
    """

    STARTING_LIMIT_S = 600.0

    def __init__(self, policy: RetryPolicy, timeout: float | None) -> None:
        self.policy = policy
        self.started = time.monotonic()
        self.deadline = None if timeout is None else self.started + timeout
        self.attempt = 1
        self.waits = 0

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def delay(self, code: grpc.StatusCode, details: str) -> float | None:
        if self.policy.max_attempts == 1 or not is_retryable(code, details):
            return None
        starting = is_starting(code, details)
        if not starting and self.attempt >= self.policy.max_attempts:
            return None
        if starting and self.deadline is None and \
                time.monotonic() - self.started >= self.STARTING_LIMIT_S:
            return None
        wait = self.policy.backoff(self.waits + 1)
        remaining = self.remaining()
        if remaining is not None and wait >= remaining:
            return None
        self.waits += 1
        if not starting:
            self.attempt += 1
        return wait
