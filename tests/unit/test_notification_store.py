from __future__ import annotations

import multiprocessing
from pathlib import Path

from operators.adapters.notification_store import (
    LedgerUpdate,
    SQLiteNotificationStore,
    aggregate_status,
    open_notification_store,
)
from operators.delivery_model import LedgerRow
from tests.delivery_fakes import request


def test_claim_creates_once_and_answers_the_holder(tmp_path: Path) -> None:
    store = SQLiteNotificationStore(tmp_path / "n.db")
    a, b = request("u1", source="push.apns/0@1"), request("u2", source="push.apns/0@1")
    assert store.claim([a, b]) == [None, None]
    again = store.claim([request("u1", source="push.apns/1@9")])
    assert again == [LedgerRow("push.apns/0@1", "sending", 0, 0)]
    # The same item twice in one call: the first copy owns it, the second is not the owner.
    c = request("u3", source="push.apns/0@2")
    first, second = store.claim([c, c])
    assert first is None and second is not None and second.owner != c.source


def test_take_over_only_for_the_awaited_retry(tmp_path: Path) -> None:
    store = SQLiteNotificationStore(tmp_path / "n.db")
    r = request(source="push.apns/0@1")
    store.claim([r])
    store.record([LedgerUpdate(r.key, "retry_scheduled", 1, 1, 503, "503", 10.0, True)], 1.0)
    stale = request(source="push.retry/0@1", seq=2)
    due = request(source="push.retry/0@2", seq=1)
    assert store.take_over([stale, due, due]) == [False, True, False]
    assert store.rows([r.key]) == [LedgerRow("push.retry/0@2", "sending", 1, 1, 503, "503", 10.0)]


def test_status_is_aggregated_from_devices(tmp_path: Path) -> None:
    store = SQLiteNotificationStore(tmp_path / "n.db")
    d1, d2 = request("u1", "d1"), request("u1", "d2")
    store.claim([d1, d2])
    assert store.notification_status("p1:u1") == "pending"
    store.record(
        [LedgerUpdate(d1.key, "invalid_token", 1, 0, 410, "Unregistered", None, True)], 2.0
    )
    assert store.notification_status("p1:u1") == "pending"
    store.record([LedgerUpdate(d2.key, "dead_lettered", 8, 7, 503, "503", None, True)], 3.0)
    assert store.notification_status("p1:u1") == "exhausted"
    store.record([LedgerUpdate(d2.key, "accepted", 9, 7, 200, None, None, True)], 4.0)
    assert store.notification_status("p1:u1") == "dispatched"
    assert [(a.device_id, a.attempt, a.state) for a in store.attempts("p1:u1")] == [
        ("d1", 1, "invalid_token"),
        ("d2", 8, "dead_lettered"),
        ("d2", 9, "accepted"),
    ]
    assert store.notification_status("nope") == "unknown"
    assert aggregate_status(["sending", "accepted"]) == "dispatched"
    assert store.state_counts() == {"accepted": 1, "invalid_token": 1}


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
