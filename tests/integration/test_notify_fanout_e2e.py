"""`fanfare api` to the fan-out on the real broker and Redis: a POST becomes dispatch batches.

The API process and `fanfare run fanout` run as users run them; a transactional request's
batches appear on `push.apns.transactional` and `email.transactional`, a scheduled one only at
its `send_at`, and a cancelled one never; a login code goes by push or else by SMS; a campaign
over the cap is dropped.
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from flows.runtime.ports import free_port
from operators.adapters.kafka.writer import produce_all
from operators.adapters.redis.api_store import RedisKeyStore, api_redis
from operators.notify.keys import new_key
from tests.conftest import REDIS_URL, Stack, wait_for

pytestmark = pytest.mark.integration

TS = "2026-06-01T12:00:00Z"


def call(port: int, method: str, path: str, key: str, body: object = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def health(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False


def api_items(stack: Stack, topic: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(notification_id, user_id, device_id, message) of every item on a topic."""
    out = []
    for _, _, value in stack.read_topic(topic):
        batch = orjson.loads(value or b"{}")
        out += [
            (i["notification_id"], i["user_id"], i["device_id"], batch["message"])
            for i in batch["items"]
        ]
    return out


def receipt(**extra: object) -> dict[str, object]:
    body: dict[str, object] = {
        "idempotency_key": f"order-{uuid.uuid4().hex}",
        "category": "receipt",
        "template_id": "receipt",
        "recipients": ["u1", "u2"],
        "data": {"order_id": "1234", "amount": "59.90", "currency": "EUR"},
        "channels": ["push", "email"],
    }
    body.update(extra)
    return body


def test_a_post_to_the_api_becomes_transactional_push_and_email_batches(stack: Stack) -> None:
    devices = []
    for user in ("u1", "u2"):
        for device_id, provider, token in (
            (f"{user}-phone", "apns", "0a" * 32),
            (f"{user}-mail", "email", f"{user}@example.com"),
        ):
            change = {
                "user_id": user,
                "device_id": device_id,
                "provider": provider,
                "token": token,
                "active": True,
                "ts": TS,
            }
            devices.append((user.encode(), orjson.dumps(change)))
    produce_all(stack.settings.kafka_config(), "device_changes", devices)
    made = new_key("e2e", frozenset({"*"}), frozenset({"*"}), 1000, 1000, time.time())
    RedisKeyStore(api_redis(REDIS_URL), stack.env["FANFARE_REDIS_PREFIX"]).add(made.record)
    port = free_port()
    stack.start_command(["api"], ("FANFARE_API_PORT", str(port)))
    stack.start_flow()
    wait_for(lambda: health(port), 90, "fanfare api to answer /health", stack, every_s=0.2)

    status, answer = call(port, "POST", "/v1/notifications", made.text, receipt())
    assert status == 202, answer
    nid = answer["notification_id"]
    expected = {
        "push.apns.transactional": {
            (f"{nid}:u1", "u1", "u1-phone"),
            (f"{nid}:u2", "u2", "u2-phone"),
        },
        "email.transactional": {(f"{nid}:u1", "u1", "u1-mail"), (f"{nid}:u2", "u2", "u2-mail")},
    }
    wait_for(
        lambda: all(len(api_items(stack, t)) >= 2 for t in expected), 120, "the batches", stack
    )
    for topic, want in expected.items():
        got = api_items(stack, topic)
        assert sorted(g[:3] for g in got) == sorted(want)  # exactly once each
        assert all(
            m["category"] == "receipt"
            and m["tier"] == "transactional"
            and m["data"]["order_id"] == "1234"
            for *_, m in got
        )

    # A scheduled one waits for send_at; a cancelled one never goes.
    send_at = datetime.now(UTC) + timedelta(seconds=6)
    stamp = send_at.isoformat().replace("+00:00", "Z")
    status, later = call(port, "POST", "/v1/notifications", made.text, receipt(send_at=stamp))
    assert status == 202, later
    status, gone = call(port, "POST", "/v1/notifications", made.text, receipt(send_at=stamp))
    assert status == 202, gone
    status, cancelled = call(
        port, "DELETE", f"/v1/notifications/{gone['notification_id']}", made.text
    )
    assert status == 202 and cancelled["state"] == "cancelled", cancelled
    status, again = call(port, "DELETE", f"/v1/notifications/{nid}", made.text)
    assert status == 409 and again["error"]["code"] == "not_cancellable", again

    def ids(topic: str) -> set[str]:
        return {n.split(":")[0] for n, *_ in api_items(stack, topic)}

    while datetime.now(UTC) < send_at - timedelta(seconds=1):
        assert later["notification_id"] not in ids("push.apns.transactional")  # not early
        time.sleep(0.5)
    wait_for(
        lambda: later["notification_id"] in ids("email.transactional"),
        60,
        "the scheduled send",
        stack,
    )
    time.sleep(3)  # the cancelled one was due at the same time: give it every chance
    assert datetime.now(UTC) >= send_at
    for topic in expected:
        assert ids(topic) == {nid, later["notification_id"]}
        assert len(api_items(stack, topic)) == 4  # two recipients, two notifications, once each


