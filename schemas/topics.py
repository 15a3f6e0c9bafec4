"""The topics of the contract, the channel topic rule and the dispatch batch limit."""

from __future__ import annotations

from schemas.addresses import CHANNEL_PROVIDERS, PUSH_PROVIDERS

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
# marketing backlog never sits in front of a login code. The fan-out reads each on its own input
# (transactional first: see README.md, "Tiers").
TIERS = ("transactional", "social", "marketing")


def tier_topic(tier: str) -> str:
    """The topic of a priority tier: ``notify.transactional``, ``notify.social``, ..."""
    return f"notify.{tier}"


TIER_TOPICS = tuple(tier_topic(t) for t in TIERS)
PROVIDERS = ("apns", "fcm")
LANES = ("normal", "bulk")
DELIVERY_LANES = ("transactional", "normal", "bulk")
"""The delivery engine's lanes, in the order it serves them: a login code before a post's
push, a post's push before a campaign's."""
CHANGELOG_TOPICS = (FOLLOW_CHANGES, PREFERENCE_CHANGES, DEVICE_CHANGES)


def channel_topic(provider: str, lane: str) -> str:
    """The topic of a provider's delivery lane.

    Push: ``push.apns`` (normal), ``push.fcm.bulk``, ``push.apns.transactional``; the other
    channels name the lane's tier: ``email.transactional``, ``sms.social``, ``chat.marketing``.
    """
    if provider not in PUSH_PROVIDERS:
        return channel_tier_topic(provider, LANE_TIERS[lane])
    return f"push.{provider}" if lane == "normal" else f"push.{provider}.{lane}"


CHANNEL_TOPICS = tuple(channel_topic(p, lane) for lane in LANES for p in PROVIDERS)
CHANNEL_TOPICS_BULK = tuple(channel_topic(p, "bulk") for p in PROVIDERS)
"""Celebrity posts' push topics (`push.apns.bulk`, `push.fcm.bulk`)."""
# Transactional API pushes (a login code) have push topics of their own, read before the
# others, so neither a celebrity's post nor a campaign sits in front of them.
PUSH_TRANSACTIONAL_TOPICS = tuple(channel_topic(p, "transactional") for p in PROVIDERS)
TIER_PUSH_LANES = {"transactional": "transactional", "social": "normal", "marketing": "bulk"}
"""The push lane of an API notification's tier: transactional on its own topics, social with
posts (`push.apns`), marketing on the bulk lane (`push.apns.bulk`); the same as `TIER_LANES`,
the delivery lane of every channel's tier."""

# The channels beyond mobile push: one topic per channel provider and tier,
# `email.transactional`, `sms.social`, `webpush.marketing`, ... The tier is the lane: a
# marketing email backlog never sits in front of a receipt, and a slow SMTP relay never holds
# up web push, since each (provider, tier) is read on its own and paced by its own bucket. Push
# names its lanes instead (posts are all social, with celebrity posts on the bulk lane).


def channel_tier_topic(provider: str, tier: str) -> str:
    """The topic of a channel provider and tier: ``email.transactional``, ``inapp.social``."""
    return f"{provider}.{tier}"


TIER_LANES = {"transactional": "transactional", "social": "normal", "marketing": "bulk"}
"""The delivery engine's lane for a tier: transactional first, social (posts among them) as the
normal lane, marketing as the bulk lane."""
LANE_TIERS = {lane: tier for tier, lane in TIER_LANES.items()}


def lane_of_topic(topic: str) -> str:
    """The delivery lane of a channel topic (`push.fcm.bulk` -> bulk, `sms.social` -> normal)."""
    last = topic.rpartition(".")[2]
    if topic.startswith("push."):
        return last if last in ("transactional", "bulk") else "normal"
    return TIER_LANES.get(last, "normal")


CHANNEL_TIER_TOPICS = tuple(channel_tier_topic(p, t) for t in TIERS for p in CHANNEL_PROVIDERS)
ALL_TOPICS = (
    POST_CREATED,
    POST_CREATED_BACKFILL,
    *CHANGELOG_TOPICS,
    *CHANNEL_TOPICS,
    *PUSH_TRANSACTIONAL_TOPICS,
    PUSH_RETRY,
    DELIVERY_EVENTS,
    NOTIFICATION_ACKS,
    DEAD_LETTERS,
    *TIER_TOPICS,
    *CHANNEL_TIER_TOPICS,
)

MAX_DISPATCH_BATCH = 500
"""Items in one dispatch batch at most (the schema's maxItems)."""
