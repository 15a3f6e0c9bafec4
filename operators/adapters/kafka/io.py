"""Kafka adapters for the dataflows: source, idempotent channel sink, dead-letter sink.

The source reports when a changelog partition has been read to its end; the channel sink drops
items it already wrote before a restart.

Offsets live only in Bytewax's recovery snapshots (no consumer group), like Bytewax's own
KafkaSource; clients are built per partition when Bytewax builds it, never at import time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast
from zlib import crc32

import orjson
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import (
    DynamicSink,
    FixedPartitionedSink,
    StatefulSinkPartition,
    StatelessSinkPartition,
)
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from operators import metrics
from operators.adapters.kafka.topic_identity import TopicIds, shared_topic_ids
from operators.fanout.shard import CaughtUp
from schemas.codecs import encode_dead_letter, encode_dispatch_batch
from schemas.records import DeadLetter, DispatchBatch

log = logging.getLogger(__name__)

KafkaConfig = dict[str, object]

STALE_OFFSET_AFTER_S = 5.0
"""Seconds a reader's position must stay past its partition's end before it rewinds."""
READBACK_BEYOND_END_S = 2.0
"""Seconds a read-back's start must stay past the partition's end before it reads nothing."""


ReaderState = tuple[int, str | None]
"""A partition reader's snapshot: the next offset, and the id of the topic log it counts in."""


def resume_point(state: object) -> ReaderState:
    """A reader snapshot of any version: None (start), an offset (before topic ids), or both."""
    if state is None:
        return (OFFSET_BEGINNING, None)
    if isinstance(state, int):
        return (state, None)
    offset, topic_id = cast(tuple[int, str | None], state)
    return (offset, topic_id)


