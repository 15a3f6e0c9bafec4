"""What the flows' steps receive from their inputs, and the dead letter made of a bad one.

Plain data, shared by every flow's domain steps: a message as read from a topic (`RawEvent`), the
marker that a changelog partition was read to its end (`CaughtUp`), and `dead_letter`, which
turns a message that cannot be processed into its dead letter, counted by reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from operators import metrics
from schemas.codecs import RAW_TEXT_LIMIT, InvalidEvent, raw_text
from schemas.records import DeadLetter

ERROR_TEXT_LIMIT = 2_000
"""Characters of a dead letter's error text (the schema messages are short; this is a bound)."""


@dataclass(frozen=True, slots=True)
class MessageOrigin:
    """Where a message was read: topic, partition, offset, and which item of a batch.

    `key` is the message's identity as claims and the ledger store it: compared, never parsed.
    """

    topic: str
    partition: int
    offset: int
    item: int | None = None

    @property
    def key(self) -> str:
        """`topic/partition@offset`: the message, whichever of its items (stored by claims)."""
        return f"{self.topic}/{self.partition}@{self.offset}"

    def of_item(self, index: int) -> MessageOrigin:
        """The origin of one item of this message."""
        return MessageOrigin(self.topic, self.partition, self.offset, index)


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
    replayed: bool = False
    """Read again from a changelog that is replayed from its beginning on every start, below
    the position its last snapshot recorded: an earlier execution processed it, so a dead
    letter of it was written then (see `ReplayHorizon` in the Kafka reader)."""
    log: str | None = None
    """The id of the topic's log it was read from (None when the reader does not know it)."""

    @property
    def origin(self) -> MessageOrigin:
        """Where this message was read."""
        return MessageOrigin(self.topic, self.partition, self.offset)


@dataclass(frozen=True, slots=True)
class CaughtUp:
    """A changelog partition was read to its end at `as_of` (epoch seconds).

    `offset` is that end (the next offset to read) and `log` the id of the partition's log,
    when the reader knows them: every event before `offset` was emitted before this marker.
    """

    source: str
    as_of: float
    offset: int | None = None
    log: str | None = None


def dead_letter(event: RawEvent, error: InvalidEvent | str) -> DeadLetter:
    """A dead letter for an event, counted by reason."""
    reason = error.kind if isinstance(error, InvalidEvent) else "unprocessable"
    metrics.DEAD_LETTERS.labels(event.topic, reason).inc()
    # Both bounded, so a dead letter fits the broker's message size whatever the input.
    return DeadLetter(
        event.topic,
        event.partition,
        event.offset,
        str(error)[:ERROR_TEXT_LIMIT],
        raw_text(event.value, RAW_TEXT_LIMIT),
    )
