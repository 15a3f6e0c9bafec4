from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

from operators.adapters.stores.by_url import open_notification_store
from operators.adapters.stores.sqlite_notifications import (
    _MIGRATIONS,
    SQLiteNotificationStore,
    migrate_sqlite,
)
from operators.delivery.ledger import LedgerUpdate, aggregate_status
from operators.delivery.model import LedgerRow
from tests.fakes import request

# The port's behaviour is the contract suite's (tests/contract); here, what is SQLite's own.


def test_a_delivery_issue_file_is_upgraded_in_place_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(_MIGRATIONS[0])  # the schema files were written with, user_version 0
    conn.execute(
        "INSERT INTO notifications VALUES ('p1:u1', 'p1', 'u1', 'a1', '2026-11-01T00:00:00Z', 1)"
    )
    conn.execute(
        "INSERT INTO deliveries VALUES ('p1:u1', 'd1', 'apns', 'push.apns/0@1', 'accepted', 1, 0,"
        " 200, NULL, NULL, 1)"
    )
    conn.commit()
    conn.close()
    store = SQLiteNotificationStore(path)
    assert store.migrated == [1, 2, 3]
    assert store.claim([request("u1", "d1", source="push.apns/0@7")]) == [
        LedgerRow("push.apns/0@1", "accepted", 1, 0, 200)
    ]
    assert store.notification_status("p1:u1") == "dispatched"
    assert [n.notification_id for n in store.inbox("u1", None, 5).notifications] == ["p1:u1"]
    assert SQLiteNotificationStore(path).migrated == []  # safe to open (migrate) twice
    assert migrate_sqlite(sqlite3.connect(path, isolation_level=None)) == []


def test_status_aggregation_order() -> None:
    assert aggregate_status([]) == "unknown"
    assert aggregate_status(["sending", "accepted"]) == "dispatched"
    assert aggregate_status(["accepted", "failed"], [None, "delivered"]) == "delivered"
    assert aggregate_status(["accepted", "accepted"], ["delivered", "opened"]) == "opened"
    assert aggregate_status(["expired", "failed"]) == "exhausted"
    assert aggregate_status(["retry_scheduled", "failed"]) == "pending"


def test_expired_rows_are_purged(tmp_path: Path) -> None:
    now = [1_000.0]
    store = SQLiteNotificationStore(tmp_path / "n.db", ttl_s=60, clock=lambda: now[0])
    r = request()
    store.claim([r])
    store.record([LedgerUpdate(r.key, "accepted", 1, 0, 200, None, None, True)], now[0])
    assert store.state_counts() == {"accepted": 1}
    now[0] += 61
    assert store.state_counts() == {}
    assert store.purge_expired() == 2  # the device row (with its attempt), the notification
    assert store.purge_expired() == 0


def _attempt_rows(path: Path) -> list[tuple[str, int, str]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT device_id, attempt, state FROM delivery_attempts ORDER BY attempt"
        ).fetchall()
    finally:
        conn.close()


def test_a_push_sent_once_keeps_its_attempt_in_its_row_and_a_later_one_moves_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "n.db"
    store = SQLiteNotificationStore(path)
    r = request()
    store.claim([r])
    store.record([LedgerUpdate(r.key, "retry_scheduled", 1, 1, 503, "503", 9.0, True)], 2.0)
    store.record([LedgerUpdate(r.key, "retry_scheduled", 1, 1, 503, "503", 9.0, True)], 2.5)
    assert _attempt_rows(path) == []  # the first attempt (and its replay) stay in the row
    store.record([LedgerUpdate(r.key, "sending", 1, 1)], 3.0)  # no attempt: the log is kept
    store.record([LedgerUpdate(r.key, "accepted", 2, 1, 200, None, None, True)], 4.0)
    assert _attempt_rows(path) == [("d1", 1, "retry_scheduled")]
    assert [(a.attempt, a.at, a.state, a.status) for a in store.attempts(r.key[0])] == [
        (1, 2.5, "retry_scheduled", 503),
        (2, 4.0, "accepted", 200),
    ]


