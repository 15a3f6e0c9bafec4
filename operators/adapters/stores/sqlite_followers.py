"""The follower store on SQLite: follow edges bucketed by (author_id, shard_id of the follower).

`SQLiteFollowerStore` implements `operators.fanout.ports.FollowerStore` for one machine. Pages
are read by cursor (the last follower_id returned), so a job can stop and resume mid-shard.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from operators.fanout.columns import PackedIds
from operators.fanout.eligibility import edge_flags
from operators.fanout.ports import FollowerRow, FollowerStore, StoreMismatch
from operators.fanout.sharding import shard_of
from operators.worker_local import WorkerLocal
from schemas.records import FollowChange

_SCHEMA = """
CREATE TABLE IF NOT EXISTS followers (
    author_id TEXT NOT NULL,
    shard_id INTEGER NOT NULL,
    follower_id TEXT NOT NULL,
    flags INTEGER NOT NULL,
    PRIMARY KEY (author_id, shard_id, follower_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS author_stats (
    author_id TEXT PRIMARY KEY,
    followers INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS follower_versions (
    author_id TEXT NOT NULL,
    shard_id INTEGER NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (author_id, shard_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


# The shard's followers as three strings: the ids back to back, their byte lengths and their
# flags, in id order (the aggregate walks the primary key's range in order).
_COLUMN_SELECT = (
    "SELECT count(*), group_concat(follower_id, ''), "
    "group_concat(length(CAST(follower_id AS BLOB))), group_concat(flags) FROM "
)
_COLUMN = _COLUMN_SELECT + "followers WHERE author_id=? AND shard_id=? AND follower_id > ?"
# Runs, for a shard whose strings would pass SQLite's length limit (a billion bytes): the
# ordered subquery costs about 60% more per follower, so it is only the fallback.
_COLUMN_RUN = (
    _COLUMN_SELECT + "(SELECT follower_id, flags FROM followers WHERE author_id=? AND "
    "shard_id=? AND follower_id > ? ORDER BY follower_id LIMIT ?)"
)
_COLUMN_RUN_IDS = 1 << 22
_EDGE_EXISTS = "SELECT 1 FROM followers WHERE author_id=? AND shard_id=? AND follower_id=?"
_BUMP_VERSION = (
    "INSERT INTO follower_versions VALUES (?, ?, 1) ON CONFLICT DO UPDATE SET version = version + 1"
)


class SQLiteFollowerStore(FollowerStore):
    """Embedded follower store; one connection per thread (Bytewax workers are threads)."""

    def __init__(self, path: Path | str, shard_count: int) -> None:
        self.path = Path(path)
        self.shard_count = shard_count
        self._local = WorkerLocal()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._conn()
        with conn:
            conn.executescript(_SCHEMA)
            conn.execute(
                "INSERT OR IGNORE INTO store_meta VALUES ('shard_count', ?)", (str(shard_count),)
            )
        stored = conn.execute("SELECT value FROM store_meta WHERE key='shard_count'").fetchone()
        if int(stored[0]) != shard_count:
            raise StoreMismatch(
                f"{self.path} was built with {stored[0]} shards but FANFARE_SHARDS={shard_count}; "
                "use the original shard count or re-import the follower graph into a new store"
            )

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA cache_size=-65536")  # 64 MiB page cache per connection
            conn.execute("PRAGMA mmap_size=1073741824")
            self._local.conn = conn
        return conn

    def apply_follow_changes(self, changes: Sequence[FollowChange]) -> None:
        """Apply in order inside one transaction; author follower counts stay exact."""
        if not changes:
            return
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for c in changes:
                shard = shard_of(c.follower_id, self.shard_count)
                key = (c.author_id, shard, c.follower_id)
                existed = conn.execute(_EDGE_EXISTS, key).fetchone() is not None
                if c.op == "follow":
                    conn.execute(
                        "INSERT INTO followers VALUES (?,?,?,?) ON CONFLICT DO UPDATE "
                        "SET flags=excluded.flags",
                        (*key, edge_flags(c.notify_on_post, c.muted)),
                    )
                    delta = 0 if existed else 1
                else:
                    conn.execute(
                        "DELETE FROM followers WHERE author_id=? AND shard_id=? AND follower_id=?",
                        key,
                    )
                    delta = -1 if existed else 0
                conn.execute(_BUMP_VERSION, key[:2])
                if delta:
                    conn.execute(
                        "INSERT INTO author_stats VALUES (?, ?) ON CONFLICT DO UPDATE "
                        "SET followers = followers + excluded.followers",
                        (c.author_id, delta),
                    )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def follower_page(
        self, author_id: str, shard_id: int, after: str | None, limit: int
    ) -> list[FollowerRow]:
        """One page by primary key order; `after=None` starts the shard."""
        rows: list[FollowerRow] = (
            self._conn()
            .execute(
                "SELECT follower_id, flags FROM followers WHERE author_id=? AND shard_id=? "
                "AND follower_id > ? ORDER BY follower_id LIMIT ?",
                (author_id, shard_id, after or "", limit),
            )
            .fetchall()
        )
        return rows

    def follower_column(self, author_id: str, shard_id: int) -> PackedIds:
        """The shard's followers in bulk: a few strings, not a row object per follower."""
        conn = self._conn()
        try:
            whole = _packed(conn.execute(_COLUMN, (author_id, shard_id, "")).fetchone())
            return whole if whole is not None else PackedIds.of([], [])
        except sqlite3.DataError:  # string or blob too big
            pass
        parts: list[PackedIds] = []
        after = ""
        while True:
            run = _packed(
                conn.execute(_COLUMN_RUN, (author_id, shard_id, after, _COLUMN_RUN_IDS)).fetchone()
            )
            if run is not None:
                parts.append(run)
            if run is None or len(run) < _COLUMN_RUN_IDS:
                return PackedIds.join(parts) if parts else PackedIds.of([], [])
            after = run.blob[int(run.ends[-2]) if len(run) > 1 else 0 :].decode()

    def follower_version(self, author_id: str, shard_id: int) -> int | None:
        """Bumped by every write to the author's edges in the shard (changes and imports)."""
        row = (
            self._conn()
            .execute(
                "SELECT version FROM follower_versions WHERE author_id=? AND shard_id=?",
                (author_id, shard_id),
            )
            .fetchone()
        )
        return 0 if row is None else int(row[0])

    def follow_flags(self, author_id: str, follower_id: str) -> int | None:
        """Point lookup of one edge."""
        row = (
            self._conn()
            .execute(
                "SELECT flags FROM followers WHERE author_id=? AND shard_id=? AND follower_id=?",
                (author_id, shard_of(follower_id, self.shard_count), follower_id),
            )
            .fetchone()
        )
        return None if row is None else int(row[0])

    def follower_count(self, author_id: str) -> int:
        """Maintained count (exact under follow changes and bulk loads)."""
        row = (
            self._conn()
            .execute("SELECT followers FROM author_stats WHERE author_id=?", (author_id,))
            .fetchone()
        )
        return 0 if row is None else int(row[0])

    def bulk_load(self, edges: Iterable[tuple[str, str, int]]) -> int:
        """Fast import for seeding and benchmarks; recomputes the touched authors' counts."""
        conn = self._conn()
        written = 0
        authors: set[str] = set()
        conn.execute("BEGIN IMMEDIATE")
        try:
            chunk: list[tuple[str, int, str, int]] = []
            for author_id, follower_id, flags in edges:
                chunk.append(
                    (author_id, shard_of(follower_id, self.shard_count), follower_id, flags)
                )
                authors.add(author_id)
                if len(chunk) >= 50_000:
                    written += self._write_chunk(conn, chunk)
            written += self._write_chunk(conn, chunk)
            conn.executemany(
                "INSERT OR REPLACE INTO author_stats "
                "SELECT author_id, COUNT(*) FROM followers WHERE author_id=?",
                [(a,) for a in authors],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return written

    @staticmethod
    def _write_chunk(conn: sqlite3.Connection, chunk: list[tuple[str, int, str, int]]) -> int:
        conn.executemany(
            "INSERT INTO followers VALUES (?,?,?,?) ON CONFLICT DO UPDATE SET flags=excluded.flags",
            chunk,
        )
        conn.executemany(_BUMP_VERSION, list(dict.fromkeys((a, s) for a, s, _, _ in chunk)))
        n = len(chunk)
        chunk.clear()
        return n

    def close(self) -> None:
        """Close this thread's connection."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _packed(row: tuple[int, str | None, str | None, str | None]) -> PackedIds | None:
    """`_COLUMN_SELECT`'s row as packed ids (None when it counted no follower)."""
    count, ids, lens, flags = row
    if not count or ids is None or lens is None or flags is None:
        return None
    return PackedIds(
        ids.encode(),
        np.cumsum(np.fromstring(lens, np.int64, sep=",")),
        np.fromstring(flags, np.int64, sep=",").astype(np.uint8),
    )
