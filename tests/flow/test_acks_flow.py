"""The acks graph with Bytewax's TestingSource/TestingSink and a real SQLite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from bytewax.testing import TestingSink, TestingSource, run_main

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
