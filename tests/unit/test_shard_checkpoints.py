"""Shard checkpoints on disk: kill -9 during a write, after it, and between two checkpoints.

A child process builds a shard from a changelog and checkpoints it with the real file store;
the parent kills it with SIGKILL at the moment named, then starts a shard from whatever is on
disk plus the changelog from the source's floor (as the flow does) and compares it with a shard
built from the whole changelog: the same users, the same pushes for a post, none twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from operators.adapters.stores.shard_state import (
    CorruptCheckpoint,
    FileShardStateStore,
    checkpoint_path,
    read_checkpoint,
    read_header,
    write_checkpoint,
)
from operators.events import CaughtUp
from operators.fanout.checkpoint import ShardCheckpointer
from operators.fanout.columns import INDEX_HASH, UserTable
from operators.fanout.shard import ChangelogEvent, FanoutTally, FollowerShard, ShardJob
from schemas.records import DeviceChange, FollowChange, PreferenceChange
from tests.fakes import InMemoryFollowerStore

ROOT = Path(__file__).resolve().parents[2]
TS = datetime(2026, 6, 1, 12, tzinfo=UTC)
SOURCES = ["follow_changes/0", "preference_changes/0", "device_changes/0"]


def changelog(n: int) -> list[ChangelogEvent]:
    """Devices for n users, then preference changes and deactivations (a later tail)."""
    out: list[ChangelogEvent] = []
    for i in range(n):
        provider = "apns" if i % 2 else "fcm"
        token = f"{i:064x}" if provider == "apns" else f"fcm_{i:040d}"
        change = DeviceChange(f"u{i:05d}", f"d{i}", provider, token, True, TS)  # type: ignore[arg-type]
        out.append(ChangelogEvent(change, 0, "device_changes/0", i, "devlog"))
    for i in range(0, n, 7):
        pref = PreferenceChange(f"u{i:05d}", False, None, None, "UTC", TS)
        out.append(ChangelogEvent(pref, 0, "preference_changes/0", i // 7, "preflog"))
    for i in range(0, n, 5):
        off = DeviceChange(f"u{i:05d}", f"d{i}", "fcm", None, False, TS)
        out.append(ChangelogEvent(off, 0, "device_changes/0", n + i // 5, "devlog"))
    return out


def fanout(shard: FollowerShard, n: int) -> Counter[tuple[str, str, str]]:
    for s in SOURCES:
        shard.note_caught_up(CaughtUp(s, 1e12))
    store = InMemoryFollowerStore(1)
    store.apply_follow_changes(
        [FollowChange("a", f"u{i:05d}", "follow", True, False, TS) for i in range(n)]
    )
    shard.add_job(ShardJob("p", "a", "2026-06-01T12:00:00Z", "bulk", 0.0, 0), 0, FanoutTally())
    pushes: Counter[tuple[str, str, str]] = Counter()
    while shard.jobs:
        for b in shard.expand(store, TS, 1_000, FanoutTally()):
            for i in b.items:
                pushes[(b.provider, i["user_id"], i["device_id"])] += 1
    return pushes


CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from operators.adapters.stores import shard_state
    from operators.fanout.shard import FollowerShard
    from tests.unit.test_shard_checkpoints import changelog, SOURCES

    folder, n, cut, mode = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    events = changelog(n)
    shard = FollowerShard(SOURCES)
    for e in events[:cut]:
        shard.apply(e)
    cols, pos = shard.checkpoint_state()
    shard_state.write_checkpoint(shard_state.checkpoint_path(folder, 0), 0, cols, pos)
    for e in events[cut:]:
        shard.apply(e)  # applied, never checkpointed: lost with the process
    cols, pos = shard.checkpoint_state()
    if mode == "during":
        real = os.fsync
        def stuck(fd):
            (folder / "mid").write_text("x")  # the new file is written, not yet renamed
            time.sleep(600)
        os.fsync = stuck
        shard_state.write_checkpoint(shard_state.checkpoint_path(folder, 0), 0, cols, pos)
    elif mode == "after":
        shard_state.write_checkpoint(shard_state.checkpoint_path(folder, 0), 0, cols, pos)
        (folder / "mid").write_text("x")
        time.sleep(600)
    else:  # between: the second checkpoint never started
        (folder / "mid").write_text("x")
        time.sleep(600)
    """
)


