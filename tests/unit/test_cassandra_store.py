"""The Cassandra adapters without a server: the CQL they prepare, its levels, and their logic.

A fake session records every prepare() and execution and answers from scripted responders.
The port's behaviour against a real server is the contract suite's (tests/contract, with
FANFARE_CASSANDRA_HOSTS set).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cassandra import ConsistencyLevel as CL  # type: ignore[import-untyped]
from cassandra import InvalidRequest
from cassandra.concurrent import ExecutionResult  # type: ignore[import-untyped]

from operators.adapters.stores import cassandra as cs
from operators.adapters.stores import cassandra_followers as cf
from operators.adapters.stores import cassandra_notifications as cn
from operators.config import Settings
from operators.delivery.ledger import InvalidCursor, LedgerUpdate, encode_cursor
from operators.delivery.model import EARLIER_COPY_IN_CALL, LedgerRow
from operators.fanout.ports import StoreMismatch
from schemas.records import FollowChange, NotificationAck
from scripts.commands import store as store_cli
from tests.fakes import request

Rows = list[dict[str, Any]]
Answer = Rows | Callable[[tuple[Any, ...]], Rows]
KS = "ks"
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp()
TTL = 604_800


class FakePrepared:
    def __init__(self, query_string: str) -> None:
        self.query_string = query_string
        self.consistency_level: int | None = None
        self.serial_consistency_level: int | None = None


class FakeBatch:
    """Stands in for the driver's BatchStatement (which binds only real prepared statements)."""

    def __init__(self, batch_type: Any, consistency_level: int) -> None:
        self.batch_type = batch_type
        self.consistency_level = consistency_level
        self.statements: list[tuple[Any, tuple[Any, ...]]] = []

    def add(self, statement: Any, parameters: Any) -> None:
        self.statements.append((statement, tuple(parameters)))


@pytest.fixture(autouse=True)
def fake_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cs, "BatchStatement", FakeBatch)


class FakeCluster:
    def __init__(self) -> None:
        self.shutdowns = 0

    def shutdown(self) -> None:
        self.shutdowns += 1


class FakeSession:
    """Records prepare() texts, executions and concurrent runs; answers from responders."""

    def __init__(self) -> None:
        self.prepared: list[FakePrepared] = []
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.runs: list[tuple[int, int]] = []  # (statements, concurrency) per concurrent run
        self.batches: list[FakeBatch] = []
        self.responders: list[tuple[str, Answer]] = []
        self.cluster = FakeCluster()
        self.fail_prepare: Exception | None = None

    def on(self, fragment: str, answer: Answer) -> None:
        """Answer statements containing `fragment` (the latest matching responder wins)."""
        self.responders.append((fragment, answer))

    def prepare(self, query: str) -> FakePrepared:
        if self.fail_prepare is not None:
            raise self.fail_prepare
        statement = FakePrepared(query)
        self.prepared.append(statement)
        return statement

    def execute(self, query: Any, parameters: Any = None) -> Rows:
        if isinstance(query, FakeBatch):
            assert parameters is None
            self.batches.append(query)
            for statement, params in query.statements:
                self.execute(statement, params)
            return []
        text = query.query_string if isinstance(query, FakePrepared) else query
        params = tuple(parameters or ())
        self.calls.append((text, params))
        for fragment, answer in reversed(self.responders):
            if fragment in text:
                return answer(params) if callable(answer) else [dict(r) for r in answer]
        return []

    def execute_concurrent_with_args(
        self, statement: Any, parameters: Any, concurrency: int, raise_on_first_error: bool
    ) -> list[ExecutionResult]:
        assert raise_on_first_error
        self.runs.append((len(parameters), concurrency))
        return [ExecutionResult(True, self.execute(statement, p)) for p in parameters]

    def execute_concurrent(
        self, statements_and_parameters: Any, concurrency: int, raise_on_first_error: bool
    ) -> list[ExecutionResult]:
        assert raise_on_first_error
        self.runs.append((len(statements_and_parameters), concurrency))
        return [ExecutionResult(True, self.execute(s, p)) for s, p in statements_and_parameters]

    def executed(self, fragment: str) -> list[tuple[Any, ...]]:
        """Parameters of every execution whose text contains `fragment`, in order."""
        return [params for text, params in self.calls if fragment in text]

    def levels(self) -> dict[str, tuple[int | None, int | None]]:
        return {
            p.query_string: (p.consistency_level, p.serial_consistency_level) for p in self.prepared
        }


def applied(params: tuple[Any, ...]) -> Rows:
    return [{"[applied]": True}]


def ms(year: int, month: int, day: int, hour: int = 0) -> int:
    return round(datetime(year, month, day, hour, tzinfo=UTC).timestamp() * 1000)


def stamp(millis: int) -> datetime:
    """A driver timestamp: naive UTC."""
    return datetime.fromtimestamp(millis / 1000, UTC).replace(tzinfo=None)


# -- the follower store ----------------------------------------------------------------------

FOLLOWER_CQL = {
    "UPDATE ks.follower_versions SET version = version + 1 WHERE author_id = ? AND shard_id = ?": (
        CL.LOCAL_QUORUM,
        None,
    ),
    "SELECT version FROM ks.follower_versions WHERE author_id = ? AND shard_id = ?": (
        CL.LOCAL_QUORUM,
        None,
    ),
    "INSERT INTO ks.store_meta (key, value) VALUES ('shard_count', ?) IF NOT EXISTS": (
        CL.LOCAL_QUORUM,
        CL.LOCAL_SERIAL,
    ),
    "SELECT notify_on_post, muted FROM ks.followers WHERE author_id = ? AND shard_id = ? AND follower_id = ?": (
        CL.LOCAL_QUORUM,
        None,
    ),
    "INSERT INTO ks.followers (author_id, shard_id, follower_id, notify_on_post, muted) VALUES (?, ?, ?, ?, ?)": (
        CL.LOCAL_QUORUM,
        None,
    ),
    "DELETE FROM ks.followers WHERE author_id = ? AND shard_id = ? AND follower_id = ?": (
        CL.LOCAL_QUORUM,
        None,
    ),
    "SELECT follower_id, notify_on_post, muted FROM ks.followers WHERE author_id = ? AND shard_id = ? AND follower_id > ? LIMIT ?": (
        CL.LOCAL_QUORUM,
        None,
    ),
    "UPDATE ks.author_stats SET followers = followers + ? WHERE author_id = ?": (
        CL.LOCAL_QUORUM,
        None,
    ),
    "SELECT followers FROM ks.author_stats WHERE author_id = ?": (CL.LOCAL_ONE, None),
}


