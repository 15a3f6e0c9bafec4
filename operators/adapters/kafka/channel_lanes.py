"""The delivery flow's channel source: each provider's normal and bulk lanes, normal first.

Normal lanes first: each source partition owns partition `i` of a provider's normal topic and
partition `i` of its bulk topic, and reads the bulk one only when the normal one has nothing
ready, and not while the provider's bucket has told the worker to pause the bulk lane. Bulk
dispatch batches are handed out in slices, within a per-worker budget of items per poll round
(FANFARE_BULK_ITEMS_PER_POLL), so a celebrity backlog never sits in front of a normal post: at
worst a normal batch waits for one round's bulk sends. The snapshot keeps the item a sliced
batch resumes at, so a restart neither skips nor repeats a slice's items beyond the ledger's
own resend rules.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, cast

import orjson
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING

from operators.adapters.kafka.probes import KafkaConfig, split_part, topic_partitions
from operators.adapters.kafka.reader import TopicPartitionReader
from operators.adapters.kafka.topic_identity import shared_topic_ids
from operators.events import RawEvent
from operators.worker_local import WorkerLocal
from schemas.topics import MAX_DISPATCH_BATCH, PROVIDERS, channel_topic

LaneOffsets = tuple[int, int, int, str | None, str | None]
"""(normal offset, bulk offset, next item of that bulk message, normal topic id, bulk topic id).

Recovery stores of earlier versions hold the first two or three only."""
"""Where a lane pair resumes: next normal offset, bulk offset, and the next item of that bulk
message (a dispatch batch is sent in slices); offsets -2 = the partition's start."""


class BulkPacer:
    """Per process: until when each provider's bulk lane should not be read (rate limited)."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def pause(self, provider: str, until: float) -> None:
        """Hold the provider's bulk reads until `until` (time.monotonic)."""
        with self._lock:
            self._until[provider] = max(self._until.get(provider, 0.0), until)

    def ready(self, provider: str) -> bool:
        """Whether the bulk lane may be read now."""
        return time.monotonic() >= self._until.get(provider, 0.0)


class BulkRoundBudget:
    """Per worker: how many bulk items its lane readers may emit in one poll round, together.

    The worker sends what one round emitted before it polls again, so this bounds how long a
    normal post read in the next round waits behind bulk sends. A round ends when a partition
    that already took from the budget asks again (Bytewax polls each partition once per step).
    State is per thread: a worker's partitions and its send step share the worker's thread.
    """

    def __init__(self, items_per_round: int) -> None:
        if items_per_round < 1:
            raise ValueError("items_per_round must be at least 1")
        self._per_round = items_per_round
        self._local = WorkerLocal()

    def take(self, part: str, wanted: int) -> int:
        """Up to `wanted` items for `part` in the current round (0: wait for the next one)."""
        seen: set[str] | None = getattr(self._local, "seen", None)
        if seen is None or part in seen:
            seen = set()
            self._local.seen = seen
            self._local.left = self._per_round
        seen.add(part)
        granted = min(wanted, int(self._local.left))
        self._local.left -= granted
        return granted


def _item_count(value: bytes | None) -> int | None:
    """Items in a dispatch batch; None when unreadable (passed on whole, to be dead-lettered)."""
    try:
        items = orjson.loads(value or b"").get("items")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_DISPATCH_BATCH:
        return None  # not a valid batch: handed out whole, decoded once and dead-lettered
    return len(items)


class _BulkSlicer:
    """A bulk partition's read messages, handed out a slice of items at a time."""

    def __init__(self, reader: TopicPartitionReader, resume_offset: int, resume_item: int) -> None:
        self._reader = reader
        self._pending: deque[list[Any]] = deque()  # [RawEvent, item count | None, next item]
        self._resume = (resume_offset, resume_item)

    def _fill(self) -> None:
        for event in self._reader.next_batch():
            assert isinstance(event, RawEvent)
            first = self._resume[1] if event.offset == self._resume[0] else 0
            # The resume point is the first message read, never a later one: after a re-created
            # topic the same offset is another message, whose items must all be sent.
            self._resume = (OFFSET_BEGINNING, 0)
            self._pending.append([event, _item_count(event.value), first])

    def wanted(self) -> int:
        """Items left in the read messages (reads more when none are left)."""
        if not self._pending:
            self._fill()
        return sum(1 if n is None else n - i for _, n, i in self._pending)

    def take(self, budget: int) -> list[object]:
        """Slices of at most `budget` items in all, oldest message first."""
        out: list[object] = []
        while budget > 0 and self._pending:
            event, n, i = self._pending[0]
            if n is None or (i == 0 and n <= budget):
                out.append(event)
                budget -= 1 if n is None else n
                self._pending.popleft()
                continue
            stop = min(n, i + budget)
            out.append(dataclasses.replace(event, window=(i, stop)))
            budget -= stop - i
            if stop == n:
                self._pending.popleft()
            else:
                self._pending[0][2] = stop
        return out

    def snapshot(self) -> tuple[int, int]:
        """The first message not wholly handed out, and its next item."""
        if self._pending:
            event, _, i = self._pending[0]
            return event.offset, i
        return self._reader.offset(), 0

    @property
    def topic_id(self) -> str | None:
        """The id of the topic log the reader counts in."""
        return self._reader.topic_id

    def close(self) -> None:
        """Leave the broker."""
        self._reader.close()


