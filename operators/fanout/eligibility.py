"""Who gets notified of a post (docs/design.md, "The trust contract")."""

from __future__ import annotations

from enum import StrEnum

from schemas.records import PostCreated


class Suppressed(StrEnum):
    """Why a candidate (or a whole post) gets no push; label values of the funnel metrics."""

    PRIVATE = "private"
    NOTIFY_FOLLOWERS_OFF = "notify_followers_off"
    NOTIFY_OFF = "notify_off"
    MUTED = "muted"
    PUSH_DISABLED = "push_disabled"
    SELF = "self"
    UNFOLLOWED = "unfollowed"
    NO_DEVICE = "no_device"
    CAPPED = "capped"  # over the user's frequency cap: joined the user's bundle (caps.py)


# Follow-edge flags as stored: one small int per edge keeps pages compact.
FLAG_NOTIFY_ON_POST = 1
FLAG_MUTED = 2


def edge_flags(notify_on_post: bool, muted: bool) -> int:
    """Pack a follow edge's flags."""
    return (FLAG_NOTIFY_ON_POST if notify_on_post else 0) | (FLAG_MUTED if muted else 0)


def post_suppression(post: PostCreated) -> Suppressed | None:
    """Why a post notifies nobody, or None when its followers are candidates."""
    if post.visibility == "private":
        return Suppressed.PRIVATE
    if not post.notify_followers:
        return Suppressed.NOTIFY_FOLLOWERS_OFF
    return None


def follower_suppression(author_id: str, follower_id: str, flags: int) -> Suppressed | None:
    """Why a follower gets nothing from this edge, or None when it stays a candidate."""
    if follower_id == author_id:
        return Suppressed.SELF
    if not flags & FLAG_NOTIFY_ON_POST:
        return Suppressed.NOTIFY_OFF
    if flags & FLAG_MUTED:
        return Suppressed.MUTED
    return None
