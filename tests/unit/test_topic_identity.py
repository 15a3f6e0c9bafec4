"""TopicIds: the cache of topic ids that lets a reader notice its topic was re-created."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING

from operators.adapters.kafka import probes as kafka_probes
from operators.adapters.kafka import reader as kafka_reader
from operators.adapters.kafka.channel_lanes import _Lane
from operators.adapters.kafka.reader import TopicPartitionReader, resume_point
from operators.adapters.kafka.topic_identity import TopicIds
from operators.delivery.pipeline import LaneProgress
from operators.events import RawEvent
from tests.unit.test_redis_outage import FakeClock, FakeConsumer, FakeMessage


class FakeBroker:
    """Answers describe requests from a dict; `down` makes it raise like an unreachable broker."""

    def __init__(self, ids: dict[str, str]) -> None:
        self.ids = ids
        self.down = False
        self.asked: list[list[str]] = []

    def describe(self, topics: list[str]) -> dict[str, str]:
        self.asked.append(topics)
        if self.down:
            raise RuntimeError("broker transport failure")
        return {t: self.ids[t] for t in topics if t in self.ids}


def test_ids_are_known_after_a_refresh_of_every_registered_topic() -> None:
    broker = FakeBroker({"post_created": "A", "push.apns": "B"})
    ids = TopicIds(broker.describe, background=False)
    ids.register(["push.apns"])
    ids.register(["post_created", "push.apns"])
    assert ids.current("post_created") is None  # nothing asked yet
    ids.refresh()
    assert broker.asked == [["post_created", "push.apns"]]  # one request for all topics
    assert (ids.current("post_created"), ids.current("push.apns")) == ("A", "B")


def test_a_recreated_topic_shows_its_new_id_and_an_outage_shows_nothing() -> None:
    broker = FakeBroker({"post_created": "A"})
    ids = TopicIds(broker.describe, background=False)
    ids.register(["post_created"])
    ids.refresh()
    broker.down = True
    ids.refresh()
    assert ids.current("post_created") is None  # no news, not "changed"
    broker.down = False
    broker.ids = {}  # back, but the topic is not created yet
    ids.refresh()
    assert ids.current("post_created") is None
    broker.ids = {"post_created": "C"}
    ids.refresh()
    assert ids.current("post_created") == "C"


def test_the_background_thread_refreshes_once_a_topic_is_registered() -> None:
    broker = FakeBroker({"t": "X"})
    asked = threading.Event()

    def describe(topics: list[str]) -> dict[str, str]:
        out = broker.describe(topics)
        asked.set()
        return out

    ids = TopicIds(describe, every_s=0.05)
    assert not asked.wait(0.2)  # no thread before a reader registers
    ids.register(["t"])
    assert asked.wait(5)
    for _ in range(100):
        if ids.current("t") == "X":
            break
        asked.clear()
        asked.wait(1)
    assert ids.current("t") == "X"


# --- the reader --------------------------------------------------------------------------------


@pytest.fixture
def consumers(monkeypatch: pytest.MonkeyPatch) -> list[FakeConsumer]:
    made: list[FakeConsumer] = []

    def make(conf: dict[str, Any]) -> FakeConsumer:
        made.append(FakeConsumer(conf, high=100))
        return made[-1]

    monkeypatch.setattr(kafka_reader, "Consumer", make)
    monkeypatch.setattr(kafka_probes, "Consumer", make)
    return made


def _reader(clock: FakeClock, ids: TopicIds, start: int) -> TopicPartitionReader:
    return TopicPartitionReader(
        {"bootstrap.servers": "x"},
        "post_created",
        0,
        start,
        100,
        False,
        1.0,
        clock=clock,
        topic_ids=ids,
    )


def _poll(r: TopicPartitionReader, clock: FakeClock, seconds: float) -> list[int]:
    offsets: list[int] = []
    end = clock.now + seconds
    while clock.now < end:
        offsets += [e.offset for e in r.next_batch() if isinstance(e, RawEvent)]
        clock.now += 0.1
    return offsets


def test_reader_rewinds_when_its_topic_is_recreated_even_with_new_messages_flowing(
    consumers: list[FakeConsumer], caplog: pytest.LogCaptureFixture
) -> None:
    """The race the end-of-log check misses: the new log already holds more than the old one's
    position, so the reader reads on from there and would skip the new log's first messages."""
    broker = FakeBroker({"post_created": "A"})
    ids = TopicIds(broker.describe, background=False)
    clock = FakeClock()
    r = _reader(clock, ids, start=5)
    [consumer] = consumers
    ids.refresh()
    assert _poll(r, clock, 1.0) == []  # learns id A
    # The broker restarts empty; 8 new messages arrive, offsets 0..7: the reader sees 5..7.
    broker.ids = {"post_created": "B"}
    consumer.queue = [FakeMessage(5), FakeMessage(6), FakeMessage(7)]
    assert _poll(r, clock, 0.3) == [5, 6, 7]  # before the refresh: read on (at least once)
    ids.refresh()
    with caplog.at_level(logging.WARNING):
        _poll(r, clock, 1.0)
    assert consumer.seeks == [OFFSET_BEGINNING] and r.rewinds == 1
    assert r.offset() == OFFSET_BEGINNING
    assert "re-created" in caplog.text and "from A to B" in caplog.text
    consumer.queue = [FakeMessage(i) for i in range(8)]
    assert _poll(r, clock, 1.0) == list(range(8))  # 0..4 not lost; 5..7 read again
    _poll(r, clock, 10.0)
    assert consumer.seeks == [OFFSET_BEGINNING]  # once


