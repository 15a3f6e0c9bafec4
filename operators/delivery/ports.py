"""The delivery engine's ports: what it needs from the world, as small abstract classes.

Adapters implement them (`operators/adapters/`: Redis for edge claims and the rate limiter,
SQLite or Cassandra for the notification store, aioapns and firebase-admin for the senders);
`flows/delivery.py` wires the real ones, the tests pass fakes (`tests/fakes.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from operators.delivery.ledger import (
    AttemptRecord,
    DeviceDelivery,
    InboxPage,
    LedgerUpdate,
    Notification,
    NotificationStatus,
)
from operators.delivery.model import LedgerRow, ProviderAnswer, SendRequest
from operators.delivery.token_bucket import BucketSpec, Grant
from schemas.records import AckOutcome, NotificationAck, Provider

T = TypeVar("T")


class NotificationStore(ABC):
    """Port: the ledger of sends, the follower-level notifications, their acks and the inbox.

    Every row lives `ttl_s` (FANFARE_STORE_TTL_S) after it was written, then disappears.
    """

    @abstractmethod
    def claim(self, requests: Sequence[SendRequest]) -> list[LedgerRow | None]:
        """Atomically, per request: create the row if absent (answer None), else answer it.

        A created row is owned by the request's source, in state `sending`; the first claim
        of a notification also records the notification (for the inbox).
        """

    @abstractmethod
    def rows(self, keys: Sequence[tuple[str, str]]) -> list[LedgerRow | None]:
        """The rows of (notification_id, device_id) keys, None where absent."""

    @abstractmethod
    def take_over(self, requests: Sequence[SendRequest]) -> list[bool]:
        """For retry requests: take ownership (state `sending`) where the row awaits this retry.

        That is: state `retry_scheduled` with `schedules == seq`; anything else is stale.
        """

    @abstractmethod
    def record(self, updates: Sequence[LedgerUpdate], at: float) -> None:
        """Apply updates to existing rows, logging attempts that were made."""

    @abstractmethod
    def apply_acks(self, acks: Sequence[NotificationAck]) -> list[AckOutcome]:
        """Mark devices delivered/opened (never backwards); say which acks matched nothing."""

    @abstractmethod
    def notification(self, notification_id: str) -> Notification | None:
        """A notification with its aggregated status, or None."""

    @abstractmethod
    def devices(self, notification_id: str) -> list[DeviceDelivery]:
        """Every device row of a notification, by device_id."""

    @abstractmethod
    def attempts(self, notification_id: str) -> list[AttemptRecord]:
        """Every attempt of every device of a notification, oldest first."""

    @abstractmethod
    def inbox(self, user_id: str, cursor: str | None, limit: int) -> InboxPage:
        """The user's notifications, newest first, `limit` per page, from a cursor."""

    def notification_status(self, notification_id: str) -> NotificationStatus:
        """The aggregated status of a notification."""
        found = self.notification(notification_id)
        return "unknown" if found is None else found.status

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""


class EdgeClaims(ABC):
    """Port: claim (notification_id, device_id) sends for a message identity."""

    @abstractmethod
    def claim(self, claims: Sequence[tuple[str, str, str]]) -> list[str | None]:
        """Per (notification_id, device_id, identity): None if claimed now, else the holder.

        The holder is our own identity when the same message is replayed.
        """


class RateLimiter(ABC):
    """Port: take tokens for sends."""

    @abstractmethod
    def take(self, spec: BucketSpec, wanted: int, lane: str) -> Grant:
        """Up to `wanted` tokens now, and the wait before the rest could be had."""


class PushSender(ABC):
    """Port: one provider's client, living on the worker's event loop."""

    provider: Provider
    bucket: BucketSpec
    max_per_send: int | None = None
    """The most requests one `send` call should carry (None: any number)."""
    concurrency: int | None = None
    """The most sends it has under way at once (its connections or sessions), when it has such a
    bound; the engine then lets it hold only a few times that in flight: requests queued behind
    its sessions would only fill the worker's in-flight limit that other providers could use."""
    one_send_at_a_time: bool = False
    """True when `send` sends its requests over time (chunks one after another): the engine then
    takes tokens for one `send` and calls the next only once it is answered, so no request
    waits inside `send` after its token was taken."""

    @abstractmethod
    def render(self, request: SendRequest) -> object:
        """The provider payload for a request; raises PayloadTooLarge."""

    @abstractmethod
    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        """Send all concurrently; one answer each (timeouts and lost connections included)."""

    async def warm_up(self) -> None:  # noqa: B027 (optional hook)
        """Connect and authenticate before the first send; raises if that fails.

        A send's connection or credentials made after its rate-limit token was taken make it
        reach the provider late, together with sends taken after it.
        """

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""


class LoopRunner(ABC):
    """Port: the worker's event loop, where the senders live."""

    @abstractmethod
    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run to completion and return its result (the caller waits)."""

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run `callback` on the loop soon, from any thread, without waiting for it.

        The pipelined engine (`DeliveryEngine.submit`) needs it; `run` alone serves `deliver`.
        """
        raise NotImplementedError(f"{type(self).__name__} runs coroutines only to completion")
