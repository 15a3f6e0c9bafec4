"""The follower store contract: every adapter (and the in-memory fake) behaves the same."""

import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from operators.adapters.stores.by_url import open_follower_store
from operators.adapters.stores.sqlite_followers import SQLiteFollowerStore
from operators.fanout.eligibility import edge_flags
from operators.fanout.ports import FollowerStore, StoreMismatch
from operators.fanout.sharding import shard_of
from schemas.records import FollowChange
from tests.contract.conftest import ADAPTERS, follower_store
from tests.fakes import InMemoryFollowerStore

TS = datetime(2026, 1, 1, tzinfo=UTC)


def change(
    author: str, follower: str, op: str = "follow", notify: bool = True, muted: bool = False
) -> FollowChange:
    return FollowChange(author, follower, op, notify, muted, TS)  # type: ignore[arg-type]


@pytest.fixture(params=["fake", *ADAPTERS])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FollowerStore]:
    """The in-memory fake of the unit tests, and each adapter (SQLite, Cassandra)."""
    if request.param == "fake":
        yield InMemoryFollowerStore(shard_count=4)
        return
    built = follower_store(request.param, request, tmp_path, 4)
    yield built
    built.close()


def unique(prefix: str) -> str:
    """Ids of their own: a Cassandra keyspace is shared by the tests of a run."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def all_followers(store: FollowerStore, author: str, page: int) -> list[tuple[str, int]]:
    out = []
    for shard in range(store.shard_count):
        cursor = None
        while True:
            rows = store.follower_page(author, shard, cursor, page)
            out += rows
            if len(rows) < page:
                break
            cursor = rows[-1][0]
    return out


def test_changes_apply_in_order_and_counts_stay_exact(store: FollowerStore) -> None:
    a, b, nobody = unique("a"), unique("b"), unique("nobody")
    store.apply_follow_changes(
        [
            change(a, "u1"),
            change(a, "u2"),
            change(a, "u2", muted=True),  # a follow with new flags updates the edge
            change(a, "u3"),
            change(a, "u3", op="unfollow"),
            change(a, "u4", op="unfollow"),  # unfollow of nothing
            change(b, "u1", notify=False),
        ]
    )
    assert store.follower_count(a) == 2
    assert store.follower_count(b) == 1
    assert store.follower_count(nobody) == 0
    assert store.follow_flags(a, "u2") == edge_flags(True, True)
    assert store.follow_flags(b, "u1") == edge_flags(False, False)
    assert store.follow_flags(a, "u3") is None
    assert sorted(all_followers(store, a, 1)) == [("u1", 1), ("u2", 3)]


def test_pages_by_cursor_cover_every_shard_once(store: FollowerStore) -> None:
    celeb = unique("celeb")
    followers = [f"user{i:05d}" for i in range(2_345)]
    assert store.bulk_load((celeb, f, 1) for f in followers) == 2_345
    assert store.follower_count(celeb) == 2_345
    got = all_followers(store, celeb, 100)
    assert sorted(f for f, _ in got) == followers
    for shard in range(4):
        page = store.follower_page(celeb, shard, None, 10_000)
        assert [f for f, _ in page] == sorted(f for f in followers if shard_of(f, 4) == shard)


@pytest.mark.parametrize("kind", ADAPTERS)
def test_a_store_refuses_another_shard_count(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    follower_store(kind, request, tmp_path, 4).close()
    with pytest.raises(StoreMismatch, match="FANFARE_SHARDS=8"):
        follower_store(kind, request, tmp_path, 8)


def test_open_by_url(tmp_path: Path) -> None:
    assert isinstance(open_follower_store(f"sqlite:///{tmp_path}/x.db", 2), SQLiteFollowerStore)
    with pytest.raises(ValueError, match="sqlite"):
        open_follower_store("mysql://x", 2)


def test_the_edge_version_moves_with_every_write_to_those_edges(store: FollowerStore) -> None:
    # The fan-out caches a celebrity's followers per shard while this stays the same.
    fa = "f-in-a-shard"
    sa = shard_of(fa, store.shard_count)
    before = store.follower_version("star", sa)
    assert before is not None
    store.apply_follow_changes([FollowChange("star", fa, "follow", True, False, datetime.now(UTC))])
    after_follow = store.follower_version("star", sa)
    assert after_follow != before
    other = store.follower_version("someone-else", sa)
    store.bulk_load([("star", fa, 3)])  # an import changes the flags
    after_import = store.follower_version("star", sa)
    assert after_import not in (before, after_follow)
    assert store.follower_version("someone-else", sa) == other
    store.apply_follow_changes(
        [FollowChange("star", fa, "unfollow", True, False, datetime.now(UTC))]
    )
    assert store.follower_version("star", sa) not in (before, after_follow, after_import)


def test_a_follower_column_is_the_pages_packed(store: FollowerStore) -> None:
    """Same followers, flags and order as the pages, for odd ids and empty shards too."""
    celeb, nobody = unique("celeb"), unique("nobody")
    followers = [f"user{i:05d}" for i in range(700)]
    followers += ["é", "中文-id", "😀" * 30, "x" * 300, "a,b", "comma,,", "tab\there"]
    store.bulk_load((celeb, f, i % 4) for i, f in enumerate(followers))
    store.apply_follow_changes([change(celeb, "user00003", op="unfollow")])
    for shard in range(4):
        column = store.follower_column(celeb, shard)
        page = store.follower_page(celeb, shard, None, 10_000)
        assert column.ids() == [f for f, _ in page]
        assert column.flags.tolist() == [fl for _, fl in page]
        assert len(store.follower_column(nobody, shard)) == 0
    assert sum(len(store.follower_column(celeb, s)) for s in range(4)) == len(followers) - 1


def test_a_sqlite_column_too_long_for_one_string_is_read_in_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past SQLite's string length limit the column is read in runs, joined in order."""
    from operators.adapters.stores import sqlite_followers

    store = SQLiteFollowerStore(tmp_path / "f.db", 1)
    followers = [f"u{i:03d}-é" for i in range(50)]
    store.bulk_load(("a", f, i % 2) for i, f in enumerate(reversed(followers)))
    store._conn().setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 200)  # 50 ids: 350 bytes
    monkeypatch.setattr(sqlite_followers, "_COLUMN_RUN_IDS", 7)
    column = store.follower_column("a", 0)
    assert column.ids() == followers
    assert column.flags.tolist() == [(49 - i) % 2 for i in range(50)]
    monkeypatch.setattr(sqlite_followers, "_COLUMN_RUN_IDS", 10)  # ends on a full run
    assert store.follower_column("a", 0).ids() == followers
    assert len(store.follower_column("b", 0)) == 0
