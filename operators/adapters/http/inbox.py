"""The inbox and status over HTTP: reads of the notification store, reads marked by acks.

"Read" is the `opened` ack the apps already send: marking a notification read publishes an
`opened` ack per device of it to `notification_acks`, and the acks flow applies it, so the flow
stays the one writer of the store. A notification is unread until the store has an `opened`
ack for any device of it (its status is then `opened`): `unread_only` filters on that, as the
store stands (a read just marked shows once the acks flow applied it, normally within a
second).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, cast

from operators.delivery.ledger import Notification, encode_cursor
from operators.delivery.ports import NotificationStore
from operators.delivery.status import recipient_status, status_counts
from operators.notify.ports import Accepted, Publisher
from schemas.codecs import encode_notification_ack, format_timestamp
from schemas.records import Channel, NotificationAck
from schemas.topics import NOTIFICATION_ACKS

UNREAD_SCAN_LIMIT = 1_000
"""Notifications one `unread_only` page looks through at most (then it returns what it found,
with the cursor to go on)."""
READ_ALL_LIMIT = 1_000
"""Notifications one read-all call marks at most (`complete: false` says to call again)."""
_PAGE = 100


def notification_view(n: Notification) -> dict[str, Any]:
    """One inbox entry."""
    return {
        "notification_id": n.notification_id,
        "status": n.status,
        "read": n.status == "opened",
        "created_at": format_timestamp(n.created_ms / 1000, "milliseconds"),
        "post_id": n.post_id,
        "author_id": n.author_id,
        "template": n.template,
    }


def inbox_page(
    store: NotificationStore, user_id: str, cursor: str | None, limit: int, unread_only: bool
) -> dict[str, Any]:
    """A page of the user's notifications, newest first (only unread ones with `unread_only`)."""
    if not unread_only:
        page = store.inbox(user_id, cursor, limit)
        return _page(user_id, page.notifications, page.next_cursor)
    found: list[Notification] = []
    scanned = 0
    position = cursor
    while True:
        page = store.inbox(user_id, position, _PAGE)
        for n in page.notifications:
            scanned += 1
            position = encode_cursor(user_id, n.created_ms, n.notification_id)
            if n.status != "opened":
                found.append(n)
            if len(found) == limit or scanned >= UNREAD_SCAN_LIMIT:
                last = n is page.notifications[-1] and page.next_cursor is None
                return _page(user_id, found, None if last else position)
        if page.next_cursor is None:
            return _page(user_id, found, None)


def _page(user_id: str, found: list[Notification], next_cursor: str | None) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "notifications": [notification_view(n) for n in found],
        "next_cursor": next_cursor,
    }


def _acks(store: NotificationStore, notification_id: str, at: datetime) -> list[NotificationAck]:
    return [
        NotificationAck(notification_id, d.device_id, "opened", at)
        for d in store.devices(notification_id)
    ]


def _publish_acks(publisher: Publisher, acks: list[NotificationAck]) -> None:
    if acks:
        publisher.publish(
            NOTIFICATION_ACKS,
            [(a.notification_id.encode(), encode_notification_ack(a)) for a in acks],
        )


def mark_read(
    store: NotificationStore, publisher: Publisher, notification_id: str, now: float
) -> int | None:
    """Publish `opened` for every device of the notification; None when the store has none."""
    if store.notification(notification_id) is None:
        return None
    acks = _acks(store, notification_id, datetime.fromtimestamp(now, UTC))
    _publish_acks(publisher, acks)
    return len(acks)


def mark_all_read(
    store: NotificationStore, publisher: Publisher, user_id: str, now: float
) -> dict[str, Any]:
    """Mark every unread notification of the user read (up to READ_ALL_LIMIT per call)."""
    at = datetime.fromtimestamp(now, UTC)
    acks: list[NotificationAck] = []
    marked = scanned = 0
    cursor: str | None = None
    complete = True
    while True:
        page = store.inbox(user_id, cursor, _PAGE)
        for n in page.notifications:
            scanned += 1
            if n.status != "opened":
                acks += _acks(store, n.notification_id, at)
                marked += 1
        cursor = page.next_cursor
        if cursor is None:
            break
        if scanned >= READ_ALL_LIMIT:
            complete = False
            break
    _publish_acks(publisher, acks)
    return {"user_id": user_id, "marked": marked, "acks": len(acks), "complete": complete}


def status_view(
    store: NotificationStore, accepted: Accepted | None, notification_id: str
) -> dict[str, Any] | None:
    """An accepted request (and its recipients' statuses), or a notification in the store."""
    if accepted is not None:
        # Each recipient's sends as the delivery flow recorded their outcomes (the fold is pure).
        recipients = [
            recipient_status(user, store.devices(f"{notification_id}:{user}"))
            for user in accepted.recipients
        ]
        channels = cast(Sequence[Channel], accepted.channels)
        return {
            "notification_id": notification_id,
            "state": "accepted",
            "category": accepted.category,
            "tier": accepted.tier,
            "template_id": accepted.template_id,
            "topic": accepted.topic,
            "partition": accepted.partition,
            "offset": accepted.offset,
            "accepted_at": format_timestamp(accepted.accepted_at, "milliseconds"),
            "send_at": accepted.send_at,
            "recipients": len(accepted.recipients),
            **status_counts(recipients, channels),
            "by_recipient": {
                r.user_id: {"status": r.status, "channels": dict(r.channels)} for r in recipients
            },
        }
    note = store.notification(notification_id)
    if note is None:
        return None
    return {
        **notification_view(note),
        "state": "in_store",
        "user_id": note.user_id,
        "devices": [asdict(d) for d in store.devices(notification_id)],
        "attempts": [asdict(a) for a in store.attempts(notification_id)],
    }
