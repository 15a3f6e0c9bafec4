"""Redis outages and broker restarts, adapter by adapter.

Redis: a closed port stands for a Redis that is down, and a redis-server of the test's own
(no persistence, on a free port; never the shared one) for one that restarts EMPTY.

- edge claims are a fast path: on a connection error they answer "claimed now" and the
  notification store's unique key decides; Redis is tried again once per probe interval;
- the rate limiter paces on a local bucket at a quarter of the rate until Redis answers;
- post claims (the fan-out's dedupe authority) and writer start marks wait for Redis with a
  bounded backoff, then fail the worker (RedisUnavailable) for the supervisor to restart.

Broker: a fake librdkafka consumer whose fetches come back empty with a high watermark below
the reader's position (what Tansu answers after a restart emptied the partition).
"""

from __future__ import annotations

import itertools
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, KafkaError

from flows.runtime.ports import free_port
from operators import metrics
from operators.adapters.kafka import probes as kafka_probes
from operators.adapters.kafka import reader as kafka_reader
from operators.adapters.kafka.probes import read_partition_to_end
from operators.adapters.kafka.reader import TopicPartitionReader
from operators.adapters.redis.client import (
    RedisOutage,
    RedisUnavailable,
    fail_fast_options,
    retry_while_down,
)
from operators.adapters.redis.edge_claims import RedisEdgeClaims
from operators.adapters.redis.post_claims import RedisPostClaims
from operators.adapters.redis.rate_limiter import AsyncRedisRateLimiter, RedisRateLimiter
from operators.adapters.redis.writer_marks import RedisWriterStartMarks
from operators.adapters.stores.sqlite_notifications import SQLiteNotificationStore
from operators.delivery.engine import DeliveryEngine, DeliverySettings
from operators.delivery.token_bucket import BucketSpec
from operators.events import CaughtUp, RawEvent
from schemas.records import DeliveryEvent
from scripts.harness.chaos_stack import RedisServer
from tests.fakes import InlineLoop, ScriptedSender, request


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def closed_url() -> str:
    """A Redis URL where nothing listens: connections are refused at once."""
    return f"redis://127.0.0.1:{free_port()}/0"


