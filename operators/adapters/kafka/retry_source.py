"""The delivery flow's retry timer: `push.retry` read and each record held until it is due."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING

from operators.adapters.kafka.probes import KafkaConfig, split_part, topic_partitions
from operators.adapters.kafka.reader import TopicPartitionReader
from operators.adapters.kafka.topic_identity import shared_topic_ids
from operators.events import RawEvent

RetryPartitionState = tuple[int, list[tuple[float, int, bytes | None, bytes | None]], str | None]
"""(next offset, the held records, the topic id the offset counts in); earlier recovery stores
hold the first two only."""


class _RetryPartitionReader(StatefulSourcePartition[object, RetryPartitionState]):
    """Reads `push.retry` and holds each record until it is due (the retry timer).

    Held records live in this partition's snapshot, so the offset may move past them: a
    restart resumes with them still held. Holding them here (not in a keyed timer downstream)
    keeps the timer beside the poll loop, which Bytewax runs continuously.
    """

    def __init__(
        self,
        reader: TopicPartitionReader,
        topic: str,
        partition: int,
        held: list[tuple[float, int, bytes | None, bytes | None]],
        due_of: Callable[[bytes | None], float],
        clock: Callable[[], float],
    ) -> None:
        self._reader = reader
        self._topic = topic
        self._partition = partition
        self._due_of = due_of
        self._clock = clock
        self._heap = list(held)
        heapq.heapify(self._heap)

    def next_batch(self) -> list[object]:
        """Records that are due now (newly read ones too)."""
        for event in self._reader.next_batch():
            assert isinstance(event, RawEvent)
            entry = (self._due_of(event.value), event.offset, event.key, event.value)
            heapq.heappush(self._heap, entry)
        now = self._clock()
        out: list[object] = []
        while self._heap and self._heap[0][0] <= now:
            _, offset, key, value = heapq.heappop(self._heap)
            out.append(RawEvent(self._topic, self._partition, offset, key, value, now))
        return out

    def next_awake(self) -> None:
        """Poll again at once (new records may arrive; held ones come due)."""
        return None

    def snapshot(self) -> RetryPartitionState:
        """The next offset and what is held."""
        return (self._reader.offset(), list(self._heap), self._reader.topic_id)

    def close(self) -> None:
        """Leave the broker."""
        self._reader.close()


class RetryTopicSource(FixedPartitionedSource[object, RetryPartitionState]):
    """`push.retry`, each record released as a RawEvent when its `due_at` comes."""

    def __init__(
        self,
        config: KafkaConfig,
        due_of: Callable[[bytes | None], float],
        topic: str = "push.retry",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._due_of = due_of
        self._topic = topic
        self._clock = clock

    def list_parts(self) -> list[str]:
        """Every partition of the retry topic."""
        return topic_partitions(self._config, [self._topic])

    def build_part(
        self, step_id: str, for_part: str, resume_state: RetryPartitionState | None
    ) -> _RetryPartitionReader:
        """Resume at the snapshotted offset with the held records."""
        topic, partition = split_part(for_part)
        start, held, topic_id = (
            (*resume_state, None)[:3] if resume_state is not None else (OFFSET_BEGINNING, [], None)
        )
        reader = TopicPartitionReader(
            self._config,
            topic,
            partition,
            start,
            5_000,
            False,
            1.0,
            topic_ids=shared_topic_ids(self._config),
            start_topic_id=topic_id,
        )
        return _RetryPartitionReader(reader, topic, partition, held, self._due_of, self._clock)
