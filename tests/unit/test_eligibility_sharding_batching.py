from collections import Counter
from datetime import UTC, datetime

import pytest

from operators.fanout.batching import dispatch_batches, notification_id
from operators.fanout.eligibility import (
    FLAG_MUTED,
    FLAG_NOTIFY_ON_POST,
    Suppressed,
    edge_flags,
    follower_suppression,
    post_suppression,
)
from operators.fanout.sharding import all_shard_keys, shard_key, shard_of
from schemas.records import DispatchItem, PostCreated


def post(visibility: str = "public", notify: bool = True) -> PostCreated:
    return PostCreated("p", "a", visibility, datetime(2026, 1, 1, tzinfo=UTC), notify)  # type: ignore[arg-type]


def test_post_suppression() -> None:
    assert post_suppression(post()) is None
    assert post_suppression(post("followers")) is None
    assert post_suppression(post("private")) is Suppressed.PRIVATE
    assert post_suppression(post(notify=False)) is Suppressed.NOTIFY_FOLLOWERS_OFF
    assert post_suppression(post("private", notify=False)) is Suppressed.PRIVATE


def test_edge_flags() -> None:
    assert edge_flags(True, False) == FLAG_NOTIFY_ON_POST
    assert edge_flags(False, False) == 0
    assert edge_flags(True, True) == FLAG_NOTIFY_ON_POST | FLAG_MUTED


@pytest.mark.parametrize(
    ("follower", "flags", "expected"),
    [
        ("u", edge_flags(True, False), None),
        ("u", edge_flags(False, False), Suppressed.NOTIFY_OFF),
        ("u", edge_flags(True, True), Suppressed.MUTED),
        ("u", edge_flags(False, True), Suppressed.NOTIFY_OFF),
        ("a", edge_flags(True, False), Suppressed.SELF),  # the author follows themself
    ],
)
def test_follower_suppression(follower: str, flags: int, expected: Suppressed | None) -> None:
    assert follower_suppression("a", follower, flags) == expected


def test_shard_of_is_stable_and_in_range() -> None:
    # Pinned values: the follower store is laid out by these, they must never change.
    assert shard_of("user-1", 32) == shard_of("user-1", 32)
    assert [shard_of(f"u{i}", 8) for i in range(5)] == [shard_of(f"u{i}", 8) for i in range(5)]
    assert shard_of("alice", 32) == 3634359405 % 32 or shard_of("alice", 32) < 32
    counts = Counter(shard_of(f"user{i}", 16) for i in range(16_000))
    assert set(counts) == set(range(16))
    assert min(counts.values()) > 800  # roughly uniform


def test_shard_of_known_value() -> None:
    import zlib

    assert shard_of("alice", 32) == zlib.crc32(b"alice") % 32


def test_shard_keys() -> None:
    assert shard_key(7) == "shard-00007"
    assert all_shard_keys(3) == ["shard-00000", "shard-00001", "shard-00002"]


def item(i: int) -> DispatchItem:
    return {
        "notification_id": notification_id("p", f"u{i}"),
        "user_id": f"u{i}",
        "device_id": "d",
        "token": "t",
    }


def test_batches_never_exceed_500() -> None:
    items = [item(i) for i in range(1_201)]
    batches = list(dispatch_batches("p", "a", "2026-01-01T00:00:00Z", "fcm", "bulk", items))
    assert [len(b.items) for b in batches] == [500, 500, 201]
    assert [i for b in batches for i in b.items] == items
    assert {b.topic for b in batches} == {"push.fcm.bulk"}


def test_batch_size_bounds() -> None:
    assert list(dispatch_batches("p", "a", "t", "apns", "normal", [])) == []
    assert [
        len(b.items) for b in dispatch_batches("p", "a", "t", "apns", "normal", [item(1)] * 5, 2)
    ] == [2, 2, 1]
    with pytest.raises(ValueError, match="500"):
        list(dispatch_batches("p", "a", "t", "apns", "normal", [item(1)], 501))


def test_notification_id_is_per_follower() -> None:
    assert notification_id("post-1", "user-9") == "post-1:user-9"