class OwnRedis(RedisServer):
    """A redis-server of the test's own without persistence: a restart comes back empty."""

    def __init__(self, port: int, directory: Path) -> None:
        super().__init__(directory, port)

    def start(self, timeout_s: float = 20.0) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        super().start(timeout_s)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(free_port(), tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


# --- the shared pieces: bounded retry and the outage gate ------------------------------------


def test_retry_while_down_rides_out_a_short_outage(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    calls = []

    def call() -> str:
        calls.append(clock.now)
        if len(calls) <= 4:
            raise redis.ConnectionError("Connection refused")
        return "ok"

    with caplog.at_level(logging.WARNING):
        assert (
            retry_while_down(
                call,
                what="post claims",
                retry_for_s=60,
                sleep=clock.sleep,
                clock=clock,
                rand=lambda: 1.0,
            )
            == "ok"
        )
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(calls)]
    assert gaps == [0.05, 0.1, 0.2, 0.4]  # exponential backoff
    text = caplog.text
    assert "post claims: Redis unreachable" in text and "answers again after 0.8 s" in text


def test_retry_while_down_gives_up_after_its_bound() -> None:
    clock = FakeClock()
    calls = 0

    def call() -> None:
        nonlocal calls
        calls += 1
        raise redis.TimeoutError("Timeout reading from socket")

    with pytest.raises(RedisUnavailable, match="supervisor restarts the flow"):
        retry_while_down(call, what="post claims", retry_for_s=30, sleep=clock.sleep, clock=clock)
    assert 30 <= clock.now - 1_000.0 < 30.01  # never sleeps past the bound
    assert 15 < calls < 40  # backoff capped at 2 s (jittered down to 1 s)


def test_retry_while_down_does_not_retry_other_errors() -> None:
    calls = 0

    def call() -> None:
        nonlocal calls
        calls += 1
        raise redis.ResponseError("WRONGTYPE")

    with pytest.raises(redis.ResponseError):
        retry_while_down(call, what="x", retry_for_s=30, sleep=lambda s: None)
    assert calls == 1


def test_outage_gate_tries_redis_once_per_probe_interval_and_waits_longer_after_a_timeout() -> None:
    clock = FakeClock()
    gate = RedisOutage("edge claims", probe_s=1.0, clock=clock)
    assert not gate.skip()
    gate.failed(redis.ConnectionError("refused"), started=clock.now)
    assert gate.down_since == clock.now
    clock.now += 0.5
    assert gate.skip() and gate.skipped == 1
    clock.now += 0.5
    assert not gate.skip()  # the probe
    started = clock.now
    clock.now += 2.0  # a connect timeout
    gate.failed(redis.TimeoutError("timed out"), started=started)
    clock.now += 7.9
    assert gate.skip()  # 4 x 2 s: Redis holds the caller at most a fifth of the time
    clock.now += 0.2
    assert not gate.skip()
    gate.answered()
    assert gate.down_since is None and not gate.skip()


# --- edge claims: a fast path the store backs ---------------------------------------------


def test_edge_claims_answer_claimed_now_when_redis_is_down_and_skip_it_for_a_while() -> None:
    claims = RedisEdgeClaims(closed_url(), "t:", ttl_s=60, probe_s=30.0)
    started = time.monotonic()
    assert claims.claim([("p1:u1", "d1", "push.apns/0@1"), ("p1:u2", "d1", "push.apns/0@1")]) == [
        None,
        None,
    ]
    assert claims.claim([("p1:u3", "d1", "push.apns/0@2")]) == [None]
    assert time.monotonic() - started < 1.0
    assert claims.bypassed == 3
    assert claims.outage.failures == 1 and claims.outage.skipped == 1  # one connection attempt


def test_engine_keeps_one_push_per_device_with_redis_down(tmp_path: Path) -> None:
    """No edge claims, no shared bucket: the store's unique key still decides every send."""
    store = SQLiteNotificationStore(tmp_path / "n.db")
    sender = ScriptedSender()
    url = closed_url()
    e = DeliveryEngine(
        claims=RedisEdgeClaims(url, "t:", ttl_s=60),
        store=store,
        limiter=RedisRateLimiter(url, "t:"),
        senders={"apns": sender},
        loop=InlineLoop(),
        settings=DeliverySettings(),
        rand=lambda: 0.5,
    )
    skipped_by_store = metrics.DELIVERY_DEDUPED.labels("store")
    before = skipped_by_store._value.get()
    first = e.deliver(
        [request("u1", source="push.apns/0@1"), request("u2", source="push.apns/0@1")]
    )
    assert [x.outcome for x in first if isinstance(x, DeliveryEvent)] == ["accepted", "accepted"]
    # A different message carrying the same items (a duplicate dispatch batch): skipped.
    assert e.deliver([request("u1", source="push.apns/1@7")]) == []
    assert skipped_by_store._value.get() == before + 1
    # The same message replayed after a crash: re-emits its outcome, sends nothing.
    again = e.deliver([request("u1", source="push.apns/0@1")])
    assert [x.outcome for x in again if isinstance(x, DeliveryEvent)] == ["accepted"]
    assert len(sender.sent) == 2


def test_edge_claims_packed_batch_answers_each_claims_holder(own_redis: OwnRedis) -> None:
    claims = RedisEdgeClaims(own_redis.url, "t:", ttl_s=60)
    assert claims.claim([("p1:u1", "d1", "A@1"), ("p1:u1", "d2", "A@1")]) == [None, None]
    # Held ones answer their holder (ours on a replay), new ones claimed now, in order.
    assert claims.claim(
        [("p1:u1", "d1", "B@2"), ("p1:u2", "d1", "B@2"), ("p1:u1", "d2", "A@1")]
    ) == ["A@1", None, "A@1"]
    assert own_redis.client().ttl("t:edge:p1:u2|d1") > 0


def test_edge_claims_with_a_separator_in_an_id_take_the_per_key_script(
    own_redis: OwnRedis,
) -> None:
    claims = RedisEdgeClaims(own_redis.url, "t:", ttl_s=60)
    odd = [("p1:u\t1", "d1", "A@1"), ("p1:u1", "d\n2", "A@1"), ("p1:u1", "d3", "A\t@1")]
    assert claims.claim(odd) == [None, None, None]
    assert claims.claim([(n, d, "B@2") for n, d, _ in odd]) == ["A@1", "A@1", "A\t@1"]
    assert own_redis.client().get("t:edge:p1:u\t1|d1") == b"A@1"


def test_edge_claims_after_redis_restarted_empty(own_redis: OwnRedis) -> None:
    claims = RedisEdgeClaims(own_redis.url, "t:", ttl_s=60, probe_s=0.05)
    assert claims.claim([("p1:u1", "d1", "A")]) == [None]
    assert claims.claim([("p1:u1", "d1", "B")]) == ["A"]  # the fast path refuses B
    own_redis.kill()
    assert claims.claim([("p1:u1", "d1", "B")]) == [None]  # down: the store decides
    own_redis.start()  # empty
    time.sleep(0.1)
    # The claim A held is gone: B reaches the store, which refuses it (see the engine test).
    assert claims.claim([("p1:u1", "d1", "B")]) == [None]
    assert claims.outage.down_since is None  # the first call after the restart answered
    assert claims.claim([("p1:u1", "d1", "C")]) == ["B"]  # and claims are written again


# --- the rate limiter: a local bucket at a quarter of the rate ------------------------------


def test_rate_limiter_paces_on_a_quarter_of_the_rate_while_redis_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    limiter = RedisRateLimiter(closed_url(), "t:", probe_s=1.0, clock=clock)
    spec = BucketSpec("apns:t", per_minute=6_000)  # 100/s, a bucket of 100
    granted = 0
    with caplog.at_level(logging.WARNING):
        for _ in range(1_000):  # 10 s, a take every 10 ms
            granted += limiter.take(spec, 50, "normal").granted
            clock.now += 0.01
    # 25/s for 10 s plus the local bucket's 25 tokens: never more.
    assert 240 <= granted <= 25 * 10 + 25, granted
    assert limiter.fallbacks == 1_000
    assert limiter.outage.failures <= 11  # Redis tried once a second, not once per take
    assert caplog.text.count("Redis unreachable") == 1  # one warning per outage


def test_rate_limiter_is_back_on_the_shared_bucket_when_redis_answers(
    own_redis: OwnRedis,
) -> None:
    limiter = RedisRateLimiter(own_redis.url, "t:", probe_s=0.05)
    spec = BucketSpec("apns:t", per_minute=6_000)
    assert limiter.take(spec, 10, "normal").granted == 10
    assert limiter.fallbacks == 0
    own_redis.kill()
    assert limiter.take(spec, 10, "normal").granted == 10  # the local bucket (25 tokens)
    assert limiter.fallbacks == 1
    own_redis.start()  # empty: the shared bucket starts full
    time.sleep(0.1)
    assert limiter.take(spec, 10, "normal").granted == 10
    assert limiter.fallbacks == 1 and limiter.outage.down_since is None
    assert own_redis.client().exists("t:ratelimit:apns:t") == 1


def test_destination_pacing_shares_the_bucket_without_holding_the_event_loop(
    own_redis: OwnRedis,
) -> None:
    """The channels' per-destination limiter takes from the same Redis bucket as the engine's,
    on the event loop without blocking it, and paces on its local bucket when Redis is gone."""
    import asyncio

    import redis.asyncio as aioredis

    spec = BucketSpec("email-domain:t.example", per_minute=6_000)  # 100/s, a bucket of 100

    async def scenario() -> tuple[list[int], int, int]:
        client = aioredis.Redis.from_url(own_redis.url, **fail_fast_options())
        limiter = AsyncRedisRateLimiter(client, "t:", probe_s=30.0)
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        beside = asyncio.create_task(ticker())
        shared = [(await limiter.take(spec, 60, "normal")).granted]
        shared.append(RedisRateLimiter(own_redis.url, "t:").take(spec, 60, "normal").granted)
        ticks_at = ticks
        own_redis.kill()
        down = (await limiter.take(spec, 10, "normal")).granted  # the local bucket (25 tokens)
        stop.set()
        await beside
        await client.aclose()
        assert limiter.fallbacks == 1 and limiter.outage.failures == 1
        return shared, down, ticks - ticks_at

    shared, down, ticks_while_down = asyncio.run(scenario())
    assert shared[0] == 60 and shared[1] < 45  # one bucket: the second take found 40 or so
    assert down == 10
    assert ticks_while_down > 0  # the loop ran other work while the take waited on Redis


# --- post claims and writer start marks: wait, then fail the worker --------------------------


def test_post_claims_wait_for_redis_and_claim_when_it_is_back(own_redis: OwnRedis) -> None:
    claims = RedisPostClaims(own_redis.url, "t:", ttl_s=60, retry_for_s=30)
    assert claims.claim([("p0", "post_created/0@0")]) == [True]
    own_redis.kill()
    restarter = threading.Timer(1.0, own_redis.start)
    restarter.start()
    started = time.monotonic()
    try:
        assert claims.claim([("p1", "post_created/0@1"), ("p1", "post_created/0@2")]) == [
            True,
            False,
        ]
    finally:
        restarter.join()
    assert time.monotonic() - started >= 0.9  # it waited for Redis, it did not skip the claim
    assert claims.claim([("p1", "post_created/0@1")]) == [True]  # a retry is idempotent
    # Redis came back empty: p0's claim is gone (the delivery ledger keeps devices at one push).
    assert claims.claim([("p0", "post_created/1@9")]) == [True]


def test_post_claims_fail_the_worker_when_redis_stays_away() -> None:
    claims = RedisPostClaims(closed_url(), "t:", ttl_s=60, retry_for_s=0.5)
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match="post claims"):
        claims.claim([("p1", "post_created/0@1")])
    assert 0.5 <= time.monotonic() - started < 3.0