class _LanePairReader(StatefulSourcePartition[object, LaneOffsets]):
    """Partition `i` of a provider's normal topic, then (only when idle) of its bulk topic."""

    def __init__(
        self,
        part: str,
        normal: TopicPartitionReader | None,
        bulk: _BulkSlicer | None,
        provider: str,
        pacer: BulkPacer,
        budget: BulkRoundBudget,
    ) -> None:
        self._part = part
        self._normal = normal
        self._bulk = bulk
        self._provider = provider
        self._pacer = pacer
        self._budget = budget

    def next_batch(self) -> list[object]:
        """Normal messages if any; else a slice of bulk items within the round's budget."""
        if self._normal is not None:
            batch = self._normal.next_batch()
            if batch:
                return batch
        if self._bulk is None or not self._pacer.ready(self._provider):
            return []
        wanted = self._bulk.wanted()
        if not wanted:
            return []
        return self._bulk.take(self._budget.take(self._part, wanted))

    def next_awake(self) -> None:
        """Poll again at once."""
        return None

    def snapshot(self) -> LaneOffsets:
        """Both positions (and the next item of a bulk message sent in part)."""
        bulk_at, bulk_item = (
            self._bulk.snapshot() if self._bulk is not None else (OFFSET_BEGINNING, 0)
        )
        return (
            self._normal.offset() if self._normal is not None else OFFSET_BEGINNING,
            bulk_at,
            bulk_item,
            self._normal.topic_id if self._normal is not None else None,
            self._bulk.topic_id if self._bulk is not None else None,
        )

    def close(self) -> None:
        """Leave the broker."""
        for reader in (self._normal, self._bulk):
            if reader is not None:
                reader.close()


class ChannelLanesSource(FixedPartitionedSource[object, LaneOffsets]):
    """Every `push.<provider>` partition paired with the same `push.<provider>.bulk` one."""

    def __init__(
        self,
        config: KafkaConfig,
        pacer: BulkPacer,
        *,
        providers: Iterable[str] = PROVIDERS,
        normal_batch_size: int = 200,
        bulk_items_per_poll: int = 100,
    ) -> None:
        self._config = config
        self._pacer = pacer
        self._providers = list(providers)
        self._normal_batch = normal_batch_size
        self._budget = BulkRoundBudget(bulk_items_per_poll)

    def _counts(self) -> dict[str, int]:
        topics = [channel_topic(p, lane) for p in self._providers for lane in ("normal", "bulk")]
        counts: dict[str, int] = {}
        for part in topic_partitions(self._config, topics):
            topic, _ = split_part(part)
            counts[topic] = counts.get(topic, 0) + 1
        return counts

    def list_parts(self) -> list[str]:
        """`apns#0` .. one per index of the larger of the two topics."""
        counts = self._counts()
        parts: list[str] = []
        for p in self._providers:
            n = max(counts[channel_topic(p, "normal")], counts[channel_topic(p, "bulk")])
            parts.extend(f"{p}#{i}" for i in range(n))
        return parts

    def build_part(
        self, step_id: str, for_part: str, resume_state: LaneOffsets | None
    ) -> _LanePairReader:
        """Readers for the pair, resumed from the snapshot."""
        provider, _, index = for_part.partition("#")
        i = int(index)
        counts = self._counts()
        # Recovery stores of earlier versions hold (normal, bulk) or (normal, bulk, item).
        given = tuple(resume_state or ())
        normal_at, bulk_at, bulk_item, normal_id, bulk_id = cast(
            LaneOffsets, given + (OFFSET_BEGINNING, OFFSET_BEGINNING, 0, None, None)[len(given) :]
        )
        normal_topic, bulk_topic = (
            channel_topic(provider, "normal"),
            channel_topic(provider, "bulk"),
        )
        normal = (
            TopicPartitionReader(
                self._config,
                normal_topic,
                i,
                normal_at,
                self._normal_batch,
                False,
                1.0,
                topic_ids=shared_topic_ids(self._config),
                start_topic_id=normal_id,
            )
            if i < counts[normal_topic]
            else None
        )
        bulk = (
            _BulkSlicer(
                TopicPartitionReader(
                    self._config,
                    bulk_topic,
                    i,
                    bulk_at,
                    2,
                    False,
                    1.0,
                    topic_ids=shared_topic_ids(self._config),
                    start_topic_id=bulk_id,
                ),
                bulk_at,
                bulk_item,
            )
            if i < counts[bulk_topic]
            else None
        )
        return _LanePairReader(for_part, normal, bulk, provider, self._pacer, self._budget)
