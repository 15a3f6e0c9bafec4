"""A producer's notification request, checked against the catalog and turned into the event.

`plan_notification` is every request-time rule of `POST /v1/notifications` that needs no I/O:
the category exists and the template belongs to it, the data has every variable the template
uses and renders in every locale, the channels resolve, `send_at` is not too far ahead.
`Rejected` carries a stable code, a message and the field at fault; the HTTP adapter maps the
code to a status (`operators/adapters/http/errors.py`).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from operators.notify.catalog import Catalog
from operators.notify.categories import CHANNELS, Category
from operators.notify.templates import DataValue, RenderError, Template, check_renders
from schemas.records import Channel, NotificationRequest

MAX_RECIPIENTS = 1_000
"""Recipients of one request; more go through a campaign (`POST /v1/notifications/bulk`)."""
MAX_SCHEDULE_AHEAD = timedelta(days=30)
"""How far ahead `send_at` may be."""


class Rejected(ValueError):
    """A request the API refuses: a stable `code`, a message, the field at fault (if one)."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


@dataclass(frozen=True, slots=True)
class NotifyRequest:
    """`POST /v1/notifications`, parsed (types and sizes already checked by the HTTP layer)."""

    idempotency_key: str
    category: str
    template_id: str
    recipients: Sequence[str]
    data: Mapping[str, DataValue]
    channels: Sequence[Channel] | None = None
    send_at: datetime | None = None
    collapse_key: str | None = None


def new_id(prefix: str) -> str:
    """A fresh id: `a_...` for audiences."""
    return f"{prefix}_{uuid.uuid4().hex}"


def request_id(prefix: str, key_id: str, idempotency_key: str) -> str:
    """The id of what a request creates (`n_...`, `c_...`), from its API key and idempotency key.

    A retry after a lost answer (the broker acknowledged late, the client timed out) publishes
    the same id again, so a consumer can drop the copy; ids of two callers never meet.
    """
    digest = hashlib.sha256(f"{key_id}\x00{idempotency_key}".encode()).hexdigest()
    return f"{prefix}_{digest[:32]}"


def fingerprint(body: Mapping[str, Any]) -> str:
    """What makes two requests the same: their canonical JSON (keys sorted), hashed."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def unique(items: Sequence[str]) -> tuple[str, ...]:
    """Items in their first order, each once."""
    return tuple(dict.fromkeys(items))


def resolve_category(catalog: Catalog, name: str) -> Category:
    """The category, or Rejected(unknown_category)."""
    category = catalog.categories.get(name)
    if category is None:
        raise Rejected(
            "unknown_category",
            f"no category {name!r}; known: {', '.join(sorted(catalog.categories))}",
            "category",
        )
    return category


def resolve_template(
    catalog: Catalog, template_id: str, category: Category, data: Mapping[str, DataValue]
) -> Template:
    """The template, checked: of this category, every variable in `data`, renders everywhere."""
    template = catalog.templates.get(template_id)
    if template is None:
        raise Rejected(
            "unknown_template",
            f"no template {template_id!r}; known: {', '.join(sorted(catalog.templates))}",
            "template_id",
        )
    if template.category != category.name:
        raise Rejected(
            "template_category_mismatch",
            f"template {template_id!r} belongs to category {template.category!r}, "
            f"not {category.name!r}",
            "template_id",
        )
    missing = template.missing_variables(data)
    if missing:
        raise Rejected(
            "missing_template_data",
            f"template {template_id!r} uses {', '.join(missing)}: add them to data",
            "data",
        )
    try:
        check_renders(template, data)
    except RenderError as exc:
        raise Rejected("template_render_failed", str(exc), "data") from None
    return template


def resolve_channels(category: Category, asked: Sequence[Channel] | None) -> tuple[Channel, ...]:
    """The channels asked for (in the standard order), or the category's defaults."""
    if asked is None:
        return category.default_channels
    chosen = tuple(c for c in CHANNELS if c in asked)
    if not chosen:
        raise Rejected("invalid_channels", "name at least one channel", "channels")
    if "sms" in chosen and not category.sms_eligible:
        raise Rejected(
            "channel_not_allowed",
            f"category {category.name!r} is not SMS-eligible (SMS costs money per message: a "
            "category must say sms_eligible = true in the categories file)",
            "channels",
        )
    return chosen


def resolve_fallback(
    category: Category, channels: Sequence[Channel] | None, asked: Sequence[Channel] | None
) -> tuple[tuple[Channel, ...], tuple[Channel, ...]]:
    """(channels, fallback) of a campaign: its category's order, or the one it asked for.

    An order asked for follows the categories file's rules: two or more channels, each once;
    its channels are on (added to the category's defaults when the request named no channels,
    and among the ones it named otherwise).
    """
    chosen = resolve_channels(category, channels)
    if asked is None:
        return chosen, category.fallback_for(chosen)
    order = tuple(asked)
    if len(order) < 2 or len(set(order)) != len(order):
        raise Rejected(
            "invalid_fallback",
            f"fallback lists two or more channels, each once, in the order to try: {list(order)}",
            "fallback",
        )
    stray = [c for c in order if c not in chosen]
    if stray and channels is not None:
        raise Rejected(
            "invalid_fallback",
            f"fallback names {stray}, which channels does not: name them in channels too",
            "fallback",
        )
    return resolve_channels(category, (*chosen, *order)), order


def check_send_at(send_at: datetime | None, now: datetime) -> None:
    """`send_at` must carry a UTC offset and be at most MAX_SCHEDULE_AHEAD away."""
    if send_at is None:
        return
    if send_at.tzinfo is None:
        raise Rejected("invalid_send_at", "send_at needs a UTC offset (e.g. Z)", "send_at")
    if send_at - now > MAX_SCHEDULE_AHEAD:
        raise Rejected(
            "invalid_send_at",
            f"send_at is more than {MAX_SCHEDULE_AHEAD.days} days ahead",
            "send_at",
        )


def plan_notification(
    catalog: Catalog,
    request: NotifyRequest,
    *,
    notification_id: str,
    api_key_id: str,
    now: datetime,
) -> NotificationRequest:
    """The event to publish for a request; Rejected with the first rule it breaks."""
    category = resolve_category(catalog, request.category)
    resolve_template(catalog, request.template_id, category, request.data)
    recipients = unique(request.recipients)
    if not recipients:
        raise Rejected("invalid_request", "name at least one recipient", "recipients")
    if len(recipients) > MAX_RECIPIENTS:
        raise Rejected(
            "too_many_recipients",
            f"{len(recipients)} recipients: at most {MAX_RECIPIENTS} per request; "
            "use POST /v1/notifications/bulk for more",
            "recipients",
        )
    check_send_at(request.send_at, now)
    channels = resolve_channels(category, request.channels)
    return NotificationRequest(
        notification_id=notification_id,
        tier=category.tier,
        category=category.name,
        template_id=request.template_id,
        recipients=recipients,
        data=dict(request.data),
        channels=channels,
        fallback=category.fallback_for(channels),
        quiet_hours=category.quiet_hours,
        caps=category.caps,
        cap_limit=category.cap,
        cap_window_s=category.cap_window_s,
        api_key_id=api_key_id,
        created_at=now,
        send_at=request.send_at,
        collapse_key=request.collapse_key,
    )
