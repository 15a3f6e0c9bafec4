"""The delivery engine with a scripted provider, the SQLite store and in-memory claims."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from operators import metrics
from operators.adapters.redis.rate_limiter import LocalRateLimiter
from operators.adapters.stores.sqlite_notifications import SQLiteNotificationStore
from operators.delivery.circuit_breaker import BreakerState
from operators.delivery.edge_claims import InMemoryEdgeClaims
from operators.delivery.engine import DeliveryEngine, DeliverySettings
from operators.delivery.model import ProviderAnswer, RetryPolicy, SendRequest
from operators.delivery.payloads import push_collapse_id
from operators.delivery.steps import decode_retry_message
from operators.events import RawEvent
from schemas.codecs import encode_retry_record
from schemas.records import ChannelMessage, DeadLetter, DeliveryEvent, DeviceChange, RetryRecord
from tests.fakes import ScriptedSender, request
from tests.unit.engine_kit import Clock, engine


@pytest.fixture
def store(tmp_path: Path) -> SQLiteNotificationStore:
    return SQLiteNotificationStore(tmp_path / "n.db")


def events(out: list[object]) -> list[tuple[str, str, str, int]]:
    return [
        (e.user_id, e.device_id, e.outcome, e.attempt) for e in out if isinstance(e, DeliveryEvent)
    ]


def test_accepted_once_per_device(store: SQLiteNotificationStore) -> None:
    sender = ScriptedSender()
    e = engine(store, sender)
    out = e.deliver([request("u1", "d1"), request("u1", "d2"), request("u2", "d1")])
    assert events(out) == [
        ("u1", "d1", "accepted", 1),
        ("u1", "d2", "accepted", 1),
        ("u2", "d1", "accepted", 1),
    ]
    assert len(sender.sent) == 3
    assert store.notification_status("p1:u1") == "dispatched"
    assert [a.attempt for a in store.attempts("p1:u1")] == [1, 1]


def test_a_duplicate_message_is_skipped_by_the_edge_claim_and_by_the_store(
    store: SQLiteNotificationStore,
) -> None:
    sender = ScriptedSender()
    e = engine(store, sender)
    e.deliver([request(source="push.apns/0@1")])
    assert e.deliver([request(source="push.apns/2@40")]) == []  # Redis claim held by another
    # Redis lost its data: the store's unique key still refuses the duplicate.
    e2 = engine(store, sender, claims=InMemoryEdgeClaims())
    assert e2.deliver([request(source="push.apns/2@40")]) == []
    assert len(sender.sent) == 1


def test_replay_of_the_owner_resends_an_unfinished_send_and_reemits_a_finished_one(
    store: SQLiteNotificationStore,
) -> None:
    sender = ScriptedSender()
    # Crash after the claim, before the answer: the row says `sending`.
    assert store.claim([request("u1", source="push.apns/0@5")]) == [None]
    e = engine(store, sender)
    out = e.deliver([request("u1", source="push.apns/0@5"), request("u2", source="push.apns/0@5")])
    assert events(out) == [("u1", "d1", "accepted", 1), ("u2", "d1", "accepted", 1)]
    assert len(sender.sent) == 2
    assert sender.sent[0].apns_id == request("u1").apns_id  # the same apns-id as before
    # Replayed again after it finished: the same events, no send, and not counted twice.
    accepted = metrics.OUTCOMES.labels("apns", "accepted")
    counted = accepted._value.get()
    again = e.deliver([request("u1", source="push.apns/0@5")])
    assert [x.identity for x in again if isinstance(x, DeliveryEvent)] == [
        x.identity for x in out if isinstance(x, DeliveryEvent) and x.user_id == "u1"
    ]
    assert len(sender.sent) == 2
    assert accepted._value.get() == counted


def test_invalid_token_deactivates_the_device_without_retry(store: SQLiteNotificationStore) -> None:
    sender = ScriptedSender(answers={"dead": ProviderAnswer(410, "Unregistered")})
    out = engine(store, sender).deliver([request("u1", "d9", token="dead")])
    assert events(out) == [("u1", "d9", "invalid_token", 1)]
    [change] = [x for x in out if isinstance(x, DeviceChange)]
    assert (change.user_id, change.device_id, change.active, change.provider) == (
        "u1",
        "d9",
        False,
        "apns",
    )
    assert not [x for x in out if isinstance(x, RetryRecord)]


def test_transient_failure_goes_through_the_retry_topic_then_succeeds(
    store: SQLiteNotificationStore,
) -> None:
    clock = Clock()
    sender = ScriptedSender(answers={"t": [ProviderAnswer(503, "ServiceUnavailable")]})
    e = engine(store, sender, clock=clock, retry=RetryPolicy(base_s=2.0))
    out = e.deliver([request(token="t")])
    [record] = [x for x in out if isinstance(x, RetryRecord)]
    [event] = [x for x in out if isinstance(x, DeliveryEvent)]
    assert (event.outcome, event.status, event.reason, event.attempt) == (
        "retry_scheduled",
        503,
        "503 ServiceUnavailable",
        1,
    )
    assert (record.attempt, record.seq, record.due_at) == (1, 1, clock.now + 1.0)  # 0.5 x 2 s
    retry = request(token="t", source="push.retry/0@0", attempt=1, seq=1)
    out = e.deliver([retry, retry])  # a duplicated retry record sends once
    assert events(out) == [("u1", "d1", "accepted", 2)]
    assert len(sender.sent) == 2
    # A stale copy of the retry record after the fact: nothing.
    assert e.deliver([request(token="t", source="push.retry/3@9", attempt=1, seq=1)]) == []


def test_retries_end_dead_lettered_after_the_attempt_cap(store: SQLiteNotificationStore) -> None:
    sender = ScriptedSender(default=lambda r: ProviderAnswer(500, "InternalServerError"))
    e = engine(store, sender, retry=RetryPolicy(max_attempts=2), breaker_failures=100)
    e.deliver([request()])
    out = e.deliver([request(source="push.retry/0@0", attempt=1, seq=1)])
    assert events(out) == [("u1", "d1", "dead_lettered", 2)]
    [letter] = [x for x in out if isinstance(x, DeadLetter)]
    assert (
        letter.source_topic == "push.retry"
        and "dead_lettered: 500 InternalServerError" in letter.error
    )
    assert store.notification_status("p1:u1") == "exhausted"


def test_an_old_notification_expires_unsent(store: SQLiteNotificationStore) -> None:
    sender = ScriptedSender()
    out = engine(store, sender, retry=RetryPolicy(max_age_s=60)).deliver(
        [request(created_ts=time.time() - 61)]
    )
    assert events(out) == [("u1", "d1", "expired", 0)]
    assert sender.sent == []


def test_permanent_failure_and_payload_too_large_are_failed_and_dead_lettered(
    store: SQLiteNotificationStore,
) -> None:
    sender = ScriptedSender(answers={"bad": ProviderAnswer(400, "BadTopic")}, too_large={"big"})
    out = engine(store, sender).deliver([request("u1", token="bad"), request("u2", token="big")])
    assert events(out) == [("u2", "d1", "failed", 0), ("u1", "d1", "failed", 1)]
    assert len([x for x in out if isinstance(x, DeadLetter)]) == 2
    assert [r.item["token"] for r in sender.sent] == ["bad"]


def test_a_dead_letter_names_the_send_in_valid_json_whatever_its_ids_hold(
    store: SQLiteNotificationStore,
) -> None:
    # The dead letter's raw was written with f-strings: a quote in an id made it invalid JSON.
    sender = ScriptedSender(answers={"bad": ProviderAnswer(400, "BadTopic")})
    odd = 'd"1\\x'
    out = engine(store, sender).deliver(
        [request("u1", odd, token="bad", source="push.apns.bulk/3@41")]
    )
    [letter] = [x for x in out if isinstance(x, DeadLetter)]
    assert (letter.source_topic, letter.partition, letter.offset) == ("push.apns.bulk", 3, 41)
    assert orjson.loads(letter.raw) == {
        "post_id": "p1",
        "notification_id": "p1:u1",
        "device_id": odd,
        "provider": "apns",
    }


def test_breaker_opens_and_holds_sends_without_losing_them(store: SQLiteNotificationStore) -> None:
    clock = Clock()
    sender = ScriptedSender(default=lambda r: ProviderAnswer(503, "ServiceUnavailable"))
    e = engine(store, sender, clock=clock, breaker_failures=3, breaker_cooldown_s=5.0)
    e.deliver([request(f"u{i}") for i in range(3)])
    assert e.breakers["apns"].state is BreakerState.OPEN
    out = e.deliver([request(f"v{i}") for i in range(4)])
    held = [x for x in out if isinstance(x, RetryRecord)]
    assert len(held) == 4 and {r.reason for r in held} == {"circuit_open"}
    assert {r.attempt for r in held} == {0}  # holding uses no attempt
    assert all(r.due_at >= clock.now + 5.0 for r in held)
    assert len(sender.sent) == 3
    # After the cooldown a probe goes; it succeeds and the breaker closes.
    clock.now += 6.5
    sender.default = lambda r: ProviderAnswer(200, None)
    out = e.deliver([request(f"v{i}", source="push.retry/0@1", seq=1) for i in range(4)])
    outcomes = sorted(o for _, _, o, _ in events(out))
    assert outcomes == ["accepted", "retry_scheduled", "retry_scheduled", "retry_scheduled"]
    assert e.breakers["apns"].state is BreakerState.CLOSED
    out = e.deliver([request(f"v{i}", source="push.retry/0@2", seq=2) for i in range(1, 4)])
    assert [o for _, _, o, _ in events(out)] == ["accepted"] * 3


def test_rate_limit_holds_what_it_cannot_wait_for(store: SQLiteNotificationStore) -> None:
    sender = ScriptedSender(per_minute=600)  # 10/s, bucket of 10
    e = engine(store, sender, rate_wait_max_s=0.0)
    out = e.deliver([request(f"u{i}") for i in range(15)])
    assert len(sender.sent) == 10
    held = [x for x in out if isinstance(x, RetryRecord)]
    assert len(held) == 5 and {r.reason for r in held} == {"rate_limited"}


def test_rate_limit_waits_briefly_for_tokens(store: SQLiteNotificationStore) -> None:
    sender = ScriptedSender(per_minute=6_000)  # 100/s
    e = engine(store, sender, rate_wait_max_s=1.0)
    e._limiter = LocalRateLimiter()  # real time: the wait is real
    started = time.monotonic()
    out = e.deliver([request(f"u{i}") for i in range(130)])
    assert len(sender.sent) == 130 and not [x for x in out if isinstance(x, RetryRecord)]
    assert time.monotonic() - started >= 0.25


class TimedSender(ScriptedSender):
    """Records when each request was handed to `send` (time.monotonic), and each call's size."""

    def __init__(self, per_minute: int, answer_after_s: float = 0.0) -> None:
        super().__init__(per_minute=per_minute)
        self.answer_after_s = answer_after_s
        self.times: list[float] = []
        self.calls: list[tuple[int, float, float]] = []  # (requests, started, answered)

    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        started = time.monotonic()
        self.times.extend(started for _ in requests)
        await asyncio.sleep(self.answer_after_s)
        answers = await super().send(requests, payloads)
        self.calls.append((len(requests), started, time.monotonic()))
        return answers


