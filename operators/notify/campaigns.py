"""Campaigns: one notification to many users, emitted a user at a time at a rate.

A campaign targets an author's followers or an uploaded list of users, and is emitted into the
marketing tier at its rate, inside its send window.

The rules here are pure: the campaign's states, the pacing arithmetic (a credit that refills at
the rate and holds at most one second of it, so a restarted scheduler never bursts), the window,
and the per-user message. The scheduler (`operators/notify/scheduler.py`) applies them through
the ports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from operators.notify.templates import DataValue
from schemas.codecs import format_timestamp
from schemas.records import Channel, NotificationRequest

CampaignState = Literal["scheduled", "running", "completed", "cancelled", "window_closed"]
FINAL_STATES: frozenset[str] = frozenset({"completed", "cancelled", "window_closed"})
TargetKind = Literal["followers", "audience", "segment"]
MAX_CHUNK = 500
"""Users one scheduler step emits at most (one produce and one commit per chunk)."""
BURST_S = 1.0
"""Seconds of the rate the pacing credit holds at most."""
MAX_WINDOW = timedelta(days=30)
"""The longest send window of a campaign."""
CURSOR_END = "<end>"
"""The cursor of a campaign whose every recipient was emitted (None is the start)."""


@dataclass(frozen=True, slots=True)
class Target:
    """Who a campaign goes to: the followers of an author, or an uploaded audience."""

    kind: TargetKind
    ref: str  # the author_id, or the audience_id (a segment's: its members when created)


@dataclass(frozen=True, slots=True)
class CampaignSpec:
    """What a campaign sends, to whom, when and how fast (fixed at creation)."""

    campaign_id: str
    category: str
    template_id: str
    data: Mapping[str, DataValue]
    channels: tuple[Channel, ...]
    quiet_hours: bool
    caps: bool
    target: Target
    window_start: float
    window_end: float | None
    rate_per_s: float
    api_key_id: str
    created_at: float
    total: int  # recipients counted at creation (the target may change while it runs)
    collapse_key: str | None = None
    cap_limit: int | None = None
    """The category's own frequency cap (None: the fan-out's FANFARE_NOTIFY_CAP)."""
    cap_window_s: int | None = None
    """The category's own cap window (None: the fan-out's FANFARE_NOTIFY_CAP_WINDOW_S)."""
    fallback: tuple[Channel, ...] = ()
    """Channels tried in this order per user (the campaign's, else its category's)."""
    segment: str | None = None
    """The segment it targets (`locale=fr,platform=ios`), when it targets one."""


@dataclass(frozen=True, slots=True)
class PendingChunk:
    """A chunk being emitted: where it started and where the topic's partitions stood.

    Written before the chunk is produced and cleared with its commit: a scheduler that finds
    one left behind reads the topic from `marks` to learn which of its users were written.
    """

    cursor_before: str | None
    size: int
    marks: Mapping[int, int]


@dataclass(frozen=True, slots=True)
class CampaignProgress:
    """Where a campaign stands (changed only by the scheduler that holds its lease, or cancel)."""

    state: CampaignState
    emitted: int = 0
    cursor: str | None = None
    credit: float = 0.0
    credit_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    cancelled_at: float | None = None
    pending: PendingChunk | None = None


def refill(credit: float, credit_at: float | None, now: float, rate: float) -> float:
    """Pacing credit at `now`: it grows at `rate` per second up to one second of it."""
    cap = max(1.0, rate * BURST_S)
    if credit_at is None:
        return min(cap, max(credit, 1.0))
    return min(cap, credit + max(0.0, now - credit_at) * rate)


def window_position(spec: CampaignSpec, now: float) -> Literal["before", "open", "closed"]:
    """Whether `now` is before, inside or after the send window."""
    if now < spec.window_start:
        return "before"
    if spec.window_end is not None and now >= spec.window_end:
        return "closed"
    return "open"


def campaign_message(spec: CampaignSpec, user_id: str) -> NotificationRequest:
    """The per-user notification a campaign emits (per-user id `campaign_id:user_id`)."""
    return NotificationRequest(
        notification_id=spec.campaign_id,
        tier="marketing",
        category=spec.category,
        template_id=spec.template_id,
        recipients=(user_id,),
        data=dict(spec.data),
        channels=spec.channels,
        quiet_hours=spec.quiet_hours,
        caps=spec.caps,
        cap_limit=spec.cap_limit,
        cap_window_s=spec.cap_window_s,
        fallback=spec.fallback,
        api_key_id=spec.api_key_id,
        created_at=datetime.fromtimestamp(spec.created_at, UTC),
        collapse_key=spec.collapse_key,
        campaign_id=spec.campaign_id,
    )


def _when(epoch: float | None) -> str | None:
    return None if epoch is None else format_timestamp(epoch, "milliseconds")


def progress_view(spec: CampaignSpec, progress: CampaignProgress) -> dict[str, Any]:
    """`GET /v1/notifications/bulk/{id}`: what was sent, what is left, when."""
    final = progress.state in FINAL_STATES
    left = max(0, spec.total - progress.emitted)
    return {
        "campaign_id": spec.campaign_id,
        "state": progress.state,
        "category": spec.category,
        "template_id": spec.template_id,
        "targeting": (
            {"segment": spec.segment or "", "audience_id": spec.target.ref}
            if spec.target.kind == "segment"
            else {spec.target.kind: spec.target.ref}
        ),
        "channels": list(spec.channels),
        "fallback": list(spec.fallback),
        "rate_per_s": spec.rate_per_s,
        "window": {"start": _when(spec.window_start), "end": _when(spec.window_end)},
        "total": spec.total,
        "emitted": progress.emitted,
        "remaining": 0 if final else left,
        "not_sent": left if progress.state in ("cancelled", "window_closed") else 0,
        "in_flight": progress.pending.size if progress.pending else 0,
        "created_at": _when(spec.created_at),
        "started_at": _when(progress.started_at),
        "finished_at": _when(progress.finished_at),
        "cancelled_at": _when(progress.cancelled_at),
    }