@dataclass(frozen=True, slots=True)
class RawEvent:
    """A message as read, with where it came from (for dead letters and claims)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    read_at: float
    window: tuple[int, int] | None = None
    """For a dispatch batch sent in slices: the items [start, stop) this event carries."""

    @property
    def source(self) -> str:
        """`topic/partition@offset`: the identity of this message."""
        return f"{self.topic}/{self.partition}@{self.offset}"


def topic_partitions(
    config: KafkaConfig, topics: Sequence[str], timeout_s: float = 10.0
) -> list[str]:
    """`topic/partition` names of every partition of the topics, failing if one is missing."""
    admin = AdminClient(cast(dict[str, Any], {k: v for k, v in config.items()}))
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


def _split_part(part: str) -> tuple[str, int]:
    topic, _, partition = part.rpartition("/")
    return topic, int(partition)


class _TopicPartitionReader(StatefulSourcePartition[object, ReaderState]):
    """Reads one partition; with `report_caught_up`, emits a CaughtUp whenever it is at the end.

    librdkafka reports the end of a partition once per arrival there, so an idle partition is
    probed by seeking to its own position: the next end-of-partition event then reflects a fetch
    issued after the probe, and `as_of` is the probe's time. Watermarks are not used (on the
    embedded broker they can trail the true end).

    A position beyond the partition's end (the broker lost the log: the embedded broker keeps
    memory only, so a restart empties every topic; or the topic was deleted and re-created) is
    detected and the reader rewinds to the partition's beginning, with a warning. Kafka answers
    a fetch past the end with OFFSET_OUT_OF_RANGE and librdkafka resets to the earliest offset
    by itself (`auto.offset.reset`); Tansu answers with an empty fetch, forever, so the reader
    would wait at its old offset: it would skip the first messages of the re-created partition
    and, for a changelog, never report it read to its end again. The signal is the high
    watermark of the fetch answers (librdkafka's cached one, no round trip), which never trails
    the position on a healthy partition: it must stay below the position, with no message and
    no end-of-partition event, for `stale_after_s`. The beginning, not the end: everything on
    a re-created partition was written after the loss, so none of it has been read.
    """

    def __init__(
        self,
        config: KafkaConfig,
        topic: str,
        partition: int,
        start: int,
        batch_size: int,
        report_caught_up: bool,
        probe_interval_s: float,
        clock: Callable[[], float] = time.time,
        stale_after_s: float = STALE_OFFSET_AFTER_S,
        topic_ids: TopicIds | None = None,
        start_topic_id: str | None = None,
    ) -> None:
        conf = dict(config)
        conf.update(
            {
                "group.id": f"fanfare-reader-{topic}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 20,
                "auto.offset.reset": "earliest",
                # One consumer per partition: librdkafka's default prefetch (64 MB each) would
                # dominate the worker's memory; 8 MB still keeps a partition's pipe full.
                "queued.max.messages.kbytes": 8_192,
            }
        )
        self._consumer = Consumer(cast(dict[str, Any], conf))
        self._topic = topic
        self._partition = partition
        self._position = start
        self._batch_size = batch_size
        self._report = report_caught_up
        self._probe_interval = probe_interval_s
        self._clock = clock
        self._source = f"{topic}/{partition}"
        self._probe_at = clock()
        self._last_eof_at = 0.0
        self._lag = metrics.CONSUMER_LAG.labels(topic, str(partition))
        self._lag_at = 0.0
        self._stale_after_s = stale_after_s
        self._behind_since: float | None = None
        self._beyond_check_at = 0.0
        self.rewinds = 0  # times the reader went back to the beginning of a new log
        self._topic_ids = topic_ids
        # The id of the log `_position` points into: from the snapshot, else the first seen.
        # A snapshot's id that differs from the topic's now means the log it counted in is
        # gone (a flow started again after the broker lost its data): start at the beginning.
        self._topic_id = start_topic_id
        self._id_check_at = 0.0
        if topic_ids is not None:
            topic_ids.register([topic])
        self._consumer.assign([TopicPartition(topic, partition, start)])

    def next_batch(self) -> list[object]:
        """Whatever is ready now (never blocks)."""
        if self._topic_ids is not None and self._clock() >= self._id_check_at:
            self._id_check_at = self._clock() + 0.5
            if self._topic_recreated():
                return []
        msgs = self._consumer.consume(self._batch_size, 0)
        out: list[object] = []
        now = self._clock()
        at_end = False
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end = True
                    # The end offset: makes the position concrete even for an empty partition.
                    self._position = max(self._position, cast(int, m.offset()))
                    continue
                if err.fatal() or not err.retriable():
                    raise RuntimeError(f"reading {self._source}: {err.str()}")
                log.warning("transient error reading %s: %s", self._source, err.str())
                continue
            offset = cast(int, m.offset())
            out.append(RawEvent(self._topic, self._partition, offset, m.key(), m.value(), now))
            self._position = offset + 1
        if out or at_end:
            self._behind_since = None
        elif now >= self._beyond_check_at:
            self._check_beyond_end(now)
        if self._report and not out:
            if at_end:
                out.append(CaughtUp(self._source, self._probe_at))
                self._last_eof_at = now
            elif now - max(self._last_eof_at, self._probe_at) >= self._probe_interval:
                # Idle: ask again whether we are at the end; the answer is about "now". Never
                # while data flows, as a seek drops what the client had prefetched.
                self._probe_at = now
                self._consumer.seek(TopicPartition(self._topic, self._partition, self._position))
        if now >= self._lag_at:
            self._sample_lag(now, at_end)
        return out

    def _topic_recreated(self) -> bool:
        """Rewind to the beginning if the topic's id changed (see `topic_identity`).

        The new log's offsets start again at 0, so the position in the old one would skip the
        new log's first messages once enough arrived. Messages of the new log read before the
        change was seen are read again: at least once, as after any restart.
        """
        assert self._topic_ids is not None
        current = self._topic_ids.current(self._topic)
        if current is None or current == self._topic_id:
            return False
        if self._topic_id is None:  # the first id seen: the log we are reading
            self._topic_id = current
            return False
        if not self._rewind():
            return False
        log.warning(
            "%s: the topic was re-created (its id changed from %s to %s: the broker lost its "
            "data, as the embedded broker does when it restarts, or someone deleted and created "
            "it); its offsets start again, so reading resumes at its beginning",
            self._source,
            self._topic_id,
            current,
        )
        self._topic_id = current
        return True

    def _rewind(self) -> bool:
        """Seek to the partition's beginning; False if the client refused (tried again later)."""
        try:
            self._consumer.seek(TopicPartition(self._topic, self._partition, OFFSET_BEGINNING))
        except KafkaException as exc:
            log.warning("%s: rewinding failed (%s); trying again", self._source, exc)
            return False
        self._behind_since = None
        self._position = OFFSET_BEGINNING
        self.rewinds += 1
        return True

    def _check_beyond_end(self, now: float) -> None:
        """Rewind to the beginning if the position has stayed past the partition's end."""
        self._beyond_check_at = now + 0.5
        if self._position < 0:  # a logical offset (beginning/end): nothing to compare
            return
        _, high = self._consumer.get_watermark_offsets(
            TopicPartition(self._topic, self._partition), cached=True
        )
        if high < 0 or high >= self._position:
            self._behind_since = None
            return
        if self._behind_since is None:
            self._behind_since = now
            return
        if now - self._behind_since < self._stale_after_s:
            return
        behind_for, position = now - self._behind_since, self._position
        if not self._rewind():
            return
        log.warning(
            "%s: the next offset to read, %d, is beyond the partition's end (%d) for %.0f s: "
            "the broker lost the partition's data (the embedded broker keeps memory only, "
            "so a restart empties every topic) or the topic was re-created. Everything on it "
            "now was written since, so reading resumes at its beginning",
            self._source,
            position,
            high,
            behind_for,
        )

    def _sample_lag(self, now: float, at_end: bool) -> None:
        """The lag gauge from the watermark the client last saw (no broker round trip)."""
        self._lag_at = now + metrics.LAG_SAMPLE_S
        if at_end:
            self._lag.set(0)
            return
        low, high = self._consumer.get_watermark_offsets(
            TopicPartition(self._topic, self._partition), cached=True
        )
        if high >= 0:
            self._lag.set(max(0, high - (self._position if self._position >= 0 else low)))

    def next_awake(self) -> None:
        """Poll again at once (Bytewax waits 1 ms after an empty batch)."""
        return None

    def offset(self) -> int:
        """The next offset to read."""
        return self._position

    @property
    def topic_id(self) -> str | None:
        """The id of the topic log the offset points into (None until first seen)."""
        return self._topic_id

    def snapshot(self) -> ReaderState:
        """The next offset to read, and the id of the log it belongs to."""
        return (self._position, self._topic_id)

    def close(self) -> None:
        """Leave the broker."""
        self._consumer.close()
        with contextlib.suppress(KeyError):  # the series goes with the reader
            metrics.CONSUMER_LAG.remove(self._topic, str(self._partition))


class KafkaTopicsSource(FixedPartitionedSource[object, ReaderState]):
    """Every partition of some topics; items are RawEvent (and CaughtUp when reporting).

    `replay_topics` are read from their beginning on every start, whatever the snapshot says:
    the state built from them is restored by replaying the changelog, not from snapshots.
    """

    def __init__(
        self,
        config: KafkaConfig,
        topics: Sequence[str],
        *,
        batch_size: int = 5_000,
        report_caught_up: bool = False,
        probe_interval_s: float = 0.05,
        replay_topics: Sequence[str] = (),
    ) -> None:
        self._config = config
        self._topics = list(topics)
        self._batch_size = batch_size
        self._report = report_caught_up
        self._probe_interval = probe_interval_s
        self._replay_topics = frozenset(replay_topics)

    def list_parts(self) -> list[str]:
        """All partitions (every worker can read every partition)."""
        return topic_partitions(self._config, self._topics)

    def build_part(
        self, step_id: str, for_part: str, resume_state: ReaderState | int | None
    ) -> _TopicPartitionReader:
        """Resume from the snapshotted offset, or start at the beginning of the partition."""
        topic, partition = _split_part(for_part)
        start, topic_id = resume_point(resume_state)
        if topic in self._replay_topics:
            start = OFFSET_BEGINNING  # state rebuilt from the changelog, not from snapshots
        return _TopicPartitionReader(
            self._config,
            topic,
            partition,
            start,
            self._batch_size,
            self._report,
            self._probe_interval,
            topic_ids=shared_topic_ids(self._config),
            start_topic_id=topic_id,
        )


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
    consumer = Consumer(cast(dict[str, Any], conf))
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
            # `start` past the partition's end (see _TopicPartitionReader): the broker lost
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
    consumer = Consumer(cast(dict[str, Any], conf))
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
    finally:
        consumer.close()
    # The high watermark may trail the real end on the embedded broker: read on from it.
    tail = read_partition_to_end(config, topic, partition, max(low, high))
    return tail[-1][0] + 1 if tail else max(low, high)


class WriterStartMarks(Protocol):
    """Where a channel writer first began writing in its recovery lineage (post_claims' Redis).

    Never cleared by a snapshot: a cluster may resume from before a writer's first snapshot
    after it was taken (the resume epoch is the slowest worker's last durable one).
    """

    def mark(self, part: str, offset: int) -> int:
        """Record `offset` unless an earlier mark is held; return the held one."""


def high_watermark(config: KafkaConfig, topic: str, partition: int) -> int:
    """The partition's high watermark (fast; may trail the true end on the embedded broker)."""
    consumer = Consumer(cast(dict[str, Any], {**config, "group.id": "fanfare-watermark"}))
    try:
        return int(consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1])
    finally:
        consumer.close()


