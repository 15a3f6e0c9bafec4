"""The acks graph with Bytewax's TestingSource/TestingSink and a real SQLite store."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

from flows.acks import build_acks_flow
from operators.acks.steps import ApplyAcks
from operators.adapters.stores.sqlite_notifications import SQLiteNotificationStore
from operators.delivery.ledger import LedgerUpdate
from operators.events import RawEvent
from schemas.records import DeadLetter
from tests.fakes import request


def ack(offset: int, nid: str, device: str, event: str) -> RawEvent:
    value = orjson.dumps(
        {"notification_id": nid, "device_id": device, "event": event, "ts": "2026-11-22T10:00:00Z"}
    )
    return RawEvent("notification_acks", 0, offset, nid.encode(), value, 1.0)


def test_acks_update_status_and_unknown_or_malformed_ones_are_dead_lettered(
    tmp_path: Path,
) -> None:
    store = SQLiteNotificationStore(tmp_path / "n.db")
    d1, d2 = request("u1", "d1"), request("u1", "d2")
    other = request("u2", "d1")
    store.claim([d1, d2, other])
    store.record(
        [LedgerUpdate(r.key, "accepted", 1, 0, 200, None, None, True) for r in (d1, d2, other)],
        1.0,
    )
    events = [
        ack(0, "p1:u1", "d1", "delivered"),
        ack(1, "p1:u1", "d2", "opened"),
        ack(2, "p1:u1", "d2", "delivered"),  # late: opened stays
        ack(3, "p1:u2", "d1", "delivered"),
        ack(4, "p1:u1", "d7", "opened"),  # no such device
        ack(5, "p9:u9", "d1", "opened"),  # no such notification
        RawEvent("notification_acks", 0, 6, None, b'{"notification_id": "p1:u1"}', 1.0),
        ack(7, "p1:u1", "d1", "clicked"),  # not an ack event
    ]
    dead: list[Any] = []
    run_main(
        build_acks_flow(
            source=TestingSource(events),
            apply_acks=ApplyAcks(lambda: store),
            dead_letter_sink=TestingSink(dead),
        )
    )
    assert store.notification_status("p1:u1") == "opened"
    assert store.notification_status("p1:u2") == "delivered"
    assert {d.device_id: d.ack for d in store.devices("p1:u1")} == {
        "d1": "delivered",
        "d2": "opened",
    }
    # Keyed by source topic, the dead_letters topic's key (it picks the partition).
    assert all(k == "notification_acks" and isinstance(d, DeadLetter) for k, d in dead)
    by_offset = {d.offset: d.error for _, d in dead}
    assert sorted(by_offset) == [4, 5, 6, 7]
    assert by_offset[4].startswith("unknown_device: no device d7 of p1:u1")
    assert by_offset[5].startswith("unknown_notification: no p9:u9")
    assert by_offset[6].startswith("schema")
    assert by_offset[7].startswith("schema")


def test_a_worker_opens_its_store_once_in_a_cluster(tmp_path: Path) -> None:
    """With a threading.local the store was opened again on every call in a cluster."""
    store = SQLiteNotificationStore(tmp_path / "n.db")
    opened: list[int] = []

    def open_store() -> SQLiteNotificationStore:
        opened.append(1)
        return store

    events = [ack(i, f"p{i}:u1", "d1", "opened") for i in range(20)]
    dead: list[Any] = []
    cluster_main(
        build_acks_flow(
            source=TestingSource(events, batch_size=1),
            apply_acks=ApplyAcks(open_store),
            dead_letter_sink=TestingSink(dead),
        ),
        [],
        0,
        worker_count_per_proc=2,
    )
    assert len(dead) == 20  # none of them is in the store: each is dead-lettered
    assert 1 <= len(opened) <= 2  # once per worker that applied acks (it was once per call)


def test_a_step_s_error_is_logged_once_with_the_step_s_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In a cluster Bytewax prints no Python error, only "Send thread panic"."""

    def no_store() -> SQLiteNotificationStore:
        raise OSError("store unreachable")

    flow = build_acks_flow(
        source=TestingSource([ack(0, "p1:u1", "d1", "opened")]),
        apply_acks=ApplyAcks(no_store),
        dead_letter_sink=TestingSink([]),
    )
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="apply_acks"):
        run_main(flow)
    logged = [r.getMessage() for r in caplog.records if r.name == "flows.runtime.step_errors"]
    assert len(logged) == 1 and logged[0].startswith("acks.apply_acks raised OSError"), logged
