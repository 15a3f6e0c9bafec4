"""The channel senders' own ports (beside the engine's, in operators/delivery/ports.py)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from operators.delivery.token_bucket import BucketSpec, Grant


class SmsBudget(ABC):
    """Port: the daily SMS budgets (per user and global), shared by every worker."""

    @abstractmethod
    async def take(self, user_id: str) -> str | None:
        """Count one message; None when both budgets had room, else which one ran out."""

    @abstractmethod
    async def give_back(self, user_id: str) -> None:
        """A counted message was not accepted: take it off both budgets."""


class DestinationLimiter(ABC):
    """Port: the per-destination buckets (an email domain, a chat webhook).

    Shared by every worker and taken on the worker's event loop: an implementation must not
    block it.
    """

    @abstractmethod
    async def take(self, spec: BucketSpec, wanted: int, lane: str) -> Grant:
        """Up to `wanted` tokens now, and the wait before the rest could be had."""
