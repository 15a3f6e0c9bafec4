"""Per-user frequency caps and bundles, as arrays over a shard's user rows.

At most `limit` pushes of a category per user per window, counted across authors. A
notification over the cap is not dropped: it joins the user's bundle, and when the window
rolls the bundle becomes a pending summary (one push per user: "ana, ben and 3 others posted")
that the shard sends through the normal path (quiet hours defer it like any push).

Windows are fixed and aligned on the Unix epoch in UTC (`window_start`): a user's window is
the same hour for everyone, so the state holds one window start per shard rather than one per
user, a roll is one sweep over the shard's bundles, and a summary's id follows from the user,
the category and the window start alone (a summary sent again after a restart has the same id,
and the delivery ledger drops it). The price: a burst that straddles a boundary can get up to
twice the limit within one window's length; a sliding per-user window would need a time per
push and user.

State per user row, 9 bytes: pushes this window (uint16), notifications bundled this window
(uint16), the first bundled author (int32, an index in the window's table of author ids) and
how many authors the bundle names (uint8). The second and third distinct authors are sparse (a
dict for the users whose bundle has more than one author), as are the pending summaries (a
window ended, the summary not sent yet: at most until the user's quiet hours end).

Another category uses the same class with its own `CapRule` over the same rows:
`admit(rows, author_id, now_ts)` keeps the rows under the cap and bundles the rest; `take_due`
gives the summaries whose window has ended. The API's capped categories (a request's `caps`
flag) use `count_one`, which drops what is over the cap instead of bundling it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

I32 = npt.NDArray[np.int32]
U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]
Arrays = dict[str, npt.NDArray[np.generic]]

MAX_AUTHORS = 3
"""Bundled authors' ids kept per user (a summary names the first few)."""
_MAX_COUNT = np.iinfo(np.uint16).max


@dataclass(frozen=True, slots=True)
class CapRule:
    """`limit` pushes of `category` per user per `window_s` seconds; 0 in either disables."""

    category: str
    limit: int
    window_s: int

    def __post_init__(self) -> None:
        if not 0 <= self.limit <= _MAX_COUNT:
            raise ValueError(f"cap limit must be 0..{_MAX_COUNT}, got {self.limit}")
        if self.window_s < 0:
            raise ValueError(f"cap window must be >= 0 seconds, got {self.window_s}")

    @property
    def enabled(self) -> bool:
        """Whether the rule caps anything."""
        return self.limit > 0 and self.window_s > 0


