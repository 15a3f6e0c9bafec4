"""The notification API's ports: what the service and the campaign scheduler need.

Adapters implement them: Redis for keys, idempotency, request rate limits, accepted
notifications, campaigns and audiences (`operators/adapters/redis/`); Kafka for publishing
and reading back (`operators/adapters/kafka/publisher.py`); the follower store for a
campaign's followers (`operators/adapters/stores/campaign_sources.py`). `fanfare api` wires
the real ones; the unit tests pass fakes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from operators.notify.campaigns import CampaignProgress, CampaignSpec, PendingChunk
from operators.notify.keys import ApiKey
from operators.notify.segments import IndexUpdate, Segment


class KeyStore(ABC):
    """Port: API key records by key id (only hashes of secrets)."""

    @abstractmethod
    def add(self, key: ApiKey) -> None:
        """Store a new key."""

    @abstractmethod
    def get(self, key_id: str) -> ApiKey | None:
        """A key's record, or None."""

    @abstractmethod
    def all(self) -> list[ApiKey]:
        """Every key, oldest first."""

    @abstractmethod
    def revoke(self, key_id: str, at: float) -> ApiKey | None:
        """Mark revoked (kept for the record); None when there is no such key."""


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """What an idempotency key holds: the request's fingerprint and the first answer."""

    fingerprint: str
    status: int | None  # None while the first request is still being handled
    body: Mapping[str, Any] | None


class IdempotencyStore(ABC):
    """Port: first answers by (key id, scope, idempotency key), kept for a while."""

    @abstractmethod
    def reserve(
        self, key_id: str, scope: str, idempotency_key: str, fingerprint: str
    ) -> StoredAnswer | None:
        """Claim the key for this request (None), or answer what it already holds."""

    @abstractmethod
    def complete(self, key_id: str, scope: str, idempotency_key: str, answer: StoredAnswer) -> None:
        """Store the first answer."""

    @abstractmethod
    def release(self, key_id: str, scope: str, idempotency_key: str) -> None:
        """Forget a claim whose request failed before doing anything (so a retry can run)."""


@dataclass(frozen=True, slots=True)
class Allowance:
    """A rate-limit decision: allowed, or how long until a request would be."""

    allowed: bool
    retry_after_s: float = 0.0


class RequestLimiter(ABC):
    """Port: a token bucket per API key."""

    @abstractmethod
    def take(self, key: ApiKey) -> Allowance:
        """Take one request's token."""


class PublishFailed(RuntimeError):
    """The broker did not acknowledge every message."""


