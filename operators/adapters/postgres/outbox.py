"""The outbox table in PostgreSQL (psycopg 3): its schema, and a relay's session on it.

The post service inserts a row in the transaction that writes the post (README, "The outbox
relay"); a statement trigger NOTIFYs the table's channel, delivered when that transaction
commits. A relay claims rows with one statement that implements
`operators.outbox.model.claimable`: it locks the heads it can (`FOR UPDATE SKIP LOCKED`: the
oldest pending row of a key, which no other relay holds) and then those keys' rows in id order.
It deletes them in the same transaction once they are published. Row locks end with the
session, so a relay killed mid-batch gives its rows back at once; `lock_timeout` bounds any
wait the second lock could meet.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

import psycopg
from psycopg import sql

from operators.outbox.model import WINDOW_BATCHES, OutboxRow, TableName
from operators.outbox.ports import Backlog, Outbox, OutboxUnavailable

log = logging.getLogger(__name__)

Session = psycopg.Connection[tuple[Any, ...]]
"""A psycopg session whose rows are tuples."""


class OutboxTable(TableName):
    """The outbox table and the names derived from it, quoted for SQL."""

    @classmethod
    def of(cls, name: TableName) -> OutboxTable:
        """The table of a parsed name."""
        return cls(name.schema, name.name)

    def ident(self, suffix: str = "") -> sql.Composable:
        """The table (or a name derived from it, in its schema), quoted."""
        name = self.name + suffix
        return sql.Identifier(self.schema, name) if self.schema else sql.Identifier(name)


def _schema_statements(table: OutboxTable, topics: Collection[str]) -> list[sql.Composed]:
    t = table.ident()
    known = sql.SQL(", ").join(sql.Literal(topic) for topic in sorted(topics))
    check = sql.Identifier(f"{table.name}_topic_known")
    return [
        *(
            [sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(table.schema))]
            if table.schema
            else []
        ),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {t} ("
            " id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " topic text NOT NULL,"
            " key text NOT NULL,"
            " payload json NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        ).format(t=t),
        # Replaced on every migration, so the list follows fanfare's topics.
        sql.SQL("ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {c}").format(t=t, c=check),
        sql.SQL("ALTER TABLE {t} ADD CONSTRAINT {c} CHECK (topic IN ({known}))").format(
            t=t, c=check, known=known
        ),
        # A key's head and run: the claim's anti-join and its second lock read it.
        sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} (key, id)").format(
            i=sql.Identifier(f"{table.name}_key_id"), t=t
        ),
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS "
            "$$BEGIN PERFORM pg_notify({channel}, ''); RETURN NULL; END$$"
        ).format(f=table.ident("_notify"), channel=sql.Literal(table.channel)),
        # Per statement, and delivered at commit: a rolled-back insert notifies nobody.
        sql.SQL(
            "CREATE OR REPLACE TRIGGER {trigger} AFTER INSERT ON {t} "
            "FOR EACH STATEMENT EXECUTE FUNCTION {f}()"
        ).format(trigger=sql.Identifier(f"{table.name}_notify"), t=t, f=table.ident("_notify")),
    ]


def migrate(conn: Session, table: OutboxTable, topics: Collection[str]) -> bool:
    """Create (or bring up to date) the table, its index and its NOTIFY trigger.

    One transaction; True when the table was created.
    """
    with conn.transaction():
        existed = table_exists(conn, table)
        for statement in _schema_statements(table, topics):
            conn.execute(statement)
    return not existed


def table_exists(conn: Session, table: OutboxTable) -> bool:
    """Whether the outbox table exists (in its schema, or on the search path)."""
    name = f"{table.schema}.{table.name}" if table.schema else table.name
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [name]).fetchone()
    return bool(row and row[0])


def connect(conninfo: str, password: str | None, *, autocommit: bool, purpose: str) -> Session:
    """A session, its password from the password file (never in the URL), keepalives on."""
    return psycopg.connect(
        conninfo,
        password=password,  # None: libpq's own sources (PGPASSFILE, ...), if any
        autocommit=autocommit,
        connect_timeout=5,
        application_name=f"fanfare-{purpose}",
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
    )


class PostgresOutbox(Outbox):
    """One relay's sessions: one for claims (a transaction per batch), one that LISTENs.

    Either reconnects on its next use after it broke; a broken claim session loses its claim
    (the server rolls it back), which is what a release would do.
    """

    def __init__(
        self,
        conninfo: str,
        table: OutboxTable,
        *,
        password: str | None = None,
        lock_timeout_ms: int = 5_000,
        idle_timeout_ms: int = 120_000,
    ) -> None:
        self._conninfo = conninfo
        self._password = password
        self._table = table
        self._lock_timeout_ms = lock_timeout_ms
        self._idle_timeout_ms = idle_timeout_ms
        self._conn: Session | None = None
        self._listen: Session | None = None
        t = table.ident()
        # The window: the oldest WINDOW_BATCHES x limit rows, read through the primary key.
        # It holds every row older than any row in it, so a key's first row there is its head,
        # and each claim reads at most the window, whatever the backlog and however many keys
        # it has (an anti-join over the whole table took seconds for one hot key). The heads
        # wanted are those whose runs start within the batch (the rows of the keys before them
        # leave room); only they are locked, SKIP LOCKED; then their keys' rows in the window,
        # in id order. See `operators.outbox.model.claimable`, the same rule in Python.
        self._claim_sql = sql.SQL(
            "WITH w AS MATERIALIZED (SELECT id, key FROM {t} ORDER BY id LIMIT %(window)s),"
            " runs AS (SELECT min(id) AS head, count(*) AS n FROM w GROUP BY key),"
            " wanted AS (SELECT head FROM"
            " (SELECT head, sum(n) OVER (ORDER BY head) - n AS before FROM runs) r"
            " WHERE before < %(limit)s),"
            " heads AS ("
            " SELECT h.key FROM {t} h WHERE h.id = ANY(ARRAY(SELECT head FROM wanted))"
            " ORDER BY h.id"
            " FOR UPDATE OF h SKIP LOCKED)"
            " SELECT r.id, r.topic, r.key, r.payload::text,"
            " extract(epoch FROM clock_timestamp() - r.created_at)::float8"
            " FROM w JOIN {t} r ON r.id = w.id"
            " WHERE w.key IN (SELECT key FROM heads)"
            " ORDER BY w.id LIMIT %(limit)s"
            " FOR UPDATE OF r"
        ).format(t=t)
        self._delete_sql = sql.SQL("DELETE FROM {t} WHERE id = ANY(%s)").format(t=t)
        self._oldest_sql = sql.SQL(
            "SELECT id, topic, key, created_at FROM {t} ORDER BY id LIMIT %s"
        ).format(t=t)
        self._backlog_sql = sql.SQL(
            "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() -"
            " (SELECT created_at FROM {t} ORDER BY id LIMIT 1)), 0)::float8 FROM {t}"
        ).format(t=t)

    def _session(self) -> Session:
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                self._conn = connect(
                    self._conninfo, self._password, autocommit=False, purpose="outbox-relay"
                )
                self._conn.execute(
                    sql.SQL("SET lock_timeout = {}").format(sql.Literal(self._lock_timeout_ms))
                )
                # A relay host that vanishes without closing its socket would hold its rows
                # until the server's TCP keepalive (2 h by default) noticed; a claim is idle
                # in its transaction only while the broker acknowledges (30 s at most).
                self._conn.execute(
                    sql.SQL("SET idle_in_transaction_session_timeout = {}").format(
                        sql.Literal(self._idle_timeout_ms)
                    )
                )
                self._conn.commit()
            except psycopg.Error as exc:
                raise OutboxUnavailable(f"connecting to the outbox database: {exc}") from exc
        return self._conn

    def _failed(self, what: str, exc: psycopg.Error) -> OutboxUnavailable:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()  # its transaction, and the claim's locks, end with it
        return OutboxUnavailable(f"{what}: {str(exc).strip() or type(exc).__name__}")

    def claim(self, limit: int) -> list[OutboxRow]:
        """Lock the runs of the keys whose heads no other relay holds (see the module doc)."""
        conn = self._session()
        try:
            # Planned for its values each time: a generic plan does not know the window is small.
            found = conn.execute(
                self._claim_sql, {"limit": limit, "window": limit * WINDOW_BATCHES}, prepare=False
            ).fetchall()
        except psycopg.Error as exc:
            raise self._failed("claiming outbox rows", exc) from exc
        return [
            OutboxRow(int(i), str(topic), str(key), str(payload).encode(), float(age))
            for i, topic, key, payload, age in found
        ]

    def complete(self, rows: Sequence[OutboxRow]) -> None:
        """Delete the published rows and commit."""
        conn = self._session()
        try:
            conn.execute(self._delete_sql, [[r.id for r in rows]])
            conn.commit()
        except psycopg.Error as exc:
            raise self._failed("deleting published outbox rows", exc) from exc

    def release(self) -> None:
        """Roll back: the claimed rows stay pending."""
        if self._conn is None:
            return
        try:
            self._conn.rollback()
        except psycopg.Error as exc:
            raise self._failed("releasing outbox rows", exc) from exc

    def _listener(self) -> Session:
        if self._listen is None or self._listen.closed or self._listen.broken:
            try:
                self._listen = connect(
                    self._conninfo, self._password, autocommit=True, purpose="outbox-listen"
                )
                self._listen.execute(
                    sql.SQL("LISTEN {}").format(sql.Identifier(self._table.channel))
                )
            except psycopg.Error as exc:
                self._listen = None
                raise OutboxUnavailable(f"listening for outbox rows: {exc}") from exc
        return self._listen

    def listen(self) -> None:
        """Start listening now (before the first claim, so no commit falls between the two)."""
        self._listener()

    def wait_for_rows(self, timeout_s: float) -> bool:
        """Wait for a notification; take every one already queued (one claim serves them)."""
        conn = self._listener()
        try:
            got = any(True for _ in conn.notifies(timeout=timeout_s, stop_after=1))
            if got:
                for _ in conn.notifies(timeout=0.0):
                    pass
            return got
        except psycopg.Error as exc:
            self._listen = None
            conn.close()
            raise OutboxUnavailable(f"waiting for outbox notifications: {exc}") from exc

    def backlog(self) -> Backlog:
        """Rows pending and the oldest one's age (read on the listening session)."""
        conn = self._listener()
        try:
            row = conn.execute(self._backlog_sql).fetchone()
        except psycopg.Error as exc:
            self._listen = None
            conn.close()
            raise OutboxUnavailable(f"counting outbox rows: {exc}") from exc
        pending, age = row if row else (0, 0.0)
        return Backlog(int(pending), float(age))

    def oldest(self, limit: int) -> list[tuple[int, str, str, str]]:
        """(id, topic, key, created_at) of the oldest pending rows (`fanfare outbox status`)."""
        conn = self._listener()
        try:
            found = conn.execute(self._oldest_sql, [limit]).fetchall()
        except psycopg.Error as exc:
            raise OutboxUnavailable(f"reading the oldest outbox rows: {exc}") from exc
        return [(int(i), str(topic), str(key), str(at)) for i, topic, key, at in found]

    def close(self) -> None:
        """Roll back what is claimed and close both sessions."""
        for conn in (self._conn, self._listen):
            if conn is not None and not conn.closed:
                conn.close()
        self._conn = self._listen = None
