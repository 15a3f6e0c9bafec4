from collections import Counter
from datetime import UTC, datetime

import orjson
import pytest

from operators.fanout.batching import (
    dispatch_batches,
    encode_batches,
    merge_post_batches,
    notification_id,
)
from operators.fanout.columns import device_fragment
from operators.fanout.eligibility import (
    FLAG_MUTED,
    FLAG_NOTIFY_ON_POST,
    Suppressed,
    edge_flags,
    follower_suppression,
    post_suppression,
)
from operators.fanout.sharding import all_shard_keys, shard_key, shard_of
from schemas.codecs import decode_dispatch_batch, encode_dispatch_batch
from schemas.records import DispatchBatch, DispatchItem, EncodedDispatchBatch, PostCreated


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


def shard_batches(
    post_id: str, users: range, provider: str = "apns", lane: str = "normal", size: int = 500
) -> list[EncodedDispatchBatch]:
    """What one follower shard emits for `users` of a post (one device each)."""
    frags = [device_fragment(f"u{u}", f"d{u}", f"t{u}") for u in users]
    return encode_batches(
        post_id,
        "a",
        "2026-01-01T00:00:00Z",
        provider,
        lane,
        frags,
        range(len(frags)),
        size,  # type: ignore[arg-type]
    )


def test_merge_joins_a_posts_shard_batches_into_one_valid_batch() -> None:
    # 32 shards, a few followers each: one message per provider instead of one per shard.
    parts = [b for s in range(32) for b in shard_batches("p1", range(s * 6, s * 6 + 6))]
    merged = merge_post_batches(parts)
    assert len(merged) == 1
    joined = merged[0]
    assert isinstance(joined, EncodedDispatchBatch)
    assert joined.count == 192
    # Byte for byte what the codec writes for the same items: the dispatch_batch/v1 contract.
    items = tuple(i for b in parts for i in b.items)
    whole = DispatchBatch("p1", "a", "apns", "2026-01-01T00:00:00Z", "normal", items)
    assert joined.payload == encode_dispatch_batch(whole)
    assert decode_dispatch_batch(joined.payload, "normal").items == items


def test_merge_respects_the_batch_size_and_keeps_every_item_once() -> None:
    parts = [b for s in range(10) for b in shard_batches("p1", range(s * 70, s * 70 + 70))]
    merged = merge_post_batches(parts, 200)
    assert [b.count for b in merged if isinstance(b, EncodedDispatchBatch)] == [140] * 5
    got = [i["user_id"] for b in merged for i in b.items]
    assert got == [f"u{u}" for u in range(700)]
    assert all(len(orjson.loads(b.payload)["items"]) <= 200 for b in merged)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="500"):
        merge_post_batches(parts, 501)


def test_merge_never_mixes_posts_providers_or_lanes_and_passes_the_rest_unchanged() -> None:
    full = shard_batches("p1", range(500))[0]
    with_message = DispatchBatch(
        "n1",
        "api",
        "email",
        "2026-01-01T00:00:00Z",
        "normal",
        (item(1),),
        {"category": "c", "template_id": "t", "tier": "social", "data": {}},
    )
    a1, a2 = shard_batches("p1", range(3)), shard_batches("p1", range(3, 6))
    f1, f2 = shard_batches("p1", range(3), "fcm"), shard_batches("p1", range(3, 6), "fcm")
    b1, b2 = (
        shard_batches("p1", range(3), lane="bulk"),
        shard_batches("p1", range(3, 6), lane="bulk"),
    )
    q1, q2 = shard_batches("p2", range(3)), shard_batches("p2", range(3, 6))
    merged = merge_post_batches([*a1, full, with_message, *f1, *b1, *q1, *a2, *f2, *b2, *q2])
    # A joined batch takes its first part's place; full and message batches pass as they are.
    assert [(b.post_id, b.provider, b.lane, len(b.items)) for b in merged] == [
        ("p1", "apns", "normal", 6),
        ("p1", "apns", "normal", 500),
        ("n1", "email", "normal", 1),
        ("p1", "fcm", "normal", 6),
        ("p1", "apns", "bulk", 6),
        ("p2", "apns", "normal", 6),
    ]
    assert merged[1] is full and merged[2] is with_message
    assert merge_post_batches([]) == []
