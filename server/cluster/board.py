"""The admin board's state: the ordered log of adapter changes, the replicas' answers to
them and the views of their adapters and figures that replicas post.

Plain asyncio with an injectable clock, so its bookkeeping is tested without Ray;
``admin.py`` runs it as a Ray actor (an async actor: waits do not block it). The log
carries changes only (load, unload, reload): reads are answered from the views, so a
flood of reads never queues ahead of an operator's change.

Everything it holds is bounded: a command's answers leave when its submitter collects
them, or ``CLAIM_S`` after submission when the submitter died first; a replica that left
or went silent is forgotten after ``FORGET_S``, and at most ``MAX_GONE`` departures are
remembered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

POLL_S = 2.0
"""How long a follower's poll waits for a command, and its heartbeat period."""
LIVE_S = 3 * POLL_S + 4.0
"""A replica not heard from (poll, heartbeat, answer or view) for this long is taken for
gone."""
FORGET_S = 60 * LIVE_S
"""A silent or departed replica's traces (last sign of life, view, departure) are
dropped after this long."""
CLAIM_S = 60.0
"""A submitter asks for its command's answers at once; answers nobody claimed this long
after submission belong to a submitter that died, and are dropped."""
MAX_WAIT_S = 3600.0
"""The longest any call waits on the board, whatever timeout it asks for."""
MAX_GONE = 1024
"""Departed replicas remembered (so their late messages do not revive them)."""
MUTATING = ("load", "unload", "reload")

Command = tuple[int, str, str, str | None]
"""(sequence number, op, adapter name, version)."""


