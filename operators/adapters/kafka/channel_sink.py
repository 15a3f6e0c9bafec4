"""The fan-out's sink: dispatch batches to the channel topics, each item written once.

A batch goes to the partition of its post (or API notification) on its topic: `push.<provider>`,
its `.bulk` or `.transactional` lane, or a channel topic `<provider>.<tier>`; after a restart,
items already on the partition are dropped from replayed batches. The small batches the shards
emit for one post in one write are joined first (up to the batch size), so a normal post costs
about one message per provider topic; identities are per item, so replays are still dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

import orjson

from operators import metrics
from operators.adapters.kafka.probes import KafkaConfig
from operators.adapters.kafka.writer import (
    ChannelSinkState,
    IdempotentPartitionWriter,
    PartitionedTopicsSink,
    WriterStartMarks,
)
from operators.fanout.batching import merge_post_batches
from schemas.codecs import encode_dispatch_batch
from schemas.records import DispatchBatch, EncodedDispatchBatch
from schemas.topics import MAX_DISPATCH_BATCH

Batch = DispatchBatch | EncodedDispatchBatch
"""What the fan-out emits (already encoded) or a batch rebuilt without replayed items."""


def _count(batch: Batch) -> int:
    return batch.count if isinstance(batch, EncodedDispatchBatch) else len(batch.items)


class _ChannelPartitionWriter(IdempotentPartitionWriter[Batch]):
    """Dispatch batches to one channel-topic partition; identity: (notification_id, device_id)."""

    def __init__(
        self,
        config: KafkaConfig,
        topic: str,
        partition: int,
        resume: ChannelSinkState | None,
        replay_window_epochs: int,
        on_written: Callable[[Batch, int], None],
        marks: WriterStartMarks | None = None,
        max_batch_items: int = MAX_DISPATCH_BATCH,
    ) -> None:
        self._on_written = on_written
        self._max_batch_items = max_batch_items
        super().__init__(config, topic, partition, resume, replay_window_epochs, marks)

    def _identities(self, raw: bytes) -> Iterable[Hashable]:
        return [(i["notification_id"], i["device_id"]) for i in orjson.loads(raw).get("items", ())]

    def _unseen(self, batch: Batch) -> tuple[Batch | None, int]:
        if batch.topic != self._topic:
            raise RuntimeError(f"batch for {batch.topic} routed to {self._topic}")
        items = batch.items  # decoded from an encoded batch: only while a replay is deduped
        kept = tuple(i for i in items if (i["notification_id"], i["device_id"]) not in self._seen)
        for i in items:
            self._seen.discard((i["notification_id"], i["device_id"]))
        dropped = len(items) - len(kept)
        if not kept:
            return None, dropped
        if dropped:
            # An API notification's batch keeps its message (the senders render it).
            message = batch.message if isinstance(batch, DispatchBatch) else None
            batch = DispatchBatch(
                batch.post_id,
                batch.author_id,
                batch.provider,
                batch.created_at,
                batch.lane,
                kept,
                message,
            )
        return batch, dropped

    def _coalesce(self, values: list[Batch]) -> list[Batch]:
        return merge_post_batches(values, self._max_batch_items)

    def _encode(self, batch: Batch) -> tuple[bytes, bytes]:
        if batch.topic != self._topic:
            raise RuntimeError(f"batch for {batch.topic} routed to {self._topic}")
        if isinstance(batch, EncodedDispatchBatch):
            return batch.post_id.encode(), batch.payload
        return batch.post_id.encode(), encode_dispatch_batch(batch)

    def _written(self, batch: Batch, dropped: int) -> None:
        if not dropped:
            metrics.observe_dispatched(batch.provider, batch.lane, batch.created_at, _count(batch))
        self._on_written(batch, dropped)


class ChannelTopicsSink(PartitionedTopicsSink[Batch]):
    """Dispatch batches to `push.*` and channel topics, routed by post_id (notification id)."""

    def __init__(
        self,
        config: KafkaConfig,
        topics: Sequence[str],
        *,
        replay_window_epochs: int = 12,
        on_written: Callable[[Batch, int], None] = lambda b, dropped: None,
        marks: Callable[[], WriterStartMarks] | None = None,
        max_batch_items: int = MAX_DISPATCH_BATCH,
    ) -> None:
        super().__init__(config, topics, replay_window_epochs=replay_window_epochs, marks=marks)
        self._max_batch_items = max_batch_items
        self._on_written = on_written

    def _topic_and_id(self, value: Batch) -> tuple[str, str]:
        return value.topic, value.post_id

    def _new_writer(
        self,
        topic: str,
        partition: int,
        resume: ChannelSinkState | None,
        marks: WriterStartMarks | None,
    ) -> _ChannelPartitionWriter:
        return _ChannelPartitionWriter(
            self._config,
            topic,
            partition,
            resume,
            self._replay_window,
            self._on_written,
            marks,
            self._max_batch_items,
        )
