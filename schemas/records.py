"""Typed, frozen records of the events on fanfare's topics (docs/design.md, "Contracts")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Final, Literal, NotRequired, TypedDict

import orjson

Visibility = Literal["public", "followers", "private"]
PushProvider = Literal["apns", "fcm"]
ChannelProvider = Literal["webpush", "email", "sms", "chat", "inapp"]
Provider = Literal["apns", "fcm", "webpush", "email", "sms", "chat", "inapp"]
"""Who delivers a dispatch item: a mobile push service, or a channel sender (schemas/addresses.py
says what each one's address looks like)."""
FollowOp = Literal["follow", "unfollow"]
AckEvent = Literal["delivered", "opened"]
Tier = Literal["transactional", "social", "marketing"]
Channel = Literal["push", "inbox", "email", "sms", "chat"]
"""What a category and a user's preferences switch: push (mobile and web push), inbox (the
in-app list, live through the `inapp` provider), email, sms, chat (webhooks)."""
CHANNEL_OF_PROVIDER: Final[Mapping[str, Channel]] = MappingProxyType(
    {
        "apns": "push",
        "fcm": "push",
        "webpush": "push",
        "email": "email",
        "sms": "sms",
        "chat": "chat",
        "inapp": "inbox",
    }
)
"""The channel a provider's sends are on (web push subscriptions are the push channel)."""


@dataclass(frozen=True, slots=True)
class PostCreated:
    """An author published a post."""

    post_id: str
    author_id: str
    visibility: Visibility
    created_at: datetime
    notify_followers: bool = True
    text: str | None = None


@dataclass(frozen=True, slots=True)
class FollowChange:
    """A follow edge was created, updated (new flags) or removed."""

    author_id: str
    follower_id: str
    op: FollowOp
    notify_on_post: bool
    muted: bool
    ts: datetime


@dataclass(frozen=True, slots=True)
class PreferenceChange:
    """A user's complete push preferences."""

    user_id: str
    push_enabled: bool
    quiet_hours_start: int | None
    quiet_hours_end: int | None
    timezone: str
    ts: datetime
    locale: str | None = None
    """The user's locale (`fr-CA`): what API notifications are rendered in (None: the
    template's default locale)."""


@dataclass(frozen=True, slots=True)
class CategorySwitch:
    """A user turned a category on or off, on one channel or (`channel` None) on all of them.

    A patch on `preference_changes` beside the complete preference records: an unsubscribe link
    knows only the user and the category. Switches are kept per (category, channel) apart from
    the complete record, which does not reset them.
    """

    user_id: str
    category: str
    channel: Channel | None
    enabled: bool
    ts: datetime
    source: str = "api"


@dataclass(frozen=True, slots=True)
class DeviceChange:
    """A device or channel address was registered or refreshed (active) or deactivated.

    `token` is the provider's token or the channel address (schemas/addresses.py).
    """

    user_id: str
    device_id: str
    provider: Provider
    token: str | None
    active: bool
    ts: datetime


class DispatchItem(TypedDict):
    """One push to one device; `notification_id` names the follower-level notification.

    A plain dict (not a dataclass): the fan-out builds one per device on its hottest path.
    `token` is the device token or the channel address; `locale` the user's, for a notification
    rendered from a template.
    """

    notification_id: str
    user_id: str
    device_id: str
    token: str
    locale: NotRequired[str]


class ChannelMessage(TypedDict):
    """What an API notification says, for senders that render it from its template.

    A dispatch batch of a `notify.<tier>` notification carries it (a post's carries none: its
    text comes from FANFARE_PUSH_TITLE/BODY/LINK); a retry carries it on.
    """

    category: str
    template_id: str
    tier: Tier
    data: dict[str, str | int | float | bool | None]
    collapse_key: NotRequired[str | None]


@dataclass(frozen=True, slots=True)
class DispatchBatch:
    """Up to 500 dispatch items of one post for one provider, bound for one channel topic."""

    post_id: str
    author_id: str
    provider: Provider
    created_at: str
    lane: str
    items: tuple[DispatchItem, ...]
    message: ChannelMessage | None = None

    @property
    def topic(self) -> str:
        """The channel topic this batch goes to (schemas/topics.py says the rule)."""
        if self.provider in ("apns", "fcm"):
            return (
                f"push.{self.provider}"
                if self.lane == "normal"
                else f"push.{self.provider}.{self.lane}"
            )
        tier = self.message["tier"] if self.message is not None else "social"
        return f"{self.provider}.{tier}"


@dataclass(frozen=True, slots=True)
class EncodedDispatchBatch:
    """A dispatch batch as the fan-out makes it: its `dispatch_batch/v1` JSON already built.

    `payload` is what goes on the channel topic, byte for byte what `encode_dispatch_batch`
    writes for the same batch; `items` decodes it again (replay dedupe, tests).
    """

    post_id: str
    author_id: str
    provider: Provider
    created_at: str
    lane: str
    payload: bytes
    count: int

    @property
    def topic(self) -> str:
        """The channel topic this batch goes to."""
        return f"push.{self.provider}" if self.lane == "normal" else f"push.{self.provider}.bulk"

    @property
    def items(self) -> tuple[DispatchItem, ...]:
        """The items, decoded from the payload."""
        return tuple(orjson.loads(self.payload)["items"])


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Something that could not be processed, with why, and the original bytes."""

    source_topic: str
    partition: int | None
    offset: int | None
    error: str
    raw: str
    item: int | None = None
    """For a dead letter about one item of a message (a send of a dispatch batch): its index."""

    @property
    def identity(self) -> tuple[str, int | None, int | None, int | None]:
        """What it is about: the source position (and item); written once per identity."""
        return (self.source_topic, self.partition, self.offset, self.item)


Outcome = Literal[
    "accepted", "invalid_token", "expired", "failed", "dead_lettered", "retry_scheduled"
]


@dataclass(frozen=True, slots=True)
class DeliveryEvent:
    """An outcome of one dispatch item (terminal, or `retry_scheduled` on the way)."""

    notification_id: str
    post_id: str
    user_id: str
    device_id: str
    provider: Provider
    outcome: Outcome
    status: int | None
    reason: str | None
    attempt: int
    ts: str
    retry_at: str | None = None

    @property
    def identity(self) -> tuple[str, str, str, int, str | None]:
        """What makes two events the same event (a replay re-emits it with a new ts)."""
        return (self.notification_id, self.device_id, self.outcome, self.attempt, self.retry_at)


@dataclass(frozen=True, slots=True)
class RetryRecord:
    """A send scheduled for later on `push.retry`: the item, its post, and when it is due."""

    provider: Provider
    lane: str
    post_id: str
    author_id: str
    created_at: str
    item: DispatchItem
    attempt: int
    seq: int
    due_at: float
    reason: str
    message: ChannelMessage | None = None


@dataclass(frozen=True, slots=True)
class NotificationAck:
    """A device reported a notification delivered to it or opened on it."""

    notification_id: str
    device_id: str
    event: AckEvent
    ts: datetime


AckOutcome = Literal["applied", "unknown_notification", "unknown_device"]
"""What applying an ack did: applied, or which part of it the notification store did not know."""


@dataclass(frozen=True, slots=True)
class NotificationRequest:
    """A notification the API accepted, on its tier's topic (`notify.<tier>`).

    The category's policy is resolved at ingress (tier, channels, quiet hours, caps), so a
    consumer needs no copy of the categories file to route it. A campaign message has one
    recipient and its `campaign_id`; per-user notification ids are `notification_id:user_id`.
    """

    notification_id: str
    tier: Tier
    category: str
    template_id: str
    recipients: tuple[str, ...]
    data: dict[str, str | int | float | bool | None]
    channels: tuple[Channel, ...]
    quiet_hours: bool
    caps: bool
    api_key_id: str
    created_at: datetime
    send_at: datetime | None = None
    collapse_key: str | None = None
    campaign_id: str | None = None
    fallback: tuple[Channel, ...] = ()
    """Channels of `channels` tried in this order: a recipient gets the first that reaches them,
    and only that one (empty: every channel that is on)."""
    cap_limit: int | None = None
    """The category's own frequency cap per user and window (None: the fan-out's default)."""
    cap_window_s: int | None = None
    """The category's own cap window in seconds (None: the fan-out's default)."""

    @property
    def key(self) -> str:
        """The message key: the notification id, or a campaign message's per-user id.

        A campaign's messages share a notification id; keying them by user spreads a campaign
        over every partition of the marketing topic.
        """
        if self.campaign_id is not None and len(self.recipients) == 1:
            return f"{self.notification_id}:{self.recipients[0]}"
        return self.notification_id


@dataclass(frozen=True, slots=True)
class NotificationCancel:
    """Cancel a scheduled notification (`DELETE /v1/notifications/{id}`), on its tier's topic.

    Keyed by the notification id, so it follows the request on the same partition. What was
    sent already is not recalled; what is held until `send_at` is dropped, and a request of this
    id read later is dropped too.
    """

    notification_id: str
    tier: Tier
    api_key_id: str
    created_at: datetime
