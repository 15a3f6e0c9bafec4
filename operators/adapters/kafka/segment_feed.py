"""The changelogs the segment index is kept from, read from the index's own positions.

No consumer group: the positions are kept in Redis beside the index (saved after the updates
they cover were applied), so the index and where it was read to are lost or kept together,
and a scheduler that dies between the two reads those events again (the index ignores what is
not newer). Several schedulers each read every partition; the index is the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from operators.adapters.kafka.client_log import client_config

Position = tuple[str, int]
"""(topic, partition)."""


class ChangelogTail:
    """Reads `topics` from `positions` (a partition not in them: from its beginning)."""

    def __init__(
        self, config: Mapping[str, object], topics: Sequence[str], positions: Mapping[Position, int]
    ) -> None:
        self._consumer = Consumer(
            client_config(
                config,
                **{"group.id": "fanfare-segments", "enable.auto.commit": False},
            )
        )
        assigned = []
        for topic in topics:
            meta = self._consumer.list_topics(topic, timeout=10)
            for p in sorted(meta.topics[topic].partitions):
                assigned.append(
                    TopicPartition(topic, p, positions.get((topic, p), OFFSET_BEGINNING))
                )
        self._consumer.assign(assigned)

    def poll(self, max_messages: int, timeout_s: float) -> list[tuple[str, int, int, bytes | None]]:
        """Up to `max_messages` records: (topic, partition, offset, value)."""
        out: list[tuple[str, int, int, bytes | None]] = []
        messages: list[Any] = self._consumer.consume(max_messages, timeout_s)
        for m in messages:
            if m.error() is None:
                out.append((m.topic(), m.partition(), m.offset(), m.value()))
        return out

    def close(self) -> None:
        """Leave the broker."""
        self._consumer.close()
