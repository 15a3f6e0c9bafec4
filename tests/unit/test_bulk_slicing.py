"""The channel lanes: normal first, bulk in slices within a per-worker budget per poll round,
sent without waiting for answers, and snapshots that resume at the first item not judged."""

from __future__ import annotations

import threading
from typing import Any, cast

import orjson
import pytest

from operators.adapters.kafka.channel_lanes import BulkPacer, BulkRoundBudget, _LanePairReader
from operators.delivery.engine import DeliveryEngine, Judged
from operators.delivery.model import SendRequest
from operators.delivery.pipeline import DeliveryPump, LaneProgress
from operators.events import RawEvent
from schemas.records import DeadLetter, DeliveryEvent
from tests.fakes import ListReader

TOPIC = "push.apns.bulk"


def batch(offset: int, n: int, topic: str = TOPIC) -> RawEvent:
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
    return RawEvent(topic, 0, offset, b"p1", value, 0.0)


class FakeEngine:
    """Takes every request it has room for; answers only when told to (`answer`)."""

    def __init__(self, room: int = 10_000) -> None:
        self.free = room
        self.submitted: list[SendRequest] = []
        self.answered: list[Judged] = []

    def submit(self, requests: list[SendRequest]) -> list[Judged]:
        self.submitted += requests
        self.free -= len(requests)
        return []

    def collect(self) -> list[Judged]:
        out, self.answered = self.answered, []
        self.free += len(out)
        return out

    def room(self, lane: str, provider: str | None = None) -> int:
        return max(0, self.free)

    def answer(self, requests: list[SendRequest] | None = None) -> None:
        """Judge these requests (all submitted ones by default): one event each."""
        for r in self.submitted if requests is None else requests:
            event = DeliveryEvent(
                r.item["notification_id"], r.post_id, r.item["user_id"], r.item["device_id"],
                "apns", "accepted", 200, None, 1, "2026-11-22T10:00:01.000Z",
            )  # fmt: skip
            self.answered.append(Judged(r, [event]))
        if requests is None:
            self.submitted = []
        else:
            self.submitted = [r for r in self.submitted if r not in requests]

    def close(self) -> None:
        pass


def pair(
    normal: list[RawEvent],
    bulk: list[RawEvent],
    engine: FakeEngine,
    *,
    per_round: int = 100,
    pacer: BulkPacer | None = None,
    resume: Any = None,
    budget: BulkRoundBudget | None = None,
) -> _LanePairReader:
    pump = DeliveryPump(lambda: cast(DeliveryEngine, engine))
    return _LanePairReader(
        "apns#0",
        ListReader(normal),
        ListReader(bulk, size=2),
        "apns",
        pacer or BulkPacer(),
        budget or BulkRoundBudget(per_round),
        pump,
        resume,
    )


def ids(requests: list[SendRequest]) -> list[str]:
    return [r.item["notification_id"] for r in requests]


# -- the per-worker round budget ------------------------------------------------------------


def test_budget_is_shared_by_the_partitions_of_a_round_and_renewed_when_one_asks_again() -> None:
    budget = BulkRoundBudget(100)
    assert budget.take("apns#0", 70) == 70
    assert budget.take("apns#1", 70) == 30
    assert budget.take("fcm#0", 10) == 0
    # apns#0 asks again: a new round, where each of the three that asked gets a third.
    assert budget.take("apns#0", 500) == 34
    assert budget.take("apns#1", 500) == 34
    assert budget.take("fcm#0", 500) == 32
    # Only one asks from now on: a third (three asked in the round before), then all of it.
    assert budget.take("fcm#0", 500) == 34
    assert budget.take("fcm#0", 500) == 100
    with pytest.raises(ValueError):
        BulkRoundBudget(0)


def test_the_partitions_polled_first_do_not_starve_the_others() -> None:
    """An APNs celebrity on apns#0 and an FCM one on fcm#0: both drain every round."""
    budget = BulkRoundBudget(100)
    got = {"apns#0": 0, "fcm#0": 0}
    for _ in range(10):
        for part in got:
            got[part] += budget.take(part, 500)
    assert got["fcm#0"] >= 400 and got["apns#0"] >= 400