def test_reader_keeps_its_position_while_the_id_is_the_same_or_unknown(
    consumers: list[FakeConsumer],
) -> None:
    broker = FakeBroker({"post_created": "A"})
    ids = TopicIds(broker.describe, background=False)
    clock = FakeClock()
    r = _reader(clock, ids, start=5)
    [consumer] = consumers
    ids.refresh()
    _poll(r, clock, 1.0)
    broker.down = True  # the broker away: no news
    ids.refresh()
    consumer.queue = [FakeMessage(5), FakeMessage(6)]
    assert _poll(r, clock, 3.0) == [5, 6]
    broker.down = False  # back with its data (Kafka): the same id
    ids.refresh()
    _poll(r, clock, 3.0)
    assert consumer.seeks == [] and r.offset() == 7


def test_a_lane_resumes_mid_message_only_for_the_first_message_it_reads(
    consumers: list[FakeConsumer],
) -> None:
    """After a rewind the old resume offset is another message: all its items are due."""
    from tests.unit.test_bulk_slicing import batch as dispatch_batch

    batch = dispatch_batch(0, 10).value
    broker = FakeBroker({"push.apns.bulk": "A"})
    ids = TopicIds(broker.describe, background=False)
    clock = FakeClock()
    reader = TopicPartitionReader(
        {"bootstrap.servers": "x"},
        "push.apns.bulk",
        0,
        3,
        2,
        False,
        1.0,
        clock=clock,
        topic_ids=ids,
    )
    [consumer] = consumers
    lane = _Lane("bulk", reader, LaneProgress((3, 4, {})), 2)  # resume at message 3, item 4
    consumer.queue = [FakeMessage(3, batch)]
    lane.fill(1)
    assert lane.progress.pending() == 6
    lane.progress.take(6)
    consumer.queue = [FakeMessage(i, batch) for i in range(5)]  # a new log: 3 is another batch
    lane.fill(50)
    assert lane.progress.pending() == 50  # messages 0 to 4, whole (the lane started over)
    assert [len(items) for _, items in lane.progress.take(50)] == [10] * 5


def test_reader_resumed_from_a_snapshot_of_a_lost_log_starts_at_the_new_beginning(
    consumers: list[FakeConsumer], caplog: pytest.LogCaptureFixture
) -> None:
    """A flow started again after the broker lost its data: the new log already holds more
    than the snapshot's offset, so only the snapshot's topic id can tell."""
    broker = FakeBroker({"post_created": "B"})
    ids = TopicIds(broker.describe, background=False)
    clock = FakeClock()
    r = TopicPartitionReader(
        {"bootstrap.servers": "x"},
        "post_created",
        0,
        1,
        100,
        False,
        1.0,
        clock=clock,
        topic_ids=ids,
        start_topic_id="A",
    )
    [consumer] = consumers
    ids.refresh()
    with caplog.at_level(logging.WARNING):
        assert _poll(r, clock, 0.2) == []
    assert consumer.seeks == [OFFSET_BEGINNING]
    assert r.snapshot() == (OFFSET_BEGINNING, "B")
    assert "from A to B" in caplog.text


def test_reader_snapshots_carry_the_topic_id_and_older_ones_still_resume() -> None:
    assert resume_point(None) == (OFFSET_BEGINNING, None)
    assert resume_point(42) == (42, None)  # recovery stores from before topic ids
    assert resume_point((42, "A")) == (42, "A")