def test_writer_start_marks_wait_for_redis_then_give_up() -> None:
    marks = RedisWriterStartMarks(closed_url(), "t:", retry_for_s=0.3)
    with pytest.raises(RedisUnavailable, match=r"writer start mark push\.apns/0"):
        marks.mark("push.apns/0", 42)


def test_writer_start_marks_survive_a_redis_restart(own_redis: OwnRedis) -> None:
    marks = RedisWriterStartMarks(own_redis.url, "t:", retry_for_s=10)
    assert marks.mark("push.apns/0", 42) == 42
    assert marks.mark("push.apns/0", 50) == 42  # the earlier start wins
    own_redis.kill()
    own_redis.start()
    assert marks.mark("push.apns/0", 50) == 50  # Redis lost it; the stale connection reconnects


def test_writer_start_marks_belong_to_one_lineage_and_outlive_their_ttl_while_used(
    own_redis: OwnRedis,
) -> None:
    first = RedisWriterStartMarks(own_redis.url, "t:", lineage="aaa", ttl_s=100)
    assert first.mark("push.apns/0", 42) == 42
    # Another recovery directory (after --fresh) starts over: its own mark.
    fresh = RedisWriterStartMarks(own_redis.url, "t:", lineage="bbb", ttl_s=100)
    assert fresh.mark("push.apns/0", 900) == 900
    assert first.mark("push.apns/0", 950) == 42
    client = own_redis.client()
    assert client.get("t:writer-start:aaa:push.apns/0") == b"42"
    client.expire("t:writer-start:aaa:push.apns/0", 5)
    first.mark("push.apns/0", 960)  # built again with no snapshot: the mark's TTL starts over
    assert client.ttl("t:writer-start:aaa:push.apns/0") > 50