_END_PROBES = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="end-probe")


def message_count(config: KafkaConfig, topics: Sequence[str]) -> int:
    """Messages on the topics: the sum of every partition's true end offset."""
    return sum(
        end_offset(config, topic, partition)
        for topic, partition in map(_split_part, topic_partitions(config, topics))
    )


ChannelSinkState = tuple[int, int]  # (next offset, earliest offset whose items may be replayed)
V = TypeVar("V")


class _IdempotentPartitionWriter(StatefulSinkPartition[V, ChannelSinkState], Generic[V]):
    """Writes to one topic partition, dropping what it already wrote before a restart.

    After a restart, Bytewax replays the work of the epoch that was not snapshotted. This writer
    snapshots the partition's next offset at each epoch; on resume it reads back what was
    written since, and drops values (or items of values) whose identity is already there. They
    stay remembered until all were seen again, or until `replay_window_epochs` snapshots in a
    row pass with none of them seen (the count starts again at each one seen: a replay slower
    than the original, on a loaded machine or behind a long catch-up, is still deduped).
    Subclasses say what identifies a message and how to encode one.
    """

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
            cast(
                dict[str, Any],
                {
                    **config,
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
        self._part = f"{topic}/{partition}"
        if resume is None and marks is not None:
            # No durable snapshot covers this writer, so Bytewax replays from before its first
            # write: read back from where the lineage's first writer here began (a mark left
            # by an earlier execution is older and wins; a watermark may trail the end, which
            # only makes the read-back start earlier).
            start = marks.mark(self._part, high_watermark(config, topic, partition))
            log.info("%s: no snapshot; reading back from offset %d (start mark)", self._part, start)
            resume = (start, start)
        if resume is None:
            # Bytewax builds a writer when its first batch arrives: finding the partition's end
            # takes ~0.6 s, so do it beside the worker; only a snapshot before our first write
            # needs the answer.
            self._end_probe = _END_PROBES.submit(end_offset, config, topic, partition)
            self._next = self._replay_from = -1
        else:
            self._next, self._replay_from = resume
            foreign = 0
            for _, value in read_partition_to_end(config, topic, partition, self._replay_from):
                # The topic is also an input others write to: a message that is not in our
                # shape is not ours, so it cannot be a replay of our writes.
                try:
                    self._seen.update(self._identities(value or b""))
                except (ValueError, LookupError, TypeError, AttributeError):
                    foreign += 1
            if foreign:
                log.warning(
                    "%s/%s: %d messages written since the last snapshot are not in this "
                    "writer's format (malformed input from another producer): not replays of "
                    "ours; the topic's readers dead-letter them",
                    topic,
                    partition,
                    foreign,
                )
            self._epochs_left = replay_window_epochs if self._seen else 0
            if self._seen:
                log.info(
                    "%s/%s resumed: %d items written since the last snapshot will not be "
                    "written again",
                    topic,
                    partition,
                    len(self._seen),
                )
            if not self._seen:
                self._replay_from = self._next

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

    def _delivered(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._errors.append(err.str())
        else:
            self._last_offset = max(self._last_offset, msg.offset())

    def write_batch(self, values: list[V]) -> None:
        """Produce each value (minus replayed parts) to this partition."""
        for value in values:
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
        """Flush what is queued."""
        self._producer.flush(30)


class _ChannelPartitionWriter(_IdempotentPartitionWriter[DispatchBatch]):
    """Dispatch batches to one channel-topic partition; identity: (notification_id, device_id)."""

    def __init__(
        self,
        config: KafkaConfig,
        topic: str,
        partition: int,
        resume: ChannelSinkState | None,
        replay_window_epochs: int,
        on_written: Callable[[DispatchBatch, int], None],
        marks: WriterStartMarks | None = None,
    ) -> None:
        self._on_written = on_written
        super().__init__(config, topic, partition, resume, replay_window_epochs, marks)

    def _identities(self, raw: bytes) -> Iterable[Hashable]:
        return [(i["notification_id"], i["device_id"]) for i in orjson.loads(raw).get("items", ())]

    def _unseen(self, batch: DispatchBatch) -> tuple[DispatchBatch | None, int]:
        if batch.topic != self._topic:
            raise RuntimeError(f"batch for {batch.topic} routed to {self._topic}")
        kept = tuple(
            i for i in batch.items if (i["notification_id"], i["device_id"]) not in self._seen
        )
        for i in batch.items:
            self._seen.discard((i["notification_id"], i["device_id"]))
        dropped = len(batch.items) - len(kept)
        if not kept:
            return None, dropped
        if dropped:
            batch = DispatchBatch(
                batch.post_id, batch.author_id, batch.provider, batch.created_at, batch.lane, kept
            )
        return batch, dropped

    def _encode(self, batch: DispatchBatch) -> tuple[bytes, bytes]:
        if batch.topic != self._topic:
            raise RuntimeError(f"batch for {batch.topic} routed to {self._topic}")
        return batch.post_id.encode(), encode_dispatch_batch(batch)

    def _written(self, batch: DispatchBatch, dropped: int) -> None:
        if not dropped:
            metrics.observe_dispatched(
                batch.provider, batch.lane, batch.created_at, len(batch.items)
            )
        self._on_written(batch, dropped)


class PartitionedTopicsSink(FixedPartitionedSink[V, ChannelSinkState], Generic[V]):
    """One sink partition per topic partition; upstream keys each value with its partition.

    :meth:`route_key` names the partition (`push.fcm/3`) from the value's topic and routing id,
    so `part_fn` is an index into the sorted list of parts.
    """

    def __init__(self, config: KafkaConfig, topics: Sequence[str]) -> None:
        self._config = config
        self._topics = list(topics)
        self._parts: list[str] | None = None
        self._counts: dict[str, int] = {}

    def _all_parts(self) -> list[str]:
        if self._parts is None:
            parts = sorted(topic_partitions(self._config, self._topics))
            counts: dict[str, int] = {}
            for p in parts:
                topic, _ = _split_part(p)
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


class ChannelTopicsSink(PartitionedTopicsSink[DispatchBatch]):
    """Dispatch batches to `push.*` topics, routed by post_id."""

    def __init__(
        self,
        config: KafkaConfig,
        topics: Sequence[str],
        *,
        replay_window_epochs: int = 12,
        on_written: Callable[[DispatchBatch, int], None] = lambda b, dropped: None,
        marks: Callable[[], WriterStartMarks] | None = None,
    ) -> None:
        super().__init__(config, topics)
        self._marks = marks
        self._replay_window = replay_window_epochs
        self._on_written = on_written

    def _topic_and_id(self, value: DispatchBatch) -> tuple[str, str]:
        return value.topic, value.post_id

    def build_part(
        self, step_id: str, for_part: str, resume_state: ChannelSinkState | None
    ) -> _ChannelPartitionWriter:
        """Build a writer, reading back what was written since the snapshot on resume."""
        topic, partition = _split_part(for_part)
        return _ChannelPartitionWriter(
            self._config,
            topic,
            partition,
            resume_state,
            self._replay_window,
            self._on_written,
            self._marks() if self._marks is not None else None,
        )


class _FlushingWriter(StatelessSinkPartition[V], Generic[V]):
    """Produces and waits for every write before Bytewax moves on (rare, must-not-lose)."""

    def __init__(
        self, config: KafkaConfig, topic: str, encode: Callable[[V], tuple[bytes, bytes]]
    ) -> None:
        self._topic = topic
        self._encode = encode
        self._producer = Producer(
            cast(dict[str, Any], {**config, "acks": "all", "message.max.bytes": 8 * 1024 * 1024})
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


def _dead_letter_message(letter: DeadLetter) -> tuple[bytes, bytes]:
    reason = metrics.dead_letter_reason(letter.error)
    metrics.DEAD_LETTERS_WRITTEN.labels(letter.source_topic, reason).inc()
    return letter.source_topic.encode(), encode_dead_letter(letter)


class DeadLetterSink(FlushingTopicSink[DeadLetter]):
    """Dead letters to the `dead_letters` topic, keyed by source topic."""

    def __init__(self, config: KafkaConfig, topic: str = "dead_letters") -> None:
        super().__init__(config, topic, _dead_letter_message)


def produce_all(
    config: KafkaConfig, topic: str, messages: Iterable[tuple[bytes | None, bytes]]
) -> int:
    """Publish (key, value) messages and wait until all are acknowledged; returns the count."""
    producer = Producer(cast(dict[str, Any], {**config, "linger.ms": 5, "acks": "all"}))
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
