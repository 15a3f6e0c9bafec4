"""Who of a page of followers gets a push now: one mask for the whole page.

The trust contract (docs/design.md) over a page of (user row, edge flags), vectorised: the edge
(self, notify_on_post, muted), then the user's preferences (push, quiet hours in the user's zone
at `now`), then the user's devices. The reasons are counted in the same order as
`eligibility.follower_suppression` and the shard always did, so the funnel metrics stay exact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import numpy.typing as npt

from operators.fanout.columns import I32, U8, UserTable, quiet_mask, release_times
from operators.fanout.eligibility import FLAG_MUTED, FLAG_NOTIFY_ON_POST, Suppressed

Admit = Callable[[I32], tuple[I32, int]]
"""A frequency cap over rows about to get a push: (rows kept, how many it bundled)."""
AdmitOne = Callable[[int], bool]
"""The same for one row: False when it joined its bundle."""


@dataclass(slots=True)
class PageDecision:
    """The devices to push per provider, the deferred rows with their release, the counts."""

    apns: list[int]
    fcm: list[int]
    deferred_rows: I32
    deferred_until: npt.NDArray[np.float64]
    suppressed: Counter[str] = field(default_factory=Counter)


def decide_page(
    table: UserTable,
    rows: I32,
    flags: U8,
    author_row: int,
    hours: npt.NDArray[np.int8],
    now: datetime,
    admit: Admit | None = None,
) -> PageDecision:
    """Decide a page: `rows` of the followers, `flags` of their edges, `hours` per zone now.

    `admit` (a frequency cap) sees the rows that would get a push now (a device, not quiet):
    a user with no device or in quiet hours uses none of the cap.
    """
    suppressed: Counter[str] = Counter()
    is_self = rows == author_row if author_row >= 0 else np.zeros(len(rows), np.bool_)
    notify_off = ~is_self & ((flags & FLAG_NOTIFY_ON_POST) == 0)
    muted = ~is_self & ~notify_off & ((flags & FLAG_MUTED) != 0)
    for reason, mask in (
        (Suppressed.SELF, is_self),
        (Suppressed.NOTIFY_OFF, notify_off),
        (Suppressed.MUTED, muted),
    ):
        n = int(np.count_nonzero(mask))
        if n:
            suppressed[reason] = n
    if suppressed:
        rows = rows[~(is_self | notify_off | muted)]
    push_on = table.push[rows] != 0
    n_off = len(rows) - int(np.count_nonzero(push_on))
    if n_off:
        suppressed[Suppressed.PUSH_DISABLED] = n_off
        rows = rows[push_on]
    quiet = quiet_mask(table, rows, hours)
    if quiet.any():
        deferred = rows[quiet]
        until = release_times(table, deferred, now)
        rows = rows[~quiet]
    else:
        deferred = rows[:0]
        until = np.zeros(0, np.float64)
    if admit is not None and len(rows):
        has_device = table.dev_head[rows] >= 0
        without = len(rows) - int(np.count_nonzero(has_device))
        if without:
            suppressed[Suppressed.NO_DEVICE] = without
            rows = rows[has_device]
        rows, capped = admit(rows)
        if capped:
            suppressed[Suppressed.CAPPED] = capped
    devices, no_device = table.devices_of_rows(rows)
    if no_device:
        suppressed[Suppressed.NO_DEVICE] = int(no_device)
    providers = table.dev_provider[devices]
    return PageDecision(
        devices[providers == 0].tolist(),
        devices[providers == 1].tolist(),
        deferred,
        until,
        suppressed,
    )


def decide_few(
    table: UserTable,
    rows: list[int],
    flags: list[int],
    author_row: int,
    hours: npt.NDArray[np.int8],
    now: datetime,
    admit_one: AdmitOne | None = None,
) -> PageDecision:
    """`decide_page` for a handful of followers, one at a time.

    numpy's per-call cost (about a microsecond per operation) would dominate a normal post's
    few followers in a shard.
    """
    suppressed: Counter[str] = Counter()
    push, qs_a, qe_a, tz_a = table.push, table.quiet_start, table.quiet_end, table.tz
    head, nxt, prov = table.dev_head, table.dev_next, table.dev_provider
    apns: list[int] = []
    fcm: list[int] = []
    deferred: list[int] = []
    for r, f in zip(rows, flags, strict=True):
        if r == author_row:
            suppressed[Suppressed.SELF] += 1
        elif not f & FLAG_NOTIFY_ON_POST:
            suppressed[Suppressed.NOTIFY_OFF] += 1
        elif f & FLAG_MUTED:
            suppressed[Suppressed.MUTED] += 1
        elif not push.item(r):
            suppressed[Suppressed.PUSH_DISABLED] += 1
        elif _quiet(qs_a.item(r), qe_a.item(r), int(hours[tz_a.item(r)])):
            deferred.append(r)
        else:
            d = head.item(r)
            if d < 0:
                suppressed[Suppressed.NO_DEVICE] += 1
            elif admit_one is not None and not admit_one(r):
                suppressed[Suppressed.CAPPED] += 1
                continue
            while d >= 0:
                (apns if prov.item(d) == 0 else fcm).append(d)
                d = nxt.item(d)
    if not deferred:
        return PageDecision(apns, fcm, _NO_ROWS, _NO_TIMES, suppressed)
    late = np.array(deferred, np.int32)
    return PageDecision(apns, fcm, late, release_times(table, late, now), suppressed)


_NO_ROWS: I32 = np.zeros(0, np.int32)
_NO_TIMES: npt.NDArray[np.float64] = np.zeros(0, np.float64)


def _quiet(start: int, end: int, hour: int) -> bool:
    if start < 0 or start == end:
        return False
    if start < end:
        return start <= hour < end
    return hour >= start or hour < end
