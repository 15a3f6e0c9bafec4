"""The notification store contract: ledger claims, retries, status, acks, inbox, TTL."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime

import pytest

from operators.delivery.ledger import InvalidCursor, LedgerUpdate
from operators.delivery.model import LedgerRow
from schemas.records import NotificationAck
from tests.contract.conftest import NotificationStoreFactory
from tests.fakes import request

TS = datetime(2026, 11, 22, tzinfo=UTC)


def unique(prefix: str) -> str:
    """Ids of their own: a Cassandra keyspace is shared by the tests of a run."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def ack(nid: str, device: str, event: str) -> NotificationAck:
    return NotificationAck(nid, device, event, TS)  # type: ignore[arg-type]


def test_claim_creates_once_and_answers_the_holder(
    notification_store_factory: NotificationStoreFactory,
) -> None:
    store = notification_store_factory()
    post = unique("p")
    a = request("u1", post=post, source="push.apns/0@1")
    b = request("u2", post=post, source="push.apns/0@1")
    assert store.claim([a, b]) == [None, None]
    again = store.claim([request("u1", post=post, source="push.apns/1@9")])
    assert again == [LedgerRow("push.apns/0@1", "sending", 0, 0)]
    c = request("u3", post=post, source="push.apns/0@2")
    first, second = store.claim([c, c])
    assert first is None and second is not None and second.owner != c.origin.key
    assert store.rows([a.key, (f"{post}:nobody", "d1")]) == [
        LedgerRow("push.apns/0@1", "sending", 0, 0),
        None,
    ]


def test_concurrent_claimers_win_each_key_exactly_once(
    notification_store_factory: NotificationStoreFactory,
) -> None:
    post = unique("p")
    keys = 200
    wins: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def claimer(k: int) -> None:
        try:
            store = notification_store_factory()
            source = f"push.apns/{k}@1"
            won = []
            for i in range(0, keys, 20):
                batch = [request(f"u{j}", post=post, source=source) for j in range(i, i + 20)]
                won += [i + n for n, row in enumerate(store.claim(batch)) if row is None]
            wins[source] = won
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    won = sorted(i for w in wins.values() for i in w)
    assert won == list(range(keys))  # every key once, none twice
    store = notification_store_factory()
    owners = store.rows([request(f"u{i}", post=post).key for i in range(keys)])
    for source, mine in wins.items():
        assert all(owners[i] is not None and owners[i].owner == source for i in mine)  # type: ignore[union-attr]


def test_take_over_only_for_the_awaited_retry(
    notification_store_factory: NotificationStoreFactory,
) -> None:
    store = notification_store_factory()
    post = unique("p")
    r = request(post=post, source="push.apns/0@1")
    store.claim([r])
    store.record([LedgerUpdate(r.key, "retry_scheduled", 1, 1, 503, "503", 10.0, True)], 1.0)
    stale = request(post=post, source="push.retry/0@1", seq=2)
    due = request(post=post, source="push.retry/0@2", seq=1)
    assert store.take_over([stale]) == [False]
    assert store.take_over([due]) == [True]
    assert store.take_over([due]) == [False]  # already taken: now `sending`
    assert store.rows([r.key]) == [LedgerRow("push.retry/0@2", "sending", 1, 1, 503, "503", 10.0)]


def test_status_aggregates_devices_and_attempts_are_logged_in_order(
    notification_store_factory: NotificationStoreFactory,
) -> None:
    store = notification_store_factory()
    post = unique("p")
    nid = f"{post}:u1"
    d1, d2 = request("u1", "d1", post=post), request("u1", "d2", post=post)
    assert store.notification_status(nid) == "unknown"
    store.claim([d1, d2])
    assert store.notification_status(nid) == "pending"
    store.record(
        [LedgerUpdate(d1.key, "invalid_token", 1, 0, 410, "Unregistered", None, True)], 2.0
    )
    assert store.notification_status(nid) == "pending"
    store.record([LedgerUpdate(d2.key, "dead_lettered", 8, 7, 503, "503", None, True)], 3.0)
    assert store.notification_status(nid) == "exhausted"
    store.record([LedgerUpdate(d2.key, "accepted", 9, 7, 200, None, None, True)], 4.0)
    assert store.notification_status(nid) == "dispatched"
    assert [(a.device_id, a.attempt, a.state, a.status) for a in store.attempts(nid)] == [
        ("d1", 1, "invalid_token", 410),
        ("d2", 8, "dead_lettered", 503),
        ("d2", 9, "accepted", 200),
    ]
    devices = store.devices(nid)
    assert [(d.device_id, d.provider, d.state, d.attempts, d.ack) for d in devices] == [
        ("d1", "apns", "invalid_token", 1, None),
        ("d2", "apns", "accepted", 9, None),
    ]
    note = store.notification(nid)
    assert note is not None
    assert (note.user_id, note.post_id, note.author_id, note.status) == (
        "u1",
        post,
        "a1",
        "dispatched",
    )
    assert note.template == "new_post/v1"


