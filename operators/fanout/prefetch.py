"""Follower columns read ahead, on threads, while a celebrity post's shard jobs wait at the gate.

A bulk-lane job reaches its shard a settle time and a changelog probe before it may expand
(`FollowerShard.gate_open_for`). A shard without the author's column would then read it from
the store on the worker's thread, one shard after the other: the cold post's first batch
waited for those reads. Asked when the job arrives, the read runs meanwhile on a small pool
(SQLite and the Cassandra driver release the GIL while they wait), and the shard takes the
result when the job starts.

The shard still owns its column: a read ahead is used only when the edge version it was read
at is the version the shard sees when it builds the column. The version is read before the
edges, and versions only grow, so equal versions mean the edges read are that version's;
a read ahead of an older version is discarded and the shard reads the column itself.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from operators.fanout.columns import PackedIds
from operators.fanout.ports import FollowerStore

log = logging.getLogger(__name__)

ReadAhead = tuple[int | None, PackedIds | None]
"""(the edge version read first, the column read after it, or None when not needed)."""

MAX_WAITING = 256  # reads ahead not taken yet (a job dropped as a duplicate never takes one)


class ColumnPrefetch:
    """Reads (author, shard) follower columns ahead for the shards of one process."""

    def __init__(self, store: Callable[[], FollowerStore], threads: int = 2) -> None:
        self._store = store
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None  # started at the first ask, not at build
        self._waiting: OrderedDict[tuple[str, int], Future[ReadAhead]] = OrderedDict()
        self._lock = threading.Lock()  # the workers of a process share it
        self.asked = 0
        self.used = 0

    def ask(self, author_id: str, shard_id: int, cached_version: int | None) -> None:
        """Start reading the column, unless the store says `cached_version` is still current."""
        key = (author_id, shard_id)
        with self._lock:
            waiting = self._waiting.get(key)
            if waiting is not None and not waiting.done():
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="column-read")
            self._waiting[key] = self._pool.submit(self._read, author_id, shard_id, cached_version)
            self.asked += 1
            while len(self._waiting) > MAX_WAITING:
                self._waiting.popitem(last=False)[1].cancel()

    def _read(self, author_id: str, shard_id: int, cached_version: int | None) -> ReadAhead:
        store = self._store()
        # The version first: the edges read after it are at least that new (see the module).
        version = store.follower_version(author_id, shard_id)
        if version is None or version == cached_version:
            return version, None
        return version, store.follower_column(author_id, shard_id)

    def ready(self, author_id: str, shard_id: int) -> bool | None:
        """Whether the read asked for is done (None: none was asked or it was taken)."""
        with self._lock:
            future = self._waiting.get((author_id, shard_id))
        return None if future is None else future.done()

    def take(self, author_id: str, shard_id: int, version: int) -> PackedIds | None:
        """The column read ahead at `version` (waiting for it if it is being read), else None."""
        with self._lock:
            future = self._waiting.pop((author_id, shard_id), None)
        if future is None or future.cancelled():
            return None
        try:
            read_version, column = future.result()
        except Exception:
            # The shard reads the column itself, and meets the error there if it persists.
            log.warning(
                "reading %s's followers in shard %d ahead failed",
                author_id,
                shard_id,
                exc_info=True,
            )
            return None
        if read_version != version or column is None:
            return None
        self.used += 1
        return column

    def wait(self) -> None:
        """Wait until every read asked so far is done (tests and benchmarks)."""
        with self._lock:
            futures = list(self._waiting.values())
        concurrent.futures.wait(futures)

    def discard(self, author_id: str, shard_id: int) -> None:
        """Forget the read ahead of a column the shard did not need (its cache was current)."""
        with self._lock:
            future = self._waiting.pop((author_id, shard_id), None)
        if future is not None:
            future.cancel()

    def close(self) -> None:
        """Stop the threads (reads under way finish; tests and benchmarks call it)."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._waiting.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
