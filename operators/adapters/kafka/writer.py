"""Kafka sinks: partition writers that drop what they wrote before a restart, flushing sinks.

Bytewax's output is at-least-once: after a restart it replays the epoch that was not
snapshotted. `IdempotentPartitionWriter` snapshots its partition's end and reads back what it
wrote since, so replayed values are dropped; `FlushingTopicSink` waits for every write of a batch
(rare, must-not-lose messages). Producers are built per partition or worker, never at import.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar
from zlib import crc32

from bytewax.outputs import (
    DynamicSink,
    FixedPartitionedSink,
    StatefulSinkPartition,
    StatelessSinkPartition,
)
from confluent_kafka import (
    KafkaError,
    Producer,
)

from operators.adapters.kafka.client_log import client_config
from operators.adapters.kafka.probes import (
    KafkaConfig,
    end_offset,
    high_watermark,
    read_partition_to_end,
    split_part,
    topic_partitions,
)

log = logging.getLogger(__name__)


ChannelSinkState = tuple[int, int]  # (next offset, earliest offset whose items may be replayed)


V = TypeVar("V")


class WriterStartMarks(Protocol):
    """Where a channel writer first began writing in its recovery lineage (post_claims' Redis).

    Never cleared by a snapshot: a cluster may resume from before a writer's first snapshot
    after it was taken (the resume epoch is the slowest worker's last durable one).
    """

    def mark(self, part: str, offset: int) -> int:
        """Record `offset` unless an earlier mark is held; return the held one."""


_END_PROBES = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="end-probe")
# Start marks and read-backs: one per partition a worker writes, run side by side. They mostly
# wait for the broker and Redis, and a fan-out writes dozens of channel partitions, so more
# threads than cores: each queued one holds its writer's values and, at worst, its snapshot.
_START_PROBES = concurrent.futures.ThreadPoolExecutor(
    max_workers=16, thread_name_prefix="writer-start"
)


@dataclass(frozen=True, slots=True)
class _ReadBack:
    """Where a writer resumes and the identities it already wrote there (probed off-thread)."""

    next: int
    replay_from: int
    seen: set[Hashable]
    foreign: int
    took_s: float


class IdempotentPartitionWriter(StatefulSinkPartition[V, ChannelSinkState], Generic[V]):
    """Writes to one topic partition, dropping what it already wrote before a restart.

    After a restart, Bytewax replays the work of the epoch that was not snapshotted. This writer
    snapshots the partition's next offset at each epoch; on resume it reads back what was
    written since, and drops values (or items of values) whose identity is already there. They
    stay remembered until all were seen again, or until `replay_window_epochs` snapshots in a
    row pass with none of them seen (the count starts again at each one seen: a replay slower
    than the original, on a loaded machine or behind a long catch-up, is still deduped).
    Subclasses say what identifies a message and how to encode one.

    The start mark and the read-back run beside the worker thread: until they are done, the
    writer holds its values and produces nothing (see `write_batch`).
    """

    # Beyond this many held values a write waits for the read-back, as every first write did
    # before: memory stays bounded while a mark waits (for Redis, up to a minute). The delivery
    # flow's writers held 58-207 each in the measured runs.
    held_limit = 1_000

    def __init__(
        self,
        config: KafkaConfig,
        topic: str,
        partition: int,
        resume: ChannelSinkState | None,
        replay_window_epochs: int,
        marks: WriterStartMarks | None = None,
    ) -> None:
        self._topic = topic
        self._partition = partition
        self._producer = Producer(
            client_config(
                config,
                **{
                    "linger.ms": 5,
                    "acks": "all",
                    "message.max.bytes": 8 * 1024 * 1024,
                    "queue.buffering.max.kbytes": 1024 * 1024,
                },
            )
        )
        self._last_offset = -1
        self._errors: list[str] = []
        self._seen: set[Hashable] = set()
        self._replay_window = replay_window_epochs
        self._epochs_left = 0
        self._end_probe: concurrent.futures.Future[int] | None = None
        self._read_back: concurrent.futures.Future[_ReadBack] | None = None
        self._held: list[V] = []  # values written before the read-back was loaded
        # The worker and the read-back's completion both write: one at a time.
        self._lock = threading.Lock()
        self._failure: BaseException | None = None  # of writing held values off the worker
        self._part = f"{topic}/{partition}"
        self._next = self._replay_from = -1
        if resume is None and marks is None:
            # Bytewax builds a writer when its first batch arrives: finding the partition's end
            # takes ~0.6 s, so do it beside the worker; only a snapshot before our first write
            # needs the answer.
            self._end_probe = _END_PROBES.submit(end_offset, config, topic, partition)
        else:
            # Bytewax builds a sink's writers one after another on the worker thread, as their
            # first batches arrive: the mark (~0.6 s to ask the broker) and the read-back in
            # the constructor stalled every input of the worker for their sum (2.4 s for four
            # delivery_events partitions). Here they run side by side, off the worker.
            self._read_back = _START_PROBES.submit(
                self._load_read_back, config, resume, marks, time.monotonic()
            )
            self._read_back.add_done_callback(self._write_held)

    def _load_read_back(
        self,
        config: KafkaConfig,
        resume: ChannelSinkState | None,
        marks: WriterStartMarks | None,
        submitted: float,
    ) -> _ReadBack:
        """Runs on a start-probe thread: touches no state of the writer, returns it instead."""
        topic, partition = self._topic, self._partition
        if resume is None:
            assert marks is not None
            # No durable snapshot covers this writer, so Bytewax replays from before its first
            # write: read back from where the lineage's first writer here began (a mark left
            # by an earlier execution is older and wins; a watermark may trail the end, which
            # only makes the read-back start earlier).
            start = marks.mark(self._part, high_watermark(config, topic, partition))
            log.debug(
                "%s: no snapshot; reading back from offset %d (start mark)", self._part, start
            )
            resume = (start, start)
        next_, replay_from = resume
        seen: set[Hashable] = set()
        foreign = 0
        for _, value in read_partition_to_end(config, topic, partition, replay_from):
            # The topic is also an input others write to: a message that is not in our
            # shape is not ours, so it cannot be a replay of our writes.
            try:
                seen.update(self._identities(value or b""))
            except (ValueError, LookupError, TypeError, AttributeError):
                foreign += 1
        return _ReadBack(next_, replay_from, seen, foreign, time.monotonic() - submitted)

    def _ready(self, wait: bool) -> bool:
        """Whether the read-back is loaded (waiting for it if `wait`); its error raises here."""
        future = self._read_back
        if future is None:
            return True
        if not wait and not future.done():
            return False
        got = future.result()  # the probe's error, if any, raises on the worker thread
        self._read_back = None
        self._next, self._replay_from, self._seen = got.next, got.replay_from, got.seen
        if got.foreign:
            log.warning(
                "%s: %d messages written since the last snapshot are not in this "
                "writer's format (malformed input from another producer): not replays of "
                "ours; the topic's readers dead-letter them",
                self._part,
                got.foreign,
            )
        self._epochs_left = self._replay_window if self._seen else 0
        if self._seen:
            log.info(
                "%s resumed: %d items written since the last snapshot will not be written again",
                self._part,
                len(self._seen),
            )
        else:
            self._replay_from = self._next
        log.info(
            "%s: start mark and read-back ready %.2f s after the writer was built; "
            "%d values were held until then",
            self._part,
            got.took_s,
            len(self._held),
        )
        held, self._held = self._held, []
        if held:
            self._write(held)
        return True

    def _identities(self, raw: bytes) -> Iterable[Hashable]:
        """What a message already on the partition identifies (read back on resume)."""
        raise NotImplementedError

    def _unseen(self, value: V) -> tuple[V | None, int]:
        """The value without what was already written, and how many parts were dropped."""
        raise NotImplementedError

    def _encode(self, value: V) -> tuple[bytes, bytes]:
        """(key, value) bytes of a message."""
        raise NotImplementedError

    def _written(self, value: V, dropped: int) -> None:
        """Hook: a value was written (dropped=0) or parts of it were dropped as replays."""

    def _coalesce(self, values: list[V]) -> list[V]:
        """Hook: the values of one write as fewer messages (their parts' identities kept)."""
        return values

    def _delivered(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._errors.append(err.str())
        else:
            self._last_offset = max(self._last_offset, msg.offset())

    def _write_held(self, future: concurrent.futures.Future[_ReadBack]) -> None:
        """When the read-back is loaded: produce the held values at once (on the probe's thread).

        Without this, a partition's first values (a small post's only batch) would wait for
        its next write or the epoch's snapshot. A probe error is left to the worker (it raises
        at the next write or snapshot); if the worker is in this writer, it loads it itself.
        """
        if future.cancelled() or future.exception() is not None:
            return
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._ready(wait=False)
        except Exception as e:  # raised on the worker at its next write or snapshot
            self._failure = e
        finally:
            self._lock.release()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"writing {self._part}'s held values failed") from self._failure

    def write_batch(self, values: list[V]) -> None:
        """Produce each value (minus replayed parts) to this partition.

        Before the read-back is loaded, values are held, not produced (they must first be
        checked against it), and the worker goes on: Bytewax calls this right after building
        the writer, so waiting here would only move the stall (the sink's next writer is built
        after this returns). Held values go out as soon as the read-back is loaded
        (`_write_held`), or at the snapshot, which waits for it; past `held_limit`, this waits.
        """
        with self._lock:
            self._raise_failure()
            if self._ready(wait=len(self._held) + len(values) > self.held_limit):
                self._write(values)
                return
            self._held.extend(values)
        future = self._read_back
        if future is not None and future.done():
            # It finished while we held the lock, so its callback left the held values to us.
            with self._lock:
                self._raise_failure()
                self._ready(wait=False)

    def _write(self, values: list[V]) -> None:
        for value in self._coalesce(values):
            if self._seen:
                kept, dropped = self._unseen(value)
                if dropped:
                    self._epochs_left = self._replay_window  # the replay is still under way
                    self._written(value, dropped)
                if kept is None:
                    continue
                value = kept
            self._produce(*self._encode(value))
            self._written(value, 0)
        self._producer.poll(0)

    def _produce(self, key: bytes, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(
                    self._topic,
                    value=value,
                    key=key,
                    partition=self._partition,
                    on_delivery=self._delivered,
                )
                return
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain

    def snapshot(self) -> ChannelSinkState:
        """Make every write durable, then record where the partition ends."""
        with self._lock:
            self._raise_failure()
            self._ready(wait=True)  # a snapshot before the start mark would not cover a replay
            return self._snapshot()

    def _snapshot(self) -> ChannelSinkState:
        remaining = self._producer.flush(60)
        if remaining or self._errors:
            raise RuntimeError(
                f"writing {self._topic}/{self._partition} failed: "
                f"{remaining} undelivered, errors: {self._errors[:3]}"
            )
        if self._last_offset >= 0:
            self._next = self._last_offset + 1
        elif self._end_probe is not None:
            self._next = self._end_probe.result(timeout=60)
        self._end_probe = None
        if self._epochs_left > 0:
            self._epochs_left -= 1
            if self._epochs_left == 0 or not self._seen:
                self._seen.clear()
                self._epochs_left = 0
        if not self._seen:
            self._replay_from = self._next
        return (self._next, self._replay_from)

    def close(self) -> None:
        """Flush what is queued, held values included once the read-back is loaded."""
        with self._lock:
            try:
                self._ready(wait=True)
            except Exception:
                # No snapshot covers the held values, so a restart replays them: not lost.
                log.exception(
                    "%s: closing without writing %d held values", self._part, len(self._held)
                )
            self._producer.flush(30)


class PartitionedTopicsSink(FixedPartitionedSink[V, ChannelSinkState], Generic[V]):
    """One `IdempotentPartitionWriter` per topic partition; upstream keys each value with its part.

    :meth:`route_key` names the partition (`push.fcm/3`) from the value's topic and routing id,
    so `part_fn` is an index into the sorted list of parts. Subclasses say which writer a
    partition gets (:meth:`_new_writer`).
    """

    def __init__(
        self,
        config: KafkaConfig,
        topics: Sequence[str],
        *,
        replay_window_epochs: int,
        marks: Callable[[], WriterStartMarks] | None,
    ) -> None:
        self._config = config
        self._topics = list(topics)
        self._parts: list[str] | None = None
        self._counts: dict[str, int] = {}
        self._replay_window = replay_window_epochs
        self._marks = marks
        # Writers built ahead of their partition's first value (`prepare`), and the partitions
        # whose writer Bytewax built (none is prepared again). Workers of a process share them.
        self._prepared: dict[str, IdempotentPartitionWriter[V]] = {}
        self._built: set[str] = set()
        self._prepare_lock = threading.Lock()

    def prepare(self, topics: Iterable[str]) -> None:
        """Build the writers of these topics' partitions now, before their first values.

        A writer no snapshot covers begins with its start mark and read-back (about a second
        on the broker) and holds its values until they are done; the first values of a
        celebrity post's bulk lanes waited for that. Called when such a post is planned, the
        start runs while its jobs wait at the gate and expand. Bytewax then gets the prepared
        writer (`build_part`), the same as one built then: no value of this execution reached
        the partition before it, so the read-back ahead saw all a replay could meet. Only with
        start marks: without them a writer holds nothing. A partition this worker never writes
        (another process's, in a cluster) keeps an idle prepared writer.
        """
        if self._marks is None:
            return
        wanted = set(topics)
        with self._prepare_lock:
            for part in self._all_parts():
                topic, partition = split_part(part)
                if topic in wanted and part not in self._built and part not in self._prepared:
                    self._prepared[part] = self._new_writer(topic, partition, None, self._marks())

    def _new_writer(
        self,
        topic: str,
        partition: int,
        resume: ChannelSinkState | None,
        marks: WriterStartMarks | None,
    ) -> IdempotentPartitionWriter[V]:
        """The writer of one partition (its `replay_window_epochs`: `self._replay_window`)."""
        raise NotImplementedError

    def build_part(
        self, step_id: str, for_part: str, resume_state: ChannelSinkState | None
    ) -> IdempotentPartitionWriter[V]:
        """A partition's writer, reading back what was written since the snapshot on resume."""
        with self._prepare_lock:
            self._built.add(for_part)
            prepared = self._prepared.pop(for_part, None)
        if prepared is not None:
            if resume_state is None:
                return prepared
            # A snapshot covers the partition: its read-back starts there. The prepared one
            # is closed beside the worker (closing waits for its start to finish).
            _START_PROBES.submit(prepared.close)
        topic, partition = split_part(for_part)
        marks = self._marks() if self._marks is not None else None
        return self._new_writer(topic, partition, resume_state, marks)

    def _all_parts(self) -> list[str]:
        if self._parts is None:
            parts = sorted(topic_partitions(self._config, self._topics))
            counts: dict[str, int] = {}
            for p in parts:
                topic, _ = split_part(p)
                counts[topic] = counts.get(topic, 0) + 1
            self._parts, self._counts = parts, counts
        return self._parts

    def _topic_and_id(self, value: V) -> tuple[str, str]:
        """The value's topic and the id that picks its partition."""
        raise NotImplementedError

    def route_key(self, value: V) -> str:
        """The partition a value goes to: by id, so one id's messages stay in order."""
        self._all_parts()
        topic, rid = self._topic_and_id(value)
        return f"{topic}/{crc32(rid.encode()) % self._counts[topic]}"

    def list_parts(self) -> list[str]:
        """Every partition of the topics."""
        return list(self._all_parts())

    def part_fn(self, item_key: str) -> int:
        """Index of the named partition in the sorted global list."""
        return self._all_parts().index(item_key)


class _FlushingWriter(StatelessSinkPartition[V], Generic[V]):
    """Produces and waits for every write before Bytewax moves on (rare, must-not-lose)."""

    def __init__(
        self, config: KafkaConfig, topic: str, encode: Callable[[V], tuple[bytes, bytes]]
    ) -> None:
        self._topic = topic
        self._encode = encode
        self._producer = Producer(
            client_config(config, **{"acks": "all", "message.max.bytes": 8 * 1024 * 1024})
        )
        self._errors: list[str] = []

    def _delivered(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._errors.append(err.str())

    def write_batch(self, items: list[V]) -> None:
        for item in items:
            key, value = self._encode(item)
            while True:
                try:
                    self._producer.produce(
                        self._topic, value=value, key=key, on_delivery=self._delivered
                    )
                    break
                except BufferError:
                    self._producer.poll(0.05)
        remaining = self._producer.flush(60)
        if remaining or self._errors:
            raise RuntimeError(
                f"writing to {self._topic} failed: {remaining} left, {self._errors[:3]}"
            )

    def close(self) -> None:
        self._producer.flush(30)


class FlushingTopicSink(DynamicSink[V], Generic[V]):
    """Values to one topic, each write batch acknowledged before the flow goes on."""

    def __init__(
        self, config: KafkaConfig, topic: str, encode: Callable[[V], tuple[bytes, bytes]]
    ) -> None:
        self._config = config
        self._topic = topic
        self._encode = encode

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _FlushingWriter[V]:
        """One producer per worker."""
        return _FlushingWriter(self._config, self._topic, self._encode)


def produce_all(
    config: KafkaConfig, topic: str, messages: Iterable[tuple[bytes | None, bytes]]
) -> int:
    """Publish (key, value) messages and wait until all are acknowledged; returns the count."""
    producer = Producer(client_config(config, **{"linger.ms": 5, "acks": "all"}))
    errors: list[str] = []

    def delivered(err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            errors.append(err.str())

    n = 0
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
        n += 1
        if n % 10_000 == 0:
            producer.poll(0)
    remaining = producer.flush(120)
    if remaining or errors:
        raise RuntimeError(f"publishing to {topic} failed: {remaining} left, {errors[:3]}")
    return n
