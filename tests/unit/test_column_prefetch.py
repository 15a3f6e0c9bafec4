"""Follower columns read ahead on threads (`ColumnPrefetch`): used only at the shard's version."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from operators.fanout.columns import PackedIds
from operators.fanout.logic import READ_AHEAD_POLL_S, ExpandFollowerShardLogic
from operators.fanout.prefetch import ColumnPrefetch
from operators.fanout.shard import FanoutTally, FollowerShard
from tests.fakes import InMemoryFollowerStore
from tests.unit.test_fanout_shard import (
    NOON,
    SOURCES,
    caught_up,
    device,
    expand_all,
    follow,
    job,
    prefs,
)


class FixedClock:
    def __call__(self) -> datetime:
        return NOON


class ColumnReadsSpy(InMemoryFollowerStore):
    """Records which thread read each column, and signals each read's end."""

    def __init__(self) -> None:
        super().__init__(shard_count=1)
        self.column_threads: list[int] = []
        self.column_read = threading.Event()

    def follower_column(self, author_id: str, shard_id: int) -> PackedIds:
        column = super().follower_column(author_id, shard_id)
        self.column_threads.append(threading.get_ident())
        self.column_read.set()
        return column


@pytest.fixture
def store() -> ColumnReadsSpy:
    store = ColumnReadsSpy()
    for u in ("u1", "u2", "u3"):
        store.apply_follow_changes([follow("star", u)])
    return store


@pytest.fixture
def prefetch(store: ColumnReadsSpy) -> Iterator[ColumnPrefetch]:
    reads = ColumnPrefetch(lambda: store)
    yield reads
    reads.close()


def shard_with(prefetch: ColumnPrefetch | None) -> FollowerShard:
    shard = FollowerShard(SOURCES, settle_s=0, prefetch=prefetch)
    caught_up(shard)
    for u in ("u1", "u2", "u3", "u4"):
        shard.apply_preference(prefs(u))
        shard.apply_device(device(u, f"d-{u}"))
    return shard


def test_a_bulk_job_reads_its_column_ahead_off_the_worker_thread(
    store: ColumnReadsSpy, prefetch: ColumnPrefetch
) -> None:
    shard = shard_with(prefetch)
    shard.add_job(job(author="star", lane="bulk"), 0, FanoutTally())
    pushed = expand_all(shard, store)
    assert {p[2] for p in pushed} == {"u1", "u2", "u3"}
    assert store.column_threads and threading.get_ident() not in store.column_threads
    assert (prefetch.asked, prefetch.used) == (1, 1)


def test_normal_jobs_read_nothing_ahead(store: ColumnReadsSpy, prefetch: ColumnPrefetch) -> None:
    shard = shard_with(prefetch)
    shard.add_job(job(author="star", lane="normal"), 0, FanoutTally())
    assert {p[2] for p in expand_all(shard, store)} == {"u1", "u2", "u3"}
    assert prefetch.asked == 0 and not store.column_threads


def test_a_column_read_ahead_of_a_follow_change_is_discarded(
    store: ColumnReadsSpy, prefetch: ColumnPrefetch
) -> None:
    shard = shard_with(prefetch)
    shard.add_job(job(author="star", lane="bulk"), 0, FanoutTally())
    assert store.column_read.wait(10)  # the read ahead saw u1-u3 only
    store.apply_follow_changes([follow("star", "u4"), follow("star", "u1", op="unfollow")])
    pushed = expand_all(shard, store)
    assert {p[2] for p in pushed} == {"u2", "u3", "u4"}
    assert prefetch.used == 0
    assert store.column_threads[-1] == threading.get_ident()  # read again, by the shard


def test_a_current_cached_column_is_not_read_again(
    store: ColumnReadsSpy, prefetch: ColumnPrefetch
) -> None:
    shard = shard_with(prefetch)
    shard.add_job(job("p1", author="star", lane="bulk"), 0, FanoutTally())
    expand_all(shard, store)
    shard.add_job(job("p2", author="star", lane="bulk"), 0, FanoutTally())
    assert {p[2] for p in expand_all(shard, store)} == {"u1", "u2", "u3"}
    assert len(store.column_threads) == 1  # the second ask read the version only
    assert prefetch.asked == 2


