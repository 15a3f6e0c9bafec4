"""Quiet hours: local hours [start, end) in the user's time zone, wrapping midnight.

A notification due inside quiet hours is deferred to the end of the window, never dropped.
start == end, or no hours, means no quiet hours.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo


@functools.lru_cache(maxsize=2048)
def zone(name: str) -> ZoneInfo:
    """A cached ZoneInfo (names were validated when the preference was decoded)."""
    return ZoneInfo(name)


def hour_is_quiet(local_hour: int, start: int | None, end: int | None) -> bool:
    """Whether a local hour falls in [start, end), wrapping midnight when start > end."""
    if start is None or end is None or start == end:
        return False
    if start < end:
        return start <= local_hour < end
    return local_hour >= start or local_hour < end


def quiet_until(now: datetime, start: int | None, end: int | None, tz_name: str) -> datetime | None:
    """When the quiet window that `now` falls in ends (UTC), or None if `now` is not quiet.

    The end is the next local `end:00` after `now`. On a DST change day that hour may not exist
    (spring forward) or occur twice (fall back): zoneinfo maps a skipped hour forward and we take
    the first occurrence of a repeated one, so the release is never early by more than the gap.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    tz = zone(tz_name)
    local = now.astimezone(tz)
    if not hour_is_quiet(local.hour, start, end):
        return None
    assert end is not None
    day = local.date()
    if local.hour >= end:  # wrapped window: it ends tomorrow
        day = day + timedelta(days=1)
    release_local = datetime(day.year, day.month, day.day, end, tzinfo=tz, fold=0)
    release = release_local.astimezone(UTC)
    if release <= now:  # a skipped hour can map behind us; never release into the past
        release = now + timedelta(seconds=1)
    return release
