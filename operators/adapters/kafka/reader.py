"""The Kafka source of the dataflows: every partition of some topics, read without a group.

Offsets live only in Bytewax's recovery snapshots (no consumer group), like Bytewax's own
KafkaSource; a consumer is built per partition when Bytewax builds it, never at import time.
The source can report when a changelog partition has been read to its true end (`CaughtUp`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, cast

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from operators import metrics
from operators.adapters.kafka.client_log import client_config
from operators.adapters.kafka.end_prober import ANSWER_TIMEOUT_S, EndAnswer, EndProber
from operators.adapters.kafka.probes import KafkaConfig, split_part, topic_partitions
from operators.adapters.kafka.topic_identity import TopicIds, shared_topic_ids
from operators.events import CaughtUp, RawEvent
from operators.probe_demand import ProbeDemand

log = logging.getLogger(__name__)


IDLE_POLL_S = 0.01
"""Seconds before the next poll of a partition that just had nothing (see `next_awake`)."""
_IDLE_POLL = timedelta(seconds=IDLE_POLL_S)
IDLE_POLL_MAX_S = 0.04
"""The longest wait between two polls of a partition that keeps having nothing: a message on
a long-idle partition waits at most this long for its read, while an idle fan-out's three dozen
partitions poll 25 times a second each instead of 100."""
_IDLE_POLL_MAX = timedelta(seconds=IDLE_POLL_MAX_S)


def idle_backoff(empty_looks: int, first: timedelta, most: timedelta) -> timedelta:
    """The wait after `empty_looks` empty polls in a row: `first`, doubling, at most `most`.

    Shared by the sources' partitions (`TopicPartitionReader`, the delivery lanes): Bytewax
    polls a partition again 1 ms after an empty batch unless told to wait.
    """
    doublings = min(max(empty_looks, 1) - 1, 16)
    return min(first * (1 << doublings), most)


FETCH_WAIT_MS = 50
"""How long the broker may hold a fetch of a partition at its end. An idle flow's fetch rate is
its consumers / this (`SharedConsumer`: partitions may share one): at 20 ms, two dozen idle
consumers cost the flow a fifth of a core (and the broker as much); a caught-up marker
comes at most this much later than the probe that asked for it, and a probe must wait longer
than this (a seek restarts the fetch: probing faster, the end is never reported)."""

QUIET_PROBE_S = 1.0
"""Seconds between two interval probes of an idle changelog partition whose process's shards
ask for the probes they need (`ProbeDemand`): each probe's caught-up marker goes to every
follower shard, so ten a second per partition made most of an idle fan-out's work. The interval
probes remain for the shards of other processes, whose gates may wait up to this long."""

PROBE_ANSWER_S = 2 * FETCH_WAIT_MS / 1000
"""About how long a probe takes to be answered by an end-of-partition event (measured ~0.1 s:
the fetch in flight ends, then the one after the seek is held at the end)."""

_ANSWER_WATCH_S = 3 * PROBE_ANSWER_S
"""Seconds a reader looks often for the answer to a probe a shard asked for: longer than an
answer takes; one that never came is left to the interval probes."""

PROBER_POLL_S = 0.002
"""Seconds between looks for the prober's answer to an ask (`EndProber`: a few ms)."""

ASK_GIVE_UP_S = 2 * ANSWER_TIMEOUT_S
"""Seconds after which an ask with no answer is taken as lost (the prober answers every ask
within its round's timeout): the reader asks again."""

STALE_OFFSET_AFTER_S = 5.0
"""Seconds a reader's position must stay past its partition's end before it rewinds."""


def reader_client_config(config: KafkaConfig, group: str) -> dict[str, Any]:
    """The settings of a reader's consumer (no group: offsets live in snapshots)."""
    conf: dict[str, object] = dict(config)
    conf.update(
        {
            "group.id": group,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": FETCH_WAIT_MS,
            "auto.offset.reset": "earliest",
            # A consumer per partition or per few: librdkafka's default prefetch (64 MB each)
            # would dominate the worker's memory; 8 MB still keeps a partition's pipe full.
            "queued.max.messages.kbytes": 8_192,
        }
    )
    return client_config(conf)