def test_a_failed_read_ahead_leaves_the_read_to_the_shard(store: ColumnReadsSpy) -> None:
    def broken() -> InMemoryFollowerStore:
        raise ConnectionError("store down")

    reads = ColumnPrefetch(broken)
    try:
        shard = shard_with(reads)
        shard.add_job(job(author="star", lane="bulk"), 0, FanoutTally())
        assert {p[2] for p in expand_all(shard, store)} == {"u1", "u2", "u3"}
        assert reads.used == 0 and store.column_threads == [threading.get_ident()]
    finally:
        reads.close()


class SlowColumns(ColumnReadsSpy):
    """A column read that waits until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    def follower_column(self, author_id: str, shard_id: int) -> PackedIds:
        assert self.go.wait(10)
        return super().follower_column(author_id, shard_id)


def test_a_job_at_the_shut_gate_gets_its_column_built_while_it_waits() -> None:
    store = SlowColumns()
    for u in ("u1", "u2", "u3"):
        store.apply_follow_changes([follow("star", u)])
    reads = ColumnPrefetch(lambda: store)
    try:
        shard = shard_with(reads)
        shard.add_job(job(author="star", lane="bulk", read_at=2e12), 0, FanoutTally())
        assert not shard.gate_open_for(2e12)
        assert shard.build_columns_ahead(lambda: store)  # still being read: look again later
        assert "star" not in shard.columns
        store.go.set()
        reads.wait()
        assert not shard.build_columns_ahead(lambda: store)
        built = shard.columns["star"]
        assert built.version == store.follower_version("star", 0) and len(built.rows) == 3
        caught_up(shard, 3e12)  # the gate opens
        assert {p[2] for p in expand_all(shard, store)} == {"u1", "u2", "u3"}
        assert shard.columns["star"] is built and len(store.column_threads) == 1
    finally:
        reads.close()


def test_a_column_built_ahead_is_dropped_when_the_edges_change_before_the_gate_opens(
    store: ColumnReadsSpy, prefetch: ColumnPrefetch
) -> None:
    shard = shard_with(prefetch)
    shard.add_job(job(author="star", lane="bulk", read_at=2e12), 0, FanoutTally())
    prefetch.wait()
    shard.build_columns_ahead(lambda: store)
    assert "star" in shard.columns
    store.apply_follow_changes([follow("star", "u4")])  # the flow also drops the cached column;
    caught_up(shard, 3e12)  # here only the store's version tells
    assert {p[2] for p in expand_all(shard, store)} == {"u1", "u2", "u3", "u4"}


def test_the_shard_logic_looks_again_soon_while_a_column_is_read_ahead() -> None:
    store = SlowColumns()
    store.apply_follow_changes([follow("star", "u1")])
    reads = ColumnPrefetch(lambda: store)
    clock = FixedClock()
    try:
        logic = ExpandFollowerShardLogic(shard_with(reads), lambda: store, 1_000, clock)
        logic.on_batch([job(author="star", lane="bulk", read_at=2e12)])
        due = logic.notify_at()
        assert due is not None and due - clock() == timedelta(seconds=READ_AHEAD_POLL_S)
        store.go.set()
        reads.wait()
        logic.on_notify()
        assert logic.notify_at() is None and "star" in logic.shard.columns
    finally:
        reads.close()


class FixedWindow:
    """A step budget whose window is always open or always shut."""

    def __init__(self, open_: bool) -> None:
        self.open = open_

    def until(self, caller: object) -> float:
        return float("inf") if self.open else float("-inf")


def test_a_column_read_ahead_is_built_only_in_the_workers_window() -> None:
    # Building a 1M-follower column takes 15-40 ms a shard: done by every shard of an
    # activation as soon as the read was in, it held a normal post's read for up to 1.3 s.
    store = InMemoryFollowerStore(shard_count=1)
    store.apply_follow_changes([follow("star", "u1")])
    reads = ColumnPrefetch(lambda: store)
    window = FixedWindow(open_=False)
    clock = FixedClock()
    try:
        logic = ExpandFollowerShardLogic(
            shard_with(reads),
            lambda: store,
            1_000,
            clock,
            step_budget=lambda: window,  # type: ignore[arg-type,return-value]
        )
        logic.on_batch([job(author="star", lane="bulk", read_at=2e12)])
        reads.wait()
        logic.on_notify()
        assert "star" not in logic.shard.columns  # read, but the window is shut
        due = logic.notify_at()
        assert due is not None and due - clock() == timedelta(seconds=READ_AHEAD_POLL_S)
        window.open = True
        logic.on_notify()
        assert "star" in logic.shard.columns and logic.notify_at() is None
    finally:
        reads.close()