def follower_store(
    session: FakeSession | None = None, shards: int = 4
) -> tuple[cf.CassandraFollowerStore, FakeSession]:
    session = session or FakeSession()
    session.on("store_meta", applied)
    return cf.CassandraFollowerStore(session, KS, shards), session


def change(
    author: str, follower: str, op: str = "follow", notify: bool = True, muted: bool = False
) -> FollowChange:
    return FollowChange(author, follower, op, notify, muted, datetime(2026, 1, 1, tzinfo=UTC))  # type: ignore[arg-type]


def test_follower_store_prepares_each_statement_once_at_its_level() -> None:
    store, session = follower_store()
    assert session.levels() == FOLLOWER_CQL
    assert len(session.prepared) == len(FOLLOWER_CQL)
    assert store.recorded_shard_count is True
    assert session.executed("store_meta") == [("4",)]
    store.apply_follow_changes([change("a", "u1")])
    store.follower_page("a", 0, None, 10)
    store.follow_flags("a", "u1")
    store.follower_count("a")
    store.follower_version("a", 0)
    store.bulk_load([("a", "u2", 1)])
    assert len(session.prepared) == len(FOLLOWER_CQL)  # nothing prepared per call


def test_quorum_consistency_from_the_url_moves_every_deciding_statement() -> None:
    session = FakeSession()
    session.on("store_meta", applied)
    cf.CassandraFollowerStore(session, KS, 4, consistency="quorum")
    levels = session.levels()
    assert levels[
        "INSERT INTO ks.store_meta (key, value) VALUES ('shard_count', ?) IF NOT EXISTS"
    ] == (CL.QUORUM, CL.SERIAL)
    assert levels["SELECT followers FROM ks.author_stats WHERE author_id = ?"] == (
        CL.LOCAL_ONE,
        None,
    )
    assert {lv for lv, _ in levels.values()} == {CL.QUORUM, CL.LOCAL_ONE}


def test_another_shard_count_is_refused() -> None:
    session = FakeSession()
    session.on("store_meta", [{"[applied]": False, "key": "shard_count", "value": "8"}])
    with pytest.raises(
        StoreMismatch, match="keyspace ks was built with 8 shards but FANFARE_SHARDS=4"
    ):
        cf.CassandraFollowerStore(session, KS, 4)
    session.on("store_meta", [{"[applied]": False, "key": "shard_count", "value": "4"}])
    assert cf.CassandraFollowerStore(session, KS, 4).recorded_shard_count is False


def test_follow_changes_fold_in_order_one_write_per_edge_and_exact_count_deltas() -> None:
    store, session = follower_store()
    existing = {
        ("a", "u2"): {"notify_on_post": True, "muted": False},
        ("a", "u5"): {"notify_on_post": True, "muted": False},
    }
    session.on(
        "SELECT notify_on_post, muted",
        lambda p: [existing[(p[0], p[2])]] if (p[0], p[2]) in existing else [],
    )
    store.apply_follow_changes(
        [
            change("a", "u1"),
            change("a", "u2", muted=True),  # existing edge, new flags: no count change
            change("a", "u3"),
            change("a", "u3", op="unfollow"),  # appears and goes in one batch: nothing written
            change("a", "u4", op="unfollow"),  # unfollow of nothing
            change("a", "u5"),  # already there, same flags: nothing written
            change("b", "u1", notify=False),
            change("a", "u2", op="unfollow"),
            change("a", "u2", muted=True),  # the last change wins
        ]
    )
    from operators.fanout.sharding import shard_of

    assert session.executed("SELECT notify_on_post, muted") == [
        ("a", shard_of(u, 4), u) for u in ("u1", "u2", "u3", "u4", "u5")
    ] + [("b", shard_of("u1", 4), "u1")]
    assert session.executed("INSERT INTO ks.followers") == [
        ("a", shard_of("u1", 4), "u1", True, False),
        ("a", shard_of("u2", 4), "u2", True, True),
        ("b", shard_of("u1", 4), "u1", False, False),
    ]
    assert session.executed("DELETE FROM ks.followers") == []
    assert session.executed("UPDATE ks.author_stats") == [(1, "a"), (1, "b")]
    store.apply_follow_changes([change("a", "u5", op="unfollow")])
    assert session.executed("DELETE FROM ks.followers") == [("a", shard_of("u5", 4), "u5")]
    assert session.executed("UPDATE ks.author_stats")[-1] == (-1, "a")


def test_follower_page_reads_after_the_cursor_and_maps_flags() -> None:
    store, session = follower_store()
    session.on(
        "follower_id > ?",
        [
            {"follower_id": "u1", "notify_on_post": True, "muted": False},
            {"follower_id": "u2", "notify_on_post": True, "muted": True},
            {"follower_id": "u3", "notify_on_post": False, "muted": None},
        ],
    )
    assert store.follower_page("a", 2, None, 3) == [("u1", 1), ("u2", 3), ("u3", 0)]
    store.follower_page("a", 2, "u3", 3)
    assert session.executed("follower_id > ?") == [("a", 2, "", 3), ("a", 2, "u3", 3)]


def test_flags_and_counts() -> None:
    store, session = follower_store()
    assert store.follow_flags("a", "u1") is None
    session.on("SELECT notify_on_post, muted", [{"notify_on_post": True, "muted": True}])
    assert store.follow_flags("a", "u1") == 3
    assert store.follower_count("a") == 0
    session.on("SELECT followers", [{"followers": 12_345}])
    assert store.follower_count("a") == 12_345
    session.on("SELECT followers", [{"followers": -2}])  # counters can drift below zero
    assert store.follower_count("a") == 0


def test_bulk_load_writes_in_bounded_chunks_and_counts_once_per_author(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cf, "_BULK_CHUNK", 3)
    store, session = follower_store()
    session.runs.clear()
    edges = [("a", f"u{i}", 1) for i in range(7)] + [("b", "u1", 3), ("a", "u0", 3)]
    assert store.bulk_load(iter(edges)) == 9
    inserts = session.executed("INSERT INTO ks.followers")
    assert len(inserts) == 9
    assert inserts[-1][2:] == ("u0", True, True)  # the later copy of (a, u0) is written last
    # Once per author, at the end; (a, u0) came in two chunks and counts twice: an estimate.
    assert session.executed("UPDATE ks.author_stats") == [(8, "a"), (1, "b")]
    # Each chunk's edges, then a version bump per (author, shard) it touched.
    bumps = session.executed("UPDATE ks.follower_versions")
    assert set(bumps) == {(a, cf.shard_of(f, 4)) for a, f, _flags in edges}
    # Three chunks of edges, each followed by its (author, shard) bumps, then the counters.
    assert [n for n, _ in session.runs[0:6:2]] == [3, 3, 3]
    assert sum(n for n, _ in session.runs[1:6:2]) == len(bumps)
    assert session.runs[6:] == [(2, 64)]


