"""Dead letters to the `dead_letters` topic, keyed by source topic and counted by reason."""

from __future__ import annotations

from operators import metrics
from operators.adapters.kafka.probes import KafkaConfig
from operators.adapters.kafka.writer import FlushingTopicSink
from schemas.codecs import encode_dead_letter
from schemas.records import DeadLetter


def _dead_letter_message(letter: DeadLetter) -> tuple[bytes, bytes]:
    reason = metrics.dead_letter_reason(letter.error)
    metrics.DEAD_LETTERS_WRITTEN.labels(letter.source_topic, reason).inc()
    return letter.source_topic.encode(), encode_dead_letter(letter)


class DeadLetterSink(FlushingTopicSink[DeadLetter]):
    """Dead letters to the `dead_letters` topic, keyed by source topic."""

    def __init__(self, config: KafkaConfig, topic: str = "dead_letters") -> None:
        super().__init__(config, topic, _dead_letter_message)