def test_a_scheduled_send_survives_a_kill_9_of_the_fanout_and_goes_once(stack: Stack) -> None:
    change = {
        "user_id": "u1",
        "device_id": "u1-mail",
        "provider": "email",
        "token": "u1@example.com",
        "active": True,
        "ts": TS,
    }
    produce_all(stack.settings.kafka_config(), "device_changes", [(b"u1", orjson.dumps(change))])
    made = new_key("e2e", frozenset({"*"}), frozenset({"*"}), 1000, 1000, time.time())
    RedisKeyStore(api_redis(REDIS_URL), stack.env["FANFARE_REDIS_PREFIX"]).add(made.record)
    port = free_port()
    stack.start_command(["api"], ("FANFARE_API_PORT", str(port)))
    flow = stack.start_flow()
    wait_for(lambda: health(port), 90, "fanfare api to answer /health", stack, every_s=0.2)

    def ids() -> list[str]:
        return [n.split(":")[0] for n, *_ in api_items(stack, "email.transactional")]

    send_at = datetime.now(UTC) + timedelta(seconds=20)
    stamp = send_at.isoformat().replace("+00:00", "Z")
    body = receipt(recipients=["u1"], channels=["email"])
    status, held = call(port, "POST", "/v1/notifications", made.text, {**body, "send_at": stamp})
    assert status == 202, held
    # One sent at once, after it: once it is out, the held one was read (and is in the state).
    status, now = call(
        port, "POST", "/v1/notifications", made.text, receipt(recipients=["u1"], channels=["email"])
    )
    assert status == 202, now
    wait_for(lambda: now["notification_id"] in ids(), 90, "the immediate send", stack)
    time.sleep(3)  # a few snapshots (FANFARE_SNAPSHOT_INTERVAL_S=1) with the send held
    assert held["notification_id"] not in ids()
    stack.kill_flow(flow)  # kill -9, the send held in the shard's state only
    stack.start_flow()
    while datetime.now(UTC) < send_at - timedelta(seconds=1):
        assert held["notification_id"] not in ids()  # never before send_at
        time.sleep(0.5)
    wait_for(lambda: held["notification_id"] in ids(), 90, "the held send after the restart", stack)
    time.sleep(3)
    assert sorted(ids()) == sorted([now["notification_id"], held["notification_id"]])  # once each


