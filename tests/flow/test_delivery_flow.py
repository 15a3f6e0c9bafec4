"""The delivery graph on in-memory readers, Bytewax's TestingSink and a scripted provider."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from bytewax.testing import TestingSink, cluster_main, run_main

from flows.delivery import build_delivery_flow
from operators.adapters.providers.event_loop import EventLoopThread
from operators.adapters.redis.rate_limiter import LocalRateLimiter
from operators.adapters.stores.sqlite_notifications import SQLiteNotificationStore
from operators.delivery.edge_claims import InMemoryEdgeClaims
from operators.delivery.engine import DeliveryEngine, DeliverySettings
from operators.delivery.model import ProviderAnswer
from operators.delivery.pipeline import DeliveryPump
from operators.events import RawEvent
from schemas.codecs import encode_retry_record
from schemas.records import DeadLetter, DeliveryEvent, DeviceChange, RetryRecord
from tests.fakes import ScriptedSender, list_delivery_sources

NOW = time.time()
CREATED = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 5))


def batch(post: str, provider: str, items: list[tuple[str, str, str]]) -> bytes:
    return orjson.dumps(
        {
            "schema": "dispatch_batch/v1",
            "post_id": post,
            "author_id": "a1",
            "provider": provider,
            "created_at": CREATED,
            "items": [
                {"notification_id": f"{post}:{u}", "user_id": u, "device_id": d, "token": t}
                for u, d, t in items
            ],
        }
    )


def run(
    tmp_path: Path, channel: list[RawEvent], retries: list[RawEvent], sender: ScriptedSender
) -> dict[str, list[Any]]:
    store = SQLiteNotificationStore(tmp_path / "n.db")
    claims = InMemoryEdgeClaims()

    def build() -> DeliveryEngine:
        return DeliveryEngine(
            claims=claims,
            store=store,
            limiter=LocalRateLimiter(),
            senders={"apns": sender},
            loop=EventLoopThread(),
            settings=DeliverySettings(),
        )

    sinks: dict[str, list[Any]] = {k: [] for k in ("events", "devices", "retries", "dead")}
    channel_source, retry_source = list_delivery_sources(channel, retries, DeliveryPump(build))
    flow = build_delivery_flow(
        channel_source=channel_source,
        retry_source=retry_source,
        events_sink=TestingSink(sinks["events"]),
        route_event=lambda e: "delivery_events/0",
        device_changes_sink=TestingSink(sinks["devices"]),
        retry_sink=TestingSink(sinks["retries"]),
        dead_letter_sink=TestingSink(sinks["dead"]),
    )
    run_main(flow)
    return sinks


def test_every_item_gets_one_outcome_and_bad_input_is_dead_lettered(tmp_path: Path) -> None:
    sender = ScriptedSender(
        answers={
            "gone": ProviderAnswer(410, "Unregistered"),
            "busy": ProviderAnswer(503, "ServiceUnavailable"),
        }
    )
    channel = [
        RawEvent(
            "push.apns",
            0,
            0,
            b"p1",
            batch("p1", "apns", [("u1", "d1", "t1"), ("u2", "d1", "gone")]),
            1.0,
        ),
        RawEvent("push.apns", 0, 1, b"p1", b"{not json", 1.0),
        RawEvent("push.apns.bulk", 0, 0, b"p2", batch("p2", "apns", [("u3", "d1", "busy")]), 1.0),
        # The same batch again from another offset: a duplicate, sent nowhere.
        RawEvent("push.apns", 1, 5, b"p1", batch("p1", "apns", [("u1", "d1", "t1")]), 1.0),
    ]
    due = RetryRecord(
        "apns",
        "normal",
        "p3",
        "a1",
        CREATED,
        {"notification_id": "p3:u4", "user_id": "u4", "device_id": "d1", "token": "t4"},
        1,
        1,
        NOW - 1,
        "503",
    )
    retries = [
        RawEvent("push.retry", 0, 0, b"p3:u4", encode_retry_record(due), 1.0),
        RawEvent("push.retry", 0, 1, b"x", b'{"provider": "apns"}', 1.0),
    ]
    # p3:u4's first attempt happened earlier and scheduled this retry.
    sinks = run(tmp_path, channel, retries, sender)
    outcomes = sorted(
        (kv[1].user_id, kv[1].outcome) for kv in sinks["events"] if isinstance(kv[1], DeliveryEvent)
    )
    # u4's retry finds no ledger row waiting for it (its first attempt was never recorded here).
    assert outcomes == [("u1", "accepted"), ("u2", "invalid_token"), ("u3", "retry_scheduled")]
    assert [
        (d.user_id, d.device_id, d.active) for d in sinks["devices"] if isinstance(d, DeviceChange)
    ] == [("u2", "d1", False)]
    [retry] = sinks["retries"]
    assert isinstance(retry, RetryRecord) and (retry.item["user_id"], retry.lane, retry.seq) == (
        "u3",
        "bulk",
        1,
    )
    assert all(k == d.source_topic for k, d in sinks["dead"])  # keyed by source topic
    dead = [d for _, d in sinks["dead"]]
    assert all(isinstance(d, DeadLetter) for d in dead)
    assert sorted((d.source_topic, d.error.split(":")[0]) for d in dead) == [
        ("push.apns", "invalid_json"),
        ("push.retry", "schema"),
    ]
    assert sorted(r.item["user_id"] for r in sender.sent) == ["u1", "u2", "u3"]


def test_a_worker_builds_its_engine_once_in_a_cluster(tmp_path: Path) -> None:
    """A threading.local does not survive Bytewax's (Rust) cluster worker threads.

    Every activation enters Python through pyo3's GIL guard, which makes and deletes the thread's
    Python thread state, and a threading.local's values with it: the engine (event loop thread,
    provider connections, a firebase app) was built again on every send call in a cluster.
    """
    store = SQLiteNotificationStore(tmp_path / "n.db")
    claims = InMemoryEdgeClaims()
    sender = ScriptedSender()
    builds: list[int] = []

    def build() -> DeliveryEngine:
        builds.append(1)
        return DeliveryEngine(
            claims=claims,
            store=store,
            limiter=LocalRateLimiter(),
            senders={"apns": sender},
            loop=EventLoopThread(),
            settings=DeliverySettings(),
        )

    channel = [
        RawEvent(
            "push.apns", i % 2, i, b"p", batch(f"p{i}", "apns", [(f"u{i}", "d1", f"t{i}")]), 1.0
        )
        for i in range(30)
    ]
    events: list[Any] = []
    channel_source, retry_source = list_delivery_sources(
        channel, [], DeliveryPump(build), read_size=1
    )
    flow = build_delivery_flow(
        channel_source=channel_source,
        retry_source=retry_source,
        events_sink=TestingSink(events),
        route_event=lambda e: "delivery_events/0",
        device_changes_sink=TestingSink([]),
        retry_sink=TestingSink([]),
        dead_letter_sink=TestingSink([]),
    )
    cluster_main(flow, [], 0, worker_count_per_proc=2)
    assert len(events) == 30
    assert 1 <= len(builds) <= 2  # once per worker that sent (it was once per call)


def test_a_step_s_error_is_logged_once_with_the_step_s_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In a cluster Bytewax prints no Python error, only "Send thread panic"."""

    def no_engine() -> DeliveryEngine:
        raise ValueError("Firebase app named 'fanfare-1-2' already exists")

    channel = [RawEvent("push.apns", 0, 0, b"p", batch("p1", "apns", [("u1", "d1", "t1")]), 1.0)]
    channel_source, retry_source = list_delivery_sources(channel, [], DeliveryPump(no_engine))
    flow = build_delivery_flow(
        channel_source=channel_source,
        retry_source=retry_source,
        events_sink=TestingSink([]),
        route_event=lambda e: "delivery_events/0",
        device_changes_sink=TestingSink([]),
        retry_sink=TestingSink([]),
        dead_letter_sink=TestingSink([]),
    )
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="read_due_retries"):
        run_main(flow)
    logged = [r.getMessage() for r in caplog.records if r.name == "flows.runtime.step_errors"]
    assert len(logged) == 1, logged
    # The engine is built with the worker's first delivery source partition: the retry
    # source's, declared first.
    assert logged[0].startswith("delivery.read_due_retries.build_part raised ValueError"), logged


