"""The notification store: the authority on who owns each (notification, device) send.

`NotificationStore` is the port delivery uses; `SQLiteNotificationStore` is the embedded
adapter (a Cassandra adapter implements the same port in a later issue). It keeps:

- the follower-level notification (post, user, author, created_at), once per notification_id;
- one ledger row per (notification_id, device_id): the unique key that makes a second push to
  a device impossible (see `operators.delivery_model` for the ownership rules);
- every provider attempt per device, for `fanfare status` and debugging.

The aggregated status of a notification is read from its device rows: `dispatched` when any
device accepted it, `exhausted` when every device's send ended without one, else `pending`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from operators.delivery_model import TERMINAL_STATES, LedgerRow, RowState, SendRequest

NotificationStatus = Literal["pending", "dispatched", "exhausted", "unknown"]


@dataclass(frozen=True, slots=True)
class LedgerUpdate:
    """A ledger row's new position after a decision, with the attempt it made (if any)."""

    key: tuple[str, str]
    state: RowState
    attempts: int
    schedules: int
    status: int | None = None
    reason: str | None = None
    due_at: float | None = None
    attempted: bool = False  # a provider send was made: log it as attempt number `attempts`


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One provider send of one device."""

    device_id: str
    attempt: int
    at: float
    state: str
    status: int | None
    reason: str | None


def aggregate_status(states: Sequence[str]) -> NotificationStatus:
    """A notification's status from its devices' states."""
    if not states:
        return "unknown"
    if "accepted" in states:
        return "dispatched"
    if all(s in TERMINAL_STATES for s in states):
        return "exhausted"
    return "pending"


class NotificationStore(ABC):
    """Port: the ledger of sends and the follower-level notifications."""

    @abstractmethod
    def claim(self, requests: Sequence[SendRequest]) -> list[LedgerRow | None]:
        """Atomically, per request: create the row if absent (answer None), else answer it.

        A created row is owned by the request's source, in state `sending`.
        """

    @abstractmethod
    def rows(self, keys: Sequence[tuple[str, str]]) -> list[LedgerRow | None]:
        """The rows of (notification_id, device_id) keys, None where absent."""

    @abstractmethod
    def take_over(self, requests: Sequence[SendRequest]) -> list[bool]:
        """For retry requests: take ownership (state `sending`) where the row awaits this retry.

        That is: state `retry_scheduled` with `schedules == seq`; anything else is stale.
        """

    @abstractmethod
    def record(self, updates: Sequence[LedgerUpdate], at: float) -> None:
        """Apply updates to existing rows, logging attempts that were made."""

    @abstractmethod
    def notification_status(self, notification_id: str) -> NotificationStatus:
        """The aggregated status of a notification."""

    @abstractmethod
    def attempts(self, notification_id: str) -> list[AttemptRecord]:
        """Every attempt of every device of a notification, oldest first."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS notifications (
    notification_id TEXT PRIMARY KEY,
    post_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    author_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    first_seen REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    notification_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    schedules INTEGER NOT NULL,
    status INTEGER,
    reason TEXT,
    due_at REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (notification_id, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS delivery_attempts (
    notification_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at REAL NOT NULL,
    state TEXT NOT NULL,
    status INTEGER,
    reason TEXT,
    PRIMARY KEY (notification_id, device_id, attempt)
) WITHOUT ROWID;
"""

_ROW_COLUMNS = (
    "notification_id, device_id, owner, state, attempts, schedules, status, reason, due_at"
)
_CHUNK = 4_000  # keys per IN (...) query: SQLite allows 32,766 parameters


class SQLiteNotificationStore(NotificationStore):
    """The embedded adapter: one SQLite file in WAL mode, shared by every delivery worker.

    Each thread (Bytewax worker) gets its own connection; claims run in an immediate
    transaction, so two processes claiming the same key cannot both win.
    """

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def _select(
        self, conn: sqlite3.Connection, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], LedgerRow]:
        found: dict[tuple[str, str], LedgerRow] = {}
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            marks = ",".join("(?,?)" for _ in chunk)
            params = [v for key in chunk for v in key]
            for nid, dev, owner, state, att, sch, status, reason, due in conn.execute(
                f"SELECT {_ROW_COLUMNS} FROM deliveries "
                f"WHERE (notification_id, device_id) IN (VALUES {marks})",
                params,
            ):
                found[(nid, dev)] = LedgerRow(owner, state, att, sch, status, reason, due)
        return found

    def claim(self, requests: Sequence[SendRequest]) -> list[LedgerRow | None]:
        """Insert missing rows as `sending`, owned by each request's source."""
        if not requests:
            return []
        conn = self._conn()
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            existing = self._select(conn, [r.key for r in requests])
            answers: list[LedgerRow | None] = []
            new_rows = []
            new_notifications = []
            claimed: set[tuple[str, str]] = set()
            for r in requests:
                row = existing.get(r.key)
                if row is None and r.key in claimed:
                    # The same item twice in one call: the first copy owns it.
                    row = LedgerRow(r.source + "#dup", "sending", 0, 0)
                answers.append(row)
                if row is None:
                    claimed.add(r.key)
                    nid, dev = r.key
                    new_rows.append((nid, dev, r.provider, r.source, "sending", 0, 0, now))
                    new_notifications.append(
                        (nid, r.post_id, r.item["user_id"], r.author_id, r.created_at, now)
                    )
            conn.executemany(
                "INSERT INTO deliveries (notification_id, device_id, provider, owner, state, "
                "attempts, schedules, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                new_rows,
            )
            conn.executemany(
                "INSERT OR IGNORE INTO notifications VALUES (?,?,?,?,?,?)", new_notifications
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return answers

    def rows(self, keys: Sequence[tuple[str, str]]) -> list[LedgerRow | None]:
        """Rows by key."""
        found = self._select(self._conn(), keys)
        return [found.get(k) for k in keys]

    def take_over(self, requests: Sequence[SendRequest]) -> list[bool]:
        """Compare-and-set each row from `retry_scheduled`/seq to `sending`/new owner."""
        if not requests:
            return []
        conn = self._conn()
        now = time.time()
        out = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for r in requests:
                cur = conn.execute(
                    "UPDATE deliveries SET owner=?, state='sending', updated_at=? "
                    "WHERE notification_id=? AND device_id=? AND state='retry_scheduled' "
                    "AND schedules=?",
                    (r.source, now, r.key[0], r.key[1], r.seq),
                )
                out.append(cur.rowcount == 1)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return out

    def record(self, updates: Sequence[LedgerUpdate], at: float) -> None:
        """Update rows and log attempts in one transaction."""
        if not updates:
            return
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "UPDATE deliveries SET state=?, attempts=?, schedules=?, status=?, reason=?, "
                "due_at=?, updated_at=? WHERE notification_id=? AND device_id=?",
                [
                    (u.state, u.attempts, u.schedules, u.status, u.reason, u.due_at, at, *u.key)
                    for u in updates
                ],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO delivery_attempts VALUES (?,?,?,?,?,?,?)",
                [
                    (*u.key, u.attempts, at, u.state, u.status, u.reason)
                    for u in updates
                    if u.attempted
                ],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def notification_status(self, notification_id: str) -> NotificationStatus:
        """Aggregated from the device rows."""
        states = [
            s
            for (s,) in self._conn().execute(
                "SELECT state FROM deliveries WHERE notification_id=?", (notification_id,)
            )
        ]
        return aggregate_status(states)

    def attempts(self, notification_id: str) -> list[AttemptRecord]:
        """The attempt log of a notification."""
        return [
            AttemptRecord(dev, att, at, state, status, reason)
            for dev, att, at, state, status, reason in self._conn().execute(
                "SELECT device_id, attempt, at, state, status, reason FROM delivery_attempts "
                "WHERE notification_id=? ORDER BY at, device_id, attempt",
                (notification_id,),
            )
        ]

    def state_counts(self) -> dict[str, int]:
        """How many device rows are in each state (the demo's and tests' summary)."""
        return dict(
            self._conn().execute("SELECT state, count(*) FROM deliveries GROUP BY state").fetchall()
        )

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def open_notification_store(url: str) -> NotificationStore:
    """Build the adapter the URL names (per worker; never at import time)."""
    if url.startswith("sqlite:///"):
        return SQLiteNotificationStore(url.removeprefix("sqlite:///"))
    raise ValueError(
        f"unsupported FANFARE_NOTIFICATION_STORE_URL {url!r}: use sqlite:///PATH "
        "(the Cassandra adapter arrives with the Cassandra issue)"
    )