def test_close_shuts_down_only_a_cluster_the_store_opened() -> None:
    store, session = follower_store()
    store.close()
    assert session.cluster.shutdowns == 0
    owned = cf.CassandraFollowerStore(session, KS, 4, owns_cluster=True)
    owned.close()
    owned.close()
    assert session.cluster.shutdowns == 1


def test_a_keyspace_without_tables_says_to_migrate() -> None:
    session = FakeSession()
    session.fail_prepare = InvalidRequest("unconfigured table store_meta")
    with pytest.raises(cs.SchemaMissing, match="run `fanfare store migrate`"):
        cf.CassandraFollowerStore(session, KS, 4)
    with pytest.raises(cs.SchemaMissing, match="keyspace ks lacks fanfare's tables"):
        cn.CassandraNotificationStore(session, KS)


# -- the notification store ------------------------------------------------------------------

LQ, LS, ONE = (CL.LOCAL_QUORUM, None), (CL.LOCAL_QUORUM, CL.LOCAL_SERIAL), (CL.LOCAL_ONE, None)
KEY = "WHERE notification_id = ? AND device_id = ?"
NOTIFICATION_CQL = {
    "INSERT INTO ks.delivery_claims (notification_id, device_id, provider, owner, state, attempts, schedules, updated_at) "
    "VALUES (?, ?, ?, ?, 'sending', 0, 0, ?) IF NOT EXISTS USING TTL ?": LS,
    "UPDATE ks.delivery_claims USING TTL ? SET provider = ?, owner = ?, state = 'sending', attempts = 0, schedules = 0, "
    f"status = null, reason = null, due_at = null, ack = null, updated_at = ? {KEY} IF owner = null": LS,
    f"SELECT notification_id, device_id, owner, state, attempts, schedules, status, reason, due_at FROM ks.delivery_claims {KEY}": (
        CL.LOCAL_SERIAL,
        None,
    ),
    f"SELECT owner, state, attempts, schedules, status, reason, due_at FROM ks.delivery_claims {KEY}": LQ,
    f"UPDATE ks.delivery_claims USING TTL ? SET owner = ?, provider = ?, state = 'sending', updated_at = ? {KEY} "
    "IF state = 'retry_scheduled' AND schedules = ?": LS,
    "UPDATE ks.delivery_claims USING TTL ? SET state = ?, attempts = ?, schedules = ?, status = ?, reason = ?, "
    f"due_at = ?, updated_at = ? {KEY}": LQ,
    "INSERT INTO ks.delivery_attempts (notification_id, attempted_at, device_id, attempt, state, status, reason) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?": LQ,
    "INSERT INTO ks.notifications_by_id (notification_id, user_id, post_id, author_id, template, created_at, month) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?": LQ,
    "INSERT INTO ks.notifications_by_user (user_id, month, created_at, notification_id, post_id, author_id, template) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?": LQ,
    f"SELECT owner, ack, TTL(owner) AS owner_ttl FROM ks.delivery_claims {KEY}": LQ,
    f"UPDATE ks.delivery_claims USING TTL ? SET ack = ?, updated_at = ? {KEY}": LQ,
    "SELECT notification_id FROM ks.notifications_by_id WHERE notification_id = ?": ONE,
    "SELECT user_id, post_id, author_id, template, created_at FROM ks.notifications_by_id WHERE notification_id = ?": ONE,
    "SELECT device_id, provider, owner, state, attempts, ack, updated_at FROM ks.delivery_claims WHERE notification_id = ?": ONE,
    "SELECT attempted_at, device_id, attempt, state, status, reason FROM ks.delivery_attempts WHERE notification_id = ?": ONE,
    "SELECT notification_id, post_id, author_id, template, created_at FROM ks.notifications_by_user "
    "WHERE user_id = ? AND month = ? LIMIT ?": ONE,
    "SELECT notification_id, post_id, author_id, template, created_at FROM ks.notifications_by_user "
    "WHERE user_id = ? AND month = ? AND (created_at, notification_id) < (?, ?) LIMIT ?": ONE,
}
CLAIM = "IF NOT EXISTS USING TTL"
RECLAIM = "IF owner = null"
SERIAL_ROW = "SELECT notification_id, device_id, owner"
TAKE_OVER = "IF state = 'retry_scheduled'"
DEVICES = "SELECT device_id, provider, owner"
INBOX = "FROM ks.notifications_by_user"


def notification_store(
    session: FakeSession | None = None, ttl_s: float = TTL, now: float = NOW
) -> tuple[cn.CassandraNotificationStore, FakeSession]:
    session = session or FakeSession()
    return cn.CassandraNotificationStore(session, KS, ttl_s=ttl_s, clock=lambda: now), session


def test_notification_store_prepares_each_statement_once_at_its_level() -> None:
    store, session = notification_store()
    assert session.levels() == NOTIFICATION_CQL
    assert len(session.prepared) == len(NOTIFICATION_CQL)
    lwt = [t for t, (_, serial) in session.levels().items() if serial is not None]
    assert len(lwt) == 3 and all(" IF " in t for t in lwt)
    assert [
        t for t in NOTIFICATION_CQL if " IF " in t
    ] == lwt  # every conditional statement is serial
    r = request("u1", post="p1")
    session.on(CLAIM, applied)
    store.claim([r])
    store.rows([r.key])
    store.take_over([request("u1", post="p1", seq=1)])
    store.record([LedgerUpdate(r.key, "accepted", 1, 0, 200, None, None, True)], NOW)
    store.apply_acks([NotificationAck("p1:u1", "d1", "opened", datetime(2026, 3, 10, tzinfo=UTC))])
    store.notification("p1:u1")
    store.devices("p1:u1")
    store.attempts("p1:u1")
    store.inbox("u1", None, 5)
    assert len(session.prepared) == len(NOTIFICATION_CQL)


