"""The delivery flow's outcomes to `delivery_events`, keyed by notification, each written once.

After a restart, events already on the partition (the same notification, device, outcome and
attempt) are dropped from the replayed epoch, so a consumer sees one terminal outcome per push.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

import orjson

from operators.adapters.kafka.probes import KafkaConfig
from operators.adapters.kafka.writer import (
    ChannelSinkState,
    IdempotentPartitionWriter,
    PartitionedTopicsSink,
    WriterStartMarks,
)
from schemas.codecs import encode_delivery_event
from schemas.records import DeliveryEvent


class _DeliveryEventWriter(IdempotentPartitionWriter[DeliveryEvent]):
    """delivery_events partition writer; a replayed event (same identity) is written once."""

    def _identities(self, raw: bytes) -> Iterable[Hashable]:
        d = orjson.loads(raw)
        return [
            (
                d["notification_id"],
                d["device_id"],
                d["outcome"],
                d["attempt"],
                d.get("retry_at"),
            )
        ]

    def _unseen(self, event: DeliveryEvent) -> tuple[DeliveryEvent | None, int]:
        if event.identity in self._seen:
            self._seen.discard(event.identity)
            return None, 1
        return event, 0

    def _encode(self, event: DeliveryEvent) -> tuple[bytes, bytes]:
        return event.notification_id.encode(), encode_delivery_event(event)


class DeliveryEventsSink(PartitionedTopicsSink[DeliveryEvent]):
    """Delivery events, routed by notification_id, written once each across restarts."""

    def __init__(
        self,
        config: KafkaConfig,
        topic: str = "delivery_events",
        *,
        replay_window_epochs: int = 12,
        marks: Callable[[], WriterStartMarks] | None = None,
    ) -> None:
        super().__init__(config, [topic], replay_window_epochs=replay_window_epochs, marks=marks)
        self._topic = topic

    def _topic_and_id(self, value: DeliveryEvent) -> tuple[str, str]:
        return self._topic, value.notification_id

    def _new_writer(
        self,
        topic: str,
        partition: int,
        resume: ChannelSinkState | None,
        marks: WriterStartMarks | None,
    ) -> _DeliveryEventWriter:
        return _DeliveryEventWriter(
            self._config, topic, partition, resume, self._replay_window, marks
        )