def window_start(ts: float, window_s: int) -> int:
    """The start (epoch seconds, UTC) of the fixed window holding `ts`."""
    return int(ts // window_s) * window_s


@dataclass(frozen=True, slots=True)
class Bundle:
    """A user's notifications over the cap in one or more ended windows, not summarised yet.

    `window` is the start of the latest window merged in (the summary's id follows from it),
    `not_before` when the summary may go (the window's end, or a quiet-hours release).
    """

    window: int
    count: int
    authors: tuple[str, ...]
    not_before: float

    def merged(self, newer: Bundle) -> Bundle:
        """Merge a newer window's bundle into this one (still waiting): one summary."""
        authors = self.authors + tuple(a for a in newer.authors if a not in self.authors)
        return Bundle(
            max(self.window, newer.window),
            self.count + newer.count,
            authors[:MAX_AUTHORS],
            max(self.not_before, newer.not_before),
        )


class FrequencyCap:
    """One category's counts, bundles and pending summaries over a shard's user rows."""

    def __init__(self, rule: CapRule) -> None:
        if not rule.enabled:
            raise ValueError(f"cap rule for {rule.category!r} is disabled")
        self.rule = rule
        self.window = -1  # start of the window the counts are for
        self.sent: U16 = np.zeros(0, np.uint16)
        self.bundled: U16 = np.zeros(0, np.uint16)
        self.named: U8 = np.zeros(0, np.uint8)
        self.first: I32 = np.zeros(0, np.int32)  # index in author_ids; -1: none
        self.more: dict[int, list[int]] = {}  # the next distinct authors, by row
        self.author_ids: list[str] = []
        self._author_index: dict[str, int] = {}
        self._window_end = float("-inf")
        self.pending: dict[int, Bundle] = {}
        # The earliest pending summary's time, so most calls (nothing due) cost no scan.
        self._pending_min: float | None = None

    # ---- decisions ------------------------------------------------------------------------------

    def admit(self, rows: I32, author_id: str, now_ts: float) -> tuple[I32, int]:
        """The rows still under the cap (counted as pushed), and how many were bundled.

        `rows` holds each user once (one post's followers); the rest join their bundles.
        """
        if now_ts >= self._window_end:
            self.roll(now_ts)
        if not len(rows):
            return rows, 0
        self._fit(int(rows.max()) + 1)
        under = self.sent[rows] < self.rule.limit
        kept = rows[under]
        self.sent[kept] += 1
        over = len(rows) - len(kept)
        if over:
            self._bundle(rows[~under], self._author(author_id))
        return kept, over

    def admit_one(self, row: int, author_id: str, now_ts: float) -> bool:
        """`admit` for one row (the few-followers path, without numpy's per-call cost)."""
        if now_ts >= self._window_end:
            self.roll(now_ts)
        if row >= len(self.sent):
            self._fit(row + 1)
        sent = self.sent.item(row)
        if sent < self.rule.limit:
            self.sent[row] = sent + 1
            return True
        bundled = self.bundled.item(row)
        if bundled < _MAX_COUNT:
            self.bundled[row] = bundled + 1
        k = self._author(author_id)
        first = self.first.item(row)
        if first < 0:
            self.first[row] = k
            self.named[row] = 1
        elif first != k and self.named.item(row) < MAX_AUTHORS:
            self._name_more(row, k)
        return False

    def count_one(self, row: int, now_ts: float) -> bool:
        """Count a send for one row if it is under the cap; over it, refuse and keep nothing.

        For the API's capped categories, whose notifications over the cap are dropped: a
        campaign has no summary to make of them, so no bundle is kept either.
        """
        if now_ts >= self._window_end:
            self.roll(now_ts)
        if row >= len(self.sent):
            self._fit(row + 1)
        sent = self.sent.item(row)
        if sent >= self.rule.limit:
            return False
        self.sent[row] = sent + 1
        return True

    def _author(self, author_id: str) -> int:
        k = self._author_index.get(author_id)
        if k is None:
            k = self._author_index[author_id] = len(self.author_ids)
            self.author_ids.append(author_id)
        return k

    def _bundle(self, rows: I32, k: int) -> None:
        b = self.bundled
        b[rows] = np.minimum(b[rows], _MAX_COUNT - 1) + 1
        first = self.first[rows]
        new = rows[first < 0]
        self.first[new] = k
        self.named[new] = 1
        # A second or third author: rows with room whose first author is another one (few).
        other = rows[(first >= 0) & (first != k)]
        for r in other[self.named[other] < MAX_AUTHORS].tolist():
            self._name_more(r, k)

    def _name_more(self, row: int, k: int) -> None:
        names = self.more.get(row)
        if names is None:
            self.more[row] = [k]
        elif k not in names:
            names.append(k)
        else:
            return
        self.named[row] += 1

    def authors(self) -> dict[int, list[str]]:
        """The named authors of this window's bundles, by row, first bundled first."""
        ids = self.author_ids
        rows = np.flatnonzero(self.first >= 0)
        more = self.more
        return {
            r: [ids[k], *(ids[m] for m in more.get(r, ()))]
            for r, k in zip(rows.tolist(), self.first[rows].tolist(), strict=True)
        }

    def _fit(self, rows: int) -> None:
        n = len(self.sent)
        if rows > n:
            size = max(rows, n + n // 2, 1_024)
            grow = size - n
            self.sent = np.concatenate([self.sent, np.zeros(grow, np.uint16)])
            self.bundled = np.concatenate([self.bundled, np.zeros(grow, np.uint16)])
            self.named = np.concatenate([self.named, np.zeros(grow, np.uint8)])
            self.first = np.concatenate([self.first, np.full(grow, -1, np.int32)])

    # ---- windows --------------------------------------------------------------------------------

    def roll(self, now_ts: float) -> None:
        """Start the window holding `now_ts`: counts reset, bundles become pending summaries."""
        start = window_start(now_ts, self.rule.window_s)
        if start <= self.window:
            return
        if self.window >= 0 and self.author_ids:
            end = float(self.window + self.rule.window_s)
            bundled = self.bundled
            for row, names in self.authors().items():
                bundle = Bundle(self.window, int(bundled[row]), tuple(names), end)
                old = self.pending.get(row)
                self.pending[row] = bundle if old is None else old.merged(bundle)
            self._pending_changed()
        self.window = start
        self._window_end = float(start + self.rule.window_s)
        self.sent[:] = 0
        if self.author_ids:
            self.bundled[:] = 0
            self.named[:] = 0
            self.first[:] = -1
            self.more = {}
            self.author_ids = []
            self._author_index = {}

    def next_due(self) -> float | None:
        """When the next summary is due.

        The current window's end if anyone is bundled, or the earliest pending summary.
        """
        due = self._pending_min
        if self.author_ids:
            end = float(self.window + self.rule.window_s)
            due = end if due is None else min(due, end)
        return due

    def take_due(self, now_ts: float) -> dict[int, Bundle]:
        """The pending summaries due at `now_ts` (after rolling), removed from the state."""
        self.roll(now_ts)
        if self._pending_min is None or self._pending_min > now_ts:
            return {}
        due = {r: b for r, b in self.pending.items() if b.not_before <= now_ts}
        for r in due:
            del self.pending[r]
        self._pending_changed()
        return due

    def put_back(self, row: int, bundle: Bundle) -> None:
        """A summary that could not go yet (quiet hours): pending again, merged with a newer one."""
        old = self.pending.get(row)
        self.pending[row] = merged = bundle if old is None else bundle.merged(old)
        if self._pending_min is None or merged.not_before < self._pending_min:
            self._pending_min = merged.not_before

    def _pending_changed(self) -> None:
        self._pending_min = min((b.not_before for b in self.pending.values()), default=None)

    # ---- state ----------------------------------------------------------------------------------

    def to_arrays(self) -> Arrays:
        """The state as arrays, all sparse.

        The counts of the users with any, the bundles' authors and the pending summaries;
        the arrays of user rows are named `*rows`.
        """
        rows = np.flatnonzero((self.sent != 0) | (self.bundled != 0)).astype(np.int32)
        named = np.flatnonzero(self.first >= 0).astype(np.int32)
        more_rows = np.array([r for r, ks in self.more.items() for _ in ks], np.int32)
        more_index = np.array([k for ks in self.more.values() for k in ks], np.int32)
        p_rows = np.fromiter(self.pending, np.int32, len(self.pending))
        bundles = list(self.pending.values())
        pa_rows, pa_names = _flatten((r, b.authors) for r, b in self.pending.items())
        return {
            "window": np.array([self.window], np.int64),
            "rows": rows,
            "sent": self.sent[rows],
            "bundled": self.bundled[rows],
            "first_rows": named,
            "first_index": self.first[named],
            "more_rows": more_rows,
            "more_index": more_index,
            **_pack("author", self.author_ids),
            "pending_rows": p_rows,
            "pending_window": np.fromiter((b.window for b in bundles), np.int64, len(bundles)),
            "pending_count": np.fromiter((b.count for b in bundles), np.int64, len(bundles)),
            "pending_until": np.fromiter((b.not_before for b in bundles), np.float64, len(bundles)),
            "pending_author_rows": pa_rows,
            **_pack("pending_author", pa_names),
        }

    @classmethod
    def from_arrays(cls, rule: CapRule, arrays: Arrays) -> FrequencyCap:
        """The state `to_arrays` gave; rows below 0 (not mapped to a row) are left out."""
        cap = cls(rule)
        cap.window = int(arrays["window"][0])
        rows = arrays["rows"].astype(np.int64)
        keep = rows >= 0
        rows = rows[keep]
        if len(rows):
            cap._fit(int(rows.max()) + 1)
            cap.sent[rows] = arrays["sent"][keep]
            cap.bundled[rows] = arrays["bundled"][keep]
        cap.author_ids = _unpack("author", arrays)
        cap._author_index = {a: k for k, a in enumerate(cap.author_ids)}
        first = arrays["first_rows"].astype(np.int64)
        keep = first >= 0
        first = first[keep]
        if len(first):
            cap._fit(int(first.max()) + 1)
            cap.first[first] = arrays["first_index"][keep]
            cap.named[first] = 1
        for r, k in zip(arrays["more_rows"].tolist(), arrays["more_index"].tolist(), strict=True):
            if r >= 0:
                cap._name_more(r, k)
        cap._window_end = float(cap.window + rule.window_s) if cap.window >= 0 else float("-inf")
        names: dict[int, list[str]] = {}
        for r, name in zip(
            arrays["pending_author_rows"].tolist(), _unpack("pending_author", arrays), strict=True
        ):
            names.setdefault(r, []).append(name)
        for r, w, n, until in zip(
            arrays["pending_rows"].tolist(),
            arrays["pending_window"].tolist(),
            arrays["pending_count"].tolist(),
            arrays["pending_until"].tolist(),
            strict=True,
        ):
            if r >= 0:
                cap.pending[r] = Bundle(w, n, tuple(names.get(r, ())), until)
        cap._pending_changed()
        return cap


def row_arrays(arrays: Arrays) -> Iterator[str]:
    """The names of the arrays in `to_arrays` that hold user rows."""
    return (k for k in arrays if k.endswith("rows"))


def _flatten(entries: Iterable[tuple[int, Sequence[str]]]) -> tuple[I32, list[str]]:
    rows: list[int] = []
    names: list[str] = []
    for r, ns in entries:
        rows.extend([r] * len(ns))
        names.extend(ns)
    return np.array(rows, np.int32), names


def _pack(prefix: str, names: list[str]) -> Arrays:
    encoded = [n.encode() for n in names]
    return {
        f"{prefix}_lens": np.fromiter(map(len, encoded), np.int32, len(encoded)),
        f"{prefix}_arena": np.frombuffer(b"".join(encoded), np.uint8),
    }


def _unpack(prefix: str, arrays: Arrays) -> list[str]:
    arena = arrays[f"{prefix}_arena"].tobytes()
    out = []
    at = 0
    for n in arrays[f"{prefix}_lens"].tolist():
        out.append(arena[at : at + n].decode())
        at += n
    return out