def test_claim_answers_none_when_applied_and_the_holders_row_when_not() -> None:
    store, session = notification_store()
    created = NOW - 60
    mine = request("u1", "d1", post="p1", source="push.apns/0@1", created_ts=created)
    theirs = request("u2", "d1", post="p1", source="push.apns/0@1", created_ts=created)
    replay = request("u3", "d1", post="p1", source="push.apns/0@1", created_ts=created)
    held = {
        "p1:u2": {
            "[applied]": False,
            "notification_id": "p1:u2",
            "device_id": "d1",
            "owner": "push.apns/3@7",
            "state": "retry_scheduled",
            "attempts": 2,
            "schedules": 2,
            "status": 503,
            "reason": "503",
            "due_at": 99.5,
            "ack": None,
            "provider": "apns",
            "updated_at": stamp(1),
        },
        "p1:u3": {
            "[applied]": False,
            "notification_id": "p1:u3",
            "device_id": "d1",
            "owner": "push.apns/0@1",
            "state": "sending",
            "attempts": 0,
            "schedules": 0,
            "status": None,
            "reason": None,
            "due_at": None,
        },
    }
    session.on(CLAIM, lambda p: [held[p[0]]] if p[0] in held else [{"[applied]": True}])
    session.runs.clear()
    answers = store.claim([mine, theirs, mine, replay])
    # One round trip: the claims and the notifications' upserts all go out at once.
    assert session.runs == [(3 + 3 + 3, 64)]
    assert answers == [
        None,
        LedgerRow("push.apns/3@7", "retry_scheduled", 2, 2, 503, "503", 99.5),
        LedgerRow(EARLIER_COPY_IN_CALL, "sending", 0, 0),  # the same key twice: not the owner
        LedgerRow("push.apns/0@1", "sending", 0, 0),  # a replay of the owner: its own row
    ]
    now_ms = round(NOW * 1000)
    assert session.executed(CLAIM) == [
        ("p1:u1", "d1", "apns", "push.apns/0@1", now_ms, TTL),
        ("p1:u2", "d1", "apns", "push.apns/0@1", now_ms, TTL),
        ("p1:u3", "d1", "apns", "push.apns/0@1", now_ms, TTL),
    ]
    created_ms = round(created * 1000)
    # Every notification of the call, month of the post, written beside the claims (the same
    # rows whoever owns a send: idempotent upserts).
    assert session.executed("INTO ks.notifications_by_id") == [
        ("p1:u1", "u1", "p1", "a1", "new_post/v1", created_ms, "2026-03", TTL),
        ("p1:u2", "u2", "p1", "a1", "new_post/v1", created_ms, "2026-03", TTL),
        ("p1:u3", "u3", "p1", "a1", "new_post/v1", created_ms, "2026-03", TTL),
    ]
    assert session.executed("INTO ks.notifications_by_user") == [
        ("u1", "2026-03", created_ms, "p1:u1", "p1", "a1", "new_post/v1", TTL),
        ("u2", "2026-03", created_ms, "p1:u2", "p1", "a1", "new_post/v1", TTL),
        ("u3", "2026-03", created_ms, "p1:u3", "p1", "a1", "new_post/v1", TTL),
    ]
    assert store.claim([]) == []


def test_a_slice_is_claimed_in_one_round_trip() -> None:
    """300 items of a bulk slice: 300 claims and 600 notification upserts in one wave."""
    store, session = notification_store()
    session.on(CLAIM, applied)
    session.runs.clear()
    reqs = [request(f"u{i}", "d1", post="p9", source="push.apns.bulk/0@3") for i in range(300)]
    assert store.claim(reqs) == [None] * 300
    assert session.runs == [(900, 900)]
    assert len(session.executed(CLAIM)) == 300


def test_a_claim_over_an_expired_claims_remnant_retakes_it_or_reads_the_winner() -> None:
    store, session = notification_store()
    remnant = {
        "[applied]": False,
        "notification_id": "p1:u1",
        "device_id": "d1",
        "owner": None,
        "state": "accepted",
        "attempts": 1,
        "schedules": 0,
        "status": 200,
        "reason": None,
        "due_at": None,
    }
    session.on(CLAIM, [remnant])
    session.on(RECLAIM, applied)
    r = request("u1", post="p1", source="push.apns/0@5")
    assert store.claim([r]) == [None]
    assert session.executed(RECLAIM) == [
        (TTL, "apns", "push.apns/0@5", round(NOW * 1000), "p1:u1", "d1")
    ]
    assert len(session.executed("INTO ks.notifications_by_id")) == 1
    session.on(RECLAIM, [{"[applied]": False, "owner": "push.apns/1@1"}])
    session.on(
        SERIAL_ROW,
        [
            {
                "notification_id": "p1:u1",
                "device_id": "d1",
                "owner": "push.apns/1@1",
                "state": "sending",
                "attempts": 0,
                "schedules": 0,
                "status": None,
                "reason": None,
                "due_at": None,
            }
        ],
    )
    assert store.claim([r]) == [LedgerRow("push.apns/1@1", "sending", 0, 0)]
    assert session.executed(SERIAL_ROW) == [("p1:u1", "d1")]
    session.on(SERIAL_ROW, [])
    with pytest.raises(cn.ClaimConflict, match="retry the batch"):
        store.claim([r])


def test_rows_read_each_key_once_and_treat_an_ownerless_row_as_absent() -> None:
    store, session = notification_store()
    rows: dict[tuple[str, str], dict[str, Any]] = {
        ("p1:u1", "d1"): {
            "owner": "push.apns/0@1",
            "state": "accepted",
            "attempts": 1,
            "schedules": 0,
            "status": 200,
            "reason": None,
            "due_at": None,
        },
        ("p1:u2", "d1"): {
            "owner": None,
            "state": "accepted",
            "attempts": 1,
            "schedules": 0,
            "status": 200,
            "reason": None,
            "due_at": None,
        },
    }
    session.on("SELECT owner, state", lambda p: [rows[p]] if p in rows else [])
    keys = [("p1:u1", "d1"), ("p1:u2", "d1"), ("p1:u9", "d1"), ("p1:u1", "d1")]
    row = LedgerRow("push.apns/0@1", "accepted", 1, 0, 200)
    assert store.rows(keys) == [row, None, None, row]
    assert session.executed("SELECT owner, state") == [
        ("p1:u1", "d1"),
        ("p1:u2", "d1"),
        ("p1:u9", "d1"),
    ]


def test_take_over_is_a_conditional_update_on_state_and_schedules() -> None:
    store, session = notification_store()
    session.on(
        TAKE_OVER,
        lambda p: (
            [{"[applied]": True}]
            if p[-1] == 2
            else [{"[applied]": False, "state": "retry_scheduled", "schedules": 2}]
        ),
    )
    due = request("u1", post="p1", source="push.retry/0@2", seq=2)
    stale = request("u2", post="p1", source="push.retry/0@3", seq=1)
    assert store.take_over([due, stale, due]) == [True, False, False]
    now_ms = round(NOW * 1000)
    assert session.executed(TAKE_OVER) == [
        (TTL, "push.retry/0@2", "apns", now_ms, "p1:u1", "d1", 2),
        (TTL, "push.retry/0@3", "apns", now_ms, "p1:u2", "d1", 1),
    ]  # the second copy of a key never reaches Cassandra
    assert store.take_over([]) == []