def test_budget_is_per_worker_thread() -> None:
    budget = BulkRoundBudget(10)
    assert budget.take("apns#0", 10) == 10
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(budget.take("apns#1", 10)))
    t.start()
    t.join()
    assert got == [10]
    assert budget.take("apns#1", 10) == 0


# -- LaneProgress: what was handed out and judged, and where a restart resumes --------------


def test_items_are_handed_out_once_in_order_and_the_snapshot_follows_what_is_judged() -> None:
    lane = LaneProgress()
    for offset, n in ((0, 500), (1, 120), (2, 500)):
        lane.add(offset, n)
    seen: list[tuple[int, int]] = []
    snapshots = []
    while lane.pending():
        for message, items in lane.take(200):
            seen += [(message.offset, i) for i in items]
            for i in items:
                lane.judged(message.offset, i)
        snapshots.append(lane.snapshot(3))
    assert seen == [(o, i) for o, n in ((0, 500), (1, 120), (2, 500)) for i in range(n)]
    assert snapshots == [
        (0, 200, {}),
        (0, 400, {}),
        (1, 100, {}),
        (2, 180, {}),  # a slice goes on into the next message
        (2, 380, {}),
        (3, 0, {}),
    ]


def test_judged_out_of_order_resumes_at_the_first_unjudged_and_skips_the_judged_after_it() -> None:
    lane = LaneProgress()
    lane.add(5, 10)
    lane.add(6, 4)
    handed = lane.take(100)
    assert [(m.offset, items) for m, items in handed] == [(5, list(range(10))), (6, [0, 1, 2, 3])]
    for offset, item in ((5, 0), (5, 1), (5, 3), (5, 4), (5, 9), (6, 1), (6, 2)):
        lane.judged(offset, item)
    state = lane.snapshot(7)
    assert state == (5, 2, {5: ((3, 5), (9, 10)), 6: ((1, 3),)})

    # A restart: the same messages again; only what had no outcome is handed out.
    again = LaneProgress(state)
    again.add(5, 10)
    again.add(6, 4)
    assert [(m.offset, items) for m, items in again.take(100)] == [
        (5, [2, 5, 6, 7, 8]),
        (6, [0, 3]),
    ]
    assert again.snapshot(7) == state  # nothing judged since


def test_a_snapshot_before_anything_was_read_again_keeps_the_resume_state() -> None:
    state = (5, 2, {5: ((3, 5),), 9: ((0, 1),)})
    lane = LaneProgress(state)
    assert lane.snapshot(5) == state
    lane.add(5, 10)
    for m, items in lane.take(100):
        for i in items:
            lane.judged(m.offset, i)
    # Message 9 was not read again yet: what was judged of it is still remembered.
    assert lane.snapshot(6) == (6, 0, {9: ((0, 1),)})


def test_a_re_created_topic_is_read_whole() -> None:
    """After a rewind the old resume offset is another message: all its items are due."""
    lane = LaneProgress((3, 4, {3: ((6, 8),)}))
    lane.add(0, 10)  # the new log starts at 0, not at the resume offset
    lane.add(3, 10)
    assert [len(items) for _, items in lane.take(100)] == [10, 10]


def test_a_reader_that_goes_back_starts_the_lane_over() -> None:
    lane = LaneProgress()
    lane.add(7, 3)
    lane.take(2)
    lane.add(0, 2)  # a new log
    assert lane.snapshot(1) == (0, 0, {})
    assert [(m.offset, items) for m, items in lane.take(10)] == [(0, [0, 1])]


# -- the lane pair ---------------------------------------------------------------------------


def test_normal_first_then_bulk_slices_within_the_round_budget() -> None:
    engine = FakeEngine()
    p = pair([batch(0, 3, "push.apns")], [batch(0, 500), batch(1, 500)], engine, per_round=100)
    assert p.next_batch() == []  # nothing judged yet
    assert [r.lane for r in engine.submitted] == ["normal"] * 3 + ["bulk"] * 100
    p.next_batch()  # a new round: 100 more bulk items, the normal ones still out
    assert len(engine.submitted) == 203
    assert ids(engine.submitted)[103:106] == ["n0-100", "n0-101", "n0-102"]


