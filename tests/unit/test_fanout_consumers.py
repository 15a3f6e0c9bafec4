"""The fan-out's sources share consumers: partition p of topics read side by side, one consumer.

Fakes stand in for librdkafka (tests/unit/test_shared_consumer.py's), so what is checked is
which readers read through which consumer, and that each still reads its own partition.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from flows.fanout import tier_sources
from operators.adapters.kafka import reader as reader_module
from operators.adapters.kafka.reader import (
    IDLE_POLL_MAX_S,
    IDLE_POLL_S,
    ConsumerShares,
    KafkaTopicsSource,
    SharedConsumer,
    TopicPartitionReader,
    idle_backoff,
)
from operators.adapters.kafka.topic_identity import TopicIds
from operators.events import CaughtUp, RawEvent
from operators.fanout.notify import TIER_READ_BATCH
from operators.probe_demand import ProbeDemand
from schemas.topics import TIERS, tier_topic
from tests.unit.test_shared_consumer import FakeConsumer

POSTS = ("post_created", "post_created_backfill")
SIZES = {(t, p): 3 + p for t in POSTS for p in range(2)}


@pytest.fixture(autouse=True)
def no_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = TopicIds(lambda topics: {}, background=False)
    monkeypatch.setattr(reader_module, "shared_topic_ids", lambda config: ids)


class Connections:
    """A `ConsumerShares` connect that hands out fakes and remembers them."""

    def __init__(self) -> None:
        self.fakes: list[FakeConsumer] = []

    def __call__(self) -> SharedConsumer:
        fake = FakeConsumer(SIZES)
        self.fakes.append(fake)
        return SharedConsumer(fake)


def test_partition_p_of_each_topic_shares_one_consumer_and_reads_its_own_messages() -> None:
    connect = Connections()
    shares = ConsumerShares(connect)
    source = KafkaTopicsSource({}, list(POSTS), consumers=shares)
    parts = {
        (t, p): source.build_part("read_posts", f"{t}/{p}", None) for t in POSTS for p in range(2)
    }
    assert len(connect.fakes) == 2  # one per partition index, not one per topic partition
    assert shares.consumers() == 2
    assert set(connect.fakes[0].position) == {(t, 0) for t in POSTS}
    assert set(connect.fakes[1].position) == {(t, 1) for t in POSTS}
    for (topic, p), part in parts.items():
        got = [e for e in part.next_batch() if isinstance(e, RawEvent)]
        assert [(e.topic, e.partition) for e in got] == [(topic, p)] * SIZES[(topic, p)]
        assert part.snapshot()[0] == SIZES[(topic, p)]  # snapshots stay per topic partition
    for part in parts.values():
        part.close()
    assert all(f.closed for f in connect.fakes)
    assert shares.consumers() == 0


def test_sources_given_the_same_shares_use_one_consumer_and_a_closed_one_is_replaced() -> None:
    connect = Connections()
    shares = ConsumerShares(connect)
    first = KafkaTopicsSource({}, [POSTS[0]], consumers=shares)
    second = KafkaTopicsSource({}, [POSTS[1]], consumers=shares)
    a = first.build_part("a", f"{POSTS[0]}/0", None)
    b = second.build_part("b", f"{POSTS[1]}/0", None)
    assert len(connect.fakes) == 1
    a.close()
    b.close()
    assert connect.fakes[0].closed
    # Built again (e.g. after a worker's restart), it gets a consumer of its own anew.
    first.build_part("a", f"{POSTS[0]}/0", (2, None)).close()
    assert len(connect.fakes) == 2
    assert connect.fakes[1].position == {(POSTS[0], 0): 2} and connect.fakes[1].closed


def test_each_worker_thread_gets_its_own_consumer() -> None:
    connect = Connections()
    shares = ConsumerShares(connect)
    got: list[object] = []
    worker = threading.Thread(target=lambda: got.append(shares.partition(POSTS[0], 0)))
    worker.start()
    worker.join()
    shares.partition(POSTS[1], 0)
    assert len(connect.fakes) == 2


def test_without_shares_the_source_builds_no_shared_consumer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[str] = []

    class OwnConsumer(FakeConsumer):
        def __init__(self, conf: object) -> None:
            super().__init__(SIZES)
            built.append("own")

        def assign(self, partitions: list[TopicPartition]) -> None:
            self.incremental_assign(partitions)

    monkeypatch.setattr(reader_module, "Consumer", OwnConsumer)
    source = KafkaTopicsSource({}, list(POSTS))
    source.build_part("read_posts", f"{POSTS[0]}/0", None)
    source.build_part("read_posts", f"{POSTS[1]}/0", None)
    assert built == ["own", "own"]


def test_an_idle_partition_polls_less_often_up_to_a_bound_and_at_once_after_a_message() -> None:
    fake = FakeConsumer({("post_created", 0): 2}, chunk=2)
    part = KafkaTopicsSource(
        {}, ["post_created"], consumers=ConsumerShares(lambda: SharedConsumer(fake))
    ).build_part("read_posts", "post_created/0", None)

    def wait() -> timedelta:
        at = part.next_awake()
        return timedelta(0) if at is None else at - datetime.now(UTC)

    assert len(part.next_batch()) == 2
    assert part.next_awake() is None  # messages: poll again at once
    waits = []
    for _ in range(6):
        part.next_batch()
        waits.append(wait())
    first, most = timedelta(seconds=IDLE_POLL_S), timedelta(seconds=IDLE_POLL_MAX_S)
    assert first - timedelta(milliseconds=5) <= waits[0] <= first
    assert waits[1] > waits[0]  # doubling...
    assert most - timedelta(milliseconds=5) <= waits[-1] <= most  # ...up to its bound
    fake.sizes[("post_created", 0)] = 3  # a message arrives
    assert len(part.next_batch()) == 1
    assert part.next_awake() is None
    part.next_batch()
    assert wait() <= first  # the backoff starts again
    assert idle_backoff(1, first, most) == first
    assert idle_backoff(10_000, first, most) == most


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def markers_in(seconds: float, changelog: TopicPartitionReader, clock: Clock) -> int:
    """Caught-up markers an idle changelog partition emits, polled every 10 ms."""
    count = 0
    end = clock.now + seconds
    while clock.now < end:
        count += sum(isinstance(e, CaughtUp) for e in changelog.next_batch())
        clock.now += 0.01
    return count


def test_an_idle_changelog_reports_its_end_seldom_unless_a_shard_asks() -> None:
    clock = Clock()
    fake = FakeConsumer({("device_changes", 0): 3})
    demand = ProbeDemand()
    changelog = TopicPartitionReader(
        {}, "device_changes", 0, OFFSET_BEGINNING, 50, True, 0.1, clock=clock,
        consumer=SharedConsumer(fake).partition("device_changes", 0), demand=demand,
    )  # fmt: skip
    first = changelog.next_batch()
    assert [type(e) for e in first] == [RawEvent] * 3
    # Its end is reported at the first probe after reading (its caught-up state changed)...
    ends = []
    for _ in range(20):
        clock.now += 0.01
        ends += [e for e in changelog.next_batch() if isinstance(e, CaughtUp)]
    assert [(e.source, e.offset) for e in ends] == [("device_changes/0", 3)]
    # ...then, with no shard asking, about once a second instead of ten times.
    assert 9 <= markers_in(10.0, changelog, clock) <= 11
    # A shard holding a post asks for a probe at the time its gate needs: it is made then.
    wanted = clock.now + 0.3
    demand.ask(wanted)
    fresh: list[CaughtUp] = []
    while clock.now < wanted + 0.2:
        fresh += [e for e in changelog.next_batch() if isinstance(e, CaughtUp)]
        clock.now += 0.01
    assert any(e.as_of >= wanted for e in fresh)
    assert markers_in(10.0, changelog, clock) <= 11  # and seldom again after
    # A change arriving while quiet is reported at the next probe, not a second later.
    fake.sizes[("device_changes", 0)] = 4
    assert [type(e) for e in changelog.next_batch()] == [RawEvent]
    assert markers_in(0.2, changelog, clock) == 1


def test_without_probe_demand_an_idle_changelog_reports_every_probe() -> None:
    clock = Clock()
    fake = FakeConsumer({("device_changes", 0): 0})
    changelog = TopicPartitionReader(
        {}, "device_changes", 0, OFFSET_BEGINNING, 50, True, 0.1, clock=clock,
        consumer=SharedConsumer(fake).partition("device_changes", 0),
    )  # fmt: skip
    assert markers_in(10.0, changelog, clock) >= 80


def test_transactional_reads_on_a_consumer_of_its_own_and_the_bulk_tiers_share_one() -> None:
    # A campaign's fetches (the marketing partition's) never carry a login code's partition.
    made: dict[str, tuple[int, Connections]] = {}

    def shares(name: str, read_size: int) -> ConsumerShares:
        made[name] = (read_size, Connections())
        return ConsumerShares(made[name][1])

    sources = dict(tier_sources({}, shares))
    assert list(sources) == list(TIERS)
    for tier, source in sources.items():
        source.build_part(f"read_notify_{tier}", f"{tier_topic(tier)}/0", None)
    read_size, own = made["transactional"]
    assert read_size == TIER_READ_BATCH["transactional"]
    assert [set(f.position) for f in own.fakes] == [{("notify.transactional", 0)}]
    read_size, bulk = made["bulk"]
    assert read_size == max(TIER_READ_BATCH["social"], TIER_READ_BATCH["marketing"])
    assert [set(f.position) for f in bulk.fakes] == [
        {("notify.social", 0), ("notify.marketing", 0)}
    ]
