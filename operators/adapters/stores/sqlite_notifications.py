"""The notification store on SQLite: the authority on who owns each (notification, device) send.

`SQLiteNotificationStore` implements `operators.delivery.ports.NotificationStore` in one file
(WAL mode, shared by every delivery worker of a host). It keeps:

- the follower-level notification (post, user, author, created_at), once per notification_id;
- one ledger row per (notification_id, device_id): the unique key that makes a second push to
  a device impossible (see `operators.delivery.model` for the ownership rules);
- every provider attempt per device, for `fanfare status` and debugging: a device's latest
  attempt in its ledger row (`last_*`), the earlier ones in `delivery_attempts` (most pushes
  are sent once, so most never write an attempt row of their own).

The aggregated status of a notification is read from its device rows
(`operators.delivery.ledger.aggregate_status`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from operators.delivery.ledger import (
    NOTIFICATION_TEMPLATE,
    AttemptRecord,
    DeviceDelivery,
    InboxPage,
    LedgerUpdate,
    Notification,
    NotificationStatus,
    aggregate_status,
    decode_cursor,
    encode_cursor,
    stronger_ack,
)
from operators.delivery.model import EARLIER_COPY_IN_CALL, LedgerRow, SendRequest
from operators.delivery.ports import NotificationStore
from operators.worker_local import WorkerLocal
from schemas.records import AckOutcome, NotificationAck

# Versioned schema: PRAGMA user_version says which of these a file has had. Version 1 is the
# first release's schema; files written then are upgraded in place when opened.
_MIGRATIONS: tuple[str, ...] = (
    """
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
""",
    # 2: the inbox (order by the post's time), template id, acks, and expiry of every row.
    """
ALTER TABLE notifications ADD COLUMN created_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE notifications ADD COLUMN template TEXT NOT NULL DEFAULT 'new_post/v1';
ALTER TABLE notifications ADD COLUMN expires_at REAL NOT NULL DEFAULT 1e18;
ALTER TABLE deliveries ADD COLUMN ack TEXT;
ALTER TABLE deliveries ADD COLUMN expires_at REAL NOT NULL DEFAULT 1e18;
ALTER TABLE delivery_attempts ADD COLUMN expires_at REAL NOT NULL DEFAULT 1e18;
CREATE INDEX IF NOT EXISTS notifications_inbox
    ON notifications (user_id, created_ms DESC, notification_id DESC);
CREATE INDEX IF NOT EXISTS deliveries_expiry ON deliveries (expires_at);
CREATE INDEX IF NOT EXISTS notifications_expiry ON notifications (expires_at);
CREATE INDEX IF NOT EXISTS attempts_expiry ON delivery_attempts (expires_at);
""",
    # 3: a device's latest attempt kept in its ledger row; moved to delivery_attempts only
    # when a later attempt replaces it (an attempt row per push was a fifth of the store's cost).
    """
