"""Segments: a campaign's users by locale and/or mobile platform.

Users' locales and devices live in the fan-out's keyed state, which the API cannot query. A
segment index is kept apart instead, from the same changelogs (`preference_changes`,
`device_changes`), by `fanfare api scheduler`: per user, the latest locale and each active
device's platform, and per locale, language and platform the set of users. A campaign that
targets a segment takes the segment's members when it is created, as an audience of its own
(frozen, like an uploaded list), so its total, progress, cancel and restarts work as for an
uploaded list and a user who joins the segment later is not added half-way.

Why not resolve it in the fan-out's shards (a vectorised mask over their columns): the
campaign's pace, cursor and cancel live in the scheduler, which emits user by user; a segment
resolved shard-side would need a second pacing and progress path in every shard, and the
total would only be known once every shard answered.

This module is the pure part: what a changelog event changes in the index, and which sets a
segment is. The Redis index (`operators/adapters/redis/segments.py`) applies it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from schemas.records import CategorySwitch, DeviceChange, PreferenceChange

Platform = Literal["ios", "android"]
PLATFORM_OF_PROVIDER: dict[str, Platform] = {"apns": "ios", "fcm": "android"}
"""A mobile device's platform by its push provider (other providers are no platform)."""
_LOCALE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


class SegmentError(ValueError):
    """A segment that cannot be resolved; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Segment:
    """`{locale?, platform?}`: the users whose locale matches and who have a device of it.

    A language matches its regional locales (`fr` is `fr`, `fr-CA`, `fr-FR`; `fr-CA` only
    itself); the platform needs an active device (ios: APNs, android: FCM). At least one.
    """

    locale: str | None = None
    platform: Platform | None = None

    def __post_init__(self) -> None:
        if self.locale is None and self.platform is None:
            raise SegmentError("a segment needs a locale, a platform or both")
        if self.locale is not None and not _LOCALE.match(self.locale):
            raise SegmentError(f"locale {self.locale!r} is not a locale like fr or fr-CA")

    def sets(self) -> list[str]:
        """The index's sets whose intersection is the segment (names after the prefix)."""
        names = []
        if self.locale is not None:
            tag = self.locale.lower()
            names.append(f"locale:{tag}" if "-" in tag else f"lang:{tag}")
        if self.platform is not None:
            names.append(f"platform:{self.platform}")
        return names

    def describe(self) -> str:
        """`locale=fr,platform=ios`: how a campaign's progress names it."""
        parts = [f"locale={self.locale}"] if self.locale else []
        return ",".join(parts + ([f"platform={self.platform}"] if self.platform else []))


@dataclass(frozen=True, slots=True)
class LocaleUpdate:
    """A user's locale as of `ts` (None: none); the sets it belongs to."""

    user_id: str
    ts: float
    sets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeviceUpdate:
    """One device's platform as of `ts` (None: not an active mobile device)."""

    user_id: str
    device_id: str
    ts: float
    platform: Platform | None


IndexUpdate = LocaleUpdate | DeviceUpdate


def locale_sets(locale: str | None) -> tuple[str, ...]:
    """The locale and language sets a user with `locale` belongs to."""
    if not locale:
        return ()
    tag = locale.lower()
    lang = tag.split("-", 1)[0]
    return (f"locale:{tag}", f"lang:{lang}") if tag != lang else (f"lang:{lang}",)


def _epoch(ts: datetime) -> float:
    return ts.timestamp()


def index_update(change: PreferenceChange | CategorySwitch | DeviceChange) -> IndexUpdate | None:
    """What a changelog event changes in the index (None: nothing, e.g. a category switch)."""
    if isinstance(change, PreferenceChange):
        return LocaleUpdate(change.user_id, _epoch(change.ts), locale_sets(change.locale))
    if isinstance(change, DeviceChange):
        platform = PLATFORM_OF_PROVIDER.get(change.provider) if change.active else None
        return DeviceUpdate(change.user_id, change.device_id, _epoch(change.ts), platform)
    return None