def test_record_updates_each_row_once_and_logs_the_attempts_made() -> None:
    store, session = notification_store()
    k1, k2 = ("p1:u1", "d1"), ("p1:u2", "d1")
    store.record(
        [
            LedgerUpdate(k1, "retry_scheduled", 1, 1, 503, "503", 1234.5, True),
            LedgerUpdate(k2, "expired", 0, 0),
            LedgerUpdate(k1, "accepted", 2, 1, 200, None, None, True),
        ],
        1_700_000_000.25,
    )
    at_ms = 1_700_000_000_250
    assert session.executed("SET state = ?") == [
        (TTL, "accepted", 2, 1, 200, None, None, at_ms, "p1:u1", "d1"),
        (TTL, "expired", 0, 0, None, None, None, at_ms, "p1:u2", "d1"),
    ]
    assert session.executed("INTO ks.delivery_attempts") == [
        ("p1:u1", at_ms, "d1", 1, "retry_scheduled", 503, "503", TTL),
        ("p1:u1", at_ms, "d1", 2, "accepted", 200, None, TTL),
    ]
    # One bounded concurrent run: p1:u1's row and its two attempts as one batch, p1:u2's alone.
    assert session.runs == [(2, 64)]
    [batch] = session.batches
    assert (str(batch.batch_type), batch.consistency_level) == ("UNLOGGED", CL.LOCAL_QUORUM)
    assert [(s.query_string.split()[0], p[-2:]) for s, p in batch.statements] == [
        ("UPDATE", ("p1:u1", "d1")),
        ("INSERT", ("503", TTL)),
        ("INSERT", (None, TTL)),
    ]
    store.record([], NOW)
    assert session.runs == [(2, 64)]


def test_a_notifications_writes_are_batched_by_partition_and_capped() -> None:
    store, session = notification_store()
    devices = [("p1:u1", f"d{i}") for i in range(10)]
    store.record(
        [LedgerUpdate(k, "accepted", 1, 0, 200, None, None, True) for k in devices]
        + [LedgerUpdate(("p1:u2", "d1"), "accepted", 1, 0, 200, None, None, True)],
        NOW,
    )
    # p1:u1: 10 rows and 10 attempts in batches of at most 16; p1:u2: its row and attempt.
    assert [len(b.statements) for b in session.batches] == [16, 4, 2]
    # Every batch stays on one partition: the UPDATE's key ends its parameters, the INSERT's
    # starts them.
    partitions = [
        {p[-2] if s.query_string.startswith("UPDATE") else p[0] for s, p in batch.statements}
        for batch in session.batches
    ]
    assert partitions == [{"p1:u1"}, {"p1:u1"}, {"p1:u2"}]
    assert session.runs == [(3, 64)]


def test_acks_move_forward_keep_the_claims_ttl_and_name_what_matched_nothing() -> None:
    store, session = notification_store()
    claims: dict[tuple[str, str], dict[str, Any]] = {
        ("p1:u1", "d1"): {"owner": "push.apns/0@1", "ack": "opened", "owner_ttl": 5000},
        ("p1:u1", "d2"): {"owner": "push.apns/0@1", "ack": None, "owner_ttl": 4000},
        ("p1:u1", "d3"): {"owner": None, "ack": "delivered", "owner_ttl": None},  # a remnant
    }
    session.on("TTL(owner)", lambda p: [claims[p]] if p in claims else [])
    session.on(
        "SELECT notification_id FROM ks.notifications_by_id",
        lambda p: [{"notification_id": "p1:u1"}] if p == ("p1:u1",) else [],
    )
    ts = datetime(2026, 3, 10, tzinfo=UTC)
    outcomes = store.apply_acks(
        [
            NotificationAck("p1:u1", "d1", "delivered", ts),
            NotificationAck("p1:u1", "d2", "delivered", ts),
            NotificationAck("p1:u1", "d2", "opened", ts),
            NotificationAck("p1:u1", "d2", "delivered", ts),
            NotificationAck("p1:u1", "d3", "opened", ts),
            NotificationAck("p9:u1", "d1", "opened", ts),
        ]
    )
    assert outcomes == [
        "applied",
        "applied",
        "applied",
        "applied",
        "unknown_device",
        "unknown_notification",
    ]
    now_ms = round(NOW * 1000)
    assert session.executed("SET ack = ?") == [
        (5000, "opened", now_ms, "p1:u1", "d1"),  # never back from opened to delivered
        (4000, "opened", now_ms, "p1:u1", "d2"),  # folded in order: one write per device
    ]
    assert session.executed("SELECT notification_id FROM ks.notifications_by_id") == [
        ("p1:u1",),
        ("p9:u1",),
    ]
    assert store.apply_acks([]) == []


def test_notification_devices_and_attempts_for_status() -> None:
    store, session = notification_store()
    assert store.notification("p1:u1") is None
    assert store.notification_status("p1:u1") == "unknown"
    created = ms(2026, 3, 9, 8) + 123
    session.on(
        "FROM ks.notifications_by_id WHERE",
        [
            {
                "user_id": "u1",
                "post_id": "p1",
                "author_id": "a1",
                "template": "new_post/v1",
                "created_at": stamp(created),
            }
        ],
    )
    session.on(
        DEVICES,
        [
            {
                "device_id": "d1",
                "provider": "apns",
                "owner": "o",
                "state": "invalid_token",
                "attempts": 1,
                "ack": None,
                "updated_at": stamp(ms(2026, 3, 9, 9)),
            },
            {
                "device_id": "d2",
                "provider": "fcm",
                "owner": "o",
                "state": "accepted",
                "attempts": 2,
                "ack": "delivered",
                "updated_at": stamp(ms(2026, 3, 9, 10)),
            },
            {
                "device_id": "d3",
                "provider": "fcm",
                "owner": None,
                "state": "sending",
                "attempts": 0,
                "ack": None,
                "updated_at": None,
            },
        ],
    )
    note = store.notification("p1:u1")
    assert note is not None
    assert (
        note.notification_id,
        note.user_id,
        note.post_id,
        note.author_id,
        note.template,
        note.created_ms,
        note.status,
    ) == ("p1:u1", "u1", "p1", "a1", "new_post/v1", created, "delivered")
    assert [
        (d.device_id, d.provider, d.state, d.attempts, d.ack, d.updated_at)
        for d in store.devices("p1:u1")
    ] == [
        ("d1", "apns", "invalid_token", 1, None, ms(2026, 3, 9, 9) / 1000),
        ("d2", "fcm", "accepted", 2, "delivered", ms(2026, 3, 9, 10) / 1000),
    ]
    t1, t2, t3 = ms(2026, 3, 9, 9), ms(2026, 3, 9, 10), ms(2026, 3, 9, 11)
    session.on(
        "FROM ks.delivery_attempts",
        [
            {
                "attempted_at": stamp(t1),
                "device_id": "d2",
                "attempt": 1,
                "state": "retry_scheduled",
                "status": 503,
                "reason": "503",
            },
            {
                "attempted_at": stamp(t2),
                "device_id": "d1",
                "attempt": 1,
                "state": "invalid_token",
                "status": 410,
                "reason": "Unregistered",
            },
            {
                "attempted_at": stamp(t3),
                "device_id": "d2",
                "attempt": 1,
                "state": "retry_scheduled",
                "status": 503,
                "reason": "503",
            },  # a replay
            {
                "attempted_at": stamp(t3),
                "device_id": "d2",
                "attempt": 2,
                "state": "accepted",
                "status": 200,
                "reason": None,
            },
        ],
    )
    assert [(a.device_id, a.attempt, a.at, a.state, a.status) for a in store.attempts("p1:u1")] == [
        ("d1", 1, t2 / 1000, "invalid_token", 410),
        ("d2", 1, t3 / 1000, "retry_scheduled", 503),
        ("d2", 2, t3 / 1000, "accepted", 200),
    ]