def test_a_login_code_goes_by_push_or_else_by_sms_through_the_api_and_the_fanout(
    stack: Stack,
) -> None:
    """login_code's fallback: u-dev (a phone and a number) gets push only, u-sms SMS only."""
    changes = [
        ("u-dev", "u-dev-phone", "apns", "0b" * 32),
        ("u-dev", "u-dev-sms", "sms", "+14155550111"),
        ("u-sms", "u-sms-sms", "sms", "+14155550112"),
    ]
    produce_all(
        stack.settings.kafka_config(),
        "device_changes",
        [
            (
                user.encode(),
                orjson.dumps(
                    {
                        "user_id": user,
                        "device_id": device_id,
                        "provider": provider,
                        "token": token,
                        "active": True,
                        "ts": TS,
                    }
                ),
            )
            for user, device_id, provider, token in changes
        ],
    )
    made = new_key("e2e", frozenset({"*"}), frozenset({"*"}), 1000, 1000, time.time())
    RedisKeyStore(api_redis(REDIS_URL), stack.env["FANFARE_REDIS_PREFIX"]).add(made.record)
    port = free_port()
    stack.start_command(["api"], ("FANFARE_API_PORT", str(port)))
    stack.start_flow()
    wait_for(lambda: health(port), 90, "fanfare api to answer /health", stack, every_s=0.2)
    body = {
        "idempotency_key": f"login-{uuid.uuid4().hex}",
        "category": "login_code",
        "template_id": "login_code",
        "recipients": ["u-dev", "u-sms"],
        "data": {"code": "482913", "minutes": 10},
    }
    status, answer = call(port, "POST", "/v1/notifications", made.text, body)
    assert status == 202 and answer["channels"] == ["push", "sms"], answer
    nid = answer["notification_id"]
    wait_for(
        lambda: (
            api_items(stack, "push.apns.transactional") and api_items(stack, "sms.transactional")
        ),
        120,
        "the login code's batches",
        stack,
    )
    time.sleep(2)  # anything more would be a second channel for the same user
    assert [g[:3] for g in api_items(stack, "push.apns.transactional")] == [
        (f"{nid}:u-dev", "u-dev", "u-dev-phone")
    ]
    assert [g[:3] for g in api_items(stack, "sms.transactional")] == [
        (f"{nid}:u-sms", "u-sms", "u-sms-sms")
    ]


def test_marketing_over_the_cap_is_dropped_across_the_api_and_the_fanout(stack: Stack) -> None:
    """FANFARE_NOTIFY_CAP=1: a user's second campaign notification of the window is dropped."""
    made = new_key("e2e", frozenset({"*"}), frozenset({"*"}), 1000, 1000, time.time())
    RedisKeyStore(api_redis(REDIS_URL), stack.env["FANFARE_REDIS_PREFIX"]).add(made.record)
    port = free_port()
    stack.start_command(["api"], ("FANFARE_API_PORT", str(port)))
    stack.start_flow(("FANFARE_NOTIFY_CAP", "1"), ("FANFARE_NOTIFY_CAP_WINDOW_S", "86400"))
    wait_for(lambda: health(port), 90, "fanfare api to answer /health", stack, every_s=0.2)

    def send(recipients: list[str]) -> str:
        body = {
            "idempotency_key": f"promo-{uuid.uuid4().hex}",
            "category": "campaign",
            "template_id": "campaign",
            "recipients": recipients,
            "data": {"headline": "Sale", "message": "-20%", "link": "https://example.com"},
            "channels": ["inbox"],
        }
        status, answer = call(port, "POST", "/v1/notifications", made.text, body)
        assert status == 202 and answer["tier"] == "marketing", answer
        return str(answer["notification_id"])

    send(["u-capped"])
    send(["u-capped"])
    last = send(["u-capped", "u-other"])

    def users() -> list[str]:
        return sorted(u for _, u, _, _ in api_items(stack, "inapp.marketing"))

    wait_for(
        lambda: f"{last}:u-other" in {n for n, *_ in api_items(stack, "inapp.marketing")},
        120,
        "the campaign notifications",
        stack,
    )
    wait_for(lambda: "u-capped" in users(), 60, "u-capped's first", stack)
    time.sleep(3)  # the two over the cap had every chance to go
    assert users() == ["u-capped", "u-other"]