class Publisher(ABC):
    """Port: publish to a topic and wait for the broker's acknowledgement; read back."""

    @abstractmethod
    def publish(self, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> list[tuple[int, int]]:
        """(key, value) messages, acknowledged; (partition, offset) of each. PublishFailed."""

    @abstractmethod
    def marks(self, topic: str) -> dict[int, int]:
        """Per partition, an offset at or before its true end (what is written next is after)."""

    @abstractmethod
    def read_since(self, topic: str, marks: Mapping[int, int]) -> Iterator[bytes | None]:
        """Every value written at or after the marks, to the true ends."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """A notification the API accepted, for `GET /v1/notifications/{id}/status`."""

    notification_id: str
    category: str
    tier: str
    template_id: str
    topic: str
    partition: int
    offset: int
    recipients: tuple[str, ...]
    accepted_at: float
    send_at: str | None
    api_key_id: str
    channels: tuple[str, ...] = ()
    """The request's channels (a record from before they were kept has none)."""


class AcceptedLog(ABC):
    """Port: accepted notifications by id (kept as long as the notification store keeps rows)."""

    @abstractmethod
    def add(self, accepted: Accepted) -> None:
        """Record one."""

    @abstractmethod
    def get(self, notification_id: str) -> Accepted | None:
        """One, or None."""


class AudienceStore(ABC):
    """Port: uploaded lists of user ids."""

    @abstractmethod
    def create(self, audience_id: str, users: Iterable[str]) -> int:
        """Store the list; how many users it holds."""

    @abstractmethod
    def size(self, audience_id: str) -> int | None:
        """How many users, or None when there is no such audience."""

    @abstractmethod
    def keep_until_used(self, audience_id: str) -> None:
        """A campaign refers to it: keep it at least as long as the campaign's record."""


class SegmentIndex(ABC):
    """Port: users by locale and platform, kept from the changelogs (see segments.py)."""

    @abstractmethod
    def apply(self, updates: Iterable[IndexUpdate]) -> int:
        """Apply updates in order (an older one than the index holds changes nothing)."""

    @abstractmethod
    def members(self, segment: Segment) -> list[str]:
        """The segment's users now, sorted."""

    @abstractmethod
    def positions(self) -> dict[tuple[str, int], int]:
        """Where the changelogs were read to, per (topic, partition): the next offset."""

    @abstractmethod
    def save_positions(self, positions: Mapping[tuple[str, int], int]) -> None:
        """Record positions (after the updates before them were applied)."""


class ChangelogFeed(Protocol):
    """Port: the changelogs' records from the index's positions."""

    def poll(self, max_messages: int, timeout_s: float) -> list[tuple[str, int, int, bytes | None]]:
        """Up to `max_messages` records: (topic, partition, offset, value)."""
        ...


class CampaignStore(ABC):
    """Port: campaigns, their progress, and the lease that lets one scheduler emit each."""

    @abstractmethod
    def create(self, spec: CampaignSpec) -> bool:
        """A new campaign, `scheduled`, on the active list; False when the id exists."""

    @abstractmethod
    def get(self, campaign_id: str) -> tuple[CampaignSpec, CampaignProgress] | None:
        """A campaign and where it stands."""

    @abstractmethod
    def active(self) -> list[str]:
        """Campaigns a scheduler still has work on."""

    @abstractmethod
    def cancel(self, campaign_id: str, at: float) -> CampaignProgress | None:
        """Stop what has not been sent (a final campaign stays as it is); None if unknown."""

    @abstractmethod
    def acquire(self, campaign_id: str, owner: str, lease_s: float) -> bool:
        """Take or renew the campaign's lease; False when another owner holds it."""

    @abstractmethod
    def renew(self, campaign_id: str, owner: str, lease_s: float) -> bool:
        """Extend the lease only if this owner still holds it; False if it lapsed meanwhile."""

    @abstractmethod
    def release(self, campaign_id: str, owner: str) -> None:
        """Give the lease up (a clean stop: another scheduler may take over at once)."""

    @abstractmethod
    def begin_chunk(self, campaign_id: str, owner: str, pending: PendingChunk) -> bool:
        """Record the chunk about to be produced; False when the lease is not ours."""

    @abstractmethod
    def commit_chunk(
        self,
        campaign_id: str,
        owner: str,
        *,
        emitted: int,
        cursor: str | None,
        credit: float,
        credit_at: float,
        started_at: float,
    ) -> bool:
        """Add `emitted`, move the cursor, clear the pending chunk; False if the lease is lost."""

    @abstractmethod
    def finish(self, campaign_id: str, owner: str, state: str, at: float) -> bool:
        """A final state (`completed`, `window_closed`); off the active list, kept a while."""

    @abstractmethod
    def settle(self, campaign_id: str, owner: str, emitted: int) -> bool:
        """A cancelled campaign's pending chunk is counted: add `emitted`, take it off the list."""


class RecipientSource(ABC):
    """Port: a campaign's recipients, read a page at a time from an opaque cursor."""

    @abstractmethod
    def page(self, cursor: str | None, limit: int) -> tuple[list[str], str | None]:
        """Up to `limit` users after `cursor`, and the cursor after them (None: no more)."""


class FollowerCounts(Protocol):
    """Port: the follower store's count, for a campaign's total at creation.

    Every `operators.fanout.ports.FollowerStore` has it.
    """

    def follower_count(self, author_id: str) -> int:
        """How many followers the author has."""
        ...