class PartitionConsumer(Protocol):
    """The part of a confluent_kafka Consumer a `TopicPartitionReader` uses."""

    def assign(self, partitions: list[TopicPartition]) -> None:
        """Read these partitions from their offsets."""

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        """Messages (and end-of-partition events) ready now."""

    def seek(self, partition: TopicPartition) -> None:
        """Read the partition from this offset next."""

    def get_watermark_offsets(
        self, partition: TopicPartition, cached: bool = False
    ) -> tuple[int, int]:
        """(low, high) watermarks of the partition."""

    def close(self) -> None:
        """Leave the broker."""


class SharedConsumer:
    """One consumer reading several partitions, each for its own `TopicPartitionReader`.

    A librdkafka consumer costs its process a broker connection, threads and a fetch request
    every FETCH_WAIT_MS while its partitions are idle, and the broker as much to answer: one
    per delivery lane partition made the delivery flow's idle and per-push CPU grow with the
    number of lanes (docs/design.md). Here the partitions one source partition reads share one
    consumer: a read for one partition takes what the consumer has ready and keeps the others'
    messages in their own buffers, in order. A partition whose buffer holds `buffered_max`
    messages or `buffered_max_bytes` of values (as much as librdkafka's own prefetch) is paused,
    its reader not taking them (e.g. a rate-limited bulk lane), and resumed once its reader took
    half of them. librdkafka resumes a paused partition after the last message it handed out,
    so nothing is skipped or read twice.
    """

    def __init__(
        self,
        consumer: Any,  # a confluent_kafka Consumer; tests pass a fake
        *,
        read_size: int = 500,
        buffered_max: int = 2_000,
        buffered_max_bytes: int = 8 << 20,
    ) -> None:
        self._consumer = consumer
        self._read_size = read_size
        self._buffered_max = buffered_max
        self._buffered_max_bytes = buffered_max_bytes
        self._bytes: dict[tuple[str, int], int] = {}
        self._buffers: dict[tuple[str, int], deque[Message]] = {}
        self._paused: set[tuple[str, int]] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether its last partition's reader left (the consumer is closed)."""
        return self._closed

    @classmethod
    def connect(
        cls,
        config: KafkaConfig,
        group: str,
        *,
        read_size: int = 500,
        buffered_max: int = 2_000,
        buffered_max_bytes: int = 8 << 20,
    ) -> SharedConsumer:
        """A shared consumer on the broker (built per worker, when Bytewax builds a partition)."""
        consumer = Consumer(reader_client_config(config, group))
        return cls(
            consumer,
            read_size=read_size,
            buffered_max=buffered_max,
            buffered_max_bytes=buffered_max_bytes,
        )

    def partition(self, topic: str, partition: int) -> PartitionConsumer:
        """The consumer as one partition's reader sees it."""
        key = (topic, partition)
        if key in self._buffers:
            raise ValueError(f"{topic}/{partition} already has a reader on this consumer")
        self._buffers[key] = deque()
        self._bytes[key] = 0
        return _SharedPartition(self, key)

    def buffered(self, key: tuple[str, int]) -> int:
        """Messages read for the partition that its reader has not taken yet."""
        return len(self._buffers[key])

    def paused(self, key: tuple[str, int]) -> bool:
        """Whether the partition's fetching is paused (its buffer is full)."""
        return key in self._paused

    def _assign(self, partitions: list[TopicPartition]) -> None:
        self._consumer.incremental_assign(partitions)

    def _take(self, key: tuple[str, int], wanted: int) -> list[Message]:
        """Up to `wanted` of the partition's messages, reading the consumer if it has too few.

        Reads at most a few batches: enough to get past other partitions' prefetched messages,
        which then wait in their buffers (paused once full), without blocking.
        """
        buffer = self._buffers[key]
        stray: list[Message] = []
        for _ in range(4):
            if len(buffer) >= wanted:
                break
            msgs = self._consumer.consume(self._read_size, 0)
            for m in msgs:
                owner = self._buffers.get((m.topic(), m.partition()))
                if owner is None:
                    # A client-wide error (no partition) or a partition no reader holds any
                    # more: the reader asking now sees the errors; messages are left alone.
                    if m.error() is not None:
                        stray.append(m)
                    continue
                owner.append(m)
                self._bytes[(m.topic(), m.partition())] += len(m.value() or b"")
            self._pause_full()
            if len(msgs) < self._read_size:
                break  # nothing more is ready now
        out = stray
        taken = 0
        while buffer and len(out) < wanted:
            m = buffer.popleft()
            taken += len(m.value() or b"")
            out.append(m)
        self._bytes[key] -= taken
        if (
            key in self._paused
            and len(buffer) <= self._buffered_max // 2
            and self._bytes[key] <= self._buffered_max_bytes // 2
        ):
            self._paused.discard(key)
            self._consumer.resume([TopicPartition(*key)])
        return out

    def _pause_full(self) -> None:
        full = [
            key
            for key, buffer in self._buffers.items()
            if key not in self._paused
            and (len(buffer) >= self._buffered_max or self._bytes[key] >= self._buffered_max_bytes)
        ]
        if full:
            self._paused.update(full)
            self._consumer.pause([TopicPartition(*key) for key in full])

    def _seek(self, key: tuple[str, int], offset: int) -> None:
        """Read the partition from `offset` next: what its buffer held is dropped."""
        if key in self._paused:
            self._paused.discard(key)
            self._consumer.resume([TopicPartition(*key)])
        self._consumer.seek(TopicPartition(key[0], key[1], offset))
        self._buffers[key].clear()
        self._bytes[key] = 0

    def _release(self, key: tuple[str, int]) -> None:
        """The partition's reader left; the last one to leave closes the consumer."""
        if self._buffers.pop(key, None) is None:
            return
        self._bytes.pop(key, None)
        self._paused.discard(key)
        if not self._buffers and not self._closed:
            self._closed = True
            self._consumer.close()
        elif not self._closed:
            with contextlib.suppress(KafkaException):
                self._consumer.incremental_unassign([TopicPartition(*key)])


