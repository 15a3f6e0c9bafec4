"""The notification ledger's vocabulary: statuses, ledger updates, inbox pages and cursors.

What the notification store port (`operators.delivery.ports.NotificationStore`) takes and
answers, and the pure rules every adapter shares: a notification's aggregated status from its
devices, acks that only move forward, and the opaque inbox cursor.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from operators.delivery.model import TERMINAL_STATES, RowState

NotificationStatus = Literal["pending", "dispatched", "delivered", "opened", "exhausted", "unknown"]


NOTIFICATION_TEMPLATE = "new_post/v1"  # the template id stored with a notification (not its text)


class LedgerUpdate(NamedTuple):
    """A ledger row's new position after a decision, with the attempt it made (if any).

    A named tuple: one is made per push judged, and a frozen dataclass costs three times more.
    """

    key: tuple[str, str]
    state: RowState
    attempts: int
    schedules: int
    status: int | None = None
    reason: str | None = None
    due_at: float | None = None
    attempted: bool = False  # a provider send was made: log it as attempt number `attempts`


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One provider send of one device."""

    device_id: str
    attempt: int
    at: float
    state: str
    status: int | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class DeviceDelivery:
    """Where one device of a notification stands (`fanfare status`)."""

    device_id: str
    provider: str
    state: str
    attempts: int
    ack: str | None  # None, "delivered" or "opened"
    updated_at: float


@dataclass(frozen=True, slots=True)
class Notification:
    """A follower-level notification: compact metadata, never the rendered payload."""

    notification_id: str
    user_id: str
    post_id: str
    author_id: str
    template: str
    created_ms: int  # the post's created_at, epoch milliseconds (the inbox order)
    status: NotificationStatus


@dataclass(frozen=True, slots=True)
class InboxPage:
    """Newest first; `next_cursor` is None on the last page."""

    notifications: list[Notification]
    next_cursor: str | None


class InvalidCursor(ValueError):
    """A cursor this store did not hand out (or from another user's inbox)."""


def aggregate_status(states: Sequence[str], acks: Sequence[str | None] = ()) -> NotificationStatus:
    """A notification's status from its devices' states and acks.

    opened (any device opened it) > delivered (any device acked it) > dispatched (any device's
    provider accepted it) > exhausted (every device's send ended without one) > pending.
    """
    if not states:
        return "unknown"
    if "opened" in acks:
        return "opened"
    if "delivered" in acks:
        return "delivered"
    if "accepted" in states:
        return "dispatched"
    if all(s in TERMINAL_STATES for s in states):
        return "exhausted"
    return "pending"


def stronger_ack(current: str | None, new: str) -> str:
    """Acks only move forward: delivered, then opened."""
    return "opened" if "opened" in (current, new) else new


def encode_cursor(user_id: str, created_ms: int, notification_id: str) -> str:
    """An opaque inbox cursor: the last notification returned (and whose inbox it is)."""
    raw = json.dumps([user_id, created_ms, notification_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(user_id: str, cursor: str) -> tuple[int, str]:
    """(created_ms, notification_id) of a cursor from `encode_cursor`; InvalidCursor if not."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        owner, created_ms, nid = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if owner != user_id or not isinstance(created_ms, int) or not isinstance(nid, str):
            raise ValueError
    except (ValueError, TypeError, UnicodeDecodeError):
        raise InvalidCursor(
            f"{cursor!r} is not a cursor of {user_id!r}'s inbox: pass the next_cursor a page "
            "printed, or no cursor for the first page"
        ) from None
    return created_ms, nid
