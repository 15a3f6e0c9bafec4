"""Dead letters to the `dead_letters` topic: keyed by source topic, each written once.

A dead letter is identified by what it is about: its source position (source topic, partition,
offset) and, for one about a single send of a dispatch batch, the item. Bytewax replays the
epoch after the last snapshot on a restart (kill -9 or a clean stop), and that replay meets the
same bad messages again; so each partition writer snapshots where the partition ends and, on
resume, reads back what was written since and drops letters already there (the channel sink's
`IdempotentPartitionWriter`). Changelogs replayed from their beginning on every start do not
reach this sink for what an earlier execution read (`ReplayHorizon` in the reader). So
`fanfare_dead_letters_written_total` counts each letter once.

The flows key dead letters by source topic (the topic's key), and that key picks the
partition, so all letters of a source topic go through one writer.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from zlib import crc32

import orjson

from operators import metrics
from operators.adapters.kafka.probes import KafkaConfig
from operators.adapters.kafka.writer import (
    ChannelSinkState,
    IdempotentPartitionWriter,
    PartitionedTopicsSink,
    WriterStartMarks,
)
from schemas.codecs import encode_dead_letter
from schemas.records import DeadLetter
from schemas.topics import DEAD_LETTERS


def source_topic_of(letter: DeadLetter) -> str:
    """The key the flows give a dead letter (the `dead_letters` topic's key)."""
    return letter.source_topic


class _DeadLetterWriter(IdempotentPartitionWriter[DeadLetter]):
    """One `dead_letters` partition; a letter whose identity is already there is dropped."""

    def _identities(self, raw: bytes) -> Iterable[Hashable]:
        d = orjson.loads(raw)
        return [(d["source_topic"], d["partition"], d["offset"], d.get("item"))]

    def _unseen(self, letter: DeadLetter) -> tuple[DeadLetter | None, int]:
        if letter.identity in self._seen:
            self._seen.discard(letter.identity)
            return None, 1
        return letter, 0

    def _encode(self, letter: DeadLetter) -> tuple[bytes, bytes]:
        return letter.source_topic.encode(), encode_dead_letter(letter)

    def _written(self, letter: DeadLetter, dropped: int) -> None:
        if not dropped:
            reason = metrics.dead_letter_reason(letter.error)
            metrics.DEAD_LETTERS_WRITTEN.labels(letter.source_topic, reason).inc()


class DeadLetterSink(PartitionedTopicsSink[DeadLetter]):
    """Dead letters keyed by source topic, each written once across restarts."""

    def __init__(
        self,
        config: KafkaConfig,
        topic: str = DEAD_LETTERS,
        *,
        replay_window_epochs: int = 12,
        marks: Callable[[], WriterStartMarks] | None = None,
    ) -> None:
        super().__init__(config, [topic], replay_window_epochs=replay_window_epochs, marks=marks)
        self._topic = topic

    def _topic_and_id(self, value: DeadLetter) -> tuple[str, str]:
        return self._topic, value.source_topic

    def part_fn(self, item_key: str) -> int:
        """The partition of a source topic's letters (its crc32, as the producer's partitioner)."""
        parts = self.list_parts()
        return parts.index(f"{self._topic}/{crc32(item_key.encode()) % len(parts)}")

    def _new_writer(
        self,
        topic: str,
        partition: int,
        resume: ChannelSinkState | None,
        marks: WriterStartMarks | None,
    ) -> _DeadLetterWriter:
        return _DeadLetterWriter(self._config, topic, partition, resume, self._replay_window, marks)
