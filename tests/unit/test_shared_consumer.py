"""One consumer for a source partition's lanes (`SharedConsumer`), and the idle pairs' backoff.

The consumer is a fake that fetches like librdkafka does for a consumer of several partitions:
one queue, the partitions' messages interleaved, paused partitions not fetched, and fetching
resumed after the last message handed out.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from operators.adapters.kafka.channel_lanes import IDLE_POLL, IDLE_POLL_MAX, idle_wait
from operators.adapters.kafka.reader import SharedConsumer, TopicPartitionReader
from operators.events import RawEvent
from tests.unit.test_bulk_slicing import FakeEngine, batch, pair

Key = tuple[str, int]


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int, eof: bool = False) -> None:
        self._tp = (topic, partition, offset)
        self._eof = eof

    def topic(self) -> str:
        return self._tp[0]

    def partition(self) -> int:
        return self._tp[1]

    def offset(self) -> int:
        return self._tp[2]

    def error(self) -> KafkaError | None:
        return KafkaError(KafkaError._PARTITION_EOF) if self._eof else None

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return f"{self._tp[0]}/{self._tp[1]}@{self._tp[2]}".encode()


class FakeConsumer:
    """Partitions of `size` messages each, fetched `chunk` at a time per partition, in turns."""

    def __init__(self, sizes: dict[Key, int], chunk: int = 3) -> None:
        self.sizes = dict(sizes)
        self.chunk = chunk
        self.position: dict[Key, int] = {}
        self.eof_sent: set[Key] = set()
        self.paused: set[Key] = set()
        self.pauses = 0
        self.closed = False
        self.consumes = 0

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.position[(tp.topic, tp.partition)] = max(tp.offset, 0)

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.position.pop((tp.topic, tp.partition), None)

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        self.consumes += 1
        out: list[FakeMessage] = []
        progress = True
        while len(out) < num_messages and progress:
            progress = False
            for key, at in self.position.items():
                if key in self.paused:
                    continue
                n = min(self.chunk, self.sizes[key] - at, num_messages - len(out))
                if n > 0:
                    out += [FakeMessage(*key, at + i) for i in range(n)]
                    self.position[key] = at + n
                    self.eof_sent.discard(key)
                    progress = True
                elif key not in self.eof_sent and len(out) < num_messages:
                    out.append(FakeMessage(*key, at, eof=True))
                    self.eof_sent.add(key)
        return out

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.pauses += 1
        self.paused.update((tp.topic, tp.partition) for tp in partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused.difference_update((tp.topic, tp.partition) for tp in partitions)

    def seek(self, tp: TopicPartition) -> None:
        key = (tp.topic, tp.partition)
        self.position[key] = 0 if tp.offset == OFFSET_BEGINNING else tp.offset
        self.eof_sent.discard(key)

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False) -> tuple[int, int]:
        return (0, self.sizes[(tp.topic, tp.partition)])

    def close(self) -> None:
        self.closed = True


LANES = ("push.apns.transactional", "push.apns", "push.apns.bulk")


def readers(
    fake: FakeConsumer, sizes: dict[str, int], buffered_max: int = 2_000, read_size: int = 500
) -> tuple[SharedConsumer, dict[str, TopicPartitionReader]]:
    shared = SharedConsumer(fake, read_size=read_size, buffered_max=buffered_max)
    out = {
        topic: TopicPartitionReader(
            {}, topic, 1, OFFSET_BEGINNING, 50, False, 1.0, consumer=shared.partition(topic, 1)
        )
        for topic in sizes
    }
    return shared, out


def offsets(events: list[object], topic: str) -> list[int]:
    for e in events:
        assert isinstance(e, RawEvent) and e.topic == topic and e.partition == 1
        assert e.value == f"{topic}/1@{e.offset}".encode()
    return [cast(RawEvent, e).offset for e in events]


def test_each_lane_reads_its_own_partition_in_order_from_one_consumer() -> None:
    sizes = {"push.apns.transactional": 7, "push.apns": 120, "push.apns.bulk": 90}
    fake = FakeConsumer({(t, 1): n for t, n in sizes.items()})
    _, lanes = readers(fake, sizes, read_size=20)
    got: dict[str, list[int]] = {t: [] for t in sizes}
    for _ in range(20):  # lanes read in the pair's order, each a batch per round
        for topic in LANES:
            got[topic] += offsets(lanes[topic].next_batch(), topic)
    assert got == {t: list(range(n)) for t, n in sizes.items()}
    assert {t: r.offset() for t, r in lanes.items()} == sizes
    for reader in lanes.values():
        reader.close()
    assert fake.closed


def test_a_lane_not_read_is_paused_when_its_buffer_is_full_and_loses_nothing() -> None:
    """A rate-limited bulk lane: the normal lane's reads fetch bulk messages too; they wait in
    the bulk lane's buffer, which stops growing at its bound, and all come out later in order."""
    sizes = {"push.apns": 300, "push.apns.bulk": 1_000}
    fake = FakeConsumer({(t, 1): n for t, n in sizes.items()})
    shared, lanes = readers(fake, sizes, buffered_max=40, read_size=30)
    normal: list[int] = []
    for _ in range(30):
        normal += offsets(lanes["push.apns"].next_batch(), "push.apns")
        assert shared.buffered(("push.apns.bulk", 1)) <= 40 + 30  # one read past the bound
    assert normal == list(range(300))
    assert shared.paused(("push.apns.bulk", 1)) and fake.pauses >= 1
    bulk: list[int] = []
    for _ in range(200):
        bulk += offsets(lanes["push.apns.bulk"].next_batch(), "push.apns.bulk")
    assert bulk == list(range(1_000))
    assert not shared.paused(("push.apns.bulk", 1))


