"""The fan-out flow's steps before the shard: decode, claim, plan (pure but for the ports)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from operators import metrics
from operators.events import CaughtUp, MessageOrigin, RawEvent, dead_letter
from operators.fanout.eligibility import post_suppression
from operators.fanout.notify import CancelNotice, RecipientJob
from operators.fanout.ports import FollowerStore, PostClaims
from operators.fanout.shard import ChangelogEvent, ShardJob, ShardMarker, lane_for
from operators.fanout.sharding import shard_key, shard_of
from schemas.addresses import DEVICE_PROVIDERS
from schemas.codecs import (
    InvalidEvent,
    decode_device_change,
    decode_follow_change,
    decode_post_created,
    decode_preference_event,
    decode_tier_event,
    format_timestamp,
)
from schemas.records import DeadLetter, NotificationCancel, NotificationRequest, PostCreated
from schemas.topics import DEVICE_CHANGES, FOLLOW_CHANGES, PREFERENCE_CHANGES


@dataclass(frozen=True, slots=True)
class ReadPost:
    """A valid post with the identity of the message that carried it."""

    post: PostCreated
    created_at_raw: str
    origin: MessageOrigin
    read_at: float


def decode_post(event: RawEvent) -> ReadPost | DeadLetter:
    """Decode and validate a post_created message."""
    try:
        post = decode_post_created(event.value)
    except InvalidEvent as exc:
        return dead_letter(event, exc)
    metrics.POSTS_READ.inc()
    created_raw = format_timestamp(post.created_at)
    return ReadPost(post, created_raw, event.origin, event.read_at)


class ChangelogRouter:
    """Decode changelog events and route each to its user's shard; fan markers to all shards.

    Preference events include category switches, and device events channel addresses
    (`allow_dev_addresses`: FANFARE_DEV_MODE's local hosts), for API notifications.
    """

    def __init__(self, shard_count: int, *, allow_dev_addresses: bool = False) -> None:
        self._shard_count = shard_count
        self._all_keys = [shard_key(s) for s in range(shard_count)]
        self._decoders: dict[str, Callable[[bytes | str | None], Any]] = {
            FOLLOW_CHANGES: decode_follow_change,
            PREFERENCE_CHANGES: decode_preference_event,
            DEVICE_CHANGES: functools.partial(
                decode_device_change,
                providers=DEVICE_PROVIDERS,
                allow_dev_addresses=allow_dev_addresses,
            ),
        }

    def route(self, event: object) -> Iterable[tuple[str, Any] | DeadLetter]:
        """(shard_key, ChangelogEvent or ShardMarker) items, or one dead letter."""
        if isinstance(event, CaughtUp):
            return [(k, ShardMarker(s, event)) for s, k in enumerate(self._all_keys)]
        assert isinstance(event, RawEvent)
        decoder = self._decoders.get(event.topic)
        if decoder is None:
            return self._dead(event, f"unexpected topic {event.topic!r} for the changelog input")
        try:
            change = decoder(event.value)
        except InvalidEvent as exc:
            return self._dead(event, exc)
        user = change.follower_id if event.topic == FOLLOW_CHANGES else change.user_id
        shard = shard_of(user, self._shard_count)
        source = f"{event.topic}/{event.partition}"
        return [
            (self._all_keys[shard], ChangelogEvent(change, shard, source, event.offset, event.log))
        ]

    @staticmethod
    def _dead(event: RawEvent, error: InvalidEvent | str) -> list[tuple[str, Any] | DeadLetter]:
        # A changelog replayed from its beginning meets its bad messages again on every start:
        # each was dead-lettered when an earlier execution first read it.
        return [] if event.replayed else [dead_letter(event, error)]


class PostClaimer:
    """Drop duplicate posts: the first message carrying a post_id owns it (see post_claims)."""

    def __init__(self, claims: Callable[[], PostClaims]) -> None:
        self._claims = claims

    def claim_batch(self, posts: list[ReadPost]) -> list[ReadPost]:
        """The posts this batch owns."""
        owned = self._claims().claim([(p.post.post_id, p.origin.key) for p in posts])
        kept = [p for p, ok in zip(posts, owned, strict=True) if ok]
        if len(kept) != len(posts):
            metrics.DEDUPED.labels("post_claim").inc(len(posts) - len(kept))
        return kept


class ShardJobPlanner:
    """Decide lane (normal or bulk) and create one job per follower shard."""

    def __init__(
        self,
        store: Callable[[], FollowerStore],
        shard_count: int,
        celebrity_threshold: int,
        on_bulk: Callable[[], object] | None = None,
    ) -> None:
        self._store = store
        self._shard_count = shard_count
        self._threshold = celebrity_threshold
        # Told of every bulk-lane post as it is planned: the sink prepares the bulk lanes'
        # writers while the post's jobs wait at the gate.
        self._on_bulk = on_bulk

    def lane_for(self, author_id: str) -> str:
        """The lane by the author's follower count now (a shard job confirms it when it starts)."""
        return lane_for(self._store().follower_count(author_id), self._threshold)

    def plan(self, read: ReadPost) -> list[tuple[str, ShardJob]]:
        """Jobs for every shard (a shard with no followers of the author finishes at once)."""
        reason = post_suppression(read.post)
        if reason is not None:
            metrics.POSTS_SUPPRESSED.labels(reason.value).inc()
            return []
        lane = self.lane_for(read.post.author_id)
        if lane == "bulk" and self._on_bulk is not None:
            self._on_bulk()
        metrics.POSTS_FANNED_OUT.labels(lane).inc()
        metrics.SHARD_JOBS_CREATED.inc(self._shard_count)
        p = read.post
        return [
            (
                shard_key(s),
                ShardJob(p.post_id, p.author_id, read.created_at_raw, lane, read.read_at, s),
            )
            for s in range(self._shard_count)
        ]


@dataclass(frozen=True, slots=True)
class ReadNotification:
    """A valid tier-topic message (a request or a cancel) and where it was read."""

    event: NotificationRequest | NotificationCancel
    origin: MessageOrigin
    read_at: float


def decode_notification(event: RawEvent) -> ReadNotification | DeadLetter:
    """Decode and validate a message of a tier topic (`notify.<tier>`)."""
    try:
        decoded = decode_tier_event(event.value)
    except InvalidEvent as exc:
        return dead_letter(event, exc)
    expected = event.topic.rpartition(".")[2]
    if decoded.tier != expected:
        return dead_letter(
            event, InvalidEvent("wrong_tier", f"a {decoded.tier} event on {event.topic}")
        )
    kind = "cancel" if isinstance(decoded, NotificationCancel) else "request"
    metrics.NOTIFICATIONS_READ.labels(decoded.tier, kind).inc()
    return ReadNotification(decoded, event.origin, event.read_at)


class NotificationClaimer:
    """Drop re-published requests: the first message carrying a request's key owns it.

    The post claim port in a key space of its own (`RedisPostClaims(kind="notification")`);
    a campaign's messages share a notification id, so the key is `NotificationRequest.key`.
    Cancels are not claimed: applying one twice changes nothing.
    """

    def __init__(self, claims: Callable[[], PostClaims]) -> None:
        self._claims = claims

    def claim_batch(self, reads: list[ReadNotification]) -> list[ReadNotification]:
        """The requests this batch owns, and every cancel."""
        requests = [(r, r.event) for r in reads if isinstance(r.event, NotificationRequest)]
        owned = self._claims().claim([(e.key, r.origin.key) for r, e in requests])
        refused = {id(r) for (r, _), ok in zip(requests, owned, strict=True) if not ok}
        if refused:
            metrics.DEDUPED.labels("notification_claim").inc(len(refused))
        return [r for r in reads if id(r) not in refused]


class NotificationRouter:
    """A request's recipients grouped by shard, one job per shard; a cancel to every shard."""

    def __init__(self, shard_count: int) -> None:
        self._shard_count = shard_count
        self._all_keys = [shard_key(s) for s in range(shard_count)]

    def route(self, read: ReadNotification) -> list[tuple[str, RecipientJob | CancelNotice]]:
        """(shard_key, job or cancel) items."""
        event = read.event
        if isinstance(event, NotificationCancel):
            return [
                (k, CancelNotice(event.notification_id, s)) for s, k in enumerate(self._all_keys)
            ]
        by_shard: dict[int, list[str]] = {}
        for user in event.recipients:
            by_shard.setdefault(shard_of(user, self._shard_count), []).append(user)
        return [
            (self._all_keys[s], RecipientJob(event, tuple(users), s, read.read_at))
            for s, users in sorted(by_shard.items())
        ]
