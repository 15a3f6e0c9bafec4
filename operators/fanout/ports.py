"""The fan-out's ports: the follower store and the post claims, as small abstract classes.

Adapters implement them (`operators/adapters/stores/` for SQLite and Cassandra,
`operators/adapters/redis/post_claims.py`); `flows/fanout.py` wires the real ones, the tests
pass fakes (`tests/fakes.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

from operators.fanout.columns import Columns, PackedIds
from schemas.records import FollowChange

Position = tuple[str | None, int]
"""How far a changelog partition is applied: (the id of its log, the next offset)."""


class PostClaims(ABC):
    """Port: claim posts for fan-out."""

    @abstractmethod
    def claim(self, claims: Sequence[tuple[str, str]]) -> list[bool]:
        """For each (post_id, message identity): True when this message owns the post."""


FollowerRow = tuple[str, int]  # (follower_id, flags)
COLUMN_PAGE = 50_000  # followers per page when a column is read page by page


class StoreMismatch(RuntimeError):
    """The store was built for another shard count; resharding needs a re-import."""


class FollowerStore(ABC):
    """Port: what the fan-out needs from the follower graph."""

    shard_count: int

    @abstractmethod
    def apply_follow_changes(self, changes: Sequence[FollowChange]) -> None:
        """Apply follow/unfollow changes in order (a follow with new flags updates the edge)."""

    @abstractmethod
    def follower_page(
        self, author_id: str, shard_id: int, after: str | None, limit: int
    ) -> list[FollowerRow]:
        """Up to `limit` followers of the author in the shard, ordered by id, after `after`."""

    def follower_column(self, author_id: str, shard_id: int) -> PackedIds:
        """All the author's followers in the shard, packed, in the order of `follower_page`.

        What a shard caches as a follower column. This default reads pages; stores override it
        to read the ids in bulk, without a Python object per follower.
        """
        ids: list[str] = []
        flags: list[int] = []
        after: str | None = None
        while True:
            page = self.follower_page(author_id, shard_id, after, COLUMN_PAGE)
            ids.extend(f for f, _ in page)
            flags.extend(fl for _, fl in page)
            if len(page) < COLUMN_PAGE:
                return PackedIds.of(ids, flags)
            after = page[-1][0]

    def follower_version(self, author_id: str, shard_id: int) -> int | None:
        """A number that changes whenever the author's edges in the shard change.

        The fan-out keeps a celebrity's followers in a shard as a cached column while this
        stays the same. None (this default) means the store cannot tell: pages are read.
        """
        return None

    @abstractmethod
    def follow_flags(self, author_id: str, follower_id: str) -> int | None:
        """The edge's flags, or None when the follower does not follow the author."""

    @abstractmethod
    def follower_count(self, author_id: str) -> int:
        """How many followers the author has (all shards)."""

    @abstractmethod
    def bulk_load(self, edges: Iterable[tuple[str, str, int]]) -> int:
        """Upsert (author_id, follower_id, flags) edges; returns how many were written."""

    def close(self) -> None:  # noqa: B027 (optional hook; most stores have nothing to close)
        """Release connections."""


class ShardStateStore(ABC):
    """Port: where follower shards checkpoint their user tables (`operators.fanout.checkpoint`).

    A checkpoint is the table's arrays and the changelog positions it includes: the state after
    applying every preference and device event before those positions, nothing after.
    """

    @abstractmethod
    def load(self, shard_id: int) -> tuple[Columns, dict[str, Position]] | None:
        """The shard's latest complete checkpoint, or None (start from the changelogs).

        A checkpoint of logs that no longer exist (a topic re-created) is not returned.
        """

    @abstractmethod
    def save(self, shard_id: int, columns: Columns, positions: dict[str, Position]) -> None:
        """Replace the shard's checkpoint; the previous one stays until this one is complete.

        May finish in the background: the arrays are the caller's copy, never changed again.
        """

    def flush(self) -> None:  # noqa: B027 (optional: stores that write in the background)
        """Wait until every save asked for so far is durable."""

    def busy(self) -> bool:
        """Whether an earlier save is still being written (a store writing in the background).

        Shards then wait for their turn: each save holds a copy of a shard's table, and all
        shards catch up at once after a start.
        """
        return False
