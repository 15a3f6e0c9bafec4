"""A notification's status from its sends' outcomes, per recipient and channel.

The delivery flow keeps one ledger row per (per-user notification, device) in the notification
store: the outcome it last reached (`accepted`, `invalid_token`, `expired`, `failed`,
`dead_lettered`, on the way `sending` or `retry_scheduled`) and the device's ack (`delivered`,
`opened`). Those rows are the outcomes `delivery_events` carries, kept where the API can read
them; this module folds them, with no I/O: each recipient's outcome on each channel is its best
device's (one device reached is the channel reached), and the view counts them.

A recipient the store has no row of has `no_send` on every channel: not sent yet (queued, held
for its `send_at` or the user's quiet hours), or decided without a send by the fan-out (no
device or address, the category switched off, push off, over its category's cap); the fan-out
keeps no per-recipient record of those, only its counters (`fanfare_suppressed_total`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from operators.delivery.ledger import DeviceDelivery, NotificationStatus, aggregate_status
from schemas.records import CHANNEL_OF_PROVIDER, Channel

OUTCOMES: tuple[str, ...] = (
    "opened",
    "delivered",
    "accepted",
    "sending",
    "retry_scheduled",
    "failed",
    "expired",
    "invalid_token",
    "dead_lettered",
)
"""A device's outcomes, best first: a channel is as far as its furthest device got."""
_RANK = {o: k for k, o in enumerate(OUTCOMES)}
NO_SEND = "no_send"


def device_outcome(row: DeviceDelivery) -> str:
    """One device's outcome: its ack when the provider accepted it, else its ledger state."""
    if row.state == "accepted" and row.ack in ("delivered", "opened"):
        return row.ack
    return row.state


def channel_outcomes(rows: Iterable[DeviceDelivery]) -> dict[Channel, str]:
    """A recipient's outcome per channel: its best device's (unknown states rank last)."""
    best: dict[Channel, str] = {}
    for row in rows:
        channel = CHANNEL_OF_PROVIDER.get(row.provider)
        if channel is None:
            continue
        outcome = device_outcome(row)
        held = best.get(channel)
        if held is None or _RANK.get(outcome, len(OUTCOMES)) < _RANK.get(held, len(OUTCOMES)):
            best[channel] = outcome
    return best


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """One recipient: the overall status (as `notification_status`) and each channel's."""

    user_id: str
    status: NotificationStatus
    channels: Mapping[Channel, str]


def recipient_status(user_id: str, rows: Sequence[DeviceDelivery]) -> RecipientStatus:
    """Fold one recipient's device rows."""
    status = aggregate_status([r.state for r in rows], [r.ack for r in rows])
    return RecipientStatus(user_id, status, channel_outcomes(rows))


def status_counts(
    recipients: Sequence[RecipientStatus], channels: Sequence[Channel]
) -> dict[str, object]:
    """The view's counts: recipients by overall status, and per channel by outcome.

    `channels` are the notification's: a recipient with no send on one of them counts as
    `no_send` there (a channel its fallback did not need, one switched off, or not sent yet).
    """
    overall = Counter(r.status for r in recipients)
    # A channel some recipient has a send on counts too (a record that names no channels).
    named = dict.fromkeys([*channels, *(c for r in recipients for c in r.channels)])
    by_channel = {c: Counter(r.channels.get(c, NO_SEND) for r in recipients) for c in named}
    return {
        "recipient_status": dict(overall),
        "channels": {c: dict(n) for c, n in by_channel.items()},
    }