def inbox_rows(*items: tuple[int, str]) -> Rows:
    return [
        {
            "notification_id": nid,
            "post_id": nid.split(":")[0],
            "author_id": "a1",
            "template": "new_post/v1",
            "created_at": stamp(t),
        }
        for t, nid in items
    ]


def test_inbox_walks_months_newest_first_and_stops_at_the_ttl_bound() -> None:
    store, session = notification_store(ttl_s=40 * 86_400)  # now - ttl falls in January
    assert store.inbox("u1", None, 5).notifications == []
    assert session.executed(INBOX) == [
        ("u1", "2026-03", 6),
        ("u1", "2026-02", 6),
        ("u1", "2026-01", 6),
    ]


def test_inbox_with_a_seven_day_ttl_reads_one_month_and_the_next_on_a_months_last_day() -> None:
    store, session = notification_store()  # 2026-03-10: seven days back is still March
    store.inbox("u1", None, 5)
    assert [p[1] for p in session.executed(INBOX)] == ["2026-03"]
    early, early_session = notification_store(now=datetime(2026, 3, 2, tzinfo=UTC).timestamp())
    early.inbox("u1", None, 5)
    assert [p[1] for p in early_session.executed(INBOX)] == ["2026-03", "2026-02"]
    late, late_session = notification_store(now=datetime(2026, 3, 31, 20, tzinfo=UTC).timestamp())
    late.inbox("u1", None, 5)
    assert [p[1] for p in late_session.executed(INBOX)] == ["2026-04", "2026-03"]


def test_inbox_pages_across_months_with_a_cursor() -> None:
    store, session = notification_store(ttl_s=90 * 86_400)
    march = inbox_rows((ms(2026, 3, 9), "p5:u1"), (ms(2026, 3, 2), "p4:u1"))
    february = inbox_rows(
        (ms(2026, 2, 20), "p3:u1"), (ms(2026, 2, 10), "p2:u1"), (ms(2026, 2, 1), "p1:u1")
    )
    by_month = {"2026-03": march, "2026-02": february}
    session.on(INBOX, lambda p: by_month.get(p[1], [])[: p[-1]])
    session.on(
        DEVICES,
        [
            {
                "device_id": "d1",
                "provider": "apns",
                "owner": "o",
                "state": "accepted",
                "attempts": 1,
                "ack": None,
                "updated_at": None,
            }
        ],
    )
    page = store.inbox("u1", None, 3)
    assert [n.notification_id for n in page.notifications] == ["p5:u1", "p4:u1", "p3:u1"]
    assert {n.status for n in page.notifications} == {"dispatched"}
    assert [n.created_ms for n in page.notifications] == [
        ms(2026, 3, 9),
        ms(2026, 3, 2),
        ms(2026, 2, 20),
    ]
    assert page.next_cursor == encode_cursor("u1", ms(2026, 2, 20), "p3:u1")
    assert session.executed(INBOX) == [
        ("u1", "2026-03", 4),
        ("u1", "2026-02", 2),
    ]  # stops: it has 4
    session.calls.clear()
    session.on("AND (created_at, notification_id) < (?, ?)", lambda p: february[1:][: p[-1]])
    second = store.inbox("u1", page.next_cursor, 3)
    assert [n.notification_id for n in second.notifications] == ["p2:u1", "p1:u1"]
    assert second.next_cursor is None
    assert session.executed(INBOX) == [
        ("u1", "2026-02", ms(2026, 2, 20), "p3:u1", 4),  # the cursor's month, after the cursor
        ("u1", "2026-01", 2),
        ("u1", "2025-12", 2),  # 90 days before 2026-03-10 is in December
    ]


def test_inbox_refuses_bad_cursors_and_limits() -> None:
    store, _ = notification_store()
    with pytest.raises(InvalidCursor):
        store.inbox("u1", encode_cursor("u2", ms(2026, 3, 1), "p1:u2"), 3)
    with pytest.raises(InvalidCursor):
        store.inbox("u1", "not-a-cursor", 3)
    with pytest.raises(ValueError, match="at least 1"):
        store.inbox("u1", None, 0)


def test_month_buckets_and_driver_timestamps() -> None:
    assert cn.month_bucket(ms(2026, 1, 31, 23)) == "2026-01"
    assert cn.month_bucket(ms(2026, 12, 1)) == "2026-12"
    assert cs.epoch_ms(stamp(1_767_225_600_123)) == 1_767_225_600_123
    assert cs.epoch_ms(datetime(2026, 1, 1, tzinfo=UTC)) == ms(2026, 1, 1)


# -- URLs, passwords, connecting -------------------------------------------------------------