class ConsumerShares:
    """Per process: one `SharedConsumer` for the partitions with the same index, per worker.

    The fan-out's topics that are read side by side have the same partition count (posts and
    their backfill lane; the three API tier topics; the three changelogs), so partition `p` of
    each is read by one consumer instead of one each: a consumer costs librdkafka threads, a
    broker connection and an idle fetch loop (see `SharedConsumer`). Every partition keeps its
    own reader, snapshot and caught-up reports; only the consumer under them is shared. Keyed
    by the building thread too: a Bytewax worker builds and polls its partitions on its own
    thread, and a `SharedConsumer` is not thread-safe.
    """

    def __init__(self, connect: Callable[[], SharedConsumer]) -> None:
        self._connect = connect
        self._consumers: dict[tuple[int, int], SharedConsumer] = {}
        self._lock = threading.Lock()

    @classmethod
    def on_broker(
        cls,
        config: KafkaConfig,
        group: str,
        *,
        read_size: int = 500,
        buffered_max: int = 2_000,
    ) -> ConsumerShares:
        """Shares whose consumers connect to the broker when a partition is first built."""
        return cls(
            functools.partial(
                SharedConsumer.connect,
                config,
                group,
                read_size=read_size,
                buffered_max=buffered_max,
            )
        )

    def partition(self, topic: str, partition: int) -> PartitionConsumer:
        """The consumer of this worker's partitions with index `partition`, as `topic`'s."""
        key = (threading.get_ident(), partition)
        with self._lock:
            shared = self._consumers.get(key)
            if shared is None or shared.closed:
                shared = self._consumers[key] = self._connect()
            return shared.partition(topic, partition)

    def consumers(self) -> int:
        """Consumers open now (all workers of the process)."""
        with self._lock:
            return sum(1 for c in self._consumers.values() if not c.closed)