def test_acks_move_forward_only_and_unknown_ones_are_named(
    notification_store_factory: NotificationStoreFactory,
) -> None:
    store = notification_store_factory()
    post = unique("p")
    nid = f"{post}:u1"
    d1, d2 = request("u1", "d1", post=post), request("u1", "d2", post=post)
    store.claim([d1, d2])
    store.record(
        [
            LedgerUpdate(d1.key, "accepted", 1, 0, 200, None, None, True),
            LedgerUpdate(d2.key, "accepted", 1, 0, 200, None, None, True),
        ],
        2.0,
    )
    assert store.apply_acks([ack(nid, "d1", "delivered")]) == ["applied"]
    assert store.notification_status(nid) == "delivered"
    assert store.apply_acks(
        [ack(nid, "d2", "opened"), ack(nid, "d2", "delivered"), ack(nid, "d9", "opened")]
    ) == ["applied", "applied", "unknown_device"]
    assert store.notification_status(nid) == "opened"
    assert {d.device_id: d.ack for d in store.devices(nid)} == {"d1": "delivered", "d2": "opened"}
    assert store.apply_acks([ack(f"{post}:nobody", "d1", "opened")]) == ["unknown_notification"]


def test_inbox_is_newest_first_with_a_cursor_to_the_next_page(
    notification_store_factory: NotificationStoreFactory,
) -> None:
    store = notification_store_factory()
    user = unique("u")
    now = time.time()
    # Seven posts an hour apart, claimed out of order; two devices for one of them.
    order = [3, 0, 6, 1, 5, 2, 4]
    for k in order:
        store.claim([request(user, "d1", post=f"post{k}", created_ts=now - 3600 * (6 - k))])
    store.claim([request(user, "d2", post="post4", created_ts=now - 3600 * 2)])
    other = unique("u")
    store.claim([request(other, "d1", post="post9", created_ts=now)])

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = store.inbox(user, cursor, 3)
        pages += 1
        seen += [n.post_id for n in page.notifications]
        assert all(n.user_id == user for n in page.notifications)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [f"post{k}" for k in range(6, -1, -1)]
    assert pages == 3
    exact = store.inbox(user, None, 7)
    assert len(exact.notifications) == 7 and exact.next_cursor is None
    with pytest.raises(InvalidCursor):
        store.inbox(other, store.inbox(user, None, 1).next_cursor, 3)
    with pytest.raises(InvalidCursor):
        store.inbox(user, "not-a-cursor", 3)
    assert store.inbox(unique("u"), None, 5).notifications == []


def test_rows_expire_after_the_ttl(notification_store_factory: NotificationStoreFactory) -> None:
    store = notification_store_factory(ttl_s=2)
    post = unique("p")
    nid = f"{post}:u1"
    r = request("u1", post=post)
    store.claim([r])
    store.record([LedgerUpdate(r.key, "accepted", 1, 0, 200, None, None, True)], time.time())
    assert store.notification(nid) is not None and len(store.attempts(nid)) == 1
    assert len(store.inbox("u1", None, 50).notifications) >= 1
    time.sleep(3.2)
    assert store.notification(nid) is None
    assert store.rows([r.key]) == [None]
    assert store.attempts(nid) == []
    assert store.devices(nid) == []
    assert all(n.post_id != post for n in store.inbox("u1", None, 50).notifications)
    # The key is free again: a claim after expiry is a new claim.
    assert store.claim([r]) == [None]
