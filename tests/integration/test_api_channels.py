"""`fanfare api`'s channel endpoints over real HTTP, with the local channel servers.

Devices of every address kind; the unsubscribe link from a real email to `preference_changes`;
the live stream (Server-Sent Events) fed by the in-app sender; SMS status callbacks from the
local SMS server; the VAPID key; the development inbox page.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from urllib.parse import urlsplit

import orjson
import pytest

from schemas.addresses import DEVICE_PROVIDERS
from schemas.codecs import decode_device_change, decode_notification_ack, decode_preference_event
from schemas.records import CategorySwitch, ChannelMessage
from schemas.topics import DEVICE_CHANGES, NOTIFICATION_ACKS, PREFERENCE_CHANGES
from tests.conftest import wait_for
from tests.integration.channel_stack import (
    ChannelStack,
    SseClient,
    channel_request,
    channel_stack,
    wait_json,
)

pytestmark = pytest.mark.integration
__all__ = ["channel_stack"]

CAMPAIGN = ChannelMessage(
    category="campaign",
    template_id="campaign",
    tier="marketing",
    data={
        "headline": "Winter sale",
        "message": "-20% until Sunday",
        "link": "https://shop.example.com",
    },
)
RECEIPT = ChannelMessage(
    category="receipt",
    template_id="receipt",
    tier="transactional",
    data={"order_id": "77", "amount": "9.90", "currency": "EUR"},
)
LOGIN = ChannelMessage(
    category="login_code",
    template_id="login_code",
    tier="transactional",
    data={"code": "123456", "minutes": 5},
)


def device_events(s: ChannelStack, user: str) -> list[dict[str, object]]:
    return [json.loads(v) for v in s.values(DEVICE_CHANGES) if json.loads(v)["user_id"] == user]


# --- devices ----------------------------------------------------------------------------------


def test_every_address_kind_registers_canonical_and_is_removed(channel_stack: ChannelStack) -> None:
    s = channel_stack
    key = s.key("users")
    user = f"u-{uuid.uuid4().hex[:6]}"
    minted = s.control.mint_subscription()["subscription"]
    bodies = [
        {"provider": "email", "address": "Ada@Example.COM"},
        {"provider": "sms", "address": "+14155550123"},
        {"provider": "chat", "address": s.providers.info["channels"]["chat"]["slack_example"]},
        {"platform": "web", "subscription": minted},
        {"device_id": "phone-1", "platform": "ios", "token": "ab" * 32},
    ]
    ids = []
    for body in bodies:
        reply = s.call("POST", f"/v1/users/{user}/devices", key, json=body)
        assert reply.status_code == 202, reply.text
        ids.append(reply.json()["device_id"])
    assert ids[0].startswith("email-") and ids[3].startswith("webpush-") and ids[4] == "phone-1"
    again = s.call(
        "POST",
        f"/v1/users/{user}/devices",
        key,
        json={"provider": "email", "address": "Ada@example.com"},
    )
    assert again.json()["device_id"] == ids[0]  # the same address is the same device
    assert (
        s.call(
            "DELETE",
            f"/v1/users/{user}/devices",
            key,
            json={"device_id": ids[3], "platform": "web"},
        ).status_code
        == 202
    )
    events = device_events(s, user)
    changes = [
        decode_device_change(orjson.dumps(e), providers=DEVICE_PROVIDERS, allow_dev_addresses=True)
        for e in events
    ]
    assert [(c.provider, c.active) for c in changes] == [
        ("email", True),
        ("sms", True),
        ("chat", True),
        ("webpush", True),
        ("apns", True),
        ("email", True),
        ("webpush", False),
    ]
    assert changes[0].token == "Ada@example.com"
    assert json.loads(changes[3].token or "{}")["keys"]["auth"] == minted["keys"]["auth"]


@pytest.mark.parametrize(
    ("body", "code", "field", "reason"),
    [
        (
            {"provider": "email", "address": "not an address"},
            "invalid_address",
            "address",
            "spaces",
        ),
        ({"provider": "email", "address": "ada@localhost"}, "invalid_address", "address", "domain"),
        ({"provider": "sms", "address": "415-555-0123"}, "invalid_address", "address", "E.164"),
        (
            {"provider": "chat", "address": "ftp://hooks.example.com/x"},
            "invalid_address",
            "address",
            "https",
        ),
        (
            {
                "platform": "web",
                "subscription": {
                    "endpoint": "https://push.example.net/x",
                    "keys": {"p256dh": "AAAA", "auth": "BBBB"},
                },
            },
            "invalid_address",
            "subscription",
            "65 bytes",
        ),
        ({"platform": "web"}, "invalid_device", "subscription", "subscription"),
        (
            {"provider": "sms", "address": "+14155550123", "token": "+14155550123"},
            "invalid_device",
            "address",
            "one value",
        ),
        ({"provider": "inapp", "address": "u1"}, "invalid_request", "provider", ""),
        (
            {"platform": "ios", "provider": "fcm", "device_id": "d", "token": "x"},
            "invalid_device",
            "provider",
            "apns",
        ),
        ({"provider": "apns", "token": "ab" * 32}, "missing_field", "device_id", "device_id"),
        ({"address": "a@example.com"}, "missing_field", "provider", "provider"),
    ],
)
def test_malformed_addresses_get_a_422_with_the_reason_and_nothing_is_published(
    channel_stack: ChannelStack, body: dict[str, object], code: str, field: str, reason: str
) -> None:
    s = channel_stack
    user = f"bad-{uuid.uuid4().hex[:6]}"
    reply = s.call("POST", f"/v1/users/{user}/devices", s.key("users"), json=body)
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert (error["code"], error.get("field")) == (code, field)
    assert reason in error["message"]
    assert device_events(s, user) == []


# --- one-click unsubscribe --------------------------------------------------------------------


def test_the_unsubscribe_link_of_a_real_email_turns_the_category_off(
    channel_stack: ChannelStack,
) -> None:
    s = channel_stack
    s.control.reset("email")
    user = f"reader-{uuid.uuid4().hex[:6]}"
    [answer] = s.send("email", channel_request("email", "reader@example.com", user, CAMPAIGN))
    assert answer.status == 250
    [mail] = s.control.accepted("email")
    header = mail["list_unsubscribe"]
    assert mail["list_unsubscribe_post"] == "List-Unsubscribe=One-Click"
    url = re.fullmatch(r"<(.+)>", header).group(1)  # type: ignore[union-attr]
    assert url in mail["text"] and url in mail["html"]
    path = urlsplit(url).path
    assert url.startswith(s.base + "/v1/unsubscribe/")
    before = len(s.values(PREFERENCE_CHANGES))
    page = s.call("GET", path)  # what a link scanner or a click does: nothing changes
    assert (
        page.status_code == 200
        and "Unsubscribe" in page.text
        and 'name="List-Unsubscribe"' in page.text
    )
    assert len(s.values(PREFERENCE_CHANGES)) == before
    refused = s.call(
        "POST",
        path,
        content=b"unsubscribe=yes",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_body"
    # What Gmail or Apple Mail sends for List-Unsubscribe-Post (RFC 8058 section 3.2).
    done = s.call(
        "POST",
        path,
        content=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert done.status_code == 200 and done.json() == {"unsubscribed": True, "category": "campaign"}
    multipart = s.call("POST", path, files={"List-Unsubscribe": (None, "One-Click")})
    assert multipart.status_code == 200
    switch = wait_json(lambda: s.values(PREFERENCE_CHANGES), lambda d: d.get("user_id") == user)
    event = decode_preference_event(orjson.dumps(switch))
    assert isinstance(event, CategorySwitch)
    assert (event.user_id, event.category, event.channel, event.enabled, event.source) == (
        user,
        "campaign",
        None,
        False,
        "unsubscribe_link",
    )


def test_forged_and_transactional_links(channel_stack: ChannelStack) -> None:
    s = channel_stack
    s.control.reset("email")
    s.send("email", channel_request("email", "x@example.com", "u-f", CAMPAIGN))
    url = s.control.accepted("email")[0]["list_unsubscribe"].strip("<>")
    token = urlsplit(url).path.rsplit("/", 1)[1]
    payload, tag = token.split(".")
    forged = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1] + "." + tag
    for bad in (forged, token + "x", "nonsense"):
        reply = s.call(
            "POST",
            f"/v1/unsubscribe/{bad}",
            content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_token"
        assert s.call("GET", f"/v1/unsubscribe/{bad}").status_code == 400
    s.control.reset("email")
    s.send("email", channel_request("email", "x@example.com", "u-f", RECEIPT))
    assert s.control.accepted("email")[0]["list_unsubscribe"] is None


# --- the live stream --------------------------------------------------------------------------


def test_in_app_notifications_arrive_on_the_stream_and_a_reconnect_replays_what_it_missed(
    channel_stack: ChannelStack,
) -> None:
    s = channel_stack
    user = f"live-{uuid.uuid4().hex[:6]}"
    key = s.key("inbox")
    client = SseClient(
        f"{s.base}/v1/users/{user}/notifications/stream", {"Authorization": f"Bearer {key}"}
    )
    try:
        assert client.response.headers["content-type"].startswith("text/event-stream")
        client.until("ready")
        sent_at = time.monotonic()
        [answer] = s.send("inapp", channel_request("inapp", user, user, RECEIPT, device="inapp"))
        assert answer.status == 200
        event = client.until("notification")
        assert time.monotonic() - sent_at < 2
        first = json.loads(event["data"])
        assert first["title"] == "Receipt for order 77" and first["user_id"] == user
        first_id = event["id"]
    finally:
        client.close()
    # Two more while disconnected: a reconnect with Last-Event-ID gets exactly those.
    s.send(
        "inapp",
        channel_request("inapp", user, user, LOGIN, device="inapp"),
        channel_request("inapp", user, user, CAMPAIGN, device="inapp"),
    )
    again = SseClient(
        f"{s.base}/v1/users/{user}/notifications/stream",
        {"Authorization": f"Bearer {key}", "Last-Event-ID": first_id},
    )
    try:
        replayed = [json.loads(again.until("notification")["data"])["title"] for _ in range(2)]
        again.until("ready")
    finally:
        again.close()
    assert replayed == ["Your login code", "Winter sale"]


def test_stream_tokens_and_stream_auth(channel_stack: ChannelStack) -> None:
    s = channel_stack
    user = f"tok-{uuid.uuid4().hex[:6]}"
    assert s.call("GET", f"/v1/users/{user}/notifications/stream").status_code == 401
    assert (
        s.call("POST", f"/v1/users/{user}/notifications/stream-token", s.key("send")).status_code
        == 403
    )
    issued = s.call("POST", f"/v1/users/{user}/notifications/stream-token", s.key("inbox")).json()
    assert issued["url"].startswith(s.base) and issued["expires_in"] == 3600
    other = s.call(
        "GET", f"/v1/users/someone-else/notifications/stream?access_token={issued['token']}"
    )
    assert other.status_code == 403
    bad = s.call("GET", f"/v1/users/{user}/notifications/stream?access_token={issued['token']}x")
    assert bad.status_code == 401
    client = SseClient(issued["url"])
    try:
        client.until("ready")
        s.send("inapp", channel_request("inapp", user, user, RECEIPT, device="inapp"))
        assert json.loads(client.until("notification")["data"])["category"] == "receipt"
    finally:
        client.close()


# --- SMS status callbacks ---------------------------------------------------------------------


def test_sms_status_callbacks_become_acks_and_dead_numbers_are_deactivated(
    channel_stack: ChannelStack,
) -> None:
    s = channel_stack
    s.control.reset("sms")
    s.control.set_address_errors("sms", {"+14155550666": {"undelivered": 30006}})
    user = f"sms-{uuid.uuid4().hex[:6]}"
    ok = channel_request("sms", "+14155550123", user, LOGIN)
    landline = channel_request("sms", "+14155550666", user, LOGIN)
    assert [a.status for a in s.send("sms", ok, landline)] == [201, 201]
    ack = wait_json(
        lambda: s.values(NOTIFICATION_ACKS),
        lambda d: d["notification_id"] == ok.item["notification_id"],
    )
    decoded = decode_notification_ack(orjson.dumps(ack))
    assert (decoded.device_id, decoded.event) == (ok.item["device_id"], "delivered")
    gone = wait_json(lambda: s.values(DEVICE_CHANGES), lambda d: d["user_id"] == user)
    assert (gone["device_id"], gone["provider"], gone["active"]) == (
        landline.item["device_id"],
        "sms",
        False,
    )
    callbacks = s.control.callbacks()
    assert {c["answer"] for c in callbacks} == {204}  # every callback's signature was accepted
    forged = s.call(
        "POST",
        "/v1/callbacks/sms?n=x&d=y&u=z",
        content=b"MessageStatus=delivered",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": "bm9wZQ==",
        },
    )
    assert forged.status_code == 403


def test_inbound_stop_and_start_switch_the_numbers_addresses_through_device_changes(
    channel_stack: ChannelStack,
) -> None:
    """The local SMS server posts what a phone sends to our number; STOP and START follow the
    number's current addresses (a number that moved to another user stops only that user)."""
    s = channel_stack
    key = s.key("users")
    url = f"{s.settings.resolved_public_url}/v1/channels/sms/inbound"
    ours = s.providers.info["channels"]["sms"]["from"]
    number = f"+1415{uuid.uuid4().int % 10**7:07d}"
    other = f"+1416{uuid.uuid4().int % 10**7:07d}"
    ada, bob = (f"{n}-{uuid.uuid4().hex[:6]}" for n in ("ada", "bob"))

    def devices(user: str, body: dict[str, str], method: str = "POST") -> str:
        reply = s.call(method, f"/v1/users/{user}/devices", key, json=body)
        assert reply.status_code == 202, reply.text
        return str(reply.json()["device_id"])

    def sms(body: str, sender: str = number) -> str:
        answer = s.control.sms_inbound(url, sender, ours, body)
        assert answer["status"] == 200 and "xml" in answer["content_type"], answer
        return str(answer["answer"])

    def changes(*users: str) -> list[tuple[str, str, str | None, bool]]:
        return [
            (str(e["user_id"]), str(e["device_id"]), e.get("token"), bool(e["active"]))
            for e in (json.loads(v) for v in s.values(DEVICE_CHANGES))
            if e["user_id"] in users
        ]

    ada_phone = devices(ada, {"provider": "sms", "address": number})
    ada_work = devices(ada, {"provider": "sms", "address": other, "device_id": "work"})
    reply = sms(" stop. ")
    assert "<Message>" in reply and "START" in reply
    gone = (ada, ada_phone, None, False)
    wait_for(lambda: gone in changes(ada), 30, "ada's number deactivated")
    assert (ada, "work", None, False) not in changes(ada)  # another number: untouched
    assert "<Message>" in sms("HELP") and "<Message>" not in sms("thanks, got it")

    # The number moves: ada removes it, bob registers it; ada's work address takes it too and
    # then goes back to its own number.
    devices(ada, {"provider": "sms", "device_id": ada_phone}, "DELETE")
    bob_phone = devices(bob, {"provider": "sms", "address": number})
    devices(ada, {"provider": "sms", "address": number, "device_id": ada_work})
    devices(ada, {"provider": "sms", "address": other, "device_id": ada_work})
    before = len(changes(ada, bob))
    assert "again" in sms("Start")
    back = (bob, bob_phone, number, True)
    wait_for(lambda: back in changes(bob), 30, "bob's number active again")
    time.sleep(1)
    # Only bob's address was switched on: nothing of ada's followed the number.
    assert changes(ada, bob)[before:] == [back]
    assert "no more" in sms("STOP", sender=other)
    wait_for(lambda: (ada, ada_work, None, False) in changes(ada), 30, "ada's work number off")

    forged = s.call(
        "POST",
        "/v1/channels/sms/inbound",
        content=f"From={number}&Body=START".replace("+", "%2B").encode(),
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": "bm9wZQ==",
        },
    )
    assert forged.status_code == 403


# --- web push key and the development page -----------------------------------------------------


def test_the_vapid_key_and_the_dev_inbox_page(channel_stack: ChannelStack) -> None:
    from operators.adapters.channels.webpush import vapid_public_key

    s = channel_stack
    key = s.call("GET", "/v1/webpush/key").json()["public_key"]
    assert key == vapid_public_key(__import__("pathlib").Path(s.settings.webpush_vapid_key_file))
    page = s.call("GET", "/dev/inbox?user=u1")
    assert (
        page.status_code == 200 and "new EventSource" in page.text and "access_token=" in page.text
    )
    docs = s.call("GET", "/openapi.json").json()["paths"]
    assert {
        "/v1/unsubscribe/{token}",
        "/v1/users/{user_id}/notifications/stream",
        "/v1/callbacks/sms",
    } <= set(docs)
    assert "/dev/inbox" not in docs
