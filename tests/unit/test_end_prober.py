"""A shard's asks for a changelog probe, answered by the process's prober instead of a seek."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from confluent_kafka import KafkaError

from operators.adapters.kafka.end_prober import EndAnswer, EndProber
from operators.adapters.kafka.reader import ASK_GIVE_UP_S, TopicPartitionReader
from operators.events import CaughtUp, RawEvent
from operators.probe_demand import ProbeDemand
from tests.unit.test_probe_demand import changelog_reader
from tests.unit.test_redis_outage import FakeClock, FakeConsumer, FakeError, FakeMessage, consumers

__all__ = ["consumers"]  # the fixture, used by name

INTERVAL = 60.0  # so long that any probe here is an ask's


@dataclass
class FakeProber:
    """Records asks; answers what the test sets."""

    asks: list[tuple[str, int, int]] = field(default_factory=list)
    answers: dict[tuple[str, int], EndAnswer] = field(default_factory=dict)

    def ask(self, topic: str, partition: int, offset: int) -> None:
        self.asks.append((topic, partition, offset))

    def answer(self, topic: str, partition: int) -> EndAnswer | None:
        return self.answers.pop((topic, partition), None)


def prober_reader(
    consumers: list[FakeConsumer],
) -> tuple[FakeClock, ProbeDemand, FakeProber, TopicPartitionReader, FakeConsumer]:
    """A changelog reader at offset 3, its end, with a demand and a prober."""
    clock = FakeClock(100.0)
    demand = ProbeDemand()
    prober = FakeProber()
    r = changelog_reader(clock, demand, prober, INTERVAL)  # type: ignore[arg-type]
    [consumer] = consumers
    consumer.queue.append(FakeMessage(3, eof=True))
    [start] = r.next_batch()
    assert isinstance(start, CaughtUp)
    return clock, demand, prober, r, consumer


def asked_reader(
    consumers: list[FakeConsumer],
) -> tuple[FakeClock, ProbeDemand, FakeProber, TopicPartitionReader, FakeConsumer]:
    """`prober_reader`'s reader, once it asked the prober for the shards' probe at 100.2."""
    clock, demand, prober, r, consumer = prober_reader(consumers)
    demand.ask(100.2)
    clock.now = 100.2
    r.next_batch()
    assert prober.asks == [("device_changes", 0, 3)]
    return clock, demand, prober, r, consumer


def test_an_ask_goes_to_the_prober_at_its_time_and_its_answer_is_a_marker(
    consumers: list[FakeConsumer],
) -> None:
    clock, demand, prober, r, consumer = prober_reader(consumers)
    demand.ask(100.2)
    clock.now = 100.1
    assert r.next_batch() == []
    assert prober.asks == []  # not before the time asked for
    clock.now = 100.2
    assert r.next_batch() == []
    assert prober.asks == [("device_changes", 0, 3)]
    assert consumer.seeks == []  # the reader's own fetch is left alone
    clock.now = 100.21
    assert r.next_batch() == []  # no answer yet, and no second ask
    assert len(prober.asks) == 1
    prober.answers[("device_changes", 0)] = EndAnswer(100.2, True, 3)
    [marker] = r.next_batch()
    assert marker == CaughtUp("device_changes/0", 100.2, 3, None)
    assert demand.due_after(marker.as_of) is None
    assert r.next_batch() == []
    assert len(prober.asks) == 1  # answered: nothing more to ask


def test_not_at_the_end_gives_no_marker_and_the_reader_asks_again_once_read(
    consumers: list[FakeConsumer],
) -> None:
    clock, _demand, prober, r, consumer = asked_reader(consumers)
    prober.answers[("device_changes", 0)] = EndAnswer(100.2, False, 3)
    consumer.queue.append(FakeMessage(3))  # the message the prober saw
    got = r.next_batch()
    assert [type(g) for g in got] == [RawEvent]  # read, but no marker: the end is not known
    assert len(prober.asks) == 1  # not idle: no ask while reading
    clock.now = 100.25
    assert r.next_batch() == []
    assert prober.asks[-1] == ("device_changes", 0, 4)  # idle again: asked at the new position
    prober.answers[("device_changes", 0)] = EndAnswer(100.25, True, 4)
    [marker] = r.next_batch()
    assert marker == CaughtUp("device_changes/0", 100.25, 4, None)


def test_a_marker_holds_for_messages_read_after_the_ask(consumers: list[FakeConsumer]) -> None:
    _clock, _demand, prober, r, consumer = asked_reader(consumers)
    consumer.queue.append(FakeMessage(3))  # written after the prober's round
    prober.answers[("device_changes", 0)] = EndAnswer(100.2, True, 3)
    got = r.next_batch()
    # The event first, then the marker: the partition ended at 3 at 100.2, and 3 is read.
    assert [type(g) for g in got] == [RawEvent, CaughtUp]
    assert got[1] == CaughtUp("device_changes/0", 100.2, 4, None)


def test_an_unanswered_ask_is_made_again(consumers: list[FakeConsumer]) -> None:
    clock, _demand, prober, r, _consumer = asked_reader(consumers)
    clock.now = 100.2 + ASK_GIVE_UP_S / 2
    r.next_batch()
    assert len(prober.asks) == 1
    clock.now = 100.2 + ASK_GIVE_UP_S + 0.01
    r.next_batch()
    assert len(prober.asks) == 2


def test_a_rewound_reader_takes_no_marker_from_an_older_position(
    consumers: list[FakeConsumer],
) -> None:
    _clock, _demand, prober, r, _consumer = asked_reader(consumers)
    r._position = 1  # as if it had gone back (a re-created topic)
    prober.answers[("device_changes", 0)] = EndAnswer(100.2, True, 3)
    assert r.next_batch() == []


# ---- the prober's rounds ---------------------------------------------------------------------


class TopicMessage(FakeMessage):
    def __init__(self, partition: int, offset: int, eof: bool = False, error: int | None = None):
        super().__init__(offset, eof=eof)
        self._partition = partition
        if error is not None:
            self._error = FakeError(error)

    def topic(self) -> str:
        return "device_changes"

    def partition(self) -> int:
        return self._partition


@dataclass
class RoundConsumer:
    """Answers each assignment with the events the test queued for it."""

    events: list[list[TopicMessage]]
    assigned: list[list[tuple[int, int]]] = field(default_factory=list)
    unassigned: int = 0
    closed: bool = False

    def assign(self, parts: list[object]) -> None:
        self.assigned.append([(p.partition, p.offset) for p in parts])  # type: ignore[attr-defined]

    def consume(self, n: int, timeout: float) -> list[TopicMessage]:
        return self.events.pop(0) if self.events else []

    def unassign(self) -> None:
        self.unassigned += 1

    def close(self) -> None:
        self.closed = True


def test_a_round_answers_each_asked_partition_from_its_first_event() -> None:
    consumer = RoundConsumer(
        [
            [
                TopicMessage(0, 3, eof=True),  # ends where asked
                TopicMessage(1, 7),  # a message at the asked offset: not the end
                TopicMessage(2, 1, eof=True),  # an end below the ask: ignored (stale)
            ],
            [TopicMessage(3, 0, error=KafkaError.OFFSET_OUT_OF_RANGE)],
        ]
    )
    prober = EndProber(
        {}, consumer_factory=lambda: consumer, clock=lambda: 50.0, answer_timeout_s=0.05
    )
    answers = prober._round(
        consumer, {("device_changes", p): o for p, o in enumerate([3, 7, 5, 9])}
    )
    assert answers == {
        ("device_changes", 0): EndAnswer(50.0, True, 3),
        ("device_changes", 1): EndAnswer(50.0, False, 7),
        ("device_changes", 2): EndAnswer(50.0, False, 5),  # never answered in time
        ("device_changes", 3): EndAnswer(50.0, False, 9),
    }
    assert consumer.assigned == [[(0, 3), (1, 7), (2, 5), (3, 9)]]
    assert consumer.unassigned == 1


def test_asks_are_answered_on_the_probers_thread() -> None:
    consumer = RoundConsumer([[TopicMessage(0, 4, eof=True)]])
    prober = EndProber({}, consumer_factory=lambda: consumer, clock=lambda: 60.0)
    try:
        prober.ask("device_changes", 0, 4)
        deadline = time.monotonic() + 5
        answer = None
        while answer is None and time.monotonic() < deadline:
            answer = prober.answer("device_changes", 0)
            time.sleep(0.001)
        assert answer == EndAnswer(60.0, True, 4)
        assert prober.answer("device_changes", 0) is None  # given once
    finally:
        prober.close()
    assert consumer.closed


def test_asks_coming_faster_than_the_round_interval_share_rounds() -> None:
    answered: list[EndAnswer] = []

    class Instant(RoundConsumer):
        def consume(self, n: int, timeout: float) -> list[TopicMessage]:
            return [TopicMessage(p, o, eof=True) for p, o in self.assigned[-1]]

    consumer = Instant([])
    prober = EndProber({}, consumer_factory=lambda: consumer, round_every_s=0.2)
    try:
        started = time.monotonic()
        for i in range(10):  # an ask every 20 ms for 0.2 s
            prober.ask("device_changes", 0, i)
            time.sleep(0.02)
            got = prober.answer("device_changes", 0)
            if got is not None:
                answered.append(got)
        elapsed = time.monotonic() - started
        # One round at once, then at most one per 0.2 s: far fewer than the asks.
        assert prober.rounds <= 2 + int(elapsed / 0.2)
        assert answered and all(a.at_end for a in answered)
    finally:
        prober.close()