ALTER TABLE deliveries ADD COLUMN last_attempt INTEGER;
ALTER TABLE deliveries ADD COLUMN last_at REAL;
ALTER TABLE deliveries ADD COLUMN last_state TEXT;
ALTER TABLE deliveries ADD COLUMN last_status INTEGER;
ALTER TABLE deliveries ADD COLUMN last_reason TEXT;
""",
)
SCHEMA_VERSION = len(_MIGRATIONS)

_ROW_COLUMNS = (
    "notification_id, device_id, owner, state, attempts, schedules, status, reason, due_at"
)
_QUALIFIED_ROW_COLUMNS = ", ".join(f"deliveries.{c.strip()}" for c in _ROW_COLUMNS.split(","))
_CHUNK = 4_000  # keys per IN (...) query: SQLite allows 32,766 parameters
_CLAIM_CHUNK = 4_000  # rows per claim statement (6 parameters each)
_PURGE_EVERY_S = 600.0


_KEY = "WHERE notification_id=? AND device_id=?"
_UPDATE_PLAIN = (
    "UPDATE deliveries SET state=?, attempts=?, schedules=?, status=?, reason=?, due_at=?, "
    f"updated_at=? {_KEY}"
)
_UPDATE_ATTEMPT = (
    "UPDATE deliveries SET state=?, attempts=?, schedules=?, status=?, reason=?, due_at=?, "
    "updated_at=?, last_attempt=?, last_at=?, last_state=?, last_status=?, last_reason=? "
    f"{_KEY}"
)
# A first attempt's update, only where the row holds no other attempt (else moved first, below).
_UPDATE_FIRST = f"{_UPDATE_ATTEMPT} AND (last_attempt IS NULL OR last_attempt = ?)"
# The row's previous attempt, before a later one replaces it (a replay of the same is not moved).
_MOVE_ATTEMPT = (
    "INSERT OR REPLACE INTO delivery_attempts (notification_id, device_id, attempt, at, state, "
    "status, reason, expires_at) SELECT notification_id, device_id, last_attempt, last_at, "
    f"last_state, last_status, last_reason, ? FROM deliveries {_KEY} "
    "AND last_attempt IS NOT NULL AND last_attempt <> ?"
)


def _plain_params(u: LedgerUpdate, at: float) -> tuple[object, ...]:
    return (u.state, u.attempts, u.schedules, u.status, u.reason, u.due_at, at, *u.key)


def _attempt_params(u: LedgerUpdate, at: float) -> tuple[object, ...]:
    return (
        u.state,
        u.attempts,
        u.schedules,
        u.status,
        u.reason,
        u.due_at,
        at,
        u.attempts,
        at,
        u.state,
        u.status,
        u.reason,
        *u.key,
    )


def migrate_sqlite(conn: sqlite3.Connection) -> list[int]:
    """Apply the migrations a file has not had (safe to run twice); the versions applied."""
    applied: list[int] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = int(conn.execute("PRAGMA user_version").fetchone()[0])
        for version, script in enumerate(_MIGRATIONS, start=1):
            if version <= current:
                continue
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            applied.append(version)
        if applied:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return applied


def _notification(row: Sequence[Any], status: NotificationStatus) -> Notification:
    nid, user_id, post_id, author_id, template, created_ms = row
    return Notification(nid, user_id, post_id, author_id, template, int(created_ms), status)


class SQLiteNotificationStore(NotificationStore):
    """The embedded adapter: one SQLite file in WAL mode, shared by every delivery worker.

    Each thread (Bytewax worker) gets its own connection; claims run in an immediate
    transaction, so two processes claiming the same key cannot both win. Rows past their
    expiry are invisible to every read and purged now and then (Cassandra's TTL, emulated).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        ttl_s: float = 604_800,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = str(path)
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._ttl = ttl_s
        self._clock = clock
        self._local = WorkerLocal()
        self._purged_at = 0.0
        self.migrated = migrate_sqlite(self._conn())

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def _select(
        self, conn: sqlite3.Connection, keys: Sequence[tuple[str, str]], now: float
    ) -> dict[tuple[str, str], LedgerRow]:
        found: dict[tuple[str, str], LedgerRow] = {}
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            marks = ",".join("(?,?)" for _ in chunk)
            params: list[object] = [v for key in chunk for v in key]
            for nid, dev, owner, state, att, sch, status, reason, due in conn.execute(
                # A join on the keys: SQLite scans the whole table for `(a, b) IN (VALUES ...)`.
                f"WITH k(n, d) AS (VALUES {marks}) SELECT {_QUALIFIED_ROW_COLUMNS} "
                "FROM k JOIN deliveries ON deliveries.notification_id = k.n "
                "AND deliveries.device_id = k.d WHERE deliveries.expires_at > ?",
                [*params, now],
            ):
                found[(nid, dev)] = LedgerRow(owner, state, att, sch, status, reason, due)
        return found

    def claim(self, requests: Sequence[SendRequest]) -> list[LedgerRow | None]:
        """Insert missing rows as `sending`, owned by each request's source.

        One transaction for the call (a slice of a dispatch batch): one statement inserts the
        rows that are new (or replaces expired ones, as a Cassandra TTL would have it gone) and
        says which it took; only the keys it did not take are read.
        """
        if not requests:
            return []
        conn = self._conn()
        now = self._clock()
        expires = now + self._ttl
        first: dict[tuple[str, str], SendRequest] = {}
        for r in requests:
            first.setdefault(r.key, r)
        conn.execute("BEGIN IMMEDIATE")
        try:
            taken: set[tuple[str, str]] = set()
            keys = list(first)
            for start in range(0, len(keys), _CLAIM_CHUNK):
                chunk = keys[start : start + _CLAIM_CHUNK]
                params: list[object] = []
                for key in chunk:
                    r = first[key]
                    params += (*key, r.provider, r.origin.key, now, expires)
                marks = ",".join("(?,?,?,?,'sending',0,0,?,?)" for _ in chunk)
                taken.update(
                    conn.execute(
                        "INSERT INTO deliveries (notification_id, device_id, provider, owner, "
                        f"state, attempts, schedules, updated_at, expires_at) VALUES {marks} "
                        "ON CONFLICT (notification_id, device_id) DO UPDATE SET "
                        "provider=excluded.provider, owner=excluded.owner, state='sending', "
                        "attempts=0, schedules=0, status=NULL, reason=NULL, due_at=NULL, "
                        "ack=NULL, updated_at=excluded.updated_at, "
                        "expires_at=excluded.expires_at, last_attempt=NULL, last_at=NULL, "
                        "last_state=NULL, last_status=NULL, last_reason=NULL "
                        "WHERE deliveries.expires_at <= excluded.updated_at "
                        "RETURNING notification_id, device_id",
                        params,
                    ).fetchall()
                )
            held = [k for k in keys if k not in taken]
            existing = self._select(conn, held, now) if held else {}
            answers: list[LedgerRow | None] = []
            answered: set[tuple[str, str]] = set()
            for r in requests:
                if r.key in answered:
                    # The same item twice in one call: the first copy owns it.
                    answers.append(
                        existing.get(r.key) or LedgerRow(EARLIER_COPY_IN_CALL, "sending", 0, 0)
                    )
                    continue
                answered.add(r.key)
                answers.append(None if r.key in taken else existing.get(r.key))
            conn.executemany(
                "INSERT INTO notifications (notification_id, post_id, user_id, author_id, "
                "created_at, first_seen, created_ms, template, expires_at) "
                "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                "first_seen=excluded.first_seen, expires_at=excluded.expires_at "
                "WHERE notifications.expires_at <= excluded.first_seen",
                [
                    (
                        key[0],
                        r.post_id,
                        r.item["user_id"],
                        r.author_id,
                        r.created_at,
                        now,
                        round(r.created_ts * 1000),
                        NOTIFICATION_TEMPLATE,
                        expires,
                    )
                    for key, r in first.items()
                    if key in taken
                ],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return answers

    def rows(self, keys: Sequence[tuple[str, str]]) -> list[LedgerRow | None]:
        """Rows by key."""
        found = self._select(self._conn(), keys, self._clock())
        return [found.get(k) for k in keys]

    def take_over(self, requests: Sequence[SendRequest]) -> list[bool]:
        """Compare-and-set each row from `retry_scheduled`/seq to `sending`/new owner."""
        if not requests:
            return []
        conn = self._conn()
        now = self._clock()
        out = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for r in requests:
                cur = conn.execute(
                    "UPDATE deliveries SET owner=?, state='sending', updated_at=? "
                    "WHERE notification_id=? AND device_id=? AND state='retry_scheduled' "
                    "AND schedules=? AND expires_at > ?",
                    (r.origin.key, now, r.key[0], r.key[1], r.seq, now),
                )
                out.append(cur.rowcount == 1)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return out

    def record(self, updates: Sequence[LedgerUpdate], at: float) -> None:
        """Update rows and log attempts in one transaction.

        An attempt is written into its device's row (`last_*`); the row's previous attempt, if
        another one, is moved to `delivery_attempts` first. A first attempt has none to move (a
        claim or re-claim clears them), so a push sent once costs one row update here, not an
        update and an insert; should a row hold another attempt all the same, the first
        attempts are done again one by one, moving it.
        """
        if not updates:
            return
        conn = self._conn()
        expires = self._clock() + self._ttl
        seen: dict[tuple[str, str], int] = {}
        for u in updates:
            seen[u.key] = seen.get(u.key, 0) + 1
        plain: list[tuple[object, ...]] = []
        first_attempts: list[tuple[object, ...]] = []
        firsts: list[LedgerUpdate] = []
        in_order: list[LedgerUpdate] = []  # later attempts and keys updated twice: one by one
        for u in updates:
            if seen[u.key] > 1 or (u.attempted and u.attempts > 1):
                in_order.append(u)
            elif u.attempted:
                first_attempts.append((*_attempt_params(u, at), u.attempts))
                firsts.append(u)
            else:
                plain.append(_plain_params(u, at))
        conn.execute("BEGIN IMMEDIATE")
        try:
            if plain:
                conn.executemany(_UPDATE_PLAIN, plain)
            if first_attempts:
                done = conn.executemany(_UPDATE_FIRST, first_attempts).rowcount
                if done != len(first_attempts):  # a row missing, or holding another attempt
                    in_order += firsts
            for u in in_order:
                if not u.attempted:
                    conn.execute(_UPDATE_PLAIN, _plain_params(u, at))
                    continue
                conn.execute(_MOVE_ATTEMPT, (expires, *u.key, u.attempts))
                conn.execute(_UPDATE_ATTEMPT, _attempt_params(u, at))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._maybe_purge()

    def apply_acks(self, acks: Sequence[NotificationAck]) -> list[AckOutcome]:
        """Forward-only ack per device row, in one transaction."""
        if not acks:
            return []
        conn = self._conn()
        now = self._clock()
        out: list[AckOutcome] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for a in acks:
                row = conn.execute(
                    "SELECT ack FROM deliveries WHERE notification_id=? AND device_id=? "
                    "AND expires_at > ?",
                    (a.notification_id, a.device_id, now),
                ).fetchone()
                if row is None:
                    known = conn.execute(
                        "SELECT 1 FROM notifications WHERE notification_id=? AND expires_at > ?",
                        (a.notification_id, now),
                    ).fetchone()
                    out.append("unknown_device" if known else "unknown_notification")
                    continue
                conn.execute(
                    "UPDATE deliveries SET ack=?, updated_at=? "
                    "WHERE notification_id=? AND device_id=?",
                    (stronger_ack(row[0], a.event), now, a.notification_id, a.device_id),
                )
                out.append("applied")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return out

    def _statuses(
        self, conn: sqlite3.Connection, nids: Sequence[str], now: float
    ) -> dict[str, NotificationStatus]:
        states: dict[str, list[str]] = {}
        acks: dict[str, list[str | None]] = {}
        for start in range(0, len(nids), _CHUNK):
            chunk = nids[start : start + _CHUNK]
            marks = ",".join("?" for _ in chunk)
            for nid, state, ack in conn.execute(
                f"SELECT notification_id, state, ack FROM deliveries "
                f"WHERE notification_id IN ({marks}) AND expires_at > ?",
                [*chunk, now],
            ):
                states.setdefault(nid, []).append(state)
                acks.setdefault(nid, []).append(ack)
        return {n: aggregate_status(states.get(n, []), acks.get(n, [])) for n in nids}

    def notification(self, notification_id: str) -> Notification | None:
        """The notification row with its devices' aggregated status."""
        conn = self._conn()
        now = self._clock()
        row = conn.execute(
            "SELECT notification_id, user_id, post_id, author_id, template, created_ms "
            "FROM notifications WHERE notification_id=? AND expires_at > ?",
            (notification_id, now),
        ).fetchone()
        if row is None:
            return None
        status = self._statuses(conn, [notification_id], now)[notification_id]
        return _notification(row, status)

    def devices(self, notification_id: str) -> list[DeviceDelivery]:
        """Device rows by device_id."""
        return [
            DeviceDelivery(*r)
            for r in self._conn().execute(
                "SELECT device_id, provider, state, attempts, ack, updated_at FROM deliveries "
                "WHERE notification_id=? AND expires_at > ? ORDER BY device_id",
                (notification_id, self._clock()),
            )
        ]

    def attempts(self, notification_id: str) -> list[AttemptRecord]:
        """The attempt log of a notification: the moved attempts and each row's latest."""
        conn = self._conn()
        now = self._clock()
        found: dict[tuple[str, int], AttemptRecord] = {}
        for dev, att, at, state, status, reason in conn.execute(
            "SELECT device_id, attempt, at, state, status, reason FROM delivery_attempts "
            "WHERE notification_id=? AND expires_at > ? UNION ALL "
            "SELECT device_id, last_attempt, last_at, last_state, last_status, last_reason "
            "FROM deliveries WHERE notification_id=? AND expires_at > ? "
            "AND last_attempt IS NOT NULL",
            (notification_id, now, notification_id, now),
        ):
            # Later wins: a file upgraded mid-send may hold an attempt in both places.
            found[(dev, att)] = AttemptRecord(dev, att, at, state, status, reason)
        return sorted(found.values(), key=lambda a: (a.at, a.device_id, a.attempt))

    def inbox(self, user_id: str, cursor: str | None, limit: int) -> InboxPage:
        """Newest first by (post time, notification_id), resuming after the cursor's row."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        conn = self._conn()
        now = self._clock()
        after = decode_cursor(user_id, cursor) if cursor else None
        where = "user_id=? AND expires_at > ?"
        params: list[object] = [user_id, now]
        if after is not None:
            where += " AND (created_ms, notification_id) < (?, ?)"
            params += list(after)
        rows = conn.execute(
            "SELECT notification_id, user_id, post_id, author_id, template, created_ms "
            f"FROM notifications WHERE {where} "
            "ORDER BY created_ms DESC, notification_id DESC LIMIT ?",
            [*params, limit + 1],
        ).fetchall()
        page, more = rows[:limit], len(rows) > limit
        statuses = self._statuses(conn, [r[0] for r in page], now)
        notes = [_notification(r, statuses[r[0]]) for r in page]
        last = notes[-1] if notes else None
        next_cursor = (
            encode_cursor(user_id, last.created_ms, last.notification_id)
            if more and last is not None
            else None
        )
        return InboxPage(notes, next_cursor)

    def purge_expired(self) -> int:
        """Delete rows past their expiry; how many."""
        conn = self._conn()
        now = self._clock()
        deleted = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for table in ("deliveries", "delivery_attempts", "notifications"):
                deleted += conn.execute(
                    f"DELETE FROM {table} WHERE expires_at <= ?", (now,)
                ).rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._purged_at = now
        return deleted

    def _maybe_purge(self) -> None:
        if self._clock() - self._purged_at >= _PURGE_EVERY_S:
            self.purge_expired()

    def state_counts(self) -> dict[str, int]:
        """How many device rows are in each state (the demo's and tests' summary)."""
        return dict(
            self._conn()
            .execute(
                "SELECT state, count(*) FROM deliveries WHERE expires_at > ? GROUP BY state",
                (self._clock(),),
            )
            .fetchall()
        )

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
