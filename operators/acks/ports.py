"""The acks flow's port: the one thing it needs from the notification store.

Every notification store adapter (`operators/adapters/stores/`) has this method; the flow is
wired to one in `flows/acks.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from schemas.records import AckOutcome, NotificationAck


class AckStore(Protocol):
    """Port: apply acks to the ledger of sends (delivered, then opened; never backwards)."""

    def apply_acks(self, acks: Sequence[NotificationAck]) -> list[AckOutcome]:
        """One outcome per ack, in order: applied, or what the store did not know."""
        ...
