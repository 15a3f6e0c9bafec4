"""`fanfare api` over real HTTP: the real server (uvicorn, a subprocess), the embedded broker, Redis.

One broker and one server for the module (each test uses keys and ids of its own, and compares
topic counts before and after); the scheduler runs as `fanfare api scheduler` and is killed
with SIGKILL mid-campaign.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from flows.runtime.ports import free_port
from operators.adapters.kafka.admin import create_topics
from operators.adapters.kafka.client_log import client_config
from operators.adapters.kafka.probes import topic_partitions
from operators.adapters.kafka.writer import produce_all
from operators.adapters.redis.api_store import RedisKeyStore, api_redis
from operators.adapters.redis.client import PerThreadRedis
from operators.adapters.redis.segments import RedisSegmentIndex
from operators.adapters.stores.sqlite_followers import SQLiteFollowerStore
from operators.adapters.stores.sqlite_notifications import SQLiteNotificationStore
from operators.config import load_settings
from operators.delivery.ledger import LedgerUpdate
from operators.fanout.eligibility import edge_flags
from operators.notify.keys import new_key
from operators.notify.segments import Segment
from schemas.codecs import (
    decode_device_change,
    decode_notification_ack,
    decode_notification_request,
    decode_preference_change,
    decode_tier_event,
    format_timestamp,
)
from schemas.records import NotificationCancel
from schemas.topics import (
    DEVICE_CHANGES,
    NOTIFICATION_ACKS,
    PREFERENCE_CHANGES,
)
from scripts.commands.api import API_TOPICS
from scripts.dev import devstack
from scripts.harness.spawn import signal_fanfare, start_fanfare, stop_fanfare
from tests.conftest import REDIS_URL, Stack, wait_for
from tests.fakes import request as send_request

pytestmark = pytest.mark.integration

LOGIN = {"code": "482913", "minutes": 10}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def code(self) -> str | None:
        return (
            (self.body or {}).get("error", {}).get("code") if isinstance(self.body, dict) else None
        )


@dataclass
class Api:
    stack: Stack
    port: int
    proc: subprocess.Popen[bytes]
    keys: RedisKeyStore

    def key(
        self, endpoints: str = "*", categories: str = "*", rate: float = 1000, burst: int = 1000
    ) -> str:
        made = new_key(
            f"test-{uuid.uuid4().hex[:6]}",
            frozenset(endpoints.split(",")),
            frozenset(categories.split(",")),
            rate,
            burst,
            time.time(),
        )
        self.keys.add(made.record)
        return made.text

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        key: str | None = None,
        *,
        raw: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        data: Any = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        chunked = data is not None and not isinstance(data, bytes)
        try:
            conn.request(method, path, body=data, headers=sent, encode_chunked=chunked)
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        parsed = json.loads(payload) if payload and payload[:1] in b"{[" else payload
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, parsed)

    def messages(self, topic: str) -> list[bytes]:
        return [v or b"" for _, _, v in self.stack.read_topic(topic)]

    def counts(self) -> dict[str, int]:
        """Messages per topic, read to partition EOF by one consumer (fast, exact)."""
        from confluent_kafka import Consumer, KafkaError, TopicPartition

        config = client_config(
            self.stack.settings.kafka_config(),
            **{"group.id": "api-test-counts", "enable.partition.eof": True},
        )
        consumer = Consumer(config)
        parts = [p.rsplit("/", 1) for p in topic_partitions(config, list(API_TOPICS))]
        consumer.assign([TopicPartition(t, int(p), 0) for t, p in parts])
        counts = dict.fromkeys(API_TOPICS, 0)
        open_parts = {(t, int(p)) for t, p in parts}
        deadline = time.monotonic() + 30
        try:
            while open_parts and time.monotonic() < deadline:
                for m in consumer.consume(1000, 0.2):
                    err = m.error()
                    if err is None:
                        counts[m.topic()] += 1
                    elif err.code() == KafkaError._PARTITION_EOF:
                        open_parts.discard((m.topic(), m.partition()))
        finally:
            consumer.close()
        assert not open_parts, f"not read to the end: {open_parts}"
        return counts

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "scripts.cli", *argv],
            env={**os.environ, **self.stack.env},
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    home = tmp_path_factory.mktemp("api") / "home"
    prefix = f"fanfare-test-{uuid.uuid4().hex[:8]}:"
    port = free_port()
    env = {
        "FANFARE_HOME": str(home),
        "FANFARE_KAFKA_BROKERS": f"127.0.0.1:{free_port()}",
        "FANFARE_REDIS_URL": REDIS_URL,
        "FANFARE_REDIS_PREFIX": prefix,
        "FANFARE_TOPIC_PARTITIONS": "2",
        "FANFARE_SHARDS": "4",
        "FANFARE_API_PORT": str(port),
        "FANFARE_API_CAMPAIGN_LEASE_S": "1",
        "FANFARE_LOG_LEVEL": "INFO",
    }
    settings = load_settings(env)
    devstack.start_broker(settings)
    stack = Stack(env, settings)
    proc = None
    try:
        create_topics(settings)
        proc = start_fanfare(["api"], {**os.environ, **env}, home / "api.log")
        server = Api(stack, port, proc, RedisKeyStore(api_redis(REDIS_URL), prefix))

        def healthy() -> bool:
            assert proc is not None
            if proc.poll() is not None:
                raise AssertionError((home / "api.log").read_text())
            try:
                return server.call("GET", "/health").status == 200
            except OSError:
                return False

        wait_for(healthy, 90, "fanfare api to answer /health", every_s=0.2)
        yield server
    finally:
        code = stop_fanfare(proc) if proc is not None else 0
        devstack.stop_broker(settings)
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    assert code == 0, f"fanfare api exited {code} on SIGTERM:\n{(home / 'api.log').read_text()}"


def login(key_suffix: str = "", **changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "idempotency_key": f"login-{uuid.uuid4().hex}{key_suffix}",
        "category": "login_code",
        "template_id": "login_code",
        "recipients": ["u1", "u2"],
        "data": LOGIN,
    }
    body.update(changes)
    return body


def raw_exchange(port: int, head: str, chunks: list[bytes]) -> tuple[int, dict[str, Any]]:
    """Send a request by hand (the server may answer and close before the body is sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode())
        for chunk in chunks:
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = b""
        while b"}}" not in answer:
            try:
                more = s.recv(65536)
            except ConnectionResetError:
                break
            if not more:
                break
            answer += more
    status_line, _, rest = answer.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(payload)["error"]