def most_in_window(times: list[float], w: float) -> int:
    """The most times in any window [t, t + w)."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while j < len(times) and times[j] < t + w:
            j += 1
        best = max(best, j - i)
    return best


def test_each_grant_is_sent_when_taken(store: SQLiteNotificationStore) -> None:
    """Tokens taken up to a second apart were sent together (25 at once, 20 allowed)."""
    sender = TimedSender(per_minute=600)  # 10/s, a bucket of 10
    e = engine(store, sender, rate_wait_max_s=2.0)
    e._limiter = LocalRateLimiter()  # real time
    out = e.deliver([request(f"u{i}") for i in range(25)])
    assert len(sender.sent) == 25 and not [x for x in out if isinstance(x, RetryRecord)]
    # rate x W + burst: at most 10 + 10 in any second, 5 + 10 in any half second
    assert most_in_window(sender.times, 1.0) <= 20
    assert most_in_window(sender.times, 0.5) <= 15
    assert sender.times[10] - sender.times[0] >= 0.05  # the 11th waited for its token


def test_a_chunked_sender_takes_tokens_for_one_chunk_at_a_time(
    store: SQLiteNotificationStore,
) -> None:
    """FCM sends a chunk of 50 at a time: a token must not wait behind another chunk."""
    sender = TimedSender(per_minute=6_000_000, answer_after_s=0.01)
    sender.max_per_send = 3
    sender.one_send_at_a_time = True
    engine(store, sender).deliver([request(f"u{i}") for i in range(8)])
    assert [n for n, _, _ in sender.calls] == [3, 3, 2]
    for (_, _, answered), (_, started, _) in itertools.pairwise(sender.calls):
        assert started >= answered  # the next chunk only once the last one was answered


def test_one_wait_budget_for_both_lanes(store: SQLiteNotificationStore) -> None:
    """The wait no longer starts over for the bulk lane."""
    sender = ScriptedSender(per_minute=600)  # 10/s, a bucket of 10
    e = engine(store, sender, rate_wait_max_s=0.3)
    e._limiter = LocalRateLimiter()
    started = time.monotonic()
    reqs = [request(f"n{i}") for i in range(12)] + [
        request(f"b{i}", lane="bulk", source="push.apns.bulk/0@1") for i in range(12)
    ]
    out = e.deliver(reqs)
    assert time.monotonic() - started < 0.3 + 0.15  # one budget, not one per lane
    held = [x for x in out if isinstance(x, RetryRecord)]
    assert held and len(sender.sent) + len(held) == 24
    assert {r.reason for r in held} == {"rate_limited"}


def test_the_bulk_window_grows_while_answers_are_quick_and_shrinks_when_they_queue() -> None:
    from operators.delivery.dispatch import DelayWindow

    w = DelayWindow(initial=64, smallest=16, queue_target_s=0.05)
    t = 0.0
    for _ in range(20):  # quick answers: the window opens
        t += 0.01
        w.answered(64, 0.01, t)
    assert w.size > 400
    big = w.size
    for _ in range(50):  # answers 100 ms slower than the quickest: it closes, once per trip
        t += 0.02
        w.answered(64, 0.11, t)
    assert 16 <= w.size < big / 4


def test_submit_returns_at_once_and_collect_judges_the_answers(
    store: SQLiteNotificationStore,
) -> None:
    """The pipelined form: nothing waits for the provider; outcomes come out of collect."""
    from operators.adapters.providers.event_loop import EventLoopThread

    sender = TimedSender(per_minute=6_000_000, answer_after_s=0.3)
    loop = EventLoopThread()
    e = DeliveryEngine(
        claims=InMemoryEdgeClaims(),
        store=store,
        limiter=LocalRateLimiter(),
        senders={"apns": sender},
        loop=loop,
        settings=DeliverySettings(in_flight=10),
    )
    started = time.monotonic()
    assert e.submit([request(f"u{i}") for i in range(6)]) == []
    assert time.monotonic() - started < 0.2  # not waiting for the 0.3 s answers
    # A tenth of the limit is kept for the transactional lane.
    assert e.in_flight == 6 and e.room("transactional") == 4
    assert e.room("normal") == 3 and e.room("bulk") == 3
    judged = []
    while len(judged) < 6 and time.monotonic() - started < 5:
        judged += e.collect()
        time.sleep(0.01)
    assert sorted(j.request.item["user_id"] for j in judged) == [f"u{i}" for i in range(6)]
    assert {o.outcome for j in judged for o in j.outputs} == {"accepted"}  # type: ignore[union-attr]
    assert e.in_flight == 0
    e.close()
    loop.stop()


def test_observe_many_counts_as_observe_does() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    one = Histogram("h_one", "h", ["x"], buckets=(0.05, 0.1, 1), registry=registry)
    many = Histogram("h_many", "h", ["x"], buckets=(0.05, 0.1, 1), registry=registry)
    values = [0.0, 0.05, 0.051, 0.1, 0.3, 1.0, 1.5, 42.0, -0.2]
    for v in values:
        one.labels("a").observe(max(0.0, v))
    metrics.observe_many(many.labels("a"), values)

    def samples(name: str) -> list[tuple[str, float]]:
        return [
            (s.name.removeprefix(name), s.value)
            for m in registry.collect()
            if m.name == name
            for s in m.samples
            if not s.name.endswith("_created")
        ]

    assert samples("h_one") == samples("h_many")


def test_a_retry_carries_the_message_and_its_collapse_key(store: SQLiteNotificationStore) -> None:
    # A bundle summary that fails once is retried with its message: the retry collapses too.
    message = ChannelMessage(
        category="new_post",
        template_id="new_posts_bundle",
        tier="social",
        data={"count": 3},
        collapse_key="bundle:new_post:u1",
    )
    sender = ScriptedSender(answers={"t": [ProviderAnswer(503, "ServiceUnavailable")]})
    out = engine(store, sender).deliver([replace(request(token="t"), message=message)])
    [record] = [x for x in out if isinstance(x, RetryRecord)]
    assert record.message == message
    event = RawEvent("push.retry", 0, 4, None, encode_retry_record(record), time.time())
    retry = decode_retry_message(event)
    assert isinstance(retry, SendRequest) and retry.message == message
    assert push_collapse_id(retry) == "bundle:new_post:u1"