def test_an_idle_lane_reports_its_end_and_a_rewind_drops_what_was_buffered() -> None:
    sizes = {"push.apns": 10, "push.apns.bulk": 5}
    fake = FakeConsumer({(t, 1): n for t, n in sizes.items()})
    shared, lanes = readers(fake, sizes)
    assert offsets(lanes["push.apns"].next_batch(), "push.apns") == list(range(10))
    # The bulk lane's messages came with the normal lane's read and wait in its buffer.
    assert shared.buffered(("push.apns.bulk", 1)) > 0
    assert lanes["push.apns"].next_batch() == []
    assert lanes["push.apns"].offset() == 10  # the end-of-partition event made it concrete
    consumer = shared.partition("push.apns.transactional", 1)
    with pytest.raises(ValueError, match="already has a reader"):
        shared.partition("push.apns.transactional", 1)
    with pytest.raises(ValueError, match="is not"):
        consumer.seek(TopicPartition("push.apns", 1, 0))
    consumer.close()
    # A rewind (the topic was re-created) reads the partition again from its beginning.
    bulk = lanes["push.apns.bulk"]
    assert bulk._rewind()
    assert shared.buffered(("push.apns.bulk", 1)) == 0
    assert offsets(bulk.next_batch(), "push.apns.bulk") == list(range(5))
    bulk.close()
    assert not fake.closed  # the normal lane still reads with it
    lanes["push.apns"].close()
    assert fake.closed


def test_client_errors_without_a_partition_reach_the_reader_that_asked() -> None:
    class Broken(FakeConsumer):
        def consume(self, num_messages: int, timeout: float) -> list[Any]:
            error = KafkaError(KafkaError._ALL_BROKERS_DOWN, fatal=True)
            return [type("Err", (), {"error": lambda _: error, "topic": lambda _: None,
                                     "partition": lambda _: -1})()]  # fmt: skip

    fake = Broken({("push.apns", 1): 0})
    _, lanes = readers(fake, {"push.apns": 0})
    with pytest.raises(RuntimeError, match=r"reading push\.apns/1"):
        lanes["push.apns"].next_batch()


def test_the_idle_wait_doubles_up_to_its_bound() -> None:
    assert idle_wait(1) == IDLE_POLL
    assert idle_wait(2) == 2 * IDLE_POLL
    assert [idle_wait(n) <= IDLE_POLL_MAX for n in range(1, 100)] == [True] * 99
    assert idle_wait(10_000) == IDLE_POLL_MAX
    assert timedelta(milliseconds=50) >= IDLE_POLL_MAX  # a login code's first read


def test_an_idle_pair_looks_less_often_and_at_once_again_when_a_message_comes() -> None:
    engine = FakeEngine()
    normal = [batch(0, 2, "push.apns")]
    part = pair([], [], engine)
    waits = []
    for _ in range(6):
        assert part.next_batch() == []
        awake = part.next_awake()
        assert awake is not None
        waits.append(awake - datetime.now(UTC))
    assert waits[0] <= IDLE_POLL and waits[-1] > 2 * IDLE_POLL
    assert max(waits) <= IDLE_POLL_MAX
    # A message arrives: handed to the engine, and the pair is polled at once until judged.
    part._normal.reader._events += normal  # type: ignore[union-attr, attr-defined]
    part.next_batch()
    assert len(engine.submitted) == 2 and part.next_awake() is None
    engine.answer()
    assert len(part.next_batch()) == 2
    part.next_batch()
    awake = part.next_awake()
    assert awake is not None and awake - datetime.now(UTC) <= IDLE_POLL


def test_a_lane_not_read_is_also_bounded_by_the_bytes_it_buffers() -> None:
    """Bulk messages are large (500 items each): the bound in bytes stops a buffer first."""
    sizes = {"push.apns": 200, "push.apns.bulk": 500}
    fake = FakeConsumer({(t, 1): n for t, n in sizes.items()})
    shared = SharedConsumer(fake, read_size=30, buffered_max=10_000, buffered_max_bytes=600)
    lanes = {
        topic: TopicPartitionReader(
            {}, topic, 1, OFFSET_BEGINNING, 50, False, 1.0, consumer=shared.partition(topic, 1)
        )
        for topic in sizes
    }
    normal: list[int] = []
    for _ in range(20):
        normal += offsets(lanes["push.apns"].next_batch(), "push.apns")
        # Values are about 20 bytes: 600 bytes is some 30 messages, plus one read past it.
        assert shared.buffered(("push.apns.bulk", 1)) <= 30 + 30
    assert normal == list(range(200))
    assert shared.paused(("push.apns.bulk", 1))
    bulk: list[int] = []
    for _ in range(100):
        bulk += offsets(lanes["push.apns.bulk"].next_batch(), "push.apns.bulk")
    assert bulk == list(range(500))
