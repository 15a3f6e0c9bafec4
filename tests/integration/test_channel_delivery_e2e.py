"""The channels end to end: dispatch batches on the channel tier topics and on
`push.apns.transactional`, read by `fanfare run delivery` (the real broker, Redis, the local
APNs and channel servers), each sent once by its provider's sender, outcomes on delivery_events."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from operators.adapters.kafka.writer import produce_all
from operators.adapters.redis.live import LiveHub
from operators.config import load_settings
from operators.delivery.model import TERMINAL_STATES
from schemas.addresses import check_subscription
from schemas.codecs import format_timestamp
from scripts.dev.local_channels.control import ChannelControl
from tests.conftest import REDIS_URL, Providers, Stack, wait_for

pytestmark = pytest.mark.integration

FAST_RETRIES = (
    ("FANFARE_RETRY_BASE_MS", "200"),
    ("FANFARE_RETRY_MAX_BACKOFF_S", "1"),
    ("FANFARE_SEND_TIMEOUT_MS", "5000"),
    # The greylisted email must outlast the test clearing its fault on a loaded machine.
    ("FANFARE_RETRY_MAX_ATTEMPTS", "100"),
)
RECEIPT = {
    "category": "receipt",
    "template_id": "receipt",
    "tier": "transactional",
    "data": {"order_id": "1234", "amount": "59.90", "currency": "EUR"},
}
LOGIN = {
    "category": "login_code",
    "template_id": "login_code",
    "tier": "transactional",
    "data": {"code": "482913", "minutes": 10},
    "collapse_key": "login:u-apns",
}
POST = {
    "category": "new_post",
    "template_id": "new_post",
    "tier": "social",
    "data": {"author_name": "Ada", "excerpt": "A new post", "post_id": "p1"},
}


def publish(
    stack: Stack,
    topic: str,
    notification: str,
    provider: str,
    items: list[tuple[str, str, str]],
    message: dict[str, Any] | None,
) -> None:
    """One dispatch batch as the fan-out writes it: items (user, device, address)."""
    body: dict[str, Any] = {
        "schema": "dispatch_batch/v1",
        "post_id": notification,
        "author_id": "api:k1",
        "provider": provider,
        "created_at": format_timestamp(datetime.now(UTC)),
        "items": [
            {
                "notification_id": f"{notification}:{u}",
                "user_id": u,
                "device_id": d,
                "token": t,
                "locale": "fr",
            }
            for u, d, t in items
        ],
    }
    if message is not None:
        body["message"] = message
    produce_all(stack.settings.kafka_config(), topic, [(notification.encode(), orjson.dumps(body))])


def events(stack: Stack) -> list[dict[str, Any]]:
    return [orjson.loads(v or b"{}") for _, _, v in stack.read_topic("delivery_events")]


def test_each_channel_tier_topic_reaches_its_server_once(
    stack: Stack, providers: Providers
) -> None:
    info = providers.info["channels"]
    ctl = ChannelControl(info["control_url"])
    ctl.reset()
    # Greylisted until cleared: the first try is a 451 (retried), the retry is accepted.
    ctl.set_address_errors("email", {"retry@example.com": {"code": 451, "message": "4.7.1 Later"}})
    subscription = ctl.mint_subscription()
    webpush = check_subscription(json.dumps(subscription["subscription"]), allow_dev=True)
    apns_token = "ab" * 32
    publish(
        stack,
        "email.transactional",
        "n_mail",
        "email",
        [("u-ada", "email-1", "ada@example.com"), ("u-retry", "email-2", "retry@example.com")],
        RECEIPT,
    )
    publish(stack, "sms.transactional", "n_sms", "sms", [("u-sms", "sms-1", "+14155550123")], LOGIN)
    publish(stack, "webpush.social", "n_web", "webpush", [("u-web", "web-1", webpush)], POST)
    publish(
        stack,
        "chat.social",
        "n_chat",
        "chat",
        [("ops", "chat-1", info["chat"]["slack_example"])],
        POST,
    )
    publish(stack, "inapp.social", "n_inapp", "inapp", [("u-live", "inapp", "u-live")], RECEIPT)
    publish(
        stack, "push.apns.transactional", "n_push", "apns", [("u-apns", "ios", apns_token)], LOGIN
    )
    stack.start_flow(*FAST_RETRIES, flow="delivery")

    expected = {
        ("n_mail:u-ada", "email-1"),
        ("n_mail:u-retry", "email-2"),
        ("n_sms:u-sms", "sms-1"),
        ("n_web:u-web", "web-1"),
        ("n_chat:ops", "chat-1"),
        ("n_inapp:u-live", "inapp"),
        ("n_push:u-apns", "ios"),
    }
    seen: list[dict[str, Any]] = []

    def retry_scheduled() -> bool:
        nonlocal seen
        seen = events(stack)
        return any(e["outcome"] == "retry_scheduled" for e in seen)

    wait_for(retry_scheduled, 90, "the greylisted email's retry_scheduled", stack)
    ctl.set_address_errors("email", {})

    def all_terminal() -> bool:
        nonlocal seen
        seen = events(stack)
        done = {
            (e["notification_id"], e["device_id"]) for e in seen if e["outcome"] in TERMINAL_STATES
        }
        return done >= expected

    wait_for(all_terminal, 60, "a terminal outcome for every item", stack, every_s=1.0)
    time.sleep(2)  # anything sent twice would show by now
    seen = events(stack)
    terminal = Counter(
        (e["notification_id"], e["device_id"], e["provider"], e["outcome"])
        for e in seen
        if e["outcome"] in TERMINAL_STATES
    )
    assert {k[:2] for k in terminal} == expected
    assert all(n == 1 for n in terminal.values()), terminal
    assert {k[3] for k in terminal} == {"accepted"}, terminal
    assert {k[2] for k in terminal} == {"email", "sms", "webpush", "chat", "inapp", "apns"}
    retried = [e for e in seen if e["notification_id"] == "n_mail:u-retry"]
    # Refused (451) until the fault was cleared, then accepted once: one attempt each.
    tries = [(e["outcome"], e["status"], e["attempt"]) for e in retried]
    n = len(tries)
    assert n >= 2 and tries == [("retry_scheduled", 451, i) for i in range(1, n)] + [
        ("accepted", 250, n)
    ]

    # Each local server got each message once, rendered from its template.
    mails = ctl.accepted("email")
    assert sorted(m["rcpt_to"][0] for m in mails) == ["ada@example.com", "retry@example.com"]
    assert all(m["category"] == "receipt" for m in mails)
    [sms] = ctl.accepted("sms")
    assert sms["to"] == "+14155550123" and "482913" in sms["body"]
    [push] = ctl.accepted("webpush")
    assert (
        push["subscription_id"] == subscription["id"] and push["payload"]["title"] == "Ada a publié"
    )
    [chat] = ctl.accepted("chat")
    assert chat["kind"] == "slack" and "Ada" in chat["body"]["text"]
    [apns] = providers.control.accepted("apns")
    assert (apns.token, apns.notification_id, apns.collapse_id) == (
        apns_token,
        "n_push:u-apns",
        "login:u-apns",
    )
    settings = load_settings(stack.env)

    async def in_app() -> list[tuple[str, str]]:
        hub = LiveHub(REDIS_URL, settings.redis_prefix, 10)
        try:
            return await hub.history("u-live", "0")
        finally:
            await hub.close()

    [(_, live)] = asyncio.run(in_app())
    assert json.loads(live)["notification_id"] == "n_inapp:u-live"


def test_emails_a_domain_bucket_holds_are_sent_later_without_using_an_attempt(
    stack: Stack, providers: Providers
) -> None:
    ctl = ChannelControl(providers.info["channels"]["control_url"])
    ctl.reset()
    users = [f"b{i}" for i in range(3)]
    publish(
        stack,
        "email.transactional",
        "n_busy",
        "email",
        [(u, f"email-{u}", f"{u}@busy.example") for u in users],
        RECEIPT,
    )
    # One token a second for busy.example (a bucket of one): two of the three are held.
    stack.start_flow(*FAST_RETRIES, ("FANFARE_EMAIL_DOMAIN_RATE_PER_MIN", "60"), flow="delivery")
    seen: list[dict[str, Any]] = []

    def all_accepted() -> bool:
        nonlocal seen
        seen = events(stack)
        return sum(e["outcome"] == "accepted" for e in seen) >= 3

    wait_for(all_accepted, 90, "three accepted emails", stack, every_s=1.0)
    time.sleep(2)
    seen = events(stack)
    accepted = [e for e in seen if e["outcome"] == "accepted"]
    holds = [e for e in seen if e["outcome"] == "retry_scheduled"]
    assert sorted(e["user_id"] for e in accepted) == users  # each once
    assert len(holds) >= 2 and all(
        e["reason"].startswith("held: ") and e["attempt"] == 0 and e["status"] is None
        for e in holds
    )
    held_users = {e["user_id"] for e in holds}
    # The held ones left once, on their first attempt; the first went at once.
    assert {e["user_id"]: e["attempt"] for e in accepted} == {u: 1 for u in users}
    assert len(held_users) >= 2
    assert sorted(m["rcpt_to"][0] for m in ctl.accepted("email")) == [
        f"{u}@busy.example" for u in users
    ]


def test_an_api_notification_reaches_the_phone_and_the_mailbox_through_both_flows(
    stack: Stack, providers: Providers
) -> None:
    """`fanfare api` -> notify.transactional -> `fanfare run fanout` -> push.apns.transactional
    and email.transactional -> `fanfare run delivery` -> the local APNs and SMTP servers."""
    import http.client
    import uuid

    from flows.runtime.ports import free_port
    from operators.adapters.redis.api_store import RedisKeyStore, api_redis
    from operators.notify.keys import new_key

    ctl = ChannelControl(providers.info["channels"]["control_url"])
    ctl.reset()
    ts = format_timestamp(datetime.now(UTC))
    token = "0b" * 32
    kafka = stack.settings.kafka_config()
    produce_all(
        kafka,
        "preference_changes",
        [
            (
                b"u1",
                orjson.dumps(
                    {
                        "user_id": "u1",
                        "push_enabled": True,
                        "quiet_hours_start": None,
                        "quiet_hours_end": None,
                        "timezone": "Europe/Paris",
                        "locale": "fr-FR",
                        "ts": ts,
                    }
                ),
            )
        ],
    )
    produce_all(
        kafka,
        "device_changes",
        [
            (b"u1", orjson.dumps({"user_id": "u1", "device_id": d, "provider": p, "token": t,
                                  "active": True, "ts": ts}))
            for d, p, t in (("u1-phone", "apns", token), ("u1-mail", "email", "ada@example.com"))
        ],
    )  # fmt: skip
    made = new_key("e2e", frozenset({"*"}), frozenset({"*"}), 1000, 1000, time.time())
    RedisKeyStore(api_redis(REDIS_URL), stack.env["FANFARE_REDIS_PREFIX"]).add(made.record)
    port = free_port()
    stack.start_command(["api"], ("FANFARE_API_PORT", str(port)))
    stack.start_flow()  # the fan-out
    stack.start_flow(*FAST_RETRIES, flow="delivery")

    def post() -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = {
            "idempotency_key": f"order-{uuid.uuid4().hex}",
            "category": "receipt",
            "template_id": "receipt",
            "recipients": ["u1", "u-none"],  # u-none has no device and no address
            "data": {"order_id": "1234", "amount": "59.90", "currency": "EUR"},
            "channels": ["push", "email"],
            "collapse_key": "order-1234",
        }
        headers = {"Authorization": f"Bearer {made.text}", "Content-Type": "application/json"}
        try:
            conn.request("POST", "/v1/notifications", json.dumps(body).encode(), headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def healthy() -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False

    def status_of(nid: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request(
                "GET",
                f"/v1/notifications/{nid}/status",
                None,
                {"Authorization": f"Bearer {made.text}"},
            )
            response = conn.getresponse()
            assert response.status == 200
            return json.loads(response.read())
        finally:
            conn.close()

    wait_for(healthy, 90, "fanfare api to answer /health", stack, every_s=0.2)
    status, answer = post()
    assert status == 202, answer
    nid = answer["notification_id"]

    def both_accepted() -> bool:
        done = {
            e["device_id"]
            for e in events(stack)
            if e["notification_id"] == f"{nid}:u1" and e["outcome"] == "accepted"
        }
        return done == {"u1-phone", "u1-mail"}

    wait_for(both_accepted, 120, "the push and the email accepted", stack, every_s=1.0)
    [push] = providers.control.accepted("apns")
    assert (push.token, push.notification_id, push.collapse_id) == (
        token,
        f"{nid}:u1",
        "order-1234",
    )
    [mail] = ctl.accepted("email")
    # Rendered at dispatch in the recipient's locale (fr-FR -> fr).
    assert mail["rcpt_to"] == ["ada@example.com"] and mail["subject"] == "Reçu de la commande 1234"
    assert mail["notification_id"] == f"{nid}:u1" and mail["list_unsubscribe"] is None
    # The status folds the outcomes the delivery flow recorded, per recipient and channel.
    # (The ledger row and the delivery event are written by one step: wait for the row.)
    wait_for(
        lambda: status_of(nid)["recipient_status"].get("dispatched") == 1,
        30,
        "the store's outcomes",
        stack,
    )
    shown = status_of(nid)
    assert shown["recipient_status"] == {"dispatched": 1, "unknown": 1}
    assert shown["channels"] == {
        "push": {"accepted": 1, "no_send": 1},
        "email": {"accepted": 1, "no_send": 1},
    }
    assert shown["by_recipient"] == {
        "u1": {"status": "dispatched", "channels": {"push": "accepted", "email": "accepted"}},
        "u-none": {"status": "unknown", "channels": {}},
    }