@pytest.mark.parametrize("mode", ["during", "after", "between"])
def test_kill_9_at_any_moment_leaves_a_checkpoint_that_plus_the_tail_is_exact(
    tmp_path: Path, mode: str
) -> None:
    n, cut = 3_000, 2_000
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    child = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(n), str(cut), mode], cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "mid").exists():
            assert child.poll() is None, "the child exited early"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    events = changelog(n)
    ids = {"device_changes": "devlog", "preference_changes": "preflog"}
    store = FileShardStateStore(tmp_path, 1, ids.get)
    restarted = FollowerShard(SOURCES)
    loaded = ShardCheckpointer(store, 0, 60).load_into(restarted)
    assert loaded
    # The source reads each partition from the floor (here: this shard's positions).
    floors = {}
    for source in ("device_changes/0", "preference_changes/0"):
        topic, partition = source.rsplit("/", 1)
        floors[source] = max(0, store.floor(topic, int(partition))[0])
    tail = [e for e in events if e.offset >= floors[e.source]]
    for e in tail:
        restarted.apply(e)
    whole = FollowerShard(SOURCES)
    for e in events:
        whole.apply(e)
    assert restarted.users.state() == whole.users.state()
    assert restarted.positions == whole.positions
    got, want = fanout(restarted, n), fanout(whole, n)
    assert got == want and max(got.values()) == 1
    expected_from = {"during": cut, "after": len(events), "between": cut}[mode]
    assert restarted.changes_applied == len(events) - expected_from


def test_a_corrupt_checkpoint_is_removed_and_refused(tmp_path: Path) -> None:
    shard = FollowerShard(SOURCES)
    for e in changelog(50):
        shard.apply(e)
    path = checkpoint_path(tmp_path, 3)
    write_checkpoint(path, 3, *shard.checkpoint_state())
    found = read_header(path)
    assert found is not None
    data = bytearray(path.read_bytes())
    data[found[1] + 3] ^= 0xFF  # inside the first array
    path.write_bytes(bytes(data))
    store = FileShardStateStore(
        tmp_path, 4, {"device_changes": "devlog", "preference_changes": "preflog"}.get
    )
    with pytest.raises(CorruptCheckpoint):
        store.load(3)
    assert not path.exists()  # the restart reads that shard's changelogs from the beginning


def test_floor_is_the_lowest_position_and_the_beginning_without_a_checkpoint(
    tmp_path: Path,
) -> None:
    empty: dict[str, np.ndarray] = FollowerShard(SOURCES).checkpoint_state()[0]  # type: ignore[assignment]
    write_checkpoint(checkpoint_path(tmp_path, 0), 0, empty, {"device_changes/1": ("L", 40)})
    store = FileShardStateStore(tmp_path, 2, {"device_changes": "L"}.get)
    assert store.floor("device_changes", 1) == (-2, "L")  # shard 1 has none yet
    write_checkpoint(checkpoint_path(tmp_path, 1), 1, empty, {"device_changes/1": ("L", 25)})
    store = FileShardStateStore(tmp_path, 2, {"device_changes": "L"}.get)
    assert store.floor("device_changes", 1) == (25, "L")
    assert store.floor("device_changes", 0) == (-2, "L")  # a partition no position covers
    # The topic was re-created since: the checkpoints are of a log that is gone.
    moved = FileShardStateStore(tmp_path, 2, {"device_changes": "new"}.get)
    assert moved.floor("device_changes", 1) == (-2, "new")
    assert moved.load(0) is None


def test_a_checkpoint_from_before_the_channel_book_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its positions include channel addresses and category switches that were not kept then.
    from operators.adapters.stores import shard_state

    shard = FollowerShard(SOURCES)
    shard.apply_device(DeviceChange("u1", "mail", "email", "u1@example.com", True, TS))
    columns, _ = shard.checkpoint_state()
    old = {k: v for k, v in columns.items() if k != "notify_book"}
    with monkeypatch.context() as m:
        m.setattr(shard_state, "VERSION", 1)
        write_checkpoint(checkpoint_path(tmp_path, 0), 0, old, {"device_changes/0": ("L", 40)})
    store = FileShardStateStore(tmp_path, 1, {"device_changes": "L"}.get)
    assert store.load(0) is None
    assert store.floor("device_changes", 0) == (-2, "L")  # read from the beginning
    write_checkpoint(checkpoint_path(tmp_path, 0), 0, columns, {"device_changes/0": ("L", 40)})
    loaded = store.load(0)
    assert loaded is not None and store.floor("device_changes", 0) == (40, "L")
    again = FollowerShard(SOURCES)
    again.load_checkpoint(*loaded)
    assert again.notify.book.addresses == {"u1": (("mail", "email", "u1@example.com"),)}