def test_parse_url_reads_hosts_port_keyspace_and_options() -> None:
    assert cs.parse_url("cassandra://127.0.0.1/fanfare") == cs.CassandraUrl(
        ("127.0.0.1",), 9042, "fanfare"
    )
    assert cs.parse_url(
        "cassandra://c1,c2:9142/fan_1?dc=dc1&replication=3&consistency=QUORUM"
    ) == cs.CassandraUrl(("c1", "c2"), 9142, "fan_1", "dc1", 3, "quorum")
    assert cs.parse_url("cassandra://[::1]:9043,c2:9043/ks").hosts == ("::1", "c2")
    assert cs.parse_url("cassandra://c1/ks").where == "c1:9042/ks"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("sqlite:///x.db", "it must start with cassandra://"),
        ("cassandra:///ks", "name at least one host"),
        ("cassandra://c1", "name the keyspace"),
        ("cassandra://c1/", "name the keyspace"),
        ("cassandra://c1/my-keyspace", "keyspace 'my-keyspace' must be a letter"),
        ("cassandra://c1/9ks", "keyspace '9ks' must be a letter"),
        ("cassandra://c1:90x/ks", "port '90x' is not a whole number"),
        ("cassandra://c1:0/ks", "port 0 is out of range 1 to 65535"),
        ("cassandra://c1:9042,c2:9043/ks", "every host must use the same port, got [9042, 9043]"),
        ("cassandra://c1,,c2/ks", "cannot read host ''"),
        ("cassandra://user:pw@c1/ks", "credentials do not go in the URL"),
        ("cassandra://c1/ks?region=eu", "unknown option(s) ['region']"),
        ("cassandra://c1/ks?dc=a&dc=b", "option(s) ['dc'] given more than once"),
        ("cassandra://c1/ks?dc=", "dc '' is not a datacenter name"),
        ("cassandra://c1/ks?replication=0", "replication 0 is out of range 1 to 99"),
        ("cassandra://c1/ks?replication=three", "replication 'three' is not a whole number"),
        ("cassandra://c1/ks?consistency=one", "consistency 'one': use local_quorum or quorum"),
    ],
)
def test_parse_url_says_what_is_wrong(url: str, why: str) -> None:
    with pytest.raises(ValueError) as caught:
        cs.parse_url(url)
    message = str(caught.value)
    assert why in message
    assert message.startswith(f"bad Cassandra store URL {url!r}: ")
    assert message.endswith(
        "the form is cassandra://host1,host2[:port]/keyspace[?dc=DC&replication=N&consistency=LEVEL]"
    )