def assert_error(reply: Reply, status: int, code: str, field: str | None = None) -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["content-type"] == "application/json"
    assert set(reply.body) == {"error"}, reply.body
    error = reply.body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) <= {"code", "message", "field"}
    if field is not None:
        assert error.get("field") == field, error


# --- sending ------------------------------------------------------------------------------------


def test_a_notification_goes_to_its_tier_topic_once_per_idempotency_key(api: Api) -> None:
    key = api.key(endpoints="send,status", categories="login_code,new_post")
    before = api.counts()
    body = login(send_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat())
    first = api.call("POST", "/v1/notifications", body, key)
    assert first.status == 202, first.body
    nid = first.body["notification_id"]
    assert first.body["tier"] == "transactional" and first.body["topic"] == "notify.transactional"
    again = api.call("POST", "/v1/notifications", body, key)
    assert again.status == 202 and again.body == first.body
    assert again.headers.get("idempotent-replayed") == "true"
    changed = api.call("POST", "/v1/notifications", {**body, "recipients": ["u9"]}, key)
    assert_error(changed, 409, "idempotency_key_reused", "idempotency_key")
    # Once the first answer expired, the key still names the notification it made.
    client = redis.Redis.from_url(REDIS_URL)
    prefix = api.stack.env["FANFARE_REDIS_PREFIX"]
    client.delete(*client.scan_iter(match=f"{prefix}api:idem:{key.split('_')[1]}:*"))
    expired = api.call("POST", "/v1/notifications", body, key)
    assert_error(expired, 409, "idempotency_key_reused", "idempotency_key")
    assert nid in expired.body["error"]["message"]
    social = api.call(
        "POST",
        "/v1/notifications",
        {
            "idempotency_key": f"post-{uuid.uuid4().hex}",
            "category": "new_post",
            "template_id": "new_post",
            "recipients": ["u3"],
            "data": {"author_name": "Ann", "excerpt": "Hello", "post_id": "p9"},
        },
        key,
    )
    assert social.status == 202 and social.body["topic"] == "notify.social"
    after = api.counts()
    assert after["notify.transactional"] == before["notify.transactional"] + 1
    assert after["notify.social"] == before["notify.social"] + 1
    events = [decode_notification_request(v) for v in api.messages("notify.transactional")]
    [event] = [e for e in events if e.notification_id == nid]
    assert event.recipients == ("u1", "u2") and event.category == "login_code"
    assert (event.quiet_hours, event.caps, event.channels) == (False, False, ("push", "sms"))
    assert event.fallback == ("push", "sms")  # push, then SMS for a user without a device
    assert event.data == LOGIN and event.send_at is not None
    status = api.call("GET", f"/v1/notifications/{nid}/status", key=key)
    assert status.status == 200, status.body
    assert status.body["state"] == "accepted" and status.body["recipients"] == 2
    assert status.body["recipient_status"] == {"unknown": 2}  # no delivery flow runs here