def test_two_attempts_of_one_device_in_one_call_are_both_logged(tmp_path: Path) -> None:
    store = SQLiteNotificationStore(tmp_path / "n.db")
    r = request()
    store.claim([r])
    store.record(
        [
            LedgerUpdate(r.key, "retry_scheduled", 1, 1, 503, "503", 9.0, True),
            LedgerUpdate(r.key, "accepted", 2, 1, 200, None, None, True),
        ],
        2.0,
    )
    assert [(a.attempt, a.state) for a in store.attempts(r.key[0])] == [
        (1, "retry_scheduled"),
        (2, "accepted"),
    ]
    assert store.rows([r.key]) == [LedgerRow("push.apns/0@1", "accepted", 2, 1, 200)]


def test_a_reclaimed_row_forgets_the_expired_claims_attempt(tmp_path: Path) -> None:
    now = [1_000.0]
    store = SQLiteNotificationStore(tmp_path / "n.db", ttl_s=60, clock=lambda: now[0])
    r = request()
    store.claim([r])
    store.record([LedgerUpdate(r.key, "accepted", 1, 0, 200, None, None, True)], now[0])
    now[0] += 61  # expired, not purged: the claim takes the row over
    assert store.claim([r]) == [None]
    assert store.attempts(r.key[0]) == []
    store.record([LedgerUpdate(r.key, "accepted", 1, 0, 200, None, None, True)], now[0])
    assert [(a.attempt, a.at) for a in store.attempts(r.key[0])] == [(1, now[0])]


def test_an_attempt_logged_before_the_upgrade_and_replayed_after_is_listed_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "n.db"
    store = SQLiteNotificationStore(path)
    r = request()
    store.claim([r])
    conn = sqlite3.connect(path)
    conn.execute(  # as the schema before version 3 logged it
        "INSERT INTO delivery_attempts VALUES (?, ?, 1, 2.0, 'accepted', 200, NULL, 1e18)", r.key
    )
    conn.commit()
    conn.close()
    store.record([LedgerUpdate(r.key, "accepted", 1, 0, 200, None, None, True)], 3.0)
    assert [(a.attempt, a.at) for a in store.attempts(r.key[0])] == [(1, 3.0)]


def _claim_in_process(path: str, source: str, n: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = SQLiteNotificationStore(path)
    won = 0
    for i in range(n):
        if store.claim([request(f"u{i}", source=source)]) == [None]:
            won += 1
    out.put(won)


def test_concurrent_claimers_in_separate_processes_win_each_key_once(tmp_path: Path) -> None:
    path = str(tmp_path / "n.db")
    SQLiteNotificationStore(path)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_claim_in_process, args=(path, f"push.apns/{k}@1", 300, out))
        for k in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sum(out.get(timeout=5) for _ in procs) == 300


def test_open_names_what_it_supports(tmp_path: Path) -> None:
    assert isinstance(
        open_notification_store(f"sqlite:///{tmp_path}/x.db"), SQLiteNotificationStore
    )
    try:
        open_notification_store("mysql://x")
    except ValueError as exc:
        assert "sqlite:///PATH" in str(exc)
    else:
        raise AssertionError("an unsupported URL must be refused")


def test_ledger_rows_are_read_by_primary_key_not_by_a_table_scan(tmp_path: Path) -> None:
    # A scan made delivery slow down as the store grew (700 -> 190 pushes/s over 200k rows).
    store = SQLiteNotificationStore(tmp_path / "n.db")
    store.claim([request(f"u{i}") for i in range(50)])
    conn = store._conn()
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    store.rows([request("u1").key, request("u2").key])
    conn.set_trace_callback(None)
    [select] = [s for s in statements if "FROM" in s and "deliveries" in s]
    plan = " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {select}"))
    assert "SEARCH deliveries USING PRIMARY KEY" in plan, plan
    assert "SCAN deliveries" not in plan, plan


def test_a_first_attempt_over_a_row_holding_another_keeps_both_in_the_log(
    tmp_path: Path,
) -> None:
    store = SQLiteNotificationStore(tmp_path / "n.db")
    r, other = request(), request("u2")
    store.claim([r, other])
    store.record([LedgerUpdate(r.key, "retry_scheduled", 2, 1, 503, "503", 9.0, True)], 2.0)
    store.record(
        [
            LedgerUpdate(r.key, "accepted", 1, 1, 200, None, None, True),
            LedgerUpdate(other.key, "accepted", 1, 0, 200, None, None, True),
        ],
        3.0,
    )
    assert [(a.attempt, a.state) for a in store.attempts(r.key[0])] == [
        (2, "retry_scheduled"),
        (1, "accepted"),
    ]
    assert [(a.attempt, a.state) for a in store.attempts(other.key[0])] == [(1, "accepted")]
