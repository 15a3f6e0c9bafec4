"""The delivery flow's retry source: `push.retry` read, each record held until due, then sent.

A due record is handed to the worker's engine (the `DeliveryPump`) and its outputs are emitted
once it is judged; until then it stays in the partition's snapshot with the held ones, so a
restart sends again exactly the records that had no outcome yet (docs/design.md).

Records wait in one queue per lane (transactional, normal, bulk), by due time: a lane whose
in-flight room is full (a campaign's retries) never holds up a due login code's retry.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING

from operators.adapters.kafka.channel_lanes import MessageReader
from operators.adapters.kafka.probes import KafkaConfig, split_part, topic_partitions
from operators.adapters.kafka.reader import TopicPartitionReader
from operators.adapters.kafka.topic_identity import shared_topic_ids
from operators.delivery.model import SendRequest
from operators.delivery.pipeline import DeliveryPump
from operators.delivery.steps import decode_retry_message
from operators.events import RawEvent
from schemas.topics import DELIVERY_LANES

RetryPartitionState = tuple[int, list[tuple[float, int, bytes | None, bytes | None]], str | None]
"""(next offset, the held records, the topic id the offset counts in); earlier recovery stores
hold the first two only."""


IDLE_POLL = timedelta(milliseconds=10)
"""How often a retry partition with nothing in flight looks for new or due records."""
HeldRecord = tuple[float, int, bytes | None, bytes | None]
"""(due_at, offset, key, value) of a record read and not judged yet."""


class _RetryPartitionReader(StatefulSourcePartition[object, RetryPartitionState]):
    """Reads `push.retry`, holds each record until it is due, sends it, emits its outputs.

    Held records, and records sent but not judged, live in this partition's snapshot, so the
    offset may move past them: a restart resumes with them still held (the sent ones due at
    once). Holding them here (not in a keyed timer downstream) keeps the timer beside the poll
    loop, which Bytewax runs continuously.
    """

    def __init__(
        self,
        reader: MessageReader,
        topic: str,
        partition: int,
        held: list[HeldRecord],
        due_of: Callable[[bytes | None], float],
        clock: Callable[[], float],
        pump: DeliveryPump,
        lane_of: Callable[[bytes | None], str] = lambda raw: "normal",
    ) -> None:
        self._reader = reader
        self._topic = topic
        self._partition = partition
        self._due_of = due_of
        self._lane_of = lane_of
        self._clock = clock
        self._heaps: dict[str, list[HeldRecord]] = {lane: [] for lane in DELIVERY_LANES}
        for entry in held:
            self._heap_of(entry[3]).append(entry)
        for heap in self._heaps.values():
            heapq.heapify(heap)
        self._sent: dict[int, HeldRecord] = {}  # by offset: handed to the engine, not judged
        self._pump = pump
        self._routes = [f"{topic}/{partition}"]
        self._worker, self._outbox = pump.register(self._routes)

    def _heap_of(self, value: bytes | None) -> list[HeldRecord]:
        lane = self._lane_of(value)
        return self._heaps[lane if lane in self._heaps else "normal"]

    def next_batch(self) -> list[object]:
        """Send the records that are due now (newly read ones too); emit what was judged."""
        worker = self._worker
        worker.poll()
        for event in self._reader.next_batch():
            assert isinstance(event, RawEvent)
            entry = (self._due_of(event.value), event.offset, event.key, event.value)
            heapq.heappush(self._heap_of(event.value), entry)
        out: list[object] = []
        now = self._clock()
        requests: list[SendRequest] = []
        for lane, heap in self._heaps.items():  # transactional first
            if not heap or heap[0][0] > now:
                continue
            engine = worker.engine
            room = engine.room(lane)
            while heap and heap[0][0] <= now:
                entry = heap[0]
                _, offset, key, value = entry
                decoded = decode_retry_message(
                    RawEvent(self._topic, self._partition, offset, key, value, now)
                )
                if isinstance(decoded, SendRequest):
                    if room <= 0 or engine.room(lane, decoded.provider) <= 0:
                        break  # the lane's in-flight limit: the rest of it waits, in order
                    room -= 1
                    requests.append(decoded)
                    self._sent[offset] = entry
                else:
                    out.append(decoded)  # a dead letter: judged now
                heapq.heappop(heap)
        if requests:
            worker.submit(requests)
        for judged in self._outbox.drain():
            self._sent.pop(judged.request.origin.offset, None)
            out.extend(judged.outputs)
        return out

    def next_awake(self) -> datetime | None:
        """When to poll again: at once while a record waits for its outcome.

        Else within IDLE_POLL (new records may arrive), or when the first held one is due.
        """
        if self._sent or self._outbox.items:
            return None
        soon = datetime.now(UTC) + IDLE_POLL
        first = min((heap[0][0] for heap in self._heaps.values() if heap), default=None)
        if first is not None:
            return min(soon, datetime.fromtimestamp(first, UTC))
        return soon

    def idle(self) -> bool:
        """Nothing is held or waits for an outcome."""
        return not any(self._heaps.values()) and not self._sent and not self._outbox.items

    def snapshot(self) -> RetryPartitionState:
        """The next offset, and what is held or sent without an outcome yet."""
        held = [entry for heap in self._heaps.values() for entry in heap]
        return (self._reader.offset(), [*held, *self._sent.values()], self._reader.topic_id)

    def close(self) -> None:
        """Leave the broker; the worker's last partition closes its engine."""
        self._reader.close()
        self._pump.release(self._worker, self._routes)


class RetryTopicSource(FixedPartitionedSource[object, RetryPartitionState]):
    """`push.retry`, each record sent when its `due_at` comes; emits the outputs."""

    def __init__(
        self,
        config: KafkaConfig,
        due_of: Callable[[bytes | None], float],
        pump: DeliveryPump,
        topic: str = "push.retry",
        clock: Callable[[], float] = time.time,
        lane_of: Callable[[bytes | None], str] = lambda raw: "normal",
    ) -> None:
        self._config = config
        self._pump = pump
        self._due_of = due_of
        self._lane_of = lane_of
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
        return _RetryPartitionReader(
            reader, topic, partition, held, self._due_of, self._clock, self._pump, self._lane_of
        )
