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
