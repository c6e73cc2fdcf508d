"""The admin board's bookkeeping and the ingress's copy of the replicas' views, without
Ray (docs/cluster.md): what the board holds stays bounded, reads never enter the log,
and a flood of reads costs the board one fetch and blocks no thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.cluster.board import CLAIM_S, FORGET_S, LIVE_S, MAX_GONE, Board
from server.cluster.views import ReplicaView, ViewCache
from server.errors import ServiceUnavailable


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def view(replica: str, *names: str) -> ReplicaView:
    return ReplicaView(replica, tuple(ReplicaView(replica, (), {}).info(n) for n in names),
                       {"replica": replica})


def test_answers_of_a_submitter_that_died_are_dropped_and_free_the_log():
    clock = Clock()
    board = Board(clock)

    async def scenario() -> None:
        await board.heartbeat("r1")
        orphan = await board.submit("load", "a", None)  # its submitter dies here
        await board.answer("r1", orphan, "loaded")
        unload = await board.submit("unload", "a", None)
        await board.answer("r1", unload, "unloaded")
        answers, missing = await board.results(unload, 5)
        assert (answers, missing) == ({"r1": "unloaded"}, [])
        # the orphan's answers may still be collected: they pin its command for now
        assert [c[0] for c in board.commands] == [orphan, unload]
        assert set(board.answers) == {orphan}

        clock.now += CLAIM_S + 1
        await board.heartbeat("r1")
        _, commands = await board.poll("r1", unload, 0)
        assert board.answers == {} and board.unclaimed == {}
        # a replica started now replays the adapter's last state only
        _, replayed = await board.poll("r2", 0, 0)
        assert replayed == [(unload, "unload", "a", None)]
        assert commands == []

    asyncio.run(scenario())


def test_the_log_takes_changes_only():
    board = Board(Clock())
    for op in ("list", "info", "stats"):
        with pytest.raises(ValueError, match=f"takes load, unload, reload only, not '{op}'"):
            asyncio.run(board.submit(op, "a", None))
    assert board.commands == [] and board.answers == {} and board.sequence() == 0


def test_departed_and_silent_replicas_are_forgotten():
    clock = Clock()
    board = Board(clock)

    async def scenario() -> None:
        for i in range(MAX_GONE + 500):
            await board.heartbeat(f"r{i}")
            await board.leave(f"r{i}")
        assert len(board.gone) == MAX_GONE
        last = f"r{MAX_GONE + 499}"
        assert "r0" not in board.gone and last in board.gone
        await board.report(last, 1.0, view(last))  # a late view: not revived
        assert last not in board.views and last not in board.seen

        await board.heartbeat("silent")
        await board.report("silent", 1.0, view("silent"))
        clock.now += FORGET_S + 1
        assert board.live() == []
        assert board.gone == {} and board.seen == {} and board.views == {}

    asyncio.run(scenario())


def test_views_keep_the_newest_and_only_live_replicas_count():
    clock = Clock()
    board = Board(clock)

    async def scenario() -> None:
        await board.report("r1", 2.0, view("r1", "new"))
        await board.report("r1", 1.0, view("r1", "old"))  # taken earlier, arrived later
        await board.heartbeat("r2")  # live, no view yet
        views, late = await board.views_of()
        assert [v.adapters[0].name for v in views] == ["new"] and late == ["r2"]
        await board.report("r2", 5.0, view("r2", "new"))
        clock.now += LIVE_S / 2
        await board.heartbeat("r1")
        clock.now += LIVE_S / 2 + 1  # r2 silent for longer than LIVE_S
        views, late = await board.views_of()
        assert [v.replica for v in views] == ["r1"] and late == []

    asyncio.run(scenario())


def test_a_flood_of_reads_costs_one_fetch_and_waits_on_none():
    clock = Clock()
    release = threading.Event()
    fetching = threading.Event()
    fetches = [0]
    views = [view("r1", "a")]

    def fetch() -> list[ReplicaView]:
        fetches[0] += 1
        if fetches[0] > 1:  # the first fills the copy; the second hangs on the board
            fetching.set()
            release.wait(30)
        return views

    cache = ViewCache(fetch, fresh_s=0.5, stale_s=10.0, clock=clock)
    assert cache.get() == views and fetches == [1]
    clock.now += 1.0  # no longer fresh: the next read fetches
    slow = threading.Thread(target=cache.get)
    slow.start()
    assert fetching.wait(30)
    got: list[list[ReplicaView]] = []
    readers = [threading.Thread(target=lambda: got.append(cache.get())) for _ in range(500)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(30)
    assert len(got) == 500 and all(g == views for g in got)  # none waited for the fetch
    assert fetches == [2]
    release.set()
    slow.join(30)
    assert not slow.is_alive()


def test_a_change_makes_the_next_read_fetch_and_a_silent_board_ages_out():
    clock = Clock()
    replies: list[list[ReplicaView] | None] = [[view("r1", "a")], [view("r1", "b")], None]

    def fetch() -> list[ReplicaView]:
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        if reply is None:
            raise ServiceUnavailable("the cluster's admin board did not answer a read")
        return reply

    cache = ViewCache(fetch, fresh_s=0.5, stale_s=10.0, clock=clock)
    assert cache.get()[0].adapters[0].name == "a"
    assert cache.get()[0].adapters[0].name == "a"  # fresh: no fetch
    clock.now += 0.01
    cache.invalidate()
    assert cache.get()[0].adapters[0].name == "b"
    clock.now += 5  # the board stops answering: the last copy, while under stale_s
    assert cache.get()[0].adapters[0].name == "b"
    clock.now += 6
    with pytest.raises(ServiceUnavailable, match="did not answer a read"):
        cache.get()
