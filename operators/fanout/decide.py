"""Who of a page of followers gets a push now: one mask for the whole page.

The trust contract (docs/design.md) over a page of (user row, edge flags), vectorised: the edge
(self, notify_on_post, muted), then the user's preferences (push, quiet hours in the user's zone
at `now`), then the user's devices. The reasons are counted in the same order as
`eligibility.follower_suppression` and the shard always did, so the funnel metrics stay exact.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import numpy.typing as npt

from operators.fanout.columns import I32, U8, UserTable, quiet_mask, release_times
from operators.fanout.eligibility import FLAG_MUTED, FLAG_NOTIFY_ON_POST, Suppressed


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
) -> PageDecision:
    """Decide a page: `rows` of the followers, `flags` of their edges, `hours` per zone now."""
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
