"""`fanfare demo`'s API part: `fanfare api`, channel addresses, two notifications, every channel.

With the demo's flows running, it creates an API key with `fanfare api keys create` (as the
README's API quick start does), starts `fanfare api` on a free port, registers channel
addresses for a few demo users through `POST /v1/users/{id}/devices` (an email address, an SMS
number, a web push subscription minted by the local push service, a chat webhook of the local
chat server), sends a `receipt` (email, in-app, chat) and a `login_code` (push, else SMS) through
`POST /v1/notifications`, waits until the fan-out dispatched them and delivery settled each item,
and reads what each local server received and the receipt's status.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.runtime.metrics_scrape import scrape, total
from flows.runtime.ports import free_port
from operators.adapters.redis.live import LiveHub
from operators.config import Settings
from scripts.dev.local_channels.control import ChannelControl
from scripts.harness.spawn import PROJECT_ROOT, start_fanfare

CHANNELS = ("email", "sms", "webpush", "chat", "inapp")
SMS_ONLY_USER = "demo-sms-only"
"""A user with an SMS number and no push device: login_code's fallback gives them SMS."""
"""The channels the demo shows, as `provider` names them on delivery_events and in metrics."""

RECEIPT_DATA = {"order_id": "1234", "amount": "59.90", "currency": "EUR"}
LOGIN_DATA = {"code": "482913", "minutes": 10}


@dataclass
class ApiDemo:
    """What the API part did and saw."""

    port: int
    key: str
    users: list[str]
    receipt_id: str = ""
    login_id: str = ""
    dispatched: dict[str, float] = field(default_factory=dict)
    settled: dict[str, float] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)


