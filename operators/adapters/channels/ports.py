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


class SmsNumberIndex(ABC):
    """Port: which users' SMS addresses are a phone number (for inbound STOP and START).

    Kept by `fanfare api` as it publishes registrations and removals on `device_changes`: an
    address re-registered with another number leaves the old one's entry, a removed address
    leaves its number's, so a number that moved to another user answers for that user only.
    Deactivations (STOP, a dead number) keep the entry: START must find the address again.
    """

    @abstractmethod
    def register(self, user_id: str, device_id: str, number: str, at: float) -> None:
        """The user's SMS address `device_id` is `number` (from now on)."""

    @abstractmethod
    def remove(self, user_id: str, device_id: str) -> None:
        """The user removed the address `device_id` (nothing happens if it was not indexed)."""

    @abstractmethod
    def holders(self, number: str) -> list[tuple[str, str]]:
        """(user_id, device_id) of every registered SMS address with this number."""
