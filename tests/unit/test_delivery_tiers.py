"""Tier lanes in delivery: the topics of each lane, transactional served first, the channel
senders' own holds, and an API notification's message carried through batches and retries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from operators.adapters.kafka.channel_lanes import BulkPacer, BulkRoundBudget, _LanePairReader
from operators.adapters.providers.event_loop import EventLoopThread
from operators.adapters.redis.rate_limiter import LocalRateLimiter
from operators.adapters.stores.sqlite_notifications import SQLiteNotificationStore
from operators.delivery.circuit_breaker import BreakerState
from operators.delivery.edge_claims import InMemoryEdgeClaims
from operators.delivery.engine import CONCURRENCY_ROUNDS, DeliveryEngine, DeliverySettings
from operators.delivery.model import HELD_PREFIX, ProviderAnswer, RetryPolicy, SendRequest
from operators.delivery.pipeline import DeliveryPump
from operators.delivery.steps import decode_channel_message, decode_retry_message
from operators.events import RawEvent
from schemas.codecs import decode_retry_record, encode_retry_record
from schemas.records import ChannelMessage, DeliveryEvent, DispatchBatch, RetryRecord
from schemas.topics import (
    ALL_TOPICS,
    CHANNEL_TIER_TOPICS,
    PUSH_TRANSACTIONAL_TOPICS,
    TIER_LANES,
    channel_topic,
    lane_of_topic,
)
from tests.fakes import ListReader, ScriptedSender, request
from tests.unit.engine_kit import Clock, engine

CREATED = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 5))
LOGIN = ChannelMessage(
    category="login_code",
    template_id="login_code",
    tier="transactional",
    data={"code": "482913", "minutes": 10},
    collapse_key="login:u1",
)


@pytest.fixture
def store(tmp_path: Path) -> SQLiteNotificationStore:
    return SQLiteNotificationStore(tmp_path / "n.db")


def batch_bytes(post: str, provider: str, users: Sequence[str], message: Any = None) -> bytes:
    body: dict[str, Any] = {
        "schema": "dispatch_batch/v1",
        "post_id": post,
        "author_id": "api:k1",
        "provider": provider,
        "created_at": CREATED,
        "items": [
            {
                "notification_id": f"{post}:{u}",
                "user_id": u,
                "device_id": f"{provider}-{u}",
                "token": f"{u}@example.com",
                "locale": "fr",
            }
            for u in users
        ],
    }
    if message is not None:
        body["message"] = message
    return orjson.dumps(body)


# -- topics and lanes ------------------------------------------------------------------------


def test_each_tier_has_its_lane_and_each_lane_its_topic() -> None:
    assert TIER_LANES == {"transactional": "transactional", "social": "normal", "marketing": "bulk"}
    assert PUSH_TRANSACTIONAL_TOPICS == ("push.apns.transactional", "push.fcm.transactional")
    assert set(PUSH_TRANSACTIONAL_TOPICS) <= set(ALL_TOPICS)
    assert [channel_topic("apns", lane) for lane in ("transactional", "normal", "bulk")] == [
        "push.apns.transactional",
        "push.apns",
        "push.apns.bulk",
    ]
    assert [channel_topic("sms", lane) for lane in ("transactional", "normal", "bulk")] == [
        "sms.transactional",
        "sms.social",
        "sms.marketing",
    ]
    for topic in (*CHANNEL_TIER_TOPICS, *PUSH_TRANSACTIONAL_TOPICS, "push.fcm", "push.fcm.bulk"):
        provider = topic.split(".")[1] if topic.startswith("push.") else topic.split(".")[0]
        assert channel_topic(provider, lane_of_topic(topic)) == topic


def test_a_transactional_push_batch_names_its_topic() -> None:
    batch = DispatchBatch("n1", "api:k1", "fcm", CREATED, "transactional", (), LOGIN)
    assert batch.topic == "push.fcm.transactional"
    assert DispatchBatch("p1", "a1", "fcm", CREATED, "bulk", ()).topic == "push.fcm.bulk"


def test_a_channel_batch_s_requests_carry_its_message_and_its_topic_s_lane() -> None:
    value = batch_bytes("n1", "email", ["u1", "u2"], LOGIN)
    requests = decode_channel_message(RawEvent("email.transactional", 0, 3, b"n1", value, 0.0))
    assert [r.lane for r in requests] == ["transactional", "transactional"]  # type: ignore[union-attr]
    assert all(r.message == LOGIN for r in requests)  # type: ignore[union-attr]
    assert requests[0].item["locale"] == "fr"  # type: ignore[union-attr]
    [marketing] = decode_channel_message(
        RawEvent("email.marketing", 0, 4, b"n2", batch_bytes("n2", "email", ["u1"]), 0.0)
    )
    assert marketing.lane == "bulk" and marketing.message is None  # type: ignore[union-attr]


def test_a_retry_carries_the_message_and_the_lane_of_its_send(
    store: SQLiteNotificationStore,
) -> None:
    sender = ScriptedSender("email", default=lambda r: ProviderAnswer(451, "RCPT 4.7.1"))
    r = request(provider="email", lane="transactional", source="email.transactional/0@1")
    r = SendRequest(**{**{f: getattr(r, f) for f in r.__slots__}, "message": LOGIN})
    out = engine(store, sender).deliver([r])
    [record] = [o for o in out if isinstance(o, RetryRecord)]
    assert record.message == LOGIN and record.lane == "transactional"
    wire = encode_retry_record(record)
    assert decode_retry_record(wire).message == LOGIN
    again = decode_retry_message(RawEvent("push.retry", 0, 9, b"k", wire, 0.0))
    assert isinstance(again, SendRequest)
    assert (again.message, again.lane, again.seq) == (LOGIN, "transactional", 1)


# -- the engine's lanes ----------------------------------------------------------------------


def test_transactional_sends_take_the_tokens_first(store: SQLiteNotificationStore) -> None:
    sender = ScriptedSender(per_minute=600)  # a bucket of 10 tokens, none refilled (fixed clock)
    e = engine(store, sender, rate_wait_max_s=0.0)
    bulk = [request(f"b{i}", lane="bulk", source="push.apns.bulk/0@1") for i in range(10)]
    normal = [request(f"n{i}") for i in range(10)]
    urgent = [
        request(f"t{i}", lane="transactional", source="push.apns.transactional/0@1")
        for i in range(10)
    ]
    out = e.deliver(bulk + normal + urgent)  # the urgent ones queued last
    assert [r.lane for r in sender.sent] == ["transactional"] * 10
    held = [o for o in out if isinstance(o, RetryRecord)]
    assert len(held) == 20 and {h.reason for h in held} == {"rate_limited"}


def test_the_other_lanes_leave_room_for_transactional(store: SQLiteNotificationStore) -> None:
    e = engine(store, ScriptedSender(), in_flight=100)
    assert (e.room("transactional"), e.room("normal"), e.room("bulk")) == (100, 90, 80)
    e._in_flight["bulk"] = 80
    e._in_flight["normal"] = 10
    assert (e.room("transactional"), e.room("normal"), e.room("bulk")) == (10, 0, 0)


# -- a sender's own holds (Verdict.HELD) ---------------------------------------------------


def held(wait_s: float) -> ProviderAnswer:
    return ProviderAnswer(None, f"{HELD_PREFIX}domain busy.example", wait_s)


def test_a_held_send_is_scheduled_after_its_wait_without_using_an_attempt(
    store: SQLiteNotificationStore,
) -> None:
    clock = Clock()
    sender = ScriptedSender("email", default=lambda r: held(2.0))
    e = engine(store, sender, clock=clock, breaker_failures=1)
    out = e.deliver(
        [request(f"u{i}", provider="email", source="email.social/0@1") for i in range(3)]
    )
    records = [o for o in out if isinstance(o, RetryRecord)]
    events = [o for o in out if isinstance(o, DeliveryEvent)]
    assert len(records) == 3 and {r.attempt for r in records} == {0}
    assert all(r.due_at >= clock.now + 2.0 for r in records)
    assert {(ev.outcome, ev.attempt, ev.reason) for ev in events} == {
        ("retry_scheduled", 0, "held: domain busy.example")
    }
    # Not the provider's failure: a breaker that opens after one failure stays closed.
    assert e.breakers["email"].state is BreakerState.CLOSED
    clock.now += 3
    sender.default = lambda r: ProviderAnswer(250, None)
    retried = [request(f"u{i}", provider="email", source="push.retry/0@5", seq=1) for i in range(3)]
    outcomes = [o for o in e.deliver(retried) if isinstance(o, DeliveryEvent)]
    assert {(ev.outcome, ev.attempt) for ev in outcomes} == {("accepted", 1)}


def test_a_hold_past_the_age_cap_expires(store: SQLiteNotificationStore) -> None:
    clock = Clock()
    sender = ScriptedSender("chat", default=lambda r: held(30.0))
    e = engine(store, sender, clock=clock, retry=RetryPolicy(max_age_s=60))
    old = request("u1", provider="chat", source="chat.social/0@1", created_ts=clock.now - 50)
    [event] = [o for o in e.deliver([old]) if isinstance(o, DeliveryEvent)]
    assert (event.outcome, event.reason) == ("expired", "max_age")


# -- the lane reader: a marketing backlog never delays a transactional send -------------------


class GatedSender(ScriptedSender):
    """Answers transactional and normal sends at once; bulk ones only once `open`."""

    def __init__(self, provider: str) -> None:
        super().__init__(provider)
        self.open = False

    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        while any(r.lane == "bulk" for r in requests) and not self.open:
            await asyncio.sleep(0.01)
        return await super().send(requests, payloads)


def test_a_marketing_backlog_does_not_delay_a_transactional_send(tmp_path: Path) -> None:
    sender = GatedSender("email")
    loop = EventLoopThread("test-tiers")
    e = DeliveryEngine(
        claims=InMemoryEdgeClaims(),
        store=SQLiteNotificationStore(tmp_path / "n.db"),
        limiter=LocalRateLimiter(),
        senders={"email": sender},
        loop=loop,
        settings=DeliverySettings(in_flight=100),
    )
    marketing = [
        RawEvent(
            "email.marketing",
            0,
            i,
            b"c",
            batch_bytes(f"c{i}", "email", [f"m{j}" for j in range(100)]),
            0.0,
        )
        for i in range(20)
    ]
    transactional = ListReader([])
    part = _LanePairReader(
        "email#0",
        ListReader([]),
        ListReader(marketing, size=2),
        "email",
        BulkPacer(),
        BulkRoundBudget(100),
        DeliveryPump(lambda: e),
        transactional=transactional,
    )
    try:
        for _ in range(20):  # the marketing lane fills what it may of the in-flight limit
            part.next_batch()
            time.sleep(0.005)
        bulk_out = e._in_flight["bulk"]
        assert bulk_out >= 50 and e.room("bulk", "email") == 0
        transactional._events.append(
            RawEvent(
                "email.transactional", 0, 0, b"n1", batch_bytes("n1", "email", ["u1"], LOGIN), 0.0
            )
        )
        started = time.monotonic()
        emitted: list[object] = []
        while time.monotonic() - started < 5 and not emitted:
            emitted += [o for o in part.next_batch() if isinstance(o, DeliveryEvent)]
            time.sleep(0.002)
        waited = time.monotonic() - started
        assert [(ev.notification_id, ev.outcome) for ev in emitted] == [("n1:u1", "accepted")]
        assert waited < 1.0
        assert e._in_flight["bulk"] == bulk_out  # the marketing sends are all still unanswered
        assert part.snapshot()[8:10] == (1, 0)  # the transactional lane resumes after it
    finally:
        sender.open = True
        part.close()
        loop.stop()


# -- the retry source: a lane per queue ------------------------------------------------------


class LaneRoomEngine:
    """Takes what each lane has room for (`free` per lane); never answers."""

    def __init__(self, free: dict[str, int]) -> None:
        self.free = free
        self.submitted: list[SendRequest] = []

    def submit(self, requests: list[SendRequest]) -> list[Any]:
        self.submitted += requests
        for r in requests:
            self.free[r.lane] -= 1
        return []

    def collect(self) -> list[Any]:
        return []

    def room(self, lane: str, provider: str | None = None) -> int:
        return max(0, self.free[lane])

    def close(self) -> None:
        pass


def retry_event(offset: int, lane: str, due_at: float, message: Any = None) -> RawEvent:
    record = RetryRecord(
        "email",
        lane,
        f"n{offset}",
        "api:k1",
        CREATED,
        {"notification_id": f"n{offset}:u", "user_id": "u", "device_id": "e", "token": "u@x.io"},
        1,
        1,
        due_at,
        "451",
        message,
    )
    return RawEvent("push.retry", 0, offset, b"k", encode_retry_record(record), 0.0)


def test_a_full_bulk_lane_does_not_hold_up_a_due_transactional_retry() -> None:
    from typing import cast

    from operators.adapters.kafka.retry_source import _RetryPartitionReader
    from operators.delivery.steps import retry_due_at, retry_lane

    now = time.time()
    engine = LaneRoomEngine({"transactional": 10, "normal": 10, "bulk": 0})
    # A campaign's retries came due first; a login code's after them.
    events = [retry_event(i, "bulk", now - 10 + i) for i in range(5)]
    events.append(retry_event(5, "transactional", now - 1, LOGIN))
    events.append(retry_event(6, "normal", now - 1))
    part = _RetryPartitionReader(
        ListReader(events),
        "push.retry",
        0,
        [],
        retry_due_at,
        time.time,
        DeliveryPump(lambda: cast(DeliveryEngine, engine)),
        retry_lane,
    )
    part.next_batch()
    assert [(r.post_id, r.lane) for r in engine.submitted] == [
        ("n5", "transactional"),
        ("n6", "normal"),
    ]
    assert engine.submitted[0].message == LOGIN
    # The bulk retries wait, kept in the snapshot; they go once the lane has room.
    snapshot = part.snapshot()
    assert sorted(entry[1] for entry in snapshot[1]) == [0, 1, 2, 3, 4, 5, 6]
    # A restart sorts what its snapshot held back into the lanes.
    restarted = LaneRoomEngine({"transactional": 10, "normal": 0, "bulk": 0})
    again = _RetryPartitionReader(
        ListReader([]),
        "push.retry",
        0,
        list(snapshot[1]),
        retry_due_at,
        time.time,
        DeliveryPump(lambda: cast(DeliveryEngine, restarted)),
        retry_lane,
    )
    again.next_batch()
    assert [r.post_id for r in restarted.submitted] == ["n5"]
    again.close()
    engine.free["bulk"] = 3
    part.next_batch()
    assert [r.post_id for r in engine.submitted[2:]] == ["n0", "n1", "n2"]
    part.close()


def test_a_snapshot_of_the_two_lane_version_resumes_with_a_fresh_transactional_lane() -> None:
    engine = LaneRoomEngine({"transactional": 10, "normal": 10, "bulk": 10})
    login = RawEvent(
        "email.transactional", 0, 0, b"n1", batch_bytes("n1", "email", ["u1"], LOGIN), 0.0
    )
    part = _LanePairReader(
        "email#0",
        ListReader([]),
        ListReader([]),
        "email",
        BulkPacer(),
        BulkRoundBudget(100),
        DeliveryPump(lambda: engine),  # type: ignore[arg-type,return-value]
        (7, 3, 0, "n-id", "b-id", 0, {}, {}),  # what a recovery store of the last version holds
        transactional=ListReader([login]),
    )
    part.next_batch()
    assert [(r.post_id, r.lane) for r in engine.submitted] == [("n1", "transactional")]
    state = part.snapshot()
    assert len(state) == 12 and state[:2] == (7, 3) and state[8:10] == (0, 0)
    part.close()


# -- a provider bound by its own sessions does not take the worker's in-flight room ----------


class SessionBoundSender(ScriptedSender):
    """`concurrency` sessions; every send waits until `release` (the provider is slow)."""

    def __init__(self, provider: str, concurrency: int) -> None:
        super().__init__(provider)
        self.concurrency = concurrency
        self.released = False

    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        while not self.released:
            await asyncio.sleep(0.01)
        return await super().send(requests, payloads)


def _read_while_room(e: DeliveryEngine, provider: str, lane: str, backlog: int) -> int:
    """Submit as a channel reader does (as much as `room` allows); how many were submitted."""
    submitted = 0
    while submitted < backlog and (room := e.room(lane, provider)) > 0:
        n = min(room, backlog - submitted)
        e.submit(
            [request(f"{provider}{submitted + i}", provider=provider, lane=lane) for i in range(n)]
        )
        submitted += n
    return submitted


def test_a_slow_channel_leaves_the_in_flight_room_to_the_other_channels(tmp_path: Path) -> None:
    """Email with 8 SMTP sessions and a backlog of 1,000 must not hold all 400 slots of the
    worker while web push (64 connections) has 1,000 waiting: web push then went at the pace
    at which email freed a slot (2 a second in the channel kill -9 test)."""
    email = SessionBoundSender("email", concurrency=8)
    webpush = SessionBoundSender("webpush", concurrency=64)
    loop = EventLoopThread("test-tiers-sessions")
    e = DeliveryEngine(
        claims=InMemoryEdgeClaims(),
        store=SQLiteNotificationStore(tmp_path / "n.db"),
        limiter=LocalRateLimiter(),
        senders={"email": email, "webpush": webpush},
        loop=loop,
        settings=DeliverySettings(in_flight=400),
    )
    try:
        emails = _read_while_room(e, "email", "transactional", 1_000)
        # A quarter of the limit (more than 4 rounds of 8 sessions), and a round for
        # transactional sends.
        assert emails == 400 // 4 + 8
        pushes = _read_while_room(e, "webpush", "normal", 1_000)
        assert pushes == CONCURRENCY_ROUNDS * 64
        assert e.in_flight == emails + pushes < 400
        # Released, everything is answered and the room comes back.
        email.released = webpush.released = True
        judged: list[Any] = []
        deadline = time.monotonic() + 10
        while len(judged) < emails + pushes and time.monotonic() < deadline:
            judged += e.collect()
            time.sleep(0.01)
        assert len(judged) == emails + pushes and e.in_flight == 0
        assert e.room("normal", "webpush") == CONCURRENCY_ROUNDS * 64
    finally:
        email.released = webpush.released = True
        e.close()
        loop.stop()


def test_a_transactional_send_finds_room_behind_its_channels_backlog(tmp_path: Path) -> None:
    """The normal and bulk lanes of a session-bound channel fill its rounds; a transactional
    message of that channel may still be read (its sessions serve it first)."""
    email = SessionBoundSender("email", concurrency=8)
    e = engine(SQLiteNotificationStore(tmp_path / "n.db"), email, in_flight=1_000)
    e._in_flight["bulk"] = 1_000 // 4  # its share: a quarter of the limit
    e._in_flight_by_provider["email"] = 1_000 // 4  # its share: a quarter of the limit
    assert e.room("bulk", "email") == e.room("normal", "email") == 0
    assert e.room("transactional", "email") == 8
    # A sender with no bound of its own (APNs, FCM: HTTP/2 streams) keeps the lane limits only.
    unbound = engine(
        SQLiteNotificationStore(tmp_path / "m.db"), ScriptedSender("apns"), in_flight=1_000
    )
    assert unbound.room("normal", "apns") == 900
