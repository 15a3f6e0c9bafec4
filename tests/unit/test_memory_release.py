"""Handing the changelog load's freed memory back: when (ShardsLoaded) and how (malloc_trim).

And the compaction and first checkpoint that come before it, once every shard caught up.
"""

from __future__ import annotations

import functools
import platform
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from operators import metrics
from operators.adapters import memory
from operators.adapters.stores.shard_state import FileShardStateStore
from operators.events import CaughtUp
from operators.fanout.checkpoint import ShardCheckpointer
from operators.fanout.loaded import ShardsLoaded
from operators.fanout.logic import SETTLE_POLL_S, ExpandFollowerShardLogic
from operators.fanout.shard import FollowerShard, ShardMarker


def test_called_when_every_shard_built_has_settled_and_again_after_a_late_one() -> None:
    calls: list[tuple[int, int, int]] = []
    loaded = ShardsLoaded(lambda: calls.append((loaded.built, loaded.caught_up, loaded.settled)))
    for _ in range(3):
        loaded.shard_built()
    loaded.shard_caught_up()
    loaded.shard_caught_up()
    assert not loaded.all_caught_up()
    loaded.shard_caught_up()
    assert loaded.all_caught_up() and calls == []  # caught up, tables not compacted yet
    loaded.shard_settled()
    loaded.shard_settled()
    assert calls == []
    loaded.shard_settled()
    assert calls == [(3, 3, 3)]
    loaded.shard_built()  # a late shard (another worker's)
    assert not loaded.all_caught_up()
    loaded.shard_caught_up()
    loaded.shard_settled()
    assert calls == [(3, 3, 3), (4, 4, 4)]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_trims_on_glibc_and_counts_it() -> None:
    before = metrics.MEMORY_TRIMS._value.get()
    garbage = [bytes(1000) for _ in range(10_000)]
    del garbage
    assert memory.release_freed_memory()
    assert metrics.MEMORY_TRIMS._value.get() == before + 1
    assert (memory.rss_bytes() or 0) > 0


def test_release_is_skipped_off_glibc_and_ignores_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert not memory.release_freed_memory()
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("glibc", "2.36"))

    def no_libc(name: str) -> None:
        raise OSError("no libc here")

    monkeypatch.setattr(memory.ctypes, "CDLL", no_libc)
    assert not memory.release_freed_memory()


def test_a_shard_compacts_and_checkpoints_only_once_every_shard_caught_up(
    tmp_path: Path,
) -> None:
    """Compaction and the first save are off the catch-up path: shard 1 does not wait for 0's."""
    calls: list[int] = []
    loaded = ShardsLoaded(lambda: calls.append(loaded.settled))
    store = FileShardStateStore(tmp_path, 2, {"preference_changes": "p"}.get)
    checkpoints = functools.partial(ShardCheckpointer, store, interval_s=60.0)

    def clock() -> datetime:
        return datetime.fromtimestamp(100.0, UTC)

    compacted: list[int] = []
    logics: list[ExpandFollowerShardLogic] = []
    for shard_id in range(2):
        shard = FollowerShard(["preference_changes/0"])
        shard.users.compact = functools.partial(compacted.append, shard_id)  # type: ignore[method-assign]
        logics.append(
            ExpandFollowerShardLogic(
                shard,
                lambda: None,  # type: ignore[arg-type,return-value]
                100,
                clock,
                checkpoints=checkpoints,
                loaded=loaded,
            )
        )
    marker = CaughtUp("preference_changes/0", 50.0, 5, "p")
    logics[0].on_batch([ShardMarker(0, marker)])
    store.flush()
    assert logics[0]._caught_up and compacted == [] and not list(tmp_path.glob("*.ckpt"))
    due = logics[0].notify_at()
    assert due is not None and due - clock() == timedelta(seconds=SETTLE_POLL_S)
    logics[0].on_notify()  # shard 1 has not caught up: still nothing
    assert compacted == [] and calls == []
    logics[1].on_batch([ShardMarker(1, marker)])  # the last one: it settles at once
    logics[0].on_notify()
    store.flush()
    assert sorted(compacted) == [0, 1] and calls == [2]
    for logic in logics:  # one save at a time (`busy`): the other's at its next activation
        logic.on_notify()
        store.flush()
    assert len(list(tmp_path.glob("*.ckpt"))) == 2
    assert logics[0].notify_at() is None
