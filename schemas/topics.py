"""The topics of the contract, the channel topic rule and the dispatch batch limit."""

from __future__ import annotations

# Every topic of the contract (docs/design.md). Channel topics carry dispatch batches per provider,
# with a `.bulk` lane for celebrity posts so they never hold up a normal post.
POST_CREATED = "post_created"
# The backfill lane: `fanfare replay` re-publishes selected posts here; the fan-out reads it
# beside post_created, and the post claim drops a post that was already fanned out.
POST_CREATED_BACKFILL = "post_created.backfill"
FOLLOW_CHANGES = "follow_changes"
PREFERENCE_CHANGES = "preference_changes"
DEVICE_CHANGES = "device_changes"
DELIVERY_EVENTS = "delivery_events"
PUSH_RETRY = "push.retry"
NOTIFICATION_ACKS = "notification_acks"
DEAD_LETTERS = "dead_letters"
# The API's tier topics (`fanfare api`): notification requests of each priority tier, so a
# marketing backlog never sits in front of a login code. Not read by the flows yet.
TIERS = ("transactional", "social", "marketing")


def tier_topic(tier: str) -> str:
    """The topic of a priority tier: ``notify.transactional``, ``notify.social``, ..."""
    return f"notify.{tier}"


TIER_TOPICS = tuple(tier_topic(t) for t in TIERS)
PROVIDERS = ("apns", "fcm")
LANES = ("normal", "bulk")
CHANGELOG_TOPICS = (FOLLOW_CHANGES, PREFERENCE_CHANGES, DEVICE_CHANGES)


def channel_topic(provider: str, lane: str) -> str:
    """The channel topic for a provider and lane: ``push.apns`` or ``push.fcm.bulk``."""
    return f"push.{provider}" if lane == "normal" else f"push.{provider}.bulk"


CHANNEL_TOPICS = tuple(channel_topic(p, lane) for lane in LANES for p in PROVIDERS)
ALL_TOPICS = (
    POST_CREATED,
    POST_CREATED_BACKFILL,
    *CHANGELOG_TOPICS,
    *CHANNEL_TOPICS,
    PUSH_RETRY,
    DELIVERY_EVENTS,
    NOTIFICATION_ACKS,
    DEAD_LETTERS,
    *TIER_TOPICS,
)

MAX_DISPATCH_BATCH = 500
"""Items in one dispatch batch at most (the schema's maxItems)."""