class Board:
    """The log, the answers and the views (the state of the admin board actor).

    Restarted by Ray if its process dies, with an empty log and a new ``epoch``: the
    followers then start over from its first command and post their views again."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.epoch = uuid.uuid4().hex
        self.commands: list[Command] = []
        self.seq = 0
        self.answers: dict[int, dict[str, Any]] = {}
        """Answers by command, while its submitter may still collect them."""
        self.unclaimed: dict[int, float] = {}
        """Commands whose submitter has not asked for the answers yet: by when it must."""
        self.seen: dict[str, float] = {}
        self.gone: dict[str, float] = {}
        """Replicas that left, and when (oldest first)."""
        self.views: dict[str, tuple[float, float, Any]] = {}
        """Each replica's latest view: (its own clock when taken, this clock when
        posted, the view)."""
        self.changed = asyncio.Condition()

    # -- replicas ------------------------------------------------------------------------
    def _heard(self, replica: str) -> None:
        if replica not in self.gone:
            self.seen[replica] = self.clock()

    async def heartbeat(self, replica: str) -> None:
        """A replica busy applying a long command is still alive."""
        self._heard(replica)

    async def report(self, replica: str, taken: float, view: Any) -> None:
        """A replica's view of its adapters and figures, taken at ``taken`` (its own
        clock). Views from one replica can arrive out of order (two of its threads post
        them): an older one never replaces a newer."""
        async with self.changed:
            self._heard(replica)
            if replica in self.gone:
                return
            held = self.views.get(replica)
            if held is None or taken >= held[0]:
                self.views[replica] = (taken, self.clock(), view)
                self.changed.notify_all()

    async def leave(self, replica: str) -> None:
        async with self.changed:
            self.seen.pop(replica, None)
            self.views.pop(replica, None)
            self.gone.pop(replica, None)
            self.gone[replica] = self.clock()
            while len(self.gone) > MAX_GONE:
                del self.gone[next(iter(self.gone))]
            self.changed.notify_all()

    def live(self) -> list[str]:
        """Replicas heard from within ``LIVE_S``; what is older than ``FORGET_S`` is
        dropped here."""
        now = self.clock()
        for replica in [r for r, at in self.seen.items() if now - at > FORGET_S]:
            del self.seen[replica]
            self.views.pop(replica, None)
        for replica in [r for r, at in self.gone.items() if now - at > FORGET_S]:
            del self.gone[replica]
        return sorted(r for r, at in self.seen.items() if now - at <= LIVE_S)

    def replicas(self) -> list[str]:
        return self.live()

    async def views_of(self, fresh_timeout: float = 0.0) -> tuple[list[Any], list[str]]:
        """The live replicas' latest views, and the live replicas that posted none
        after this call arrived within ``fresh_timeout`` (with 0: none posted yet)."""
        asked = self.clock()
        deadline = asked + min(fresh_timeout, MAX_WAIT_S)

        def late() -> list[str]:
            return [r for r in self.live()
                    if r not in self.views or (fresh_timeout > 0 and self.views[r][1] < asked)]

        async with self.changed:
            while fresh_timeout > 0 and late():
                left = deadline - self.clock()
                if left <= 0:
                    break
                # Wake at least every second: a dead replica drops out of live().
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
        return [self.views[r][2] for r in self.live() if r in self.views], late()

    # -- the log -------------------------------------------------------------------------
    async def poll(self, replica: str, after: int, timeout: float
                   ) -> tuple[str, list[Command]]:
        """This board's epoch and the commands after ``after`` (waiting up to
        ``timeout`` for one)."""
        self._heard(replica)
        async with self.changed:
            self._expire()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait_for(lambda: self.seq > after),
                                       min(timeout, MAX_WAIT_S))
        self._heard(replica)
        return self.epoch, [c for c in self.commands if c[0] > after]

    async def submit(self, op: str, name: str, version: str | None) -> int:
        """Append a change to the log; its sequence number."""
        if op not in MUTATING:
            raise ValueError(f"the admin log takes {', '.join(MUTATING)} only, not {op!r}: "
                             "reads are answered from the replicas' views")
        async with self.changed:
            self._expire()
            self.seq += 1
            self.commands.append((self.seq, op, name, version))
            self.answers[self.seq] = {}
            self.unclaimed[self.seq] = self.clock() + CLAIM_S
            self.changed.notify_all()
        return self.seq

    async def answer(self, replica: str, seq: int, result: Any) -> None:
        async with self.changed:
            self._heard(replica)
            if seq in self.answers:
                self.answers[seq][replica] = result
            self.changed.notify_all()

    async def results(self, seq: int, timeout: float) -> tuple[dict[str, Any], list[str]]:
        """The answers to ``seq`` and the live replicas that did not answer within
        ``timeout``; its answers then leave the board and the log is compacted."""
        deadline = self.clock() + min(timeout, MAX_WAIT_S)
        self.unclaimed.pop(seq, None)
        answers = self.answers.get(seq, {})
        async with self.changed:
            while True:
                live = self.live()
                if live and all(r in answers for r in live):
                    break
                left = deadline - self.clock()
                if left <= 0:
                    break
                # Wake at least every second: a dead replica drops out of live().
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
            self._settle(seq)
        return answers, [r for r in self.live() if r not in answers]

    def sequence(self) -> int:
        """The last command's number: how many changes the log has taken."""
        return self.seq

    def _settle(self, seq: int) -> None:
        self.answers.pop(seq, None)
        self.commands = compact(self.commands, set(self.answers))

    def _expire(self) -> None:
        """Drop the answers no submitter came for in time (it died after submitting):
        otherwise they would stay for ever and pin the older commands they follow."""
        now = self.clock()
        for seq in [s for s, until in self.unclaimed.items() if now > until]:
            del self.unclaimed[seq]
            self._settle(seq)


def compact(commands: list[Command], waited_on: set[int]) -> list[Command]:
    """The log with each adapter's last change only, and the changes someone still waits
    on (their answers are collected as they arrive): a replica that replays the log only
    needs each adapter's last state, and the log stays bounded by the adapters."""
    last = {name: seq for seq, _, name, _ in commands}
    return [c for c in commands if c[0] == last[c[2]] or c[0] in waited_on]
