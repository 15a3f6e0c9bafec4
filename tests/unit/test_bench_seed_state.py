"""The fan-out benchmark's seeded checkpoints equal the state the flow builds from the messages."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pytest

from operators.adapters.stores.shard_state import FileShardStateStore
from operators.events import RawEvent
from operators.fanout.caps import CapRule
from operators.fanout.checkpoint import ShardCheckpointer
from operators.fanout.notify import NotifyShard
from operators.fanout.shard import POST_CATEGORY, ChangelogEvent, FollowerShard
from operators.fanout.steps import ChangelogRouter
from schemas.codecs import format_timestamp
from schemas.records import PreferenceChange
from schemas.topics import DEVICE_CHANGES, PREFERENCE_CHANGES
from scripts.bench import fanout as fanout_bench
from scripts.bench.seed_state import Message, changelog_sources, seed_checkpoints

SHARDS = 4
TS = format_timestamp(datetime(2026, 6, 1, 12, tzinfo=UTC))
LOGS = {PREFERENCE_CHANGES: "preflog", DEVICE_CHANGES: "devlog"}
SOURCES = [
    f"{t}/{p}" for t in ("follow_changes", PREFERENCE_CHANGES, DEVICE_CHANGES) for p in (0, 1)
]


def new_shard() -> FollowerShard:
    return FollowerShard(
        SOURCES,
        caps=CapRule(POST_CATEGORY, 10, 3600),
        notify=NotifyShard({"social": 100, "marketing": 100}, cap=(5, 3600)),
    )


def preferences(n: int) -> Iterator[tuple[bytes, bytes]]:
    for i in range(n):
        quiet = i % 5 == 0
        uid = f"u{i:04d}"
        rec = {
            "user_id": uid,
            "push_enabled": i % 10 != 3,
            "quiet_hours_start": 22 if quiet else None,
            "quiet_hours_end": 7 if quiet else None,
            "timezone": "Europe/Berlin" if quiet else "UTC",
            "ts": TS,
        }
        yield uid.encode(), orjson.dumps(rec)


def devices(n: int) -> Iterator[tuple[bytes, bytes]]:
    for i in range(n):
        apns = i % 2 == 0
        rec = {
            "user_id": f"u{i:04d}",
            "device_id": f"d{i}",
            "provider": "apns" if apns else "fcm",
            "token": f"{i:064x}" if apns else f"fcm{i:030d}:x{i:020d}",
            "active": i % 11 != 4,
            "ts": TS,
        }
        yield f"u{i:04d}".encode(), orjson.dumps(rec)


def built_by_the_flow(n: int) -> list[FollowerShard]:
    """Shards after the flow's router applied the messages read from 2 partitions each."""
    router = ChangelogRouter(SHARDS)
    shards = [new_shard() for _ in range(SHARDS)]
    for topic, stream in ((PREFERENCE_CHANGES, preferences(n)), (DEVICE_CHANGES, devices(n))):
        for offset, (key, value) in enumerate(stream):
            raw = RawEvent(topic, offset % 2, offset // 2, key, value, 0.0, log=LOGS[topic])
            for routed in router.route(raw):
                assert isinstance(routed, tuple)
                item = routed[1]
                assert isinstance(item, ChangelogEvent)
                assert shards[item.shard_id].apply(item)
    for shard in shards:
        shard.users.compact()
    return shards


def test_seeded_checkpoints_load_into_the_flows_state_at_the_changelogs_ends(
    tmp_path: Path,
) -> None:
    n = 500
    ends = {**changelog_sources([PREFERENCE_CHANGES], 2), f"{DEVICE_CHANGES}/0": 7}
    ends[f"{DEVICE_CHANGES}/1"] = 3
    seeded = seed_checkpoints(
        tmp_path,
        new_shard,
        SHARDS,
        LOGS.get,
        {PREFERENCE_CHANGES: preferences(n), DEVICE_CHANGES: devices(n)},
        ends,
    )
    assert (seeded.events, seeded.users) == (2 * n, n)
    assert seeded.checkpoint_bytes == sum(p.stat().st_size for p in tmp_path.glob("*.ckpt"))

    expected = built_by_the_flow(n)
    store = FileShardStateStore(tmp_path, SHARDS, LOGS.get)
    for shard_id, want in enumerate(expected):
        got = new_shard()
        assert ShardCheckpointer(store, shard_id, 60).load_into(got)
        want_cols, _ = want.checkpoint_state()
        got_cols, got_positions = got.checkpoint_state()
        assert want_cols.keys() == got_cols.keys()
        for name, arr in want_cols.items():
            assert np.array_equal(arr, got_cols[name]), name
        assert got_positions == {s: (LOGS[s.rpartition("/")[0]], e) for s, e in ends.items()}
    # The flow's changelog source starts each partition at its end: nothing is read twice.
    assert store.floor(DEVICE_CHANGES, 0)[0] == 7
    assert store.floor(PREFERENCE_CHANGES, 1)[0] == 0


def test_a_message_the_flow_would_dead_letter_stops_the_seeding(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rejects"):
        seed_checkpoints(
            tmp_path,
            new_shard,
            SHARDS,
            LOGS.get,
            {PREFERENCE_CHANGES: [(b"u1", b'{"user_id": "u1"}')]},
            changelog_sources([PREFERENCE_CHANGES], 1),
        )


def test_a_topic_without_an_id_writes_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no topic id"):
        seed_checkpoints(
            tmp_path,
            new_shard,
            SHARDS,
            lambda _topic: None,
            {PREFERENCE_CHANGES: preferences(3)},
            changelog_sources([PREFERENCE_CHANGES], 1),
        )
    assert not list(tmp_path.glob("*.ckpt"))


def test_the_benchmarks_changes_are_what_the_flow_decodes_from_its_messages(
    tmp_path: Path,
) -> None:
    args = fanout_bench.build_parser().parse_args(["--users", "3000", "--authors", "5"])
    seed = fanout_bench.make_seed(args)
    rng = random.Random(7)
    seeded = seed_checkpoints(
        tmp_path,
        new_shard,
        SHARDS,
        LOGS.get,
        {
            PREFERENCE_CHANGES: fanout_bench.seeded_preferences(seed, rng),
            DEVICE_CHANGES: fanout_bench.seeded_devices(seed, rng),
        },
        changelog_sources([PREFERENCE_CHANGES, DEVICE_CHANGES], 1),
        check_every=1,  # every change is compared with its message decoded by the router
    )
    assert (seeded.events, seeded.decoded, seeded.users) == (6000, 6000, 3000)


def test_a_change_that_is_not_its_messages_stops_the_seeding(tmp_path: Path) -> None:
    key, value = next(preferences(1))
    wrong = PreferenceChange("u0000", False, None, None, "UTC", datetime.now(UTC))
    with pytest.raises(ValueError, match="is not its message's change"):
        seed_checkpoints(
            tmp_path,
            new_shard,
            SHARDS,
            LOGS.get,
            {PREFERENCE_CHANGES: [(key, value, wrong)]},
            changelog_sources([PREFERENCE_CHANGES], 1),
        )


def test_changes_given_with_their_messages_seed_the_same_state(tmp_path: Path) -> None:
    n = 400
    router = ChangelogRouter(SHARDS)

    def with_changes(topic: str, stream: Iterator[tuple[bytes, bytes]]) -> Iterator[Message]:
        for key, value in stream:
            routed = list(router.route(RawEvent(topic, 0, 0, key, value, 0.0)))
            assert isinstance(routed[0], tuple)
            yield key, value, routed[0][1].change

    seed_checkpoints(
        tmp_path,
        new_shard,
        SHARDS,
        LOGS.get,
        {
            PREFERENCE_CHANGES: with_changes(PREFERENCE_CHANGES, preferences(n)),
            DEVICE_CHANGES: with_changes(DEVICE_CHANGES, devices(n)),
        },
        changelog_sources([PREFERENCE_CHANGES, DEVICE_CHANGES], 2),
        check_every=97,
    )
    store = FileShardStateStore(tmp_path, SHARDS, LOGS.get)
    for shard_id, want in enumerate(built_by_the_flow(n)):
        got = new_shard()
        assert ShardCheckpointer(store, shard_id, 60).load_into(got)
        assert got.users.state() == want.users.state()