def call(
    port: int, method: str, path: str, key: str | None = None, body: Any = None
) -> tuple[int, Any]:
    """One JSON request to `fanfare api` on the loopback: (status, decoded answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, path, payload, headers)
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def _expect(answer: tuple[int, Any], status: int, what: str) -> Any:
    if answer[0] != status:
        raise SystemExit(f"fanfare demo: {what}: `fanfare api` answered {answer[0]} {answer[1]}")
    return answer[1]


def create_key(env: Mapping[str, str], log: Path) -> str:
    """`fanfare api keys create` for the demo's categories; the key text it printed once."""
    argv = [
        "api",
        "keys",
        "create",
        "--name",
        "fanfare-demo",
        "--endpoints",
        "*",
        "--categories",
        "receipt,login_code",
        "--json",
    ]
    done = subprocess.run(
        [*_python_cli(), *argv],
        env=dict(env),
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    with log.open("a") as out:
        out.write(done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"fanfare demo: `fanfare api keys create` failed: {done.stderr.strip()}")
    key: str = json.loads(done.stdout)["key"]
    return key


def _python_cli() -> list[str]:
    return [sys.executable, "-m", "scripts.cli"]


def start_api(env: Mapping[str, str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`fanfare api` on a free loopback port."""
    port = free_port()
    proc = start_fanfare(
        ["api"], {**env, "FANFARE_API_HOST": "127.0.0.1", "FANFARE_API_PORT": str(port)}, log
    )
    return proc, port


def healthy(port: int) -> bool:
    """True once `fanfare api` answers /health with 200."""
    try:
        return call(port, "GET", "/health")[0] == 200
    except OSError:
        return False


def register_addresses(demo: ApiDemo, channels: ChannelControl, webhook: str) -> int:
    """Channel addresses for the demo users through the devices endpoint; how many.

    `webhook` is an incoming-webhook URL of the local chat server (providers.json).
    """
    first, second, third = demo.users[:3]
    subscription = channels.mint_subscription()["subscription"]
    registrations: list[tuple[str, dict[str, Any]]] = [
        (first, {"provider": "email", "address": f"{first}@example.com"}),
        (second, {"provider": "email", "address": f"{second}@example.com"}),
        (SMS_ONLY_USER, {"provider": "sms", "address": "+14155550123"}),
        (first, {"platform": "web", "subscription": subscription}),
        (third, {"provider": "chat", "address": webhook}),
    ]
    for user, body in registrations:
        _expect(
            call(demo.port, "POST", f"/v1/users/{user}/devices", demo.key, body),
            202,
            f"registering {body.get('provider') or 'web'} for {user}",
        )
    return len(registrations)


def send_notifications(demo: ApiDemo, run_id: str) -> None:
    """A receipt (email, in-app, chat) to the three users, a login code to two.

    login_code's fallback order is push, then SMS: the first user (devices and a web push
    subscription) gets push only, SMS_ONLY_USER (a number, no device) SMS only.
    """
    receipt = {
        "idempotency_key": f"demo-receipt-{run_id}",
        "category": "receipt",
        "template_id": "receipt",
        "recipients": demo.users[:3],
        "data": RECEIPT_DATA,
        "channels": ["email", "inbox", "chat"],
    }
    login = {
        "idempotency_key": f"demo-login-{run_id}",
        "category": "login_code",
        "template_id": "login_code",
        "recipients": [demo.users[0], SMS_ONLY_USER],
        "data": LOGIN_DATA,
        "channels": ["push", "sms"],
    }
    answer = call(demo.port, "POST", "/v1/notifications", demo.key, receipt)
    demo.receipt_id = _expect(answer, 202, "the receipt")["notification_id"]
    answer = call(demo.port, "POST", "/v1/notifications", demo.key, login)
    demo.login_id = _expect(answer, 202, "the login code")["notification_id"]


def channel_dispatched(fanout: Sequence[str]) -> dict[str, float]:
    """Dispatch items the fan-out wrote per channel."""
    m = scrape(list(fanout))
    return {c: total(m, "fanfare_dispatched_total", provider=c) for c in CHANNELS}


def channel_settled(delivery: Sequence[str]) -> dict[str, float]:
    """Items delivery settled per channel (every outcome but a retry scheduled)."""
    m = scrape(list(delivery))
    out = {}
    for c in CHANNELS:
        every = total(m, "fanfare_delivery_outcomes_total", provider=c)
        retry = total(m, "fanfare_delivery_outcomes_total", provider=c, outcome="retry_scheduled")
        out[c] = every - retry
    return out


def read_servers(demo: ApiDemo, channels: ChannelControl, settings: Settings) -> None:
    """What each local server received (one sample each) and the users' in-app streams."""
    stats = channels.stats()
    for c in ("email", "sms", "webpush", "chat"):
        demo.received[c] = int(stats[c]["accepted"])
        records = channels.accepted(c)
        if records:
            demo.samples[c] = _sample(c, records[0])
    # In-app has no server: what the users' live streams in Redis hold of the receipt.
    notes = [
        json.loads(entry)
        for user in demo.users
        for _, entry in asyncio.run(_inapp_history(settings, user))
    ]
    receipts = [n for n in notes if str(n.get("notification_id", "")).startswith(demo.receipt_id)]
    demo.received["inapp"] = len(receipts)
    if receipts:
        demo.samples["inapp"] = f"{receipts[0].get('title', '')} | {receipts[0].get('body', '')}"


def _sample(channel: str, record: Mapping[str, Any]) -> str:
    return " / ".join(_sample_text(channel, record).splitlines())


def _sample_text(channel: str, record: Mapping[str, Any]) -> str:
    if channel == "email":
        return f"to {record['rcpt_to'][0]}: {record['subject']}"
    if channel == "sms":
        return f"to {record['to']}: {record['body']}"
    if channel == "webpush":
        payload = record.get("payload") or {}
        return f"{payload.get('title', '')} | {payload.get('body', '')}"
    body = record.get("body") or {}
    return str(body.get("text", ""))


async def _inapp_history(settings: Settings, user: str) -> list[tuple[str, str]]:
    hub = LiveHub(settings.redis_url, settings.redis_prefix, 10)
    try:
        return await hub.history(user, "0")
    finally:
        await hub.close()


def hints(demo: ApiDemo) -> list[str]:
    """The `curl` lines that run as printed while the API is up."""
    auth = f"-H {shlex.quote('Authorization: Bearer ' + demo.key)}"
    base = f"127.0.0.1:{demo.port}"
    login = json.dumps(
        {
            "idempotency_key": "try-it-1",
            "category": "login_code",
            "template_id": "login_code",
            "recipients": demo.users[:1],
            "data": LOGIN_DATA,
            "channels": ["push", "sms"],
        },
        separators=(",", ":"),
    )
    return [
        f"curl -s {base}/v1/notifications/{demo.receipt_id}/status {auth}",
        f"curl -s '{base}/v1/users/{demo.users[0]}/notifications?unread_only=true' {auth}",
        f"curl -s -X POST {base}/v1/notifications {auth} "
        f"-H 'Content-Type: application/json' -d {shlex.quote(login)}",
    ]


def inbox_page(demo: ApiDemo) -> str:
    """The development stack's live inbox page of the first demo user."""
    return f"http://127.0.0.1:{demo.port}/dev/inbox?user={demo.users[0]}"


def receipt_status(demo: ApiDemo) -> dict[str, Any]:
    """`GET /v1/notifications/{id}/status` of the receipt."""
    path = f"/v1/notifications/{demo.receipt_id}/status"
    status: dict[str, Any] = _expect(call(demo.port, "GET", path, demo.key), 200, path)
    return status


def stay(processes: Sequence[tuple[str, subprocess.Popen[bytes]]]) -> None:
    """Wait for Ctrl-C (SIGINT) or SIGTERM, or for one of the processes to exit."""
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    print("  (up until Ctrl-C)", flush=True)
    try:
        while not stop.wait(0.5):
            for name, proc in processes:
                if proc.poll() is not None:
                    print(f"  {name} exited (code {proc.returncode}); stopping", flush=True)
                    return
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
