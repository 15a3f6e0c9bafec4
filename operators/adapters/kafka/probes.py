"""Questions to the broker about partitions: which exist, where they end, what they hold.

The true end of a partition is found by reading to partition EOF, never from watermarks alone
(on the embedded broker the high watermark a client reads can trail the true end).
Clients are made per call and closed before returning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import cast

from confluent_kafka import (
    Consumer,
    KafkaError,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from operators.adapters.kafka.client_log import client_config

log = logging.getLogger(__name__)


KafkaConfig = dict[str, object]


READBACK_BEYOND_END_S = 2.0
"""Seconds a read-back's start must stay past the partition's end before it reads nothing."""


def topic_partitions(
    config: KafkaConfig, topics: Sequence[str], timeout_s: float = 10.0
) -> list[str]:
    """`topic/partition` names of every partition of the topics, failing if one is missing."""
    admin = AdminClient(client_config(config))
    meta = admin.list_topics(timeout=timeout_s)
    parts: list[str] = []
    for topic in topics:
        tmeta = meta.topics.get(topic)
        if tmeta is None or tmeta.error is not None or not tmeta.partitions:
            raise RuntimeError(
                f"topic {topic!r} does not exist on {config.get('bootstrap.servers')}: "
                "run `fanfare topics create` (or `fanfare dev up`)"
            )
        parts.extend(f"{topic}/{p}" for p in sorted(tmeta.partitions))
    return parts


def split_part(part: str) -> tuple[str, int]:
    """(topic, partition) of a `topic/partition` name."""
    topic, _, partition = part.rpartition("/")
    return topic, int(partition)


def read_partition_to_end(
    config: KafkaConfig, topic: str, partition: int, start: int, timeout_s: float = 60.0
) -> list[tuple[int, bytes | None]]:
    """Every (offset, value) from `start` to the true end (partition EOF, not watermarks)."""
    conf = dict(config)
    conf.update(
        {
            "group.id": "fanfare-readback",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    consumer = Consumer(client_config(conf))
    consumer.assign([TopicPartition(topic, partition, start)])
    out: list[tuple[int, bytes | None]] = []
    deadline = time.monotonic() + timeout_s
    behind_since: float | None = None
    try:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}/{partition} to its end took over {timeout_s}s")
            msgs = consumer.consume(10_000, 0.2)
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        return out
                    if not err.retriable():
                        raise RuntimeError(f"reading {topic}/{partition}: {err.str()}")
                    continue
                out.append((cast(int, m.offset()), m.value()))
            if msgs or out or start < 0:
                continue
            # `start` past the partition's end (see TopicPartitionReader): the broker lost
            # what was written there, so there is nothing to read back.
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            if not 0 <= high < start:
                behind_since = None
            elif behind_since is None:
                behind_since = time.monotonic()
            elif time.monotonic() - behind_since >= min(READBACK_BEYOND_END_S, timeout_s / 4):
                log.warning(
                    "reading back %s/%s from offset %d: the partition ends before it, at %d "
                    "(the broker lost its data, or the topic was re-created); nothing to read",
                    topic,
                    partition,
                    start,
                    high,
                )
                return out
    finally:
        consumer.close()


def end_offset(config: KafkaConfig, topic: str, partition: int) -> int:
    """The true end of a partition, found by reading to partition EOF from the low watermark."""
    conf = dict(config)
    conf.update({"group.id": "fanfare-endprobe", "enable.partition.eof": True})
    consumer = Consumer(client_config(conf))
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
    finally:
        consumer.close()
    # The high watermark may trail the real end on the embedded broker: read on from it.
    tail = read_partition_to_end(config, topic, partition, max(low, high))
    return tail[-1][0] + 1 if tail else max(low, high)


def high_watermark(config: KafkaConfig, topic: str, partition: int) -> int:
    """The partition's high watermark (fast; may trail the true end on the embedded broker)."""
    consumer = Consumer(client_config(config, **{"group.id": "fanfare-watermark"}))
    try:
        return int(consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1])
    finally:
        consumer.close()


def message_count(config: KafkaConfig, topics: Sequence[str]) -> int:
    """Messages on the topics: the sum of every partition's true end offset."""
    return sum(
        end_offset(config, topic, partition)
        for topic, partition in map(split_part, topic_partitions(config, topics))
    )