# --- broker restarts: a reader whose offset lies beyond the partition's end -----------------


class FakeError:
    def __init__(self, code: int) -> None:
        self._code = code

    def code(self) -> int:
        return self._code

    def fatal(self) -> bool:
        return False

    def retriable(self) -> bool:
        return False

    def str(self) -> str:
        return f"error {self._code}"


class FakeMessage:
    def __init__(self, offset: int, value: bytes | None = b"v", eof: bool = False) -> None:
        self._offset = offset
        self._value = value
        self._error = FakeError(KafkaError._PARTITION_EOF) if eof else None

    def error(self) -> FakeError | None:
        return self._error

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes | None:
        return self._value


@dataclass
class FakeConsumer:
    """What librdkafka shows on Tansu after a restart: empty fetches, a smaller high watermark."""

    conf: dict[str, Any]
    high: int = 3
    queue: list[FakeMessage] = field(default_factory=list)
    seeks: list[int] = field(default_factory=list)
    assigned: list[int] = field(default_factory=list)

    def assign(self, parts: list[Any]) -> None:
        self.assigned = [p.offset for p in parts]

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        out, self.queue = self.queue[:n], self.queue[n:]
        return out

    def seek(self, tp: Any) -> None:
        self.seeks.append(tp.offset)

    def get_watermark_offsets(self, tp: Any, cached: bool = False, timeout: float = 0) -> Any:
        return (0, self.high)

    def close(self) -> None:
        pass


