"""Retries with exponential backoff and full jitter, only where they are safe.

Retried: UNAVAILABLE (server starting, draining, unreachable) and RESOURCE_EXHAUSTED
when the server's queue is full. Never: INVALID_ARGUMENT, NOT_FOUND, oversized messages
(also RESOURCE_EXHAUSTED, but retrying cannot help) or anything else. And never once a
response message has arrived: a stream that already yielded tokens is not replayed.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

QUEUE_FULL_MARKER = "queue is full"


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
        return True
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and QUEUE_FULL_MARKER in details


class Attempts:
    """One call's retry budget: attempts left and the call's overall deadline.

    Each attempt gets what remains of ``timeout`` (the deadline covers retries too);
    :meth:`delay` says how long to wait before the next attempt, or None to give up.
    """

    def __init__(self, policy: RetryPolicy, timeout: float | None) -> None:
        self.policy = policy
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.attempt = 1

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def delay(self, code: grpc.StatusCode, details: str) -> float | None:
        if self.attempt >= self.policy.max_attempts or not is_retryable(code, details):
            return None
        wait = self.policy.backoff(self.attempt)
        remaining = self.remaining()
        if remaining is not None and wait >= remaining:
            return None
        self.attempt += 1
        return wait