class _SharedPartition:
    """One partition's view of a `SharedConsumer` (a `PartitionConsumer`)."""

    def __init__(self, shared: SharedConsumer, key: tuple[str, int]) -> None:
        self._shared = shared
        self._key = key

    def _check(self, partition: TopicPartition) -> None:
        if (partition.topic, partition.partition) != self._key:
            raise ValueError(f"{partition.topic}/{partition.partition} is not {self._key}")

    def assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._check(tp)
        self._shared._assign(partitions)

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        return self._shared._take(self._key, num_messages)

    def seek(self, partition: TopicPartition) -> None:
        self._check(partition)
        self._shared._seek(self._key, partition.offset)

    def get_watermark_offsets(
        self, partition: TopicPartition, cached: bool = False
    ) -> tuple[int, int]:
        self._check(partition)
        low, high = self._shared._consumer.get_watermark_offsets(partition, cached=cached)
        return (low, high)

    def close(self) -> None:
        self._shared._release(self._key)


ReaderState = tuple[int, str | None]
"""A partition reader's snapshot: the next offset, and the id of the topic log it counts in."""

TOPIC_ID_WAIT_S = 3.0
"""Seconds a replayed changelog waits for its topic's id before trusting its replay horizon."""


class ReplayHorizon:
    """Where a changelog replayed from its beginning stops repeating what was read before.

    A partition of a changelog that is read from offset 0 on every start (its state lives in
    memory only) meets again everything an earlier execution read. The offsets below the one
    its last snapshot recorded were processed then, dead letters included, so they are
    *replayed*: applied to state again, never dead-lettered again. That holds only in the same
    log: a topic that was re-created (the embedded broker restarted empty, or someone deleted
    and created it) starts its offsets again, and nothing in the new log was read before. So the
    horizon is trusted once the topic's id (KIP-516) is known to be the snapshot's, and dropped
    when it differs; a broker that gives no id within `wait_s` is taken to keep its logs (Kafka
    does).
    """

    def __init__(self, below: int, log_id: str | None, wait_s: float = TOPIC_ID_WAIT_S) -> None:
        self.below = below if below > 0 else 0
        self._log_id = log_id
        self._wait_s = wait_s
        self.settled = self.below == 0

    def settle(self, current_id: str | None, waited_s: float) -> bool:
        """Decide with the topic's id now (None: not known yet); False means wait and ask again."""
        if self.settled:
            return True
        if current_id is None and waited_s < self._wait_s:
            return False
        if current_id is not None and self._log_id is not None and current_id != self._log_id:
            self.below = 0  # a new log: none of it was read before
        self.settled = True
        return True

    def forget(self) -> None:
        """The reader went back to the beginning of a new log: nothing in it was read before."""
        self.below = 0
        self.settled = True

    def replayed(self, offset: int) -> bool:
        """Whether the message at `offset` was read by an earlier execution."""
        return offset < self.below


def resume_point(state: object) -> ReaderState:
    """A reader snapshot of any version: None (start), an offset (before topic ids), or both."""
    if state is None:
        return (OFFSET_BEGINNING, None)
    if isinstance(state, int):
        return (state, None)
    offset, topic_id = cast(tuple[int, str | None], state)
    return (offset, topic_id)