def test_passwords_come_from_a_file_and_errors_never_show_them(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cr3t pass\n")
    assert cs.read_password(secret) == "s3cr3t pass"
    with pytest.raises(ValueError, match=r"cannot read the Cassandra password file .*missing"):
        cs.read_password(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        cs.read_password(tmp_path / "empty")
    with pytest.raises(ValueError, match="needs both a username and a password file"):
        cs.connect(cs.parse_url("cassandra://127.0.0.1/ks"), username="fanfare")


def test_connect_to_nothing_raises_the_drivers_no_host_available() -> None:
    from cassandra.cluster import NoHostAvailable  # type: ignore[import-untyped]

    with pytest.raises(NoHostAvailable):
        cs.connect(cs.parse_url("cassandra://127.0.0.1:1/ks"), connect_timeout_s=2)


# -- CQL files and migrations ----------------------------------------------------------------


def test_split_cql_handles_comments_strings_and_semicolons() -> None:
    script = """
    -- a comment; with a semicolon
    CREATE TABLE t (k text PRIMARY KEY, v text); // another; comment
    /* a block;
       comment */ INSERT INTO t (k, v) VALUES ('a;b', 'it''s; fine');
    INSERT INTO "odd;name" (k) VALUES ('--not a comment');
    CREATE FUNCTION f (x int) CALLED ON NULL INPUT RETURNS int LANGUAGE java AS $$ return x; $$;
    ;;
    SELECT * FROM t WHERE k = 'x'  -- no semicolon at the end
    """
    assert cs.split_cql(script) == [
        "CREATE TABLE t (k text PRIMARY KEY, v text)",
        "INSERT INTO t (k, v) VALUES ('a;b', 'it''s; fine')",
        "INSERT INTO \"odd;name\" (k) VALUES ('--not a comment')",
        "CREATE FUNCTION f (x int) CALLED ON NULL INPUT RETURNS int LANGUAGE java AS $$ return x; $$",
        "SELECT * FROM t WHERE k = 'x'",
    ]
    for broken, what in (
        ("SELECT 'open", "unterminated ' literal"),
        ("/* open", "unterminated /\\* comment"),
    ):
        with pytest.raises(ValueError, match=what):
            cs.split_cql(broken)


def test_the_initial_schema_file_has_every_table_with_ttls_on_the_hot_ones() -> None:
    files = cs.migration_files()
    assert [(m.version, m.name) for m in files] == [(1, "initial"), (2, "follower_versions")]
    text = files[0].path.read_text().replace("{keyspace}", "ks").replace("{ttl_s}", "604800")
    statements = cs.split_cql(text)
    tables = [
        s.split("(")[0].removeprefix("CREATE TABLE IF NOT EXISTS ks.").strip() for s in statements
    ]
    assert tables == [
        "schema_migrations",
        "followers",
        "author_stats",
        "store_meta",
        "notifications_by_user",
        "notifications_by_id",
        "delivery_claims",
        "delivery_attempts",
    ]
    with_ttl = [
        t for t, s in zip(tables, statements, strict=True) if "default_time_to_live = 604800" in s
    ]
    assert with_ttl == [
        "notifications_by_user",
        "notifications_by_id",
        "delivery_claims",
        "delivery_attempts",
    ]
    inbox = statements[tables.index("notifications_by_user")]
    assert "PRIMARY KEY ((user_id, month), created_at, notification_id)" in inbox
    assert "CLUSTERING ORDER BY (created_at DESC, notification_id DESC)" in inbox
    assert "PRIMARY KEY ((author_id, shard_id), follower_id)" in statements[1]
    assert (
        "PRIMARY KEY ((notification_id), device_id)" in statements[tables.index("delivery_claims")]
    )
    assert "PRIMARY KEY ((notification_id), attempted_at, device_id, attempt)" in statements[-1]
    assert all("{" not in s for s in statements)


def migration_session() -> tuple[FakeSession, list[tuple[Any, ...]]]:
    session = FakeSession()
    recorded: list[tuple[Any, ...]] = []

    def record(params: tuple[Any, ...]) -> Rows:
        recorded.append(params)
        return []

    session.on(
        "SELECT version FROM ks.schema_migrations", lambda p: [{"version": r[0]} for r in recorded]
    )
    session.on("INSERT INTO ks.schema_migrations", record)
    return session, recorded


def test_migrate_applies_files_in_order_once(tmp_path: Path) -> None:
    (tmp_path / "002_inbox_index.cql").write_text("ALTER TABLE {keyspace}.t ADD extra text; -- 2\n")
    (tmp_path / "001_initial.cql").write_text(
        "CREATE TABLE IF NOT EXISTS {keyspace}.t (k text PRIMARY KEY) WITH default_time_to_live = {ttl_s};\n"
        "CREATE TABLE IF NOT EXISTS {keyspace}.u (k text PRIMARY KEY);"
    )
    session, recorded = migration_session()
    assert cs.migrate(
        session, KS, ttl_s=3600.5, replication=3, cql_dir=tmp_path, clock=lambda: NOW
    ) == [1, 2]
    assert [text for text, _ in session.calls] == [
        "CREATE KEYSPACE IF NOT EXISTS ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 3}",
        "CREATE TABLE IF NOT EXISTS ks.schema_migrations (version int PRIMARY KEY, name text, applied_at timestamp)",
        "SELECT version FROM ks.schema_migrations",
        "CREATE TABLE IF NOT EXISTS ks.t (k text PRIMARY KEY) WITH default_time_to_live = 3601",
        "CREATE TABLE IF NOT EXISTS ks.u (k text PRIMARY KEY)",
        "INSERT INTO ks.schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
        "ALTER TABLE ks.t ADD extra text",
        "INSERT INTO ks.schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
    ]
    assert recorded == [(1, "initial", round(NOW * 1000)), (2, "inbox_index", round(NOW * 1000))]
    session.calls.clear()
    assert cs.migrate(session, KS, ttl_s=3600, cql_dir=tmp_path) == []  # the second run
    assert [text.split(" WITH")[0] for text, _ in session.calls] == [
        "CREATE KEYSPACE IF NOT EXISTS ks",
        "CREATE TABLE IF NOT EXISTS ks.schema_migrations (version int PRIMARY KEY, name text, applied_at timestamp)",
        "SELECT version FROM ks.schema_migrations",
    ]
    (tmp_path / "003_more.cql").write_text(
        "CREATE TABLE IF NOT EXISTS {keyspace}.v (k int PRIMARY KEY);"
    )
    assert cs.migrate(session, KS, ttl_s=3600, cql_dir=tmp_path) == [3]


def test_keyspace_replication_and_bad_migration_files(tmp_path: Path) -> None:
    assert cs.keyspace_cql("ks", 3, "dc1") == (
        "CREATE KEYSPACE IF NOT EXISTS ks WITH replication = {'class': 'NetworkTopologyStrategy', 'dc1': 3}"
    )
    with pytest.raises(ValueError, match="must be a letter"):
        cs.keyspace_cql("drop table", 1)
    with pytest.raises(ValueError, match="not a datacenter name"):
        cs.keyspace_cql("ks", 1, "dc1'}; DROP")
    (tmp_path / "1_x.cql").write_text("")
    with pytest.raises(ValueError, match=r"named NNN_name\.cql"):
        cs.migration_files(tmp_path)
    (tmp_path / "1_x.cql").unlink()
    (tmp_path / "001_a.cql").write_text("")
    (tmp_path / "0001_b.cql").write_text("")
    with pytest.raises(ValueError, match="have the same version 1"):
        cs.migration_files(tmp_path)


# -- fanfare store migrate -------------------------------------------------------------------


def migrate_args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(replication=kw.get("replication"), dc=kw.get("dc"))


def test_store_migrate_on_sqlite_creates_then_reports_up_to_date(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(home=tmp_path, shard_count=8)
    assert store_cli.command(migrate_args(), settings) == 0
    first = capsys.readouterr().out.splitlines()
    assert first[0] == f"follower store {tmp_path / 'store.db'}: created (8 shards)"
    assert first[1].startswith(
        f"notification store {tmp_path / 'notifications.db'}: applied schema version(s) 1"
    )
    assert store_cli.command(migrate_args(), settings) == 0
    second = capsys.readouterr().out.splitlines()
    assert second[0] == f"follower store {tmp_path / 'store.db'}: ready (8 shards)"
    assert second[1].startswith(
        f"notification store {tmp_path / 'notifications.db'}: up to date (schema version "
    )
    assert store_cli.command(migrate_args(), settings.with_overrides(shard_count=4)) == 1
    assert "FANFARE_SHARDS=4" in capsys.readouterr().err


def test_store_migrate_on_cassandra_applies_the_schema_and_records_the_shard_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    session, _ = migration_session()
    session.on("store_meta", applied)
    connected: list[cs.CassandraUrl] = []

    def fake_connect(url: cs.CassandraUrl, **kw: Any) -> FakeSession:
        connected.append(url)
        assert kw == {"username": None, "password_file": None}
        return session

    monkeypatch.setattr(cs, "connect", fake_connect)
    url = "cassandra://127.0.0.1/ks?replication=1"
    settings = Settings(home=tmp_path, store_url=url, notification_store_url=url, shard_count=8)
    assert store_cli.command(migrate_args(replication=3, dc="dc1"), settings) == 0
    assert len(connected) == 1  # one keyspace: one connection, one migration
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "follower store and notification store on Cassandra 127.0.0.1:9042/ks: applied "
        "001_initial, 002_follower_versions",
        "follower store: shard count 8 recorded",
    ]
    assert session.calls[0][0] == (
        "CREATE KEYSPACE IF NOT EXISTS ks WITH replication = {'class': 'NetworkTopologyStrategy', 'dc1': 3}"
    )
    assert session.cluster.shutdowns == 1
    session.on("store_meta", [{"[applied]": False, "value": "8"}])
    assert store_cli.command(migrate_args(), settings) == 0
    assert capsys.readouterr().out.splitlines() == [
        "follower store and notification store on Cassandra 127.0.0.1:9042/ks: up to date (schema version 2)",
        "follower store: shard count 8 matches the keyspace",
    ]


def test_store_migrate_says_when_cassandra_cannot_be_reached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(home=tmp_path, notification_store_url="cassandra://127.0.0.1:1/ks")
    assert store_cli.command(migrate_args(), settings) == 1
    err = capsys.readouterr().err
    assert err.startswith("fanfare: cannot connect to Cassandra at 127.0.0.1:1/ks: 127.0.0.1:1: ")
    assert "Connection refused" in err and "docker compose up -d cassandra" in err
    bad = Settings(home=tmp_path, store_url="cassandra://127.0.0.1/no-such-ks")
    assert store_cli.command(migrate_args(), bad) == 2
    assert "keyspace 'no-such-ks' must be a letter" in capsys.readouterr().err


def test_follower_column_reads_long_runs_after_the_cursor_and_packs_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cf, "_COLUMN_RUN", 2)
    store, session = follower_store()
    rows = [
        {"follower_id": "u1", "notify_on_post": True, "muted": False},
        {"follower_id": "u3", "notify_on_post": True, "muted": True},
        {"follower_id": "ü2", "notify_on_post": False, "muted": None},
    ]

    def page(params: tuple[Any, ...]) -> list[dict[str, Any]]:
        _, _, after, limit = params
        return [dict(r) for r in rows if r["follower_id"] > after][:limit]

    session.on("follower_id > ?", page)
    column = store.follower_column("a", 2)
    assert column.ids() == ["u1", "u3", "ü2"]
    assert column.flags.tolist() == [1, 3, 0]
    # A full run asks for more after its last id; the short one ends the column.
    assert session.executed("follower_id > ?") == [("a", 2, "", 2), ("a", 2, "u3", 2)]
