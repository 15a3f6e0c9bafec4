"""Notification categories: one file says, per category, its tier and its policy.

A category is what a producer sends (`login_code`, `receipt`, `new_post`, `campaign`): its
priority tier (which topic, which worker budget), which channels are on by default, and whether
the recipients' quiet hours and frequency caps apply. Transactional categories skip quiet hours
unless the file says otherwise, and are never capped; social and marketing ones respect both.

The file is TOML::

    [categories.login_code]
    tier = "transactional"
    description = "A one-time login code"
    channels = { inbox = false }
    fallback = ["push", "sms"]  # the first that reaches the user, and only that one
    # quiet_hours and caps default by tier (transactional: false; social, marketing: true)
    sms_eligible = true     # SMS costs money per message: only categories that say so use it

    [categories.campaign]
    tier = "marketing"
    cap = 3                 # this category's own frequency cap per user (capped categories only)
    cap_window_s = 604800   # ... per week (either absent: FANFARE_NOTIFY_CAP(_WINDOW_S))
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from schemas.records import Channel, Tier
from schemas.topics import TIERS

CHANNELS: tuple[Channel, ...] = ("push", "inbox", "email", "sms", "chat")
"""Channels a notification can use: a push to the user's devices (mobile and web push), an entry
in the in-app inbox (live on the in-app stream), an email, an SMS, a chat webhook post."""
NAME = re.compile(r"^[a-z0-9_]{1,64}$")
"""Category and template names: lower-case letters, digits and underscores (topic-safe)."""
_KEYS = {
    "tier",
    "description",
    "channels",
    "fallback",
    "quiet_hours",
    "caps",
    "cap",
    "cap_window_s",
    "sms_eligible",
}
MAX_CAP = 65_535
"""The largest per-category cap (the fan-out counts sends per user in 16 bits)."""
MAX_CAP_WINDOW_S = 366 * 86_400
"""The longest per-category cap window: a year."""


class CatalogError(ValueError):
    """A categories file or a template that cannot be used; the message is one line."""


@dataclass(frozen=True, slots=True)
class Category:
    """A kind of notification and its policy."""

    name: str
    tier: Tier
    channels: Mapping[Channel, bool]
    quiet_hours: bool
    caps: bool
    description: str = ""
    sms_eligible: bool = False
    """Whether the category may use SMS at all (requests, routing and the SMS sender check)."""
    fallback: tuple[Channel, ...] = ()
    """Channels tried in this order: a recipient gets the first that reaches them, only that
    one (empty: every channel that is on gets its send)."""
    cap: int | None = None
    """Sends per user per cap window when `caps` is on (None: FANFARE_NOTIFY_CAP)."""
    cap_window_s: int | None = None
    """The cap's window in seconds (None: FANFARE_NOTIFY_CAP_WINDOW_S)."""

    @property
    def default_channels(self) -> tuple[Channel, ...]:
        """The channels used when a request names none: the ones on, and the fallback's."""
        return tuple(c for c in CHANNELS if self.channels.get(c, False) or c in self.fallback)

    def fallback_for(self, channels: Sequence[Channel]) -> tuple[Channel, ...]:
        """The fallback order among a request's channels (fewer than two: no choice to make)."""
        order = tuple(c for c in self.fallback if c in channels)
        return order if len(order) > 1 else ()


def tier_defaults(tier: Tier) -> tuple[bool, bool]:
    """(quiet_hours, caps) of a tier: a login code must not wait for the morning."""
    return (False, False) if tier == "transactional" else (True, True)


