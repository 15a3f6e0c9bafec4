"""The outbox relay's ports: the outbox table and the broker, as small abstract classes.

`operators/adapters/postgres/outbox.py` implements the table, `operators/adapters/kafka/
outbox_publisher.py` the broker; `scripts/commands/outbox.py` wires them, the tests pass fakes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from operators.outbox.model import OutboxRow
from schemas.records import DeadLetter


class OutboxUnavailable(RuntimeError):
    """The database did not answer or lost the connection; the claimed batch is released."""


class PublishFailed(RuntimeError):
    """Some messages of a batch were not acknowledged by the broker (none may be assumed sent)."""


@dataclass(frozen=True, slots=True)
class Backlog:
    """What waits in the outbox: rows pending and the oldest one's age (0 when empty)."""

    pending: int
    oldest_age_s: float


class Outbox(ABC):
    """Port: the outbox table, one relay's session on it.

    A claim opens a transaction that holds the claimed rows (other relays skip them) until
    `complete` deletes them and commits, or `release` rolls back (they stay pending).
    """

    @abstractmethod
    def claim(self, limit: int) -> list[OutboxRow]:
        """Claim up to `limit` rows by the rule of `operators.outbox.model.claimable`."""

    @abstractmethod
    def complete(self, rows: Sequence[OutboxRow]) -> None:
        """Delete the claimed rows and commit (they were published)."""

    @abstractmethod
    def release(self) -> None:
        """Roll the claim back: its rows stay pending for the next claim."""

    @abstractmethod
    def wait_for_rows(self, timeout_s: float) -> bool:
        """Block until a commit notifies new rows (True) or `timeout_s` passed (False)."""

    @abstractmethod
    def backlog(self) -> Backlog:
        """Rows pending and the oldest one's age."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""


class RowPublisher(ABC):
    """Port: publish rows to their topics and wait until the broker acknowledged all."""

    @abstractmethod
    def publish(self, rows: Sequence[OutboxRow]) -> None:
        """Each row to its topic, with its key and its id in a header, in the order given.

        Returns when every one is acknowledged; raises PublishFailed otherwise.
        """

    @abstractmethod
    def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        """Write dead letters (rows that cannot be published) and wait for their acks."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Flush and release the producer."""
