"""Blocking work off the event loop, on daemon threads.

``asyncio.to_thread`` uses the loop's default executor, which ``asyncio.run`` joins when
the loop closes: one adapter load stuck on a hung disk would then keep a server that was
told to stop alive for ever. A daemon thread cannot; when the loop is gone, its result
is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

READ_THREADS = 4
"""Threads one front-end runs adapter listings on at once (see BoundedDaemonThreads)."""


async def run_in_daemon_thread(fn: Callable[..., T], *args: Any, name: str = "switchboard-work"
                               ) -> T:
    """``await fn(*args)`` run on a new daemon thread; its exception is re-raised here."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():  # the awaiting call was cancelled meanwhile
            return
        if error is None:
            done.set_result(result)
        else:
            done.set_exception(error)

    def work() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await done


class BoundedDaemonThreads:
    """At most ``limit`` daemon threads at once for one kind of work (reads such as
    listing adapters, which anyone with a key may send in a flood); callers over the
    limit wait their turn on the loop instead of each starting a thread."""

    def __init__(self, limit: int, name: str) -> None:
        self.limit, self.name = limit, name
        self._slots: asyncio.Semaphore | None = None
        """Made on first use, inside the loop that serves the calls."""

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        async with self._slots:
            return await run_in_daemon_thread(fn, *args, name=self.name)