def _bool(source: str, where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise CatalogError(f"{source}: {where} must be true or false, not {value!r}")
    return value


def parse_category(source: str, name: str, entry: object) -> Category:
    """One `[categories.NAME]` table."""
    where = f"category {name!r}"
    if not NAME.match(name):
        raise CatalogError(
            f"{source}: {where}: names are 1-64 lower-case letters, digits or underscores"
        )
    if not isinstance(entry, dict):
        raise CatalogError(f"{source}: {where} must be a table")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise CatalogError(
            f"{source}: {where} has unknown keys {unknown}; known: {', '.join(sorted(_KEYS))}"
        )
    tier = entry.get("tier")
    if tier not in TIERS:
        raise CatalogError(f"{source}: {where}: tier must be one of {', '.join(TIERS)}")
    tier = cast(Tier, tier)
    raw_channels = entry.get("channels", {"push": True})
    if not isinstance(raw_channels, dict):
        raise CatalogError(f"{source}: {where}: channels must be a table like {{ push = true }}")
    bad = sorted(set(raw_channels) - set(CHANNELS))
    if bad:
        raise CatalogError(
            f"{source}: {where}: unknown channels {bad}; known: {', '.join(CHANNELS)}"
        )
    channels = {
        cast(Channel, c): _bool(source, f"{where}: channels.{c}", v)
        for c, v in raw_channels.items()
    }
    fallback = _fallback(source, where, entry.get("fallback"), raw_channels)
    quiet_default, caps_default = tier_defaults(tier)
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise CatalogError(f"{source}: {where}: description must be a string")
    category = Category(
        name=name,
        tier=tier,
        channels={c: channels.get(c, False) for c in CHANNELS},
        quiet_hours=_bool(source, f"{where}: quiet_hours", entry.get("quiet_hours", quiet_default)),
        caps=_bool(source, f"{where}: caps", entry.get("caps", caps_default)),
        description=description,
        sms_eligible=_bool(source, f"{where}: sms_eligible", entry.get("sms_eligible", False)),
        fallback=fallback,
        cap=_whole(source, f"{where}: cap", entry.get("cap"), MAX_CAP),
        cap_window_s=_whole(
            source, f"{where}: cap_window_s", entry.get("cap_window_s"), MAX_CAP_WINDOW_S
        ),
    )
    if "sms" in category.default_channels and not category.sms_eligible:
        raise CatalogError(
            f"{source}: {where}: SMS is on (channels.sms or fallback) but the category is not "
            "sms_eligible (add sms_eligible = true: SMS costs money per message)"
        )
    if category.caps and tier == "transactional":
        raise CatalogError(
            f"{source}: {where}: caps = true on a transactional category: transactional "
            "notifications are never capped (a login code must go)"
        )
    if not category.caps and (category.cap is not None or category.cap_window_s is not None):
        raise CatalogError(
            f"{source}: {where}: cap or cap_window_s is set but caps is off for this category "
            "(a transactional category is never capped; elsewhere add caps = true)"
        )
    if not category.default_channels:
        raise CatalogError(f"{source}: {where}: turn at least one channel on by default")
    return category


def _whole(source: str, where: str, value: object, most: int) -> int | None:
    """An optional whole number from 1 to `most`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise CatalogError(
            f"{source}: {where} must be a whole number from 1 to {most}, not {value!r}"
        )
    return value


def _fallback(
    source: str, where: str, value: object, channels: Mapping[str, object]
) -> tuple[Channel, ...]:
    """A `fallback = ["push", "sms"]` list: known channels, each once, none turned off."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) < 2:
        raise CatalogError(
            f"{source}: {where}: fallback must list two or more channels in the order to try, "
            f'like ["push", "sms"], not {value!r}'
        )
    bad = [c for c in value if c not in CHANNELS]
    if bad:
        raise CatalogError(
            f"{source}: {where}: fallback names unknown channels {bad}; "
            f"known: {', '.join(CHANNELS)}"
        )
    if len(set(value)) != len(value):
        raise CatalogError(f"{source}: {where}: fallback names a channel twice: {value}")
    off = [c for c in value if channels.get(c) is False]
    if off:
        raise CatalogError(
            f"{source}: {where}: fallback names {off}, which channels turns off "
            "(a fallback's channels are on; remove them from one or the other)"
        )
    return tuple(cast(Channel, c) for c in value)


def parse_categories(text: str, source: str) -> dict[str, Category]:
    """Every category of a categories file (TOML); CatalogError names what is wrong."""
    try:
        doc: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{source}: not valid TOML ({exc})") from None
    unknown = sorted(set(doc) - {"categories"})
    if unknown:
        raise CatalogError(f"{source}: unknown top-level keys {unknown}; use [categories.NAME]")
    tables = doc.get("categories")
    if not isinstance(tables, dict) or not tables:
        raise CatalogError(f"{source}: no categories (add [categories.NAME] tables)")
    return {name: parse_category(source, name, entry) for name, entry in tables.items()}