def test_bad_requests_get_a_json_reason_and_publish_nothing(api: Api) -> None:
    key = api.key(endpoints="send", categories="*")
    before = api.counts()
    too_many = [f"u{i}" for i in range(1001)]
    cases: list[tuple[dict[str, object] | bytes, int, str, str | None]] = [
        (b'{"idempotency_key": ', 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_body", None),
        ({"category": "login_code"}, 422, "missing_field", None),
        (login(colour="red"), 422, "unknown_field", "colour"),
        (login(recipients=too_many), 422, "too_many_recipients", "recipients"),
        (login(recipients=[]), 422, "invalid_request", "recipients"),
        (login(recipients=[1, 2]), 422, "invalid_request", "recipients.0"),
        (login(recipients=["a\nb"]), 422, "invalid_request", "recipients.0"),
        (login(category="urgent"), 422, "unknown_category", "category"),
        (login(template_id="nope"), 422, "unknown_template", "template_id"),
        (login(template_id="receipt"), 422, "template_category_mismatch", "template_id"),
        (login(data={"code": "1"}), 422, "missing_template_data", "data"),
        (login(data={"code": {"x": 1}, "minutes": 1}), 422, "invalid_request", None),
        (login(send_at="2026-12-24T10:00:00"), 422, "invalid_request", "send_at"),
        (login(send_at="2099-01-01T00:00:00Z"), 422, "invalid_send_at", "send_at"),
        (login(channels=["fax"]), 422, "invalid_request", "channels.0"),
        (
            login(
                category="receipt",
                template_id="receipt",
                data={"order_id": "1", "amount": "1", "currency": "EUR"},
                channels=["push", "sms"],
            ),
            422,
            "channel_not_allowed",
            "channels",
        ),
        (login(channels=[]), 422, "invalid_request", "channels"),
        (login(collapse_key="x" * 65), 422, "invalid_request", "collapse_key"),
        (login(idempotency_key=""), 422, "invalid_request", "idempotency_key"),
    ]
    for body, status, code, field in cases:
        if isinstance(body, bytes):
            reply = api.call(
                "POST",
                "/v1/notifications",
                key=key,
                raw=body,
                headers={"Content-Type": "application/json"},
            )
        else:
            reply = api.call("POST", "/v1/notifications", body, key)
        assert_error(reply, status, code, field)
    form = api.call(
        "POST",
        "/v1/notifications",
        key=key,
        raw=b"a=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_error(form, 400, "invalid_body")
    assert_error(api.call("GET", "/v1/nothing-here", key=key), 404, "not_found")
    assert_error(api.call("PUT", "/v1/notifications", login(), key), 405, "method_not_allowed")
    assert api.counts() == before


def test_auth_no_key_bad_key_revoked_key_and_wrong_scope(api: Api) -> None:
    before = api.counts()
    body = login()
    reply = api.call("POST", "/v1/notifications", body)
    assert_error(reply, 401, "missing_api_key")
    assert reply.headers["www-authenticate"].startswith("Bearer")
    assert_error(api.call("POST", "/v1/notifications", body, "not-a-key"), 401, "invalid_api_key")
    good = api.key(endpoints="send", categories="new_post")
    key_id, secret = good.split("_")[1], good.split("_", 2)[2]
    forged = f"ffk_{key_id}_{'A' * len(secret)}"
    assert_error(api.call("POST", "/v1/notifications", body, forged), 401, "invalid_api_key")
    unknown = f"ffk_{'0' * 12}_{secret}"
    assert_error(api.call("POST", "/v1/notifications", body, unknown), 401, "invalid_api_key")
    basic = api.call("POST", "/v1/notifications", body, headers={"Authorization": f"Basic {good}"})
    assert_error(basic, 401, "invalid_api_key")
    # A key for social notifications cannot send a transactional one.
    assert_error(api.call("POST", "/v1/notifications", body, good), 403, "forbidden", "category")
    # Nor call an endpoint outside its scopes.
    assert_error(api.call("GET", "/v1/users/u1/notifications", key=good), 403, "forbidden")
    revoked = api.key()
    api.keys.revoke(revoked.split("_")[1], time.time())
    assert_error(api.call("POST", "/v1/notifications", body, revoked), 401, "revoked_api_key")
    assert api.counts() == before


def test_the_per_key_rate_limit_answers_429_with_retry_after(api: Api) -> None:
    key = api.key(endpoints="status", rate=0.5, burst=2)
    other = api.key(endpoints="status", rate=0.5, burst=2)
    path = "/v1/notifications/n_missing/status"
    assert api.call("GET", path, key=key).status == 404
    assert api.call("GET", path, key=key).status == 404
    limited = api.call("GET", path, key=key)
    assert_error(limited, 429, "rate_limited")
    assert int(limited.headers["retry-after"]) in (1, 2)
    assert api.call("GET", path, key=other).status == 404  # buckets are per key


def test_oversized_bodies_are_refused_before_they_are_read(api: Api) -> None:
    key = api.key()
    before = api.counts()
    head = (
        "POST /v1/notifications HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\n"
    )
    # Declared too large: answered at once, with the body never sent.
    started = time.monotonic()
    status, error = raw_exchange(api.port, head + "Content-Length: 50000000\r\n\r\n", [])
    assert time.monotonic() - started < 5
    assert status == 413 and error["code"] == "payload_too_large", error
    # Chunked, no length: refused once it passes the limit (256 KiB by default).
    chunk = b"x" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 8 + [b"0\r\n\r\n"]
    status, error = raw_exchange(api.port, head + "Transfer-Encoding: chunked\r\n\r\n", chunks)
    assert status == 413 and error["code"] == "payload_too_large", error
    # An upload has its own, larger limit.
    users = "".join(f"user-{i:06d}\n" for i in range(30_000)).encode()  # ~360 KB
    upload = api.call(
        "POST",
        "/v1/notifications/bulk/audiences",
        key=key,
        raw=users,
        headers={"Content-Type": "text/plain"},
    )
    assert upload.status == 201 and upload.body["users"] == 30_000
    assert api.counts() == before


def test_two_api_processes_share_idempotency_answers_and_rate_limits(api: Api) -> None:
    home = Path(api.stack.env["FANFARE_HOME"])
    port = free_port()
    proc = start_fanfare(
        ["api", "--port", str(port)], {**os.environ, **api.stack.env}, home / "api-2.log"
    )
    try:
        second = Api(api.stack, port, proc, api.keys)

        def healthy() -> bool:
            try:
                return second.call("GET", "/health").status == 200
            except OSError:
                return False

        wait_for(healthy, 60, "a second fanfare api", every_s=0.2)
        key = api.key(endpoints="send", categories="login_code", rate=0.2, burst=2)
        body = login()
        first = api.call("POST", "/v1/notifications", body, key)
        assert first.status == 202
        replayed = second.call("POST", "/v1/notifications", body, key)
        assert replayed.status == 202 and replayed.body == first.body
        assert replayed.headers.get("idempotent-replayed") == "true"
        # The key's bucket (2 at once) is shared: the third request, on either process, waits.
        assert_error(second.call("POST", "/v1/notifications", login(), key), 429, "rate_limited")
    finally:
        assert stop_fanfare(proc) == 0


# --- users: preferences and devices -------------------------------------------------------------


def test_preferences_and_devices_are_published_in_their_contracts(api: Api) -> None:
    key = api.key(endpoints="users", categories="*")
    user = f"user-{uuid.uuid4().hex[:8]}"
    before = api.counts()
    bad = [
        ("PUT", "preferences", {"timezone": "Mars/Olympus"}, "invalid_preferences"),
        ("PUT", "preferences", {"timezone": "UTC", "quiet_hours_start": 22}, "invalid_preferences"),
        (
            "PUT",
            "preferences",
            {"timezone": "UTC", "quiet_hours_start": 24, "quiet_hours_end": 7},
            "invalid_request",
        ),
        ("PUT", "preferences", {"timezone": "UTC", "push_enabled": "yes"}, "invalid_request"),
        ("PUT", "preferences", {"timezone": "UTC", "locale": "fr CA"}, "invalid_request"),
        (
            "POST",
            "devices",
            {"device_id": "d1", "provider": "apns", "token": "zz"},
            "invalid_device",
        ),
        (
            "POST",
            "devices",
            {"device_id": "d1", "provider": "sms", "token": "ab" * 32},
            "invalid_address",  # sms is a channel address: not E.164
        ),
        (
            "POST",
            "devices",
            {"device_id": "d1", "provider": "fax", "token": "ab" * 32},
            "invalid_request",
        ),
        ("DELETE", "devices", {"device_id": "d1"}, "missing_field"),
    ]
    for method, what, body, code in bad:
        reply = api.call(method, f"/v1/users/{user}/{what}", body, key)
        assert reply.status == 422 and reply.code == code, (what, body, reply.body)
    assert api.counts() == before
    prefs = api.call(
        "PUT",
        f"/v1/users/{user}/preferences",
        {
            "timezone": "Europe/Paris",
            "quiet_hours_start": 22,
            "quiet_hours_end": 7,
            "locale": "fr-CA",
        },
        key,
    )
    assert prefs.status == 202 and prefs.body["topic"] == PREFERENCE_CHANGES
    token = "ab" * 32
    added = api.call(
        "POST",
        f"/v1/users/{user}/devices",
        {"device_id": "d1", "provider": "apns", "token": token},
        key,
    )
    assert added.status == 202 and added.body["topic"] == DEVICE_CHANGES
    removed = api.call(
        "DELETE", f"/v1/users/{user}/devices", {"device_id": "d1", "provider": "apns"}, key
    )
    assert removed.status == 202
    [change] = [
        c
        for c in map(decode_preference_change, api.messages(PREFERENCE_CHANGES))
        if c.user_id == user
    ]
    assert (change.quiet_hours_start, change.quiet_hours_end, change.timezone) == (
        22,
        7,
        "Europe/Paris",
    )
    assert change.push_enabled is True and change.locale == "fr-CA"
    devices = [
        d for d in map(decode_device_change, api.messages(DEVICE_CHANGES)) if d.user_id == user
    ]
    assert [(d.device_id, d.active, d.token) for d in devices] == [
        ("d1", True, token),
        ("d1", False, None),
    ]
    raw = next(v for v in api.messages(PREFERENCE_CHANGES) if orjson.loads(v)["user_id"] == user)
    assert set(orjson.loads(raw)) == {
        "user_id",
        "push_enabled",
        "quiet_hours_start",
        "quiet_hours_end",
        "timezone",
        "ts",
        "locale",
    }


# --- the inbox and status -----------------------------------------------------------------------


def test_inbox_status_and_read_marks_go_through_acks(api: Api) -> None:
    key = api.key(endpoints="inbox,status,send", categories="*")
    user = f"reader-{uuid.uuid4().hex[:6]}"
    store = SQLiteNotificationStore(
        api.stack.settings.resolved_notification_store_url.removeprefix("sqlite:///")
    )
    now = time.time()
    sent = [send_request(user, "d1", post=f"p{k}", created_ts=now - 60 * (5 - k)) for k in range(5)]
    sent.append(send_request(user, "d2", post="p4", provider="fcm", created_ts=now - 60))
    store.claim(sent)
    store.record([LedgerUpdate(r.key, "accepted", 1, 0, 200, None, None, True) for r in sent], now)

    page = api.call("GET", f"/v1/users/{user}/notifications?limit=2", key=key)
    assert page.status == 200
    assert [n["post_id"] for n in page.body["notifications"]] == ["p4", "p3"]
    assert all(not n["read"] for n in page.body["notifications"])
    rest = api.call(
        "GET", f"/v1/users/{user}/notifications?limit=10&cursor={page.body['next_cursor']}", key=key
    )
    assert [n["post_id"] for n in rest.body["notifications"]] == ["p2", "p1", "p0"]
    assert rest.body["next_cursor"] is None
    bad_cursor = api.call("GET", f"/v1/users/{user}/notifications?cursor=nope", key=key)
    assert_error(bad_cursor, 422, "invalid_cursor", "cursor")

    before = set(api.messages(NOTIFICATION_ACKS))
    read = api.call("PATCH", f"/v1/notifications/p4:{user}/read", key=key)
    assert read.status == 202 and read.body["acks"] == 2  # both devices
    assert_error(api.call("PATCH", f"/v1/notifications/p9:{user}/read", key=key), 404, "not_found")
    acks = [decode_notification_ack(v) for v in api.messages(NOTIFICATION_ACKS) if v not in before]
    assert sorted((a.notification_id, a.device_id, a.event) for a in acks) == [
        (f"p4:{user}", "d1", "opened"),
        (f"p4:{user}", "d2", "opened"),
    ]
    store.apply_acks(acks)  # what the acks flow does with them
    unread = api.call("GET", f"/v1/users/{user}/notifications?unread_only=true&limit=3", key=key)
    assert [n["post_id"] for n in unread.body["notifications"]] == ["p3", "p2", "p1"]
    assert unread.body["next_cursor"] is not None
    last = api.call(
        "GET",
        f"/v1/users/{user}/notifications?unread_only=true&cursor={unread.body['next_cursor']}",
        key=key,
    )
    assert [n["post_id"] for n in last.body["notifications"]] == ["p0"]
    assert last.body["next_cursor"] is None

    before = set(api.messages(NOTIFICATION_ACKS))
    everything = api.call("POST", f"/v1/users/{user}/notifications/read-all", key=key)
    assert everything.status == 202
    assert everything.body == {"user_id": user, "marked": 4, "acks": 4, "complete": True}
    acks = [decode_notification_ack(v) for v in api.messages(NOTIFICATION_ACKS) if v not in before]
    store.apply_acks(acks)
    none_left = api.call("GET", f"/v1/users/{user}/notifications?unread_only=true", key=key)
    assert none_left.body["notifications"] == []

    one = api.call("GET", f"/v1/notifications/p4:{user}/status", key=key)
    assert one.status == 200 and one.body["status"] == "opened" and one.body["read"]
    assert {d["device_id"] for d in one.body["devices"]} == {"d1", "d2"}
    # A notification the API accepted, once the store has one of its recipients.
    accepted = api.call("POST", "/v1/notifications", login(recipients=[user, "u-other"]), key)
    nid = accepted.body["notification_id"]
    store.claim([send_request(user, "d1", post=nid)])
    status = api.call("GET", f"/v1/notifications/{nid}/status", key=key)
    assert status.body["recipient_status"] == {"pending": 1, "unknown": 1}
    # Per channel and recipient: the one send under way is push (apns), the rest no send yet.
    assert status.body["channels"] == {"push": {"sending": 1, "no_send": 1}, "sms": {"no_send": 2}}
    assert status.body["by_recipient"][user] == {
        "status": "pending",
        "channels": {"push": "sending"},
    }
    store.close()


# --- keys ---------------------------------------------------------------------------------------


def test_keys_create_list_revoke_from_the_command_line(api: Api) -> None:
    created = api.cli(
        "api",
        "keys",
        "create",
        "--name",
        "orders",
        "--endpoints",
        "send",
        "--categories",
        "receipt,login_code",
        "--rate",
        "5",
        "--json",
    )
    assert created.returncode == 0, created.stderr
    record = json.loads(created.stdout)
    key = record["key"]
    assert record["categories"] == ["login_code", "receipt"] and record["rate_per_s"] == 5
    stored = api.keys.get(record["key_id"])
    assert stored is not None and key.split("_", 2)[2] not in repr(stored)
    assert api.call("POST", "/v1/notifications", login(), key).status == 202
    listed = api.cli("api", "keys", "list")
    assert record["key_id"] in listed.stdout and "orders" in listed.stdout
    assert key not in listed.stdout
    typo = api.cli("api", "keys", "create", "--name", "x", "--categories", "reciept")
    assert typo.returncode == 2 and "unknown categories ['reciept']" in typo.stderr
    revoked = api.cli("api", "keys", "revoke", record["key_id"])
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert_error(api.call("POST", "/v1/notifications", login(), key), 401, "revoked_api_key")
    assert api.cli("api", "keys", "revoke", "000000000000").returncode == 1


# --- operations ---------------------------------------------------------------------------------


def test_health_metrics_and_docs(api: Api) -> None:
    health = api.call("GET", "/health")
    assert health.status == 200 and health.body["status"] == "ok"
    assert set(health.body["checks"]) == {"redis", "kafka"}
    docs = api.call("GET", "/docs")
    assert docs.status == 200 and b"swagger" in docs.body.lower()
    spec = api.call("GET", "/openapi.json").body
    assert {
        "/v1/notifications",
        "/v1/notifications/bulk",
        "/v1/notifications/bulk/{campaign_id}",
        "/v1/notifications/{notification_id}/status",
        "/v1/users/{user_id}/notifications",
        "/v1/users/{user_id}/preferences",
        "/v1/users/{user_id}/devices",
    } <= set(spec["paths"])
    api.call("GET", "/v1/notifications/n_abc/status", key=api.key(endpoints="status"))
    metrics = api.call("GET", "/metrics").body.decode()
    assert 'fanfare_api_requests_total{method="GET",route="/health",status="200"}' in metrics
    assert "fanfare_api_request_seconds_bucket" in metrics
    assert 'route="/v1/notifications/{notification_id}/status"' in metrics  # templates, not ids


# --- campaigns ----------------------------------------------------------------------------------


def campaign_body(targeting: dict[str, object], rate: float, **more: object) -> dict[str, object]:
    return {
        "idempotency_key": f"campaign-{uuid.uuid4().hex}",
        "category": "campaign",
        "template_id": "campaign",
        "data": {"headline": "Winter sale", "message": "Everything -20%", "link": "fanfare://sale"},
        "targeting": targeting,
        "rate_per_s": rate,
        **more,
    }


def campaign_users(api: Api, campaign_id: str) -> list[str]:
    return [
        u
        for v in api.messages("notify.marketing")
        for e in (decode_notification_request(v),)
        if e.campaign_id == campaign_id
        for u in e.recipients
    ]


def test_campaign_validation(api: Api) -> None:
    key = api.key(endpoints="campaigns", categories="*")
    social = api.key(endpoints="campaigns", categories="new_post")
    before = api.counts()
    cases = [
        (campaign_body({"segment": {"locale": "xq"}}, 10), 422, "empty_segment"),
        (campaign_body({"segment": {}}, 10), 422, "invalid_segment"),
        (campaign_body({}, 10), 422, "invalid_request"),
        (
            campaign_body({"followers_of": "a", "audience_id": "a_" + "0" * 32}, 10),
            422,
            "invalid_request",
        ),
        (campaign_body({"audience_id": "a_" + "0" * 32}, 10), 422, "unknown_audience"),
        (campaign_body({"followers_of": "a"}, 10_000), 422, "invalid_rate"),
        (campaign_body({"followers_of": "a"}, 0), 422, "invalid_request"),
        (
            {
                **campaign_body({"followers_of": "a"}, 10),
                "category": "login_code",
                "template_id": "login_code",
                "data": LOGIN,
            },
            422,
            "invalid_category",
        ),
        (
            campaign_body(
                {"followers_of": "a"},
                10,
                window={"start": "2026-12-06T10:00:00Z", "end": "2026-12-06T09:00:00Z"},
            ),
            422,
            "invalid_window",
        ),
        (campaign_body({"followers_of": "a"}, 10, fallback=["push"]), 422, "invalid_request"),
        (
            campaign_body({"followers_of": "a"}, 10, fallback=["push", "push"]),
            422,
            "invalid_fallback",
        ),
        (
            campaign_body({"followers_of": "a"}, 10, channels=["push"], fallback=["push", "email"]),
            422,
            "invalid_fallback",
        ),
    ]
    for body, status, code in cases:
        assert_error(api.call("POST", "/v1/notifications/bulk", body, key), status, code)
    forbidden = api.call(
        "POST", "/v1/notifications/bulk", campaign_body({"followers_of": "a"}, 5), social
    )
    assert_error(forbidden, 403, "forbidden", "category")
    assert_error(api.call("GET", "/v1/notifications/bulk/c_nope", key=key), 404, "not_found")
    bad_upload = api.call(
        "POST",
        "/v1/notifications/bulk/audiences",
        key=key,
        raw=b"u1\n" + b"x" * 300 + b"\n",
        headers={"Content-Type": "text/plain"},
    )
    assert_error(bad_upload, 422, "invalid_audience")
    assert api.counts() == before


def test_campaigns_progress_cancel_and_resume_after_kill_9_without_duplicates(api: Api) -> None:
    key = api.key(endpoints="campaigns", categories="campaign")
    audience = [f"member-{i:04d}" for i in range(400)]
    upload = api.call(
        "POST",
        "/v1/notifications/bulk/audiences",
        key=key,
        raw=("user_id\n" + "\n".join(audience + audience[:5]) + "\n").encode(),
        headers={"Content-Type": "text/plain"},
    )
    assert upload.status == 201
    assert upload.body["users"] == 400 and upload.body["duplicates_dropped"] == 5
    listed = api.call(
        "POST",
        "/v1/notifications/bulk",
        campaign_body({"audience_id": upload.body["audience_id"]}, 40),
        key,
    )
    assert listed.status == 202 and listed.body["state"] == "scheduled"
    assert listed.body["total"] == 400 and listed.body["remaining"] == 400
    list_id = listed.body["campaign_id"]

    followers = SQLiteFollowerStore(
        api.stack.settings.resolved_store_url.removeprefix("sqlite:///"), 4
    )
    fans = [f"fan-{i:03d}" for i in range(30)]
    followers.bulk_load(("star", f, edge_flags(True, muted=f.endswith("3"))) for f in fans)
    followers.close()
    # Its own fallback: each fan gets push, or email when push cannot reach them.
    body = campaign_body({"followers_of": "star"}, 100, fallback=["push", "email"])
    fanned = api.call("POST", "/v1/notifications/bulk", body, key)
    assert fanned.status == 202 and fanned.body["total"] == 30
    assert fanned.body["channels"] == ["push", "inbox", "email"]
    assert fanned.body["fallback"] == ["push", "email"]
    assert listed.body["fallback"] == []  # the campaign category has none
    assert api.call("POST", "/v1/notifications/bulk", body, key).body == fanned.body  # idempotent
    fan_id = fanned.body["campaign_id"]

    home = Path(api.stack.env["FANFARE_HOME"])
    env = {**os.environ, **api.stack.env}

    def progress(cid: str) -> dict[str, Any]:
        reply = api.call("GET", f"/v1/notifications/bulk/{cid}", key=key)
        assert reply.status == 200, reply.body
        return reply.body  # type: ignore[no-any-return]

    scheduler = start_fanfare(["api", "scheduler"], env, home / "scheduler.log")
    try:
        wait_for(lambda: progress(list_id)["emitted"] >= 40, 60, "the campaign to start")
        running = progress(list_id)
        assert running["state"] == "running" and running["started_at"]
        assert running["remaining"] == 400 - running["emitted"]
        signal_fanfare(scheduler, signal.SIGKILL)
        scheduler.wait(10)
        at_kill = progress(list_id)["emitted"]
        scheduler = start_fanfare(["api", "scheduler"], env, home / "scheduler.log")
        wait_for(lambda: progress(list_id)["emitted"] >= at_kill + 80, 60, "the campaign to resume")
        cancelled = api.call("DELETE", f"/v1/notifications/bulk/{list_id}", key=key)
        assert cancelled.status == 200 and cancelled.body["state"] == "cancelled"
        wait_for(lambda: progress(fan_id)["state"] == "completed", 60, "the followers campaign")
        time.sleep(1.0)
        final = progress(list_id)
        assert final["state"] == "cancelled" and final["in_flight"] == 0
        assert 0 < final["emitted"] < 400
        assert final["not_sent"] == 400 - final["emitted"] and final["remaining"] == 0
        time.sleep(0.5)
        assert progress(list_id)["emitted"] == final["emitted"]  # nothing after the cancel
    finally:
        stop_fanfare(scheduler)
    sent = campaign_users(api, list_id)
    assert len(sent) == len(set(sent)) == final["emitted"]
    assert set(sent) <= set(audience)
    fan_sent = campaign_users(api, fan_id)
    assert sorted(fan_sent) == [f for f in fans if not f.endswith("3")]
    assert {
        (e.fallback, e.channels)
        for v in api.messages("notify.marketing")
        for e in (decode_notification_request(v),)
        if e.campaign_id == fan_id
    } == {(("push", "email"), ("push", "inbox", "email"))}
    done = progress(fan_id)
    assert done["emitted"] == 27 and done["finished_at"] and done["remaining"] == 0
    again = api.call("DELETE", f"/v1/notifications/bulk/{fan_id}", key=key)
    assert again.body["state"] == "completed"  # a finished campaign stays finished
    assert not [
        v
        for v in api.messages("notify.transactional")
        if decode_notification_request(v).campaign_id in (list_id, fan_id)
    ]


def test_a_scheduled_notification_can_be_cancelled_before_send_at(api: Api) -> None:
    key = api.key(endpoints="send", categories="new_post")

    def post_notice(**extra: object) -> Reply:
        body = {
            "idempotency_key": f"post-{uuid.uuid4().hex}",
            "category": "new_post",
            "template_id": "new_post",
            "recipients": ["u3"],
            "data": {"author_name": "Ann", "excerpt": "Hello", "post_id": "p9"},
            **extra,
        }
        return api.call("POST", "/v1/notifications", body, key)

    later = post_notice(send_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat())
    now = post_notice()
    assert later.status == 202 and now.status == 202
    before = api.counts()["notify.social"]
    cancel = api.call("DELETE", f"/v1/notifications/{later.body['notification_id']}", key=key)
    assert cancel.status == 202, cancel.body
    assert cancel.body["state"] == "cancelled" and cancel.body["topic"] == "notify.social"
    assert api.counts()["notify.social"] == before + 1
    records = [decode_tier_event(v) for v in api.messages("notify.social")]
    [record] = [
        r
        for r in records
        if isinstance(r, NotificationCancel) and r.notification_id == later.body["notification_id"]
    ]
    assert record.tier == "social"
    at_once = api.call("DELETE", f"/v1/notifications/{now.body['notification_id']}", key=key)
    assert_error(at_once, 409, "not_cancellable")
    assert_error(api.call("DELETE", "/v1/notifications/n_nothing", key=key), 404, "not_found")
    other = api.key(endpoints="send", categories="login_code")
    hidden = api.call("DELETE", f"/v1/notifications/{later.body['notification_id']}", key=other)
    assert_error(hidden, 404, "not_found")  # another category's notification is not shown
    no_scope = api.key(endpoints="status", categories="new_post")
    refused = api.call("DELETE", f"/v1/notifications/{later.body['notification_id']}", key=no_scope)
    assert_error(refused, 403, "forbidden")
    assert api.counts()["notify.social"] == before + 1  # nothing more was published


def test_a_segment_campaign_goes_to_the_users_the_changelogs_put_in_it(api: Api) -> None:
    """preference_changes and device_changes -> the scheduler's segment index -> a campaign
    to `{locale: sv, platform: ios}` -> one message per member on notify.marketing."""
    key = api.key(endpoints="campaigns", categories="campaign")
    run = uuid.uuid4().hex[:6]
    ts = format_timestamp(datetime.now(UTC))
    swedes = [f"sv-{run}-{i}" for i in range(4)]
    prefs = [(u, "sv-SE" if i % 2 else "sv") for i, u in enumerate(swedes)]
    prefs.append((f"fi-{run}", "fi"))
    kafka = api.stack.settings.kafka_config()
    produce_all(
        kafka,
        PREFERENCE_CHANGES,
        [
            (u.encode(), orjson.dumps({"user_id": u, "push_enabled": True, "timezone": "UTC",
                                       "locale": loc, "ts": ts}))
            for u, loc in prefs
        ],
    )  # fmt: skip
    # Everyone has an iPhone but the last Swede (Android only); the Finn's does not count.
    phones = [(u, "apns" if u != swedes[-1] else "fcm") for u in [*swedes, f"fi-{run}"]]
    produce_all(
        kafka,
        DEVICE_CHANGES,
        [
            (u.encode(), orjson.dumps({"user_id": u, "device_id": f"{u}-phone", "provider": p,
                                       "token": "ab" * 32 if p == "apns" else "t" * 40,
                                       "active": True, "ts": ts}))
            for u, p in phones
        ],
    )  # fmt: skip
    index = RedisSegmentIndex(PerThreadRedis(REDIS_URL), api.stack.env["FANFARE_REDIS_PREFIX"])
    home = Path(api.stack.env["FANFARE_HOME"])
    env = {**os.environ, **api.stack.env}
    scheduler = start_fanfare(["api", "scheduler"], env, home / "segments-scheduler.log")
    try:
        wanted = sorted(swedes[:-1])
        wait_for(lambda: index.members(Segment("sv", "ios")) == wanted, 60, "the segment index")
        body = campaign_body({"segment": {"locale": "sv", "platform": "ios"}}, 100)
        made = api.call("POST", "/v1/notifications/bulk", body, key)
        assert made.status == 202, made.body
        assert made.body["total"] == 3
        assert made.body["targeting"]["segment"] == "locale=sv,platform=ios"
        cid = made.body["campaign_id"]

        def state() -> str:
            return str(api.call("GET", f"/v1/notifications/bulk/{cid}", key=key).body["state"])

        wait_for(lambda: state() == "completed", 60, "the segment campaign")
    finally:
        stop_fanfare(scheduler)
    assert sorted(campaign_users(api, cid)) == wanted
