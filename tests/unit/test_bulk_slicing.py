"""Bulk dispatch batches handed out in slices within a per-worker budget per poll round."""

from __future__ import annotations

import threading
from typing import Any, cast

import orjson
import pytest

from operators.adapters.kafka.channel_lanes import (
    BulkPacer,
    BulkRoundBudget,
    _BulkSlicer,
    _LanePairReader,
)
from operators.adapters.kafka.reader import TopicPartitionReader
from operators.delivery.model import SendRequest
from operators.delivery.steps import decode_channel_message
from operators.events import RawEvent
from schemas.records import DeadLetter

TOPIC = "push.apns.bulk"


def batch(offset: int, n: int) -> RawEvent:
    value = orjson.dumps(
        {
            "schema": "dispatch_batch/v1",
            "post_id": "p1",
            "author_id": "a1",
            "provider": "apns",
            "created_at": "2026-11-22T10:00:00Z",
            "items": [
                {
                    "notification_id": f"n{offset}-{i}",
                    "user_id": f"u{offset}-{i}",
                    "device_id": f"d{i}",
                    "token": "ab" * 32,
                }
                for i in range(n)
            ],
        }
    )
    return RawEvent(TOPIC, 0, offset, b"p1", value, 0.0)


class FakeReader:
    """A partition reader over a fixed list, `size` messages per call."""

    def __init__(self, events: list[RawEvent], start: int = 0, size: int = 2) -> None:
        self._events = [e for e in events if e.offset >= start]
        self._size = size
        self._position = start
        self.closed = False

    def next_batch(self) -> list[object]:
        out: list[object] = list(self._events[: self._size])
        del self._events[: self._size]
        if out:
            self._position = cast(RawEvent, out[-1]).offset + 1
        return out

    def offset(self) -> int:
        return self._position

    topic_id = "topic-id"

    def close(self) -> None:
        self.closed = True


def slicer(events: list[RawEvent], offset: int = 0, item: int = 0) -> _BulkSlicer:
    reader = cast(TopicPartitionReader, FakeReader(events, offset))
    return _BulkSlicer(reader, offset, item)


def items_of(out: list[object]) -> list[str]:
    ids: list[str] = []
    for e in out:
        for r in decode_channel_message(cast(RawEvent, e)):
            assert isinstance(r, SendRequest)
            ids.append(r.item["notification_id"])
    return ids


def test_budget_is_shared_by_the_partitions_of_a_round_and_renewed_when_one_asks_again() -> None:
    budget = BulkRoundBudget(100)
    assert budget.take("apns#0", 70) == 70
    assert budget.take("apns#1", 70) == 30
    assert budget.take("fcm#0", 10) == 0
    # apns#0 asks again: a new round.
    assert budget.take("apns#0", 500) == 100
    with pytest.raises(ValueError):
        BulkRoundBudget(0)


def test_budget_is_per_worker_thread() -> None:
    budget = BulkRoundBudget(10)
    assert budget.take("apns#0", 10) == 10
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(budget.take("apns#1", 10)))
    t.start()
    t.join()
    assert got == [10]
    assert budget.take("apns#1", 10) == 0


def test_slices_cover_every_item_once_in_order_and_snapshot_marks_the_next_item() -> None:
    events = [batch(0, 500), batch(1, 120), batch(2, 500)]
    s = slicer(events)
    seen: list[str] = []
    snapshots = []
    while s.wanted():
        out = s.take(200)
        assert 0 < len(items_of(out)) <= 200
        seen += items_of(out)
        snapshots.append(s.snapshot())
    expected = [f"n{o}-{i}" for o, n in ((0, 500), (1, 120), (2, 500)) for i in range(n)]
    assert seen == expected
    # A slice continues into the next read message; the snapshot is the first one not done.
    assert snapshots == [(0, 200), (0, 400), (1, 100), (2, 0), (2, 200), (2, 400), (3, 0)]


def test_a_whole_batch_that_fits_is_passed_on_unsliced() -> None:
    s = slicer([batch(0, 120), batch(1, 50)])
    assert s.wanted() == 170
    out = s.take(200)
    assert [cast(RawEvent, e).window for e in out] == [None, None]


def test_resume_at_an_item_inside_a_batch_skips_what_was_sent() -> None:
    events = [batch(0, 500), batch(1, 500)]
    s = slicer(events, offset=0, item=400)
    assert s.wanted() == 100 + 500
    first = items_of(s.take(150))
    assert first == [f"n0-{i}" for i in range(400, 500)] + [f"n1-{i}" for i in range(50)]
    assert s.snapshot() == (1, 50)


def test_an_unreadable_batch_is_passed_whole_and_dead_lettered_once() -> None:
    bad = RawEvent(TOPIC, 0, 0, None, b"{not json", 0.0)
    s = slicer([bad, batch(1, 10)])
    assert s.wanted() == 11
    out = cast(list[RawEvent], s.take(5))
    assert out[0] == bad and out[1].window == (0, 4)  # the bad one counts as one item
    decoded = decode_channel_message(bad)
    assert len(decoded) == 1 and isinstance(decoded[0], DeadLetter)


def test_a_schema_invalid_batch_in_slices_is_dead_lettered_with_its_first_slice_only() -> None:
    value = orjson.dumps({"schema": "dispatch_batch/v1", "items": [{"x": 1}] * 300})
    event = RawEvent(TOPIC, 0, 7, None, value, 0.0)
    s = slicer([event], offset=7)
    assert s.wanted() == 300
    slices = [cast(RawEvent, e) for _ in range(3) for e in s.take(100)]
    assert [e.window for e in slices] == [(0, 100), (100, 200), (200, 300)]
    dead = [d for e in slices for d in decode_channel_message(e)]
    assert len(dead) == 1 and isinstance(dead[0], DeadLetter)


def test_lane_pair_prefers_normal_and_snapshots_three_positions() -> None:
    normal = FakeReader([RawEvent("push.apns", 0, 0, None, batch(0, 3).value, 0.0)])
    bulk = slicer([batch(0, 500)])
    pair = _LanePairReader(
        "apns#0",
        cast(TopicPartitionReader, normal),
        bulk,
        "apns",
        BulkPacer(),
        BulkRoundBudget(100),
    )
    first = pair.next_batch()
    assert [cast(RawEvent, e).topic for e in first] == ["push.apns"]
    second = cast(list[Any], pair.next_batch())
    assert [e.window for e in second] == [(0, 100)]
    assert pair.snapshot()[:3] == (1, 0, 100)
    paused = BulkPacer()
    paused.pause("apns", float("inf"))
    held = _LanePairReader(
        "apns#0", None, slicer([batch(0, 5)]), "apns", paused, BulkRoundBudget(9)
    )
    assert held.next_batch() == []
    held.close()
