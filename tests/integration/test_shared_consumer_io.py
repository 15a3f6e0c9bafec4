"""A source partition's lanes read through one consumer, against the real broker."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import OFFSET_BEGINNING, Producer

from operators.adapters.kafka.client_log import client_config
from operators.adapters.kafka.reader import SharedConsumer, TopicPartitionReader
from operators.events import RawEvent
from tests.conftest import Stack

pytestmark = pytest.mark.integration

LANES = {"push.apns.transactional": 30, "push.apns": 400, "push.apns.bulk": 1_500}


def publish(kafka: dict[str, object], counts: dict[str, int], partition: int) -> None:
    producer = Producer(client_config(kafka))
    for topic, n in counts.items():
        for i in range(n):
            producer.produce(topic, value=b"%d" % i, key=b"k", partition=partition)
        producer.poll(0)
    assert producer.flush(30) == 0


def values(events: list[object], topic: str) -> list[int]:
    assert all(isinstance(e, RawEvent) and (e.topic, e.partition) == (topic, 1) for e in events)
    return [int(e.value or b"") for e in events if isinstance(e, RawEvent)]


def test_lanes_on_one_consumer_read_every_message_once_in_order_while_one_is_paused(
    stack: Stack,
) -> None:
    kafka = stack.settings.kafka_config()
    publish(kafka, LANES, partition=1)
    # A small buffer bound, so the bulk lane is paused and resumed many times meanwhile.
    shared = SharedConsumer.connect(kafka, "fanfare-test-lanes", read_size=100, buffered_max=60)
    readers = {
        topic: TopicPartitionReader(
            kafka,
            topic,
            1,
            OFFSET_BEGINNING,
            50,
            False,
            1.0,
            consumer=shared.partition(topic, 1),
        )
        for topic in LANES
    }
    got: dict[str, list[int]] = {t: [] for t in LANES}
    deadline = time.monotonic() + 30
    paused_seen = False
    # The bulk lane waits until the others are read (as it does behind normal posts).
    while time.monotonic() < deadline and any(
        len(got[t]) < n for t, n in LANES.items() if t != "push.apns.bulk"
    ):
        for topic in ("push.apns.transactional", "push.apns"):
            got[topic] += values(readers[topic].next_batch(), topic)
        paused_seen = paused_seen or shared.paused(("push.apns.bulk", 1))
        time.sleep(0.002)
    while time.monotonic() < deadline and len(got["push.apns.bulk"]) < LANES["push.apns.bulk"]:
        got["push.apns.bulk"] += values(readers["push.apns.bulk"].next_batch(), "push.apns.bulk")
        time.sleep(0.002)
    assert got == {t: list(range(n)) for t, n in LANES.items()}
    assert paused_seen, "the bulk lane's buffer never reached its bound: the test tests nothing"
    assert {t: r.offset() for t, r in readers.items()} == LANES
    # Idle now: nothing more, and a late transactional message is read (not left paused).
    publish(kafka, {"push.apns.transactional": 1}, partition=1)
    late: list[int] = []
    while time.monotonic() < deadline and not late:
        for topic, reader in readers.items():
            late += values(reader.next_batch(), topic)
        time.sleep(0.005)
    assert late == [0]  # the first value of the second publish
    for reader in readers.values():
        reader.close()
    assert shared._closed