def message_batch(post: str, provider: str, users: list[str], message: dict[str, Any]) -> bytes:
    body = orjson.loads(batch(post, provider, [(u, f"{provider}-{u}", f"{u}-addr") for u in users]))
    body["message"] = message
    body["author_id"] = "api:k1"
    return orjson.dumps(body)


def test_channel_tier_topics_and_transactional_push_go_to_their_senders(tmp_path: Path) -> None:
    """Each provider's sender gets its items, in its topic's lane, with the batch's message; a
    transient answer's retry record carries that message for the retry to render again."""
    message = {
        "category": "receipt",
        "template_id": "receipt",
        "tier": "transactional",
        "data": {"order_id": "1234", "amount": "59.90", "currency": "EUR"},
    }
    senders = {
        "email": ScriptedSender("email", answers={"u2-addr": ProviderAnswer(451, "RCPT 4.7.1")}),
        "inapp": ScriptedSender("inapp"),
        "apns": ScriptedSender("apns"),
    }
    store = SQLiteNotificationStore(tmp_path / "n.db")

    def build() -> DeliveryEngine:
        return DeliveryEngine(
            claims=InMemoryEdgeClaims(),
            store=store,
            limiter=LocalRateLimiter(),
            senders=dict(senders),
            loop=EventLoopThread(),
            settings=DeliverySettings(),
        )

    channel = [
        RawEvent("email.transactional", 0, 0, b"n1", message_batch("n1", "email", ["u1", "u2"], message), 1.0),
        RawEvent("email.marketing", 0, 0, b"n2", message_batch("n2", "email", ["u3"], {**message, "tier": "marketing"}), 1.0),
        RawEvent("inapp.social", 0, 0, b"n3", message_batch("n3", "inapp", ["u4"], {**message, "tier": "social"}), 1.0),
        RawEvent("push.apns.transactional", 0, 0, b"n4", message_batch("n4", "apns", ["u5"], message), 1.0),
        RawEvent("sms.transactional", 0, 0, b"n5", message_batch("n5", "sms", ["u6"], message), 1.0),
    ]  # fmt: skip
    sinks: dict[str, list[Any]] = {k: [] for k in ("events", "retries", "dead")}
    channel_source, retry_source = list_delivery_sources(channel, [], DeliveryPump(build))
    flow = build_delivery_flow(
        channel_source=channel_source,
        retry_source=retry_source,
        events_sink=TestingSink(sinks["events"]),
        route_event=lambda e: "delivery_events/0",
        device_changes_sink=TestingSink([]),
        retry_sink=TestingSink(sinks["retries"]),
        dead_letter_sink=TestingSink(sinks["dead"]),
    )
    run_main(flow)
    outcomes = sorted((e.provider, e.user_id, e.outcome) for _, e in sinks["events"])
    assert outcomes == [
        ("apns", "u5", "accepted"),
        ("email", "u1", "accepted"),
        ("email", "u2", "retry_scheduled"),
        ("email", "u3", "accepted"),
        ("inapp", "u4", "accepted"),
        ("sms", "u6", "failed"),  # no SMS sender in this worker: never left unread
    ]
    lanes = {r.item["user_id"]: (r.lane, r.message) for s in senders.values() for r in s.sent}
    assert lanes["u1"] == ("transactional", message) and lanes["u5"][0] == "transactional"
    assert lanes["u3"][0] == "bulk" and lanes["u4"][0] == "normal"
    [retry] = sinks["retries"]
    assert (retry.item["user_id"], retry.lane, retry.message) == ("u2", "transactional", message)
    [dead] = [d for _, d in sinks["dead"]]
    assert dead.source_topic == "sms.transactional" and "provider_not_configured" in dead.error


def test_the_retry_source_starts_its_epochs_before_the_lane_source() -> None:
    """Bytewax starts an input's epoch clock when it builds its partitions, in declaration order,
    and an input that closed an epoch reads nothing until every input has closed it. The lane
    source builds slowly (a consumer per partition, 28 of them), so declared first it closed each
    epoch that long before the retry source and stopped reading normal posts for that long every
    snapshot interval (README, Delivery regression)."""
    channel_source, retry_source = list_delivery_sources([], [], DeliveryPump(lambda: None))  # type: ignore[arg-type, return-value]
    flow = build_delivery_flow(
        channel_source=channel_source,
        retry_source=retry_source,
        events_sink=TestingSink([]),
        route_event=lambda e: "delivery_events/0",
        device_changes_sink=TestingSink([]),
        retry_sink=TestingSink([]),
        dead_letter_sink=TestingSink([]),
    )
    inputs = [s.step_id for s in flow.substeps if type(s).__name__ == "input"]
    assert inputs == ["delivery.read_due_retries", "delivery.read_channel_lanes"]