def test_background_saves_keep_the_latest_and_round_trip(tmp_path: Path) -> None:
    store = FileShardStateStore(
        tmp_path, 1, {"device_changes": "devlog", "preference_changes": "preflog"}.get
    )
    shard = FollowerShard(SOURCES)
    for e in changelog(100):
        shard.apply(e)
        store.save(0, *shard.checkpoint_state())
    store.flush()
    found = read_checkpoint(checkpoint_path(tmp_path, 0))
    assert found is not None and found[0]["positions"]["device_changes/0"] == ["devlog", 120]
    again = FollowerShard(SOURCES)
    assert ShardCheckpointer(store, 0, 60).load_into(again)
    assert again.users.state() == shard.users.state()


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from operators.adapters.stores import shard_state
    from operators.fanout.shard import FollowerShard
    from tests.unit.test_shard_checkpoints import changelog, SOURCES

    shard = FollowerShard(SOURCES)
    for e in changelog(300):
        shard.apply(e)
    path = shard_state.checkpoint_path(Path(sys.argv[1]), 0)
    shard_state.write_checkpoint(path, 0, *shard.checkpoint_state())
    """
)


def test_the_saved_user_index_serves_another_process_and_an_old_checkpoint_rebuilds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Written by a process with another str hash seed: the saved index must still find every
    # user here, without hashing them again.
    seed = "456" if os.environ.get("PYTHONHASHSEED") == "123" else "123"
    subprocess.run(
        [sys.executable, "-c", WRITER.format(root=str(ROOT)), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHONHASHSEED": seed},
        timeout=120,
    )
    found = read_checkpoint(checkpoint_path(tmp_path, 0))
    assert found is not None
    header, columns = found
    positions = {s: (p[0], p[1]) for s, p in header["positions"].items()}
    reference = FollowerShard(SOURCES)
    for e in changelog(300):
        reference.apply(e)

    def loaded(cols: dict[str, np.ndarray]) -> FollowerShard:  # type: ignore[type-arg]
        shard = FollowerShard(SOURCES)
        shard.load_checkpoint(cols, positions)
        users = shard.users
        for i in range(300):
            row = users.row_of(f"u{i:05d}")
            assert row >= 0 and users.uid(row) == f"u{i:05d}"
        assert users.row_of("u-never-seen") == -1
        assert users.state() == reference.users.state()
        return shard

    def no_rebuild(self: UserTable) -> None:
        raise AssertionError("the saved index was rebuilt")

    with monkeypatch.context() as m:
        m.setattr(UserTable, "_rebuild_index", no_rebuild)
        shard = loaded(columns)
        # A new user after the load goes through the same index (no duplicate rows).
        rows = shard.users.rows
        assert shard.users.ensure_row("u-new") == rows == shard.users.ensure_row("u-new")
        assert shard.users.rows_of(["u00007", "u-new", "u00299"]).tolist() == [
            shard.users.row_of("u00007"),
            rows,
            shard.users.row_of("u00299"),
        ]
    # A checkpoint from before the index was saved, or with another hash: rebuilt, same rows.
    old = {k: v for k, v in columns.items() if not k.startswith("index_")}
    other = {**columns, "index_hash": np.array([INDEX_HASH + 1], np.uint8)}
    for cols in (old, other):
        with monkeypatch.context() as m:
            m.setattr(UserTable, "_rebuild_index", no_rebuild)
            with pytest.raises(AssertionError, match="rebuilt"):
                loaded(cols)
        assert loaded(cols).users.state() == reference.users.state()


def test_a_checkpoint_is_mapped_not_copied_and_a_loaded_shard_owns_its_arrays(
    tmp_path: Path,
) -> None:
    store = FileShardStateStore(
        tmp_path, 1, {"device_changes": "devlog", "preference_changes": "preflog"}.get
    )
    events = changelog(200)
    shard = FollowerShard(SOURCES)
    for e in events[:150]:
        shard.apply(e)
    store.save(0, *shard.checkpoint_state())
    store.flush()
    found = read_checkpoint(checkpoint_path(tmp_path, 0))
    assert found is not None
    # Views of the file's mapping (read-only), not a second copy of it in memory.
    assert all(not arr.flags.writeable for arr in found[1].values())
    again = FollowerShard(SOURCES)
    assert ShardCheckpointer(store, 0, 60).load_into(again)
    # The file replaced under the loaded shard changes nothing in it, and its tables take the
    # tail (the loaders copied every array out of the mapping).
    store.save(0, *FollowerShard(SOURCES).checkpoint_state())
    store.flush()
    for e in events[150:]:
        shard.apply(e)
        again.apply(e)
    assert again.users.state() == shard.users.state()