class TopicPartitionReader(StatefulSourcePartition[object, ReaderState]):
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

    `consumer`, when given, is the partition's share of a consumer it reads with other
    partitions (`SharedConsumer.partition`); else the reader builds a consumer of its own.

    `demand`, when given, says when this process's shards want a probe (`ProbeDemand`): an
    idle reader whose last probe was answered probes at that time, not at its next interval,
    and holds back an interval probe that would still be unanswered then.
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
        replayed_below: int = 0,
        consumer: PartitionConsumer | None = None,
        demand: ProbeDemand | None = None,
        prober: EndProber | None = None,
    ) -> None:
        self._demand = demand
        # With a prober, a shard's asks are answered by it, not by seeking this consumer.
        self._prober = prober if demand is not None else None
        self._end_ask_at: float | None = None  # when the prober was asked (None: no ask out)
        self._marked_at = float("-inf")  # the latest caught-up marker's as_of
        self._read_since_marker = False  # messages read since the last caught-up marker
        self._consumer: PartitionConsumer = (
            consumer
            if consumer is not None
            # The stubs' parameter names differ from the protocol's; the calls are the same.
            else cast(
                PartitionConsumer,
                Consumer(reader_client_config(config, f"fanfare-reader-{topic}")),
            )
        )
        self._topic = topic
        self._partition = partition
        self._position = start
        self._batch_size = batch_size
        self._report = report_caught_up
        self._probe_interval = max(probe_interval_s, 2 * FETCH_WAIT_MS / 1000)
        self._clock = clock
        self._source = f"{topic}/{partition}"
        self._probe_at = clock()
        self._last_eof_at = 0.0
        self._probe_asked = False  # the probe out was made for a shard's ask (`_probe_wait`)
        self._lag = metrics.CONSUMER_LAG.labels(topic, str(partition))
        self._lag_at = 0.0
        self._stale_after_s = stale_after_s
        self._behind_since: float | None = None
        self._beyond_check_at = 0.0
        self.rewinds = 0  # times the reader went back to the beginning of a new log
        self._empty_looks = 0  # polls in a row that read no message
        self._topic_ids = topic_ids
        # The id of the log `_position` points into: from the snapshot, else the first seen.
        # A snapshot's id that differs from the topic's now means the log it counted in is
        # gone (a flow started again after the broker lost its data): start at the beginning.
        self._topic_id = start_topic_id
        self._id_check_at = 0.0
        self._horizon = ReplayHorizon(replayed_below, start_topic_id)
        self._started_at = clock()
        if topic_ids is not None:
            topic_ids.register([topic])
        self._consumer.assign([TopicPartition(topic, partition, start)])

    def next_batch(self) -> list[object]:
        """Whatever is ready now (never blocks)."""
        if not self._horizon.settled:
            current = self._topic_ids.current(self._topic) if self._topic_ids else None
            if not self._horizon.settle(current, self._clock() - self._started_at):
                return []  # which log the snapshot's offsets count in is not known yet
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
            out.append(
                RawEvent(
                    self._topic,
                    self._partition,
                    offset,
                    m.key(),
                    m.value(),
                    now,
                    replayed=self._horizon.replayed(offset),
                    log=self._topic_id,
                )
            )
            self._position = offset + 1
        if out or at_end:
            self._behind_since = None
        elif now >= self._beyond_check_at:
            self._check_beyond_end(now)
        if out:
            self._read_since_marker = True
        if self._report and not out:
            if at_end:
                end = self._position if self._position >= 0 else None
                out.append(CaughtUp(self._source, self._probe_at, end, self._topic_id))
                self._read_since_marker = False
                self._last_eof_at = now
                self._marked_at = max(self._marked_at, self._probe_at)
            elif self._probe_due(now):
                # Idle: ask again whether we are at the end; the answer is about "now". Never
                # while data flows, as a seek drops what the client had prefetched.
                self._probe_asked = self._demand is not None and (
                    self._demand.due_after(self._probe_at) is not None
                )
                self._probe_at = now
                self._consumer.seek(TopicPartition(self._topic, self._partition, self._position))
        if self._report and self._prober is not None:
            marker = self._probe_for_shards(now, idle=not any(m.error() is None for m in msgs))
            if marker is not None:
                out.append(marker)
        if now >= self._lag_at:
            self._sample_lag(now, at_end)
        # Activity is a message read: an end-of-partition event or a caught-up marker from an
        # idle partition's probe does not reset its backoff.
        read = any(m.error() is None for m in msgs)
        self._empty_looks = 0 if read else self._empty_looks + 1
        return out

    def _probe_due(self, now: float) -> bool:
        """Whether an idle reader probes now: at a shard's ask, else after the interval.

        Never again while a probe is unanswered (a seek restarts the fetch, so asks coming
        faster than the answer would keep the end from ever being reported), except after the
        interval, as before, in case its answer was lost. With a prober, the asks go to it
        (`_probe_for_shards`) and only the interval probes are made here.
        """
        demand = self._demand if self._prober is None else None
        wanted = None if demand is None else demand.due_after(self._probe_at)
        if wanted is not None and self._last_eof_at >= self._probe_at:
            if now >= wanted:
                return True
            if wanted - now < PROBE_ANSWER_S:
                return False  # an interval probe now would still be unanswered then
        return now - max(self._last_eof_at, self._probe_at) >= self._probe_every()

    def _probe_for_shards(self, now: float, idle: bool) -> CaughtUp | None:
        """Ask the prober when a shard wants a probe; a marker once it says we are at the end.

        Asked only while idle, at the position every message before which was read: an answer
        that the partition ended there is a marker as of the prober's round, even if messages
        came since (they are read after it). An answer that it did not end there, or none in
        time, is dropped: the reader reads on and asks again once idle.
        """
        assert self._prober is not None and self._demand is not None
        if self._end_ask_at is not None:
            answer = self._prober.answer(self._topic, self._partition)
            if answer is None:
                if now - self._end_ask_at < ASK_GIVE_UP_S:
                    return None
                answer = EndAnswer(self._end_ask_at, False, -1)  # lost: ask again below
            self._end_ask_at = None
            if not answer.at_end or self._position < answer.offset:
                return self._probe_for_shards(now, idle) if answer.offset < 0 else None
            self._marked_at = max(self._marked_at, answer.as_of)
            return CaughtUp(self._source, answer.as_of, self._position, self._topic_id)
        if not idle or self._position < 0:
            return None
        wanted = self._demand.due_after(self._marked_at)
        if wanted is None or now < wanted:
            return None
        self._end_ask_at = now
        self._prober.ask(self._topic, self._partition, self._position)
        return None

    def _probe_every(self) -> float:
        """Seconds between interval probes of this idle partition (see `QUIET_PROBE_S`).

        Soon after it read something (its caught-up state changed: the shards learn its new
        end at once); else seldom when the shards of the process ask for the probes they need.
        """
        if self._demand is None or self._read_since_marker:
            return self._probe_interval
        return max(self._probe_interval, QUIET_PROBE_S)

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
        self._horizon.forget()
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

    def next_awake(self) -> datetime | None:
        """Poll again at once after messages; an idle partition after `IDLE_POLL_S`, doubling.

        Bytewax polls a source again 1 ms after an empty batch: with a few dozen idle
        partitions that alone kept a good part of a core busy, which a busy fan-out needs. The
        wait doubles with each empty poll up to `IDLE_POLL_MAX_S`; a message read resets it.
        A changelog reader a gate waits on wakes sooner (`_probe_wait`).
        """
        if self._empty_looks:
            wait = idle_backoff(self._empty_looks, _IDLE_POLL, _IDLE_POLL_MAX)
            if self._report:
                probe_wait = self._probe_wait(self._clock())
                if probe_wait is not None:
                    wait = min(wait, timedelta(seconds=max(probe_wait, 0.0)))
            return datetime.now(UTC) + wait
        return None

    def _probe_wait(self, now: float) -> float | None:
        """Seconds until this idle reader has probe work a shard's gate waits on (None: none).

        A gate opens on the slowest changelog partition's answer, and the backoff alone let
        each partition make its asked-for probe up to `IDLE_POLL_MAX_S` late and pass its
        answer on as late again. So: wake at the asked time, and while a probe made for an
        ask is unanswered (for at most `_ANSWER_WATCH_S`), look every `IDLE_POLL_S`.
        """
        if self._demand is None:
            return None
        if self._prober is not None:
            if self._end_ask_at is not None:  # the prober answers in a few milliseconds
                return PROBER_POLL_S if now - self._end_ask_at < _ANSWER_WATCH_S else None
            wanted = self._demand.due_after(self._marked_at)
            return None if wanted is None else wanted - now
        if self._last_eof_at < self._probe_at:  # a probe is out
            if now - self._probe_at < _ANSWER_WATCH_S and self._probe_asked:
                return IDLE_POLL_S
            return None
        wanted = self._demand.due_after(self._probe_at)
        return None if wanted is None else wanted - now

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
    `start_at(topic, partition)`, when given, says where to start a partition instead of the
    snapshot: `(offset, topic id it counts in)`, e.g. the oldest position the follower shards'
    checkpoints hold (`operators.adapters.stores.shard_state.FileShardStateStore.floor`).
    Either way, what lies below the snapshot's offset was read by an earlier execution and is
    marked `replayed` (see `ReplayHorizon`): applied again, never dead-lettered again.
    `consumers`, when given, are the consumers its partitions share (`ConsumerShares`: partition
    `p` of every topic on one consumer, possibly with other sources' partitions `p`); else each
    partition has a consumer of its own. `demand`: when the shards of this process want the
    partitions probed (`ProbeDemand`); with it, idle partitions are otherwise probed seldom.
    `prober`: answers those asks on a consumer of its own (`EndProber`) instead of a seek.
    """

    def __init__(
        self,
        config: KafkaConfig,
        topics: Sequence[str],
        *,
        batch_size: int = 5_000,
        report_caught_up: bool = False,
        probe_interval_s: float = 0.1,
        replay_topics: Sequence[str] = (),
        start_at: Callable[[str, int], tuple[int, str | None] | None] | None = None,
        consumers: ConsumerShares | None = None,
        demand: ProbeDemand | None = None,
        prober: EndProber | None = None,
    ) -> None:
        self._consumers = consumers
        self._demand = demand
        self._prober = prober
        self._config = config
        self._topics = list(topics)
        self._batch_size = batch_size
        self._report = report_caught_up
        self._probe_interval = probe_interval_s
        self._replay_topics = frozenset(replay_topics)
        self._start_at = start_at

    def list_parts(self) -> list[str]:
        """All partitions (every worker can read every partition)."""
        return topic_partitions(self._config, self._topics)

    def build_part(
        self, step_id: str, for_part: str, resume_state: ReaderState | int | None
    ) -> TopicPartitionReader:
        """Resume from the snapshotted offset, or start at the beginning of the partition."""
        topic, partition = split_part(for_part)
        start, topic_id = resume_point(resume_state)
        replayed_below = 0
        if topic in self._replay_topics:
            replayed_below = max(start, 0)
            start = OFFSET_BEGINNING  # state rebuilt from the changelog, not from snapshots
        chosen = self._start_at(topic, partition) if self._start_at is not None else None
        if chosen is not None:
            # Started below the snapshot's position: what lies between was read before. The
            # horizon counts in the snapshot's log, which the reader confirms before trusting.
            if chosen[1] in (None, topic_id):
                replayed_below = max(replayed_below, start, 0)
            start, topic_id = chosen
            log.info("%s: starting at offset %d (shard checkpoints)", for_part, start)
        return TopicPartitionReader(
            self._config,
            topic,
            partition,
            start,
            self._batch_size,
            self._report,
            self._probe_interval,
            topic_ids=shared_topic_ids(self._config),
            start_topic_id=topic_id,
            replayed_below=replayed_below,
            consumer=(
                self._consumers.partition(topic, partition) if self._consumers is not None else None
            ),
            demand=self._demand,
            prober=self._prober,
        )