def test_outputs_come_out_when_judged_and_the_snapshot_never_passes_an_unjudged_item() -> None:
    engine = FakeEngine()
    p = pair([], [batch(0, 500)], engine, per_round=100)
    p.next_batch()
    p.next_batch()
    first, second = engine.submitted[:100], engine.submitted[100:]
    engine.answer(second)  # the later slice answers first
    out = p.next_batch()
    assert {cast(DeliveryEvent, e).notification_id for e in out} == set(ids(second))
    snapshot = p.snapshot()
    assert (snapshot[1], snapshot[2]) == (0, 0)  # resume at item 0 of message 0...
    assert snapshot[7] == {0: ((100, 200),)}  # ...skipping what was judged after it
    engine.answer(first)
    p.next_batch()  # a new round: items 200 to 299 go out
    snapshot = p.snapshot()
    assert (snapshot[1], snapshot[2], snapshot[7]) == (0, 200, {})


def test_one_push_messages_fill_the_round_budget_not_one_message_per_round() -> None:
    # A campaign's messages carry one push each (one per user, as the scheduler emits them).
    engine = FakeEngine()
    p = pair([], [batch(i, 1) for i in range(250)], engine, per_round=100)
    p.next_batch()
    assert ids(engine.submitted) == [f"n{i}-0" for i in range(100)]
    p.next_batch()
    assert len(engine.submitted) == 200


def test_nothing_is_read_past_the_in_flight_limit() -> None:
    engine = FakeEngine(room=150)
    p = pair([batch(i, 100, "push.apns") for i in range(2)], [batch(0, 500)], engine)
    p.next_batch()
    # The normal lane first: no bulk while normal items wait for room.
    assert [r.lane for r in engine.submitted] == ["normal"] * 150
    p.next_batch()
    assert len(engine.submitted) == 150  # no room
    engine.answer()
    p.next_batch()
    assert [r.lane for r in engine.submitted] == ["normal"] * 50 + ["bulk"] * 100


def test_a_paused_bulk_lane_is_not_read() -> None:
    engine = FakeEngine()
    paused = BulkPacer()
    paused.pause("apns", float("inf"))
    p = pair([], [batch(0, 5)], engine, pacer=paused)
    assert p.next_batch() == [] and engine.submitted == []
    p.close()


def test_an_unreadable_batch_is_dead_lettered_once_and_counts_as_one_item() -> None:
    bad = RawEvent(TOPIC, 0, 0, None, b"{not json", 0.0)
    engine = FakeEngine()
    p = pair([], [bad, batch(1, 10)], engine, per_round=5)
    out = p.next_batch()
    assert len(out) == 1 and isinstance(out[0], DeadLetter)
    assert ids(engine.submitted) == [f"n1-{i}" for i in range(4)]  # 1 of 5 was the bad one
    assert p.snapshot()[1:3] == (1, 0)


def test_a_schema_invalid_batch_is_decoded_once_and_dead_lettered_once() -> None:
    value = orjson.dumps({"schema": "dispatch_batch/v1", "items": [{"x": 1}] * 300})
    engine = FakeEngine()
    p = pair([], [RawEvent(TOPIC, 0, 7, None, value, 0.0)], engine)
    letters = [d for _ in range(3) for d in p.next_batch()]
    assert len(letters) == 1 and isinstance(letters[0], DeadLetter)
    assert engine.submitted == []


def test_a_resumed_pair_sends_only_what_had_no_outcome() -> None:
    engine = FakeEngine()
    p = pair([batch(0, 3, "push.apns")], [batch(0, 300)], engine, per_round=300)
    p.next_batch()
    normal, bulk = engine.submitted[:3], engine.submitted[3:]
    engine.answer([normal[1], *bulk[:50], *bulk[60:]])
    p.next_batch()
    state = p.snapshot()
    # Resume: normal message 0 at item 0 (1 judged after it), bulk message 0 at item 50.
    assert (state[0], state[5], state[6]) == (0, 0, {0: ((1, 2),)})
    assert (state[1], state[2], state[7]) == (0, 50, {0: ((60, 300),)})

    again = FakeEngine()
    q = pair([batch(0, 3, "push.apns")], [batch(0, 300)], again, per_round=300, resume=state)
    q.next_batch()
    assert ids(again.submitted) == ["n0-0", "n0-2"] + [f"n0-{i}" for i in range(50, 60)]