@pytest.fixture
def consumers(monkeypatch: pytest.MonkeyPatch) -> list[FakeConsumer]:
    made: list[FakeConsumer] = []

    def make(conf: dict[str, Any]) -> FakeConsumer:
        made.append(FakeConsumer(conf))
        return made[-1]

    monkeypatch.setattr(kafka_reader, "Consumer", make)
    monkeypatch.setattr(kafka_probes, "Consumer", make)
    return made


def reader(
    clock: FakeClock, start: int, report: bool = False, stale_after_s: float = 5.0
) -> TopicPartitionReader:
    return TopicPartitionReader(
        {"bootstrap.servers": "x"},
        "post_created",
        0,
        start,
        100,
        report,
        0.05,
        clock=clock,
        stale_after_s=stale_after_s,
    )


def poll_for(r: TopicPartitionReader, clock: FakeClock, seconds: float) -> list[object]:
    out: list[object] = []
    end = clock.now + seconds
    while clock.now < end:
        out += r.next_batch()
        clock.now += 0.1
    return out


def test_reader_past_the_partition_end_rewinds_to_the_beginning(
    consumers: list[FakeConsumer], caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    r = reader(clock, start=10)  # a snapshot from before the broker lost its data
    [consumer] = consumers
    with caplog.at_level(logging.WARNING):
        assert poll_for(r, clock, 4.0) == []
        assert consumer.seeks == []  # not before stale_after_s
        poll_for(r, clock, 2.0)
    assert consumer.seeks == [OFFSET_BEGINNING]
    assert r.offset() == OFFSET_BEGINNING  # a crash now resumes at the beginning too
    assert "beyond the partition's end (3)" in caplog.text and "post_created/0" in caplog.text
    consumer.queue = [FakeMessage(0), FakeMessage(1), FakeMessage(2), FakeMessage(3, eof=True)]
    got = poll_for(r, clock, 0.5)
    assert [e.offset for e in got if isinstance(e, RawEvent)] == [0, 1, 2]
    assert r.offset() == 3
    poll_for(r, clock, 20.0)
    assert consumer.seeks == [OFFSET_BEGINNING]  # once


def test_changelog_reader_past_the_end_rewinds_and_reports_caught_up_again(
    consumers: list[FakeConsumer],
) -> None:
    clock = FakeClock()
    r = reader(clock, start=10, report=True)
    [consumer] = consumers
    assert not [x for x in poll_for(r, clock, 6.0) if isinstance(x, CaughtUp)]
    assert OFFSET_BEGINNING in consumer.seeks
    consumer.queue = [FakeMessage(0, eof=True)]
    assert [x for x in poll_for(r, clock, 0.5) if isinstance(x, CaughtUp)]


def test_reader_never_rewinds_a_healthy_partition(consumers: list[FakeConsumer]) -> None:
    clock = FakeClock()
    r = reader(clock, start=10)
    [consumer] = consumers
    consumer.high = 10  # idle at the end
    poll_for(r, clock, 60.0)
    consumer.high = -1001  # the broker is away: librdkafka knows no watermark
    poll_for(r, clock, 60.0)
    assert consumer.seeks == []
    # Messages keep arriving: the position is real, whatever the watermark says.
    consumer.high = 3
    for i in range(100):
        consumer.queue.append(FakeMessage(10 + i))
        r.next_batch()
        clock.now += 0.1
    assert consumer.seeks == [] and r.offset() == 110


def test_reading_back_from_beyond_the_end_returns_nothing(
    consumers: list[FakeConsumer], caplog: pytest.LogCaptureFixture
) -> None:
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert read_partition_to_end({"bootstrap.servers": "x"}, "push.apns", 1, 120, 2.0) == []
    assert time.monotonic() - started < 2.0  # not the TimeoutError a stale snapshot gave
    assert "push.apns/1 from offset 120" in caplog.text
