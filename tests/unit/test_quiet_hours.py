from datetime import UTC, datetime

import pytest

from operators.fanout.quiet_hours import hour_is_quiet, quiet_until


@pytest.mark.parametrize(
    ("hour", "start", "end", "quiet"),
    [
        (21, 22, 7, False),
        (22, 22, 7, True),
        (23, 22, 7, True),
        (0, 22, 7, True),
        (6, 22, 7, True),
        (7, 22, 7, False),
        (12, 9, 17, True),
        (9, 9, 17, True),
        (17, 9, 17, False),
        (8, 9, 17, False),
        (5, 5, 5, False),  # start == end: no quiet hours
        (5, None, None, False),
        (0, 0, 1, True),
        (23, 23, 0, True),
        (0, 23, 0, False),
    ],
)
def test_hour_is_quiet(hour: int, start: int | None, end: int | None, quiet: bool) -> None:
    assert hour_is_quiet(hour, start, end) is quiet


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_not_quiet_returns_none() -> None:
    assert quiet_until(utc(2026, 6, 1, 12), 22, 7, "Europe/Paris") is None


def test_wrapping_window_before_midnight_ends_tomorrow() -> None:
    # 21:30 UTC = 23:30 in Paris (CEST, +2): quiet until 07:00 local next day = 05:00 UTC.
    assert quiet_until(utc(2026, 6, 1, 21, 30), 22, 7, "Europe/Paris") == utc(2026, 6, 2, 5)


def test_wrapping_window_after_midnight_ends_today() -> None:
    # 01:00 UTC = 03:00 Paris: ends 07:00 Paris the same day.
    assert quiet_until(utc(2026, 6, 2, 1), 22, 7, "Europe/Paris") == utc(2026, 6, 2, 5)


def test_same_instant_differs_by_timezone() -> None:
    now = utc(2026, 6, 1, 3)  # 23:00 in New York, 12:00 in Tokyo, 05:00 in Paris
    assert quiet_until(now, 22, 7, "America/New_York") == utc(2026, 6, 1, 11)
    assert quiet_until(now, 22, 7, "Asia/Tokyo") is None
    assert quiet_until(now, 22, 7, "Europe/Paris") == utc(2026, 6, 1, 5)


def test_half_hour_zone() -> None:
    # Asia/Kolkata is +05:30: 17:00 UTC = 22:30 local -> quiet until 07:00 local = 01:30 UTC.
    assert quiet_until(utc(2026, 1, 10, 17), 22, 7, "Asia/Kolkata") == utc(2026, 1, 11, 1, 30)


def test_dst_spring_forward_day_release_uses_new_offset() -> None:
    # New York springs forward on 2026-03-08 at 02:00 (EST -5 -> EDT -4).
    # 04:00 UTC = 23:00 EST on the 7th; window 22-7 ends 07:00 EDT on the 8th = 11:00 UTC.
    assert quiet_until(utc(2026, 3, 8, 4), 22, 7, "America/New_York") == utc(2026, 3, 8, 11)


def test_dst_end_hour_that_does_not_exist_releases_after_the_gap() -> None:
    # Window 0-2 on spring-forward day: 02:00 local does not exist; release at 03:00 EDT.
    release = quiet_until(utc(2026, 3, 8, 6, 30), 0, 2, "America/New_York")  # 01:30 EST
    assert release == utc(2026, 3, 8, 7)  # 03:00 EDT, the first instant after the gap
    assert release > utc(2026, 3, 8, 6, 30)


def test_dst_fall_back_day_releases_at_first_occurrence() -> None:
    # New York falls back on 2026-11-01 at 02:00 EDT -> 01:00 EST; window 22-1.
    # 04:30 UTC = 00:30 EDT: quiet until the first 01:00 local (EDT) = 05:00 UTC.
    assert quiet_until(utc(2026, 11, 1, 4, 30), 22, 1, "America/New_York") == utc(2026, 11, 1, 5)


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        quiet_until(datetime(2026, 1, 1), 22, 7, "UTC")
