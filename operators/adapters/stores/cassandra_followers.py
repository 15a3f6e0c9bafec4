"""The follower store on Cassandra: edges by (author, follower's shard), a follower count.

Tables and consistency levels: `operators.adapters.stores.cassandra` (connection, URL,
migrations) and `schemas/cql/`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from operators.adapters.stores.cassandra import (
    DEFAULT_CONCURRENCY,
    LEVELS,
    ONE,
    CqlSession,
    Row,
    Statements,
    check_keyspace,
    connect,
    parse_url,
    prepare,
)
from operators.fanout.columns import PackedIds
from operators.fanout.eligibility import FLAG_MUTED, FLAG_NOTIFY_ON_POST, edge_flags
from operators.fanout.ports import FollowerRow, FollowerStore, StoreMismatch
from operators.fanout.sharding import shard_of
from schemas.records import FollowChange

_BULK_CHUNK = 5_000  # edges per concurrent run in bulk_load
_COLUMN_RUN = 100_000  # followers per read of a whole column (the driver pages within it)


def _flags(row: Row) -> int:
    return edge_flags(bool(row.get("notify_on_post")), bool(row.get("muted")))


class CassandraFollowerStore(FollowerStore):
    """Follow edges in `followers`, counts in `author_stats` (counters), shard count checked."""

    def __init__(
        self,
        session: CqlSession,
        keyspace: str,
        shard_count: int,
        *,
        consistency: str = "local_quorum",
        concurrency: int = DEFAULT_CONCURRENCY,
        owns_cluster: bool = False,
    ) -> None:
        self.shard_count = shard_count
        self.keyspace = check_keyspace(keyspace)
        self._session = session
        self._owns_cluster = owns_cluster
        self._run = Statements(session, concurrency)
        q, serial = LEVELS[consistency]
        ks = keyspace

        def prep(cql: str, level: int, serial_level: int | None = None) -> Any:
            return prepare(session, ks, cql, level, serial_level)

        self._meta_claim = prep(
            f"INSERT INTO {ks}.store_meta (key, value) VALUES ('shard_count', ?) IF NOT EXISTS",
            q,
            serial,
        )
        self._edge_get = prep(
            f"SELECT notify_on_post, muted FROM {ks}.followers "
            "WHERE author_id = ? AND shard_id = ? AND follower_id = ?",
            q,
        )
        self._edge_put = prep(
            f"INSERT INTO {ks}.followers (author_id, shard_id, follower_id, notify_on_post, muted) "
            "VALUES (?, ?, ?, ?, ?)",
            q,
        )
        self._edge_delete = prep(
            f"DELETE FROM {ks}.followers WHERE author_id = ? AND shard_id = ? AND follower_id = ?",
            q,
        )
        self._page = prep(
            f"SELECT follower_id, notify_on_post, muted FROM {ks}.followers "
            "WHERE author_id = ? AND shard_id = ? AND follower_id > ? LIMIT ?",
            q,
        )
        self._count_add = prep(
            f"UPDATE {ks}.author_stats SET followers = followers + ? WHERE author_id = ?", q
        )
        self._count_get = prep(f"SELECT followers FROM {ks}.author_stats WHERE author_id = ?", ONE)
        self._version_add = prep(
            f"UPDATE {ks}.follower_versions SET version = version + 1 "
            "WHERE author_id = ? AND shard_id = ?",
            q,
        )
        self._version_get = prep(
            f"SELECT version FROM {ks}.follower_versions WHERE author_id = ? AND shard_id = ?", q
        )
        self._check_shard_count()

    @classmethod
    def open(
        cls,
        url: str,
        shard_count: int,
        *,
        username: str | None = None,
        password_file: str | Path | None = None,
    ) -> CassandraFollowerStore:
        """Connect (per worker) and open the store of a `cassandra://` URL."""
        parsed = parse_url(url)
        session = connect(parsed, username=username, password_file=password_file)
        try:
            return cls(
                session,
                parsed.keyspace,
                shard_count,
                consistency=parsed.consistency,
                owns_cluster=True,
            )
        except BaseException:
            session.cluster.shutdown()
            raise

    def _check_shard_count(self) -> None:
        row = self._run.one(self._meta_claim, (str(self.shard_count),))[0]
        self.recorded_shard_count = bool(row.get("[applied]"))  # this open wrote it
        if self.recorded_shard_count:
            return
        stored = row.get("value")
        if stored != str(self.shard_count):
            raise StoreMismatch(
                f"keyspace {self.keyspace} was built with {stored} shards but "
                f"FANFARE_SHARDS={self.shard_count}; use the original shard count or re-import "
                "the follower graph into a new keyspace"
            )

    def apply_follow_changes(self, changes: Sequence[FollowChange]) -> None:
        """Apply in order: read the touched edges, fold the changes, write each edge once.

        One write per edge keeps the order right however the concurrent writes land; the
        counts move by the edges that appeared or disappeared, so they stay exact unless two
        writers change the same edge at once (follow_changes are keyed by author: they don't).
        """
        if not changes:
            return
        keys = list(dict.fromkeys((c.author_id, c.follower_id) for c in changes))
        found = self._run.each(
            self._edge_get, [(a, shard_of(f, self.shard_count), f) for a, f in keys]
        )
        before: dict[tuple[str, str], int | None] = {
            key: _flags(rows[0]) if rows else None for key, rows in zip(keys, found, strict=True)
        }
        after = dict(before)
        delta: Counter[str] = Counter()
        for c in changes:
            key = (c.author_id, c.follower_id)
            if c.op == "follow":
                if after[key] is None:
                    delta[c.author_id] += 1
                after[key] = edge_flags(c.notify_on_post, c.muted)
            else:
                if after[key] is not None:
                    delta[c.author_id] -= 1
                after[key] = None
        writes: list[tuple[Any, Sequence[object]]] = []
        for author_id, follower_id in keys:
            flags = after[(author_id, follower_id)]
            if flags == before[(author_id, follower_id)]:
                continue
            shard = shard_of(follower_id, self.shard_count)
            if flags is None:
                writes.append((self._edge_delete, (author_id, shard, follower_id)))
            else:
                writes.append(
                    (
                        self._edge_put,
                        (
                            author_id,
                            shard,
                            follower_id,
                            bool(flags & FLAG_NOTIFY_ON_POST),
                            bool(flags & FLAG_MUTED),
                        ),
                    )
                )
        self._run.mixed(writes)
        self._run.each(self._count_add, [(n, a) for a, n in delta.items() if n])
        # After the edges: a reader that sees the new version sees the new edges.
        touched = dict.fromkeys((p[0], p[1]) for _, p in writes)
        self._run.each(self._version_add, list(touched))

    def follower_page(
        self, author_id: str, shard_id: int, after: str | None, limit: int
    ) -> list[FollowerRow]:
        """`follower_id > after` in clustering order, `limit` rows."""
        rows = self._run.one(self._page, (author_id, shard_id, after or "", limit))
        return [(r["follower_id"], _flags(r)) for r in rows]

    def follower_column(self, author_id: str, shard_id: int) -> PackedIds:
        """The shard's followers in clustering order, read in long runs and packed."""
        parts: list[PackedIds] = []
        after = ""
        while True:
            rows = self._run.one(self._page, (author_id, shard_id, after, _COLUMN_RUN))
            if rows:
                parts.append(
                    PackedIds.of([r["follower_id"] for r in rows], list(map(_flags, rows)))
                )
                after = rows[-1]["follower_id"]
            if len(rows) < _COLUMN_RUN:
                return PackedIds.join(parts) if parts else PackedIds.of([], [])

    def follower_version(self, author_id: str, shard_id: int) -> int | None:
        """The (author, shard) counter, bumped after every write to those edges."""
        rows = self._run.one(self._version_get, (author_id, shard_id))
        return int(rows[0]["version"] or 0) if rows else 0

    def follow_flags(self, author_id: str, follower_id: str) -> int | None:
        """Point read of one edge."""
        rows = self._run.one(
            self._edge_get, (author_id, shard_of(follower_id, self.shard_count), follower_id)
        )
        return _flags(rows[0]) if rows else None

    def follower_count(self, author_id: str) -> int:
        """The counter: an estimate (a retried counter write may count twice), for the lane."""
        rows = self._run.one(self._count_get, (author_id,))
        return max(0, int(rows[0]["followers"] or 0)) if rows else 0

    def bulk_load(self, edges: Iterable[tuple[str, str, int]]) -> int:
        """Upsert edges in concurrent chunks; counters move once per author, at the end.

        Counted as new edges: the counts are right for a load into an empty graph (`fanfare
        followers import`) and over-count edges loaded twice: an estimate, as documented.
        """
        written = 0
        counts: Counter[str] = Counter()
        chunk: dict[tuple[str, str], int] = {}
        for author_id, follower_id, flags in edges:
            written += 1
            chunk[(author_id, follower_id)] = flags
            if len(chunk) >= _BULK_CHUNK:
                self._write_edges(chunk, counts)
        self._write_edges(chunk, counts)
        self._run.each(self._count_add, [(n, a) for a, n in counts.items() if n])
        return written

    def _write_edges(self, chunk: dict[tuple[str, str], int], counts: Counter[str]) -> None:
        params = []
        for (author_id, follower_id), flags in chunk.items():
            params.append(
                (
                    author_id,
                    shard_of(follower_id, self.shard_count),
                    follower_id,
                    bool(flags & FLAG_NOTIFY_ON_POST),
                    bool(flags & FLAG_MUTED),
                )
            )
            counts[author_id] += 1
        self._run.each(self._edge_put, params)
        self._run.each(self._version_add, list(dict.fromkeys((p[0], p[1]) for p in params)))
        chunk.clear()

    def close(self) -> None:
        """Shut the cluster connection down when this store opened it."""
        if self._owns_cluster:
            self._owns_cluster = False
            self._session.cluster.shutdown()
