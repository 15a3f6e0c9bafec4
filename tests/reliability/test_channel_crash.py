"""A kill -9 of `fanfare run delivery` while it sends on every channel, counted at the servers.

Email (SMTP), SMS (Twilio-shaped), web push, chat webhooks and in-app each get their items on
their channel topic; the local servers hold every answer back a little, so many sends are in
flight when the worker is killed with SIGKILL. A new worker then finishes the work. Checked:

- every item reached its server (or, for in-app, the user's stream): none lost;
- the only repeats are sends that were in flight at the kill, resent after the restart: their
  number is at most the worker's in-flight limit, and each is counted by channel. Where the
  protocol carries an idempotency key, the server reports the copy as a resend of the same key
  (email: the Message-ID, stable per notification and address; web push: the Topic, per
  subscription); SMS and chat carry none, so their copies are counted by the test, as FCM's are
  in tests/reliability/test_crash_and_cluster.py; in-app dedupes in Redis: never twice;
- delivery_events has exactly one terminal outcome per item, `accepted`.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
import redis

from operators.adapters.redis.live import stream_key
from operators.delivery.model import TERMINAL_STATES
from scripts.dev.local_channels.control import ChannelControl
from tests.conftest import REDIS_URL, Providers, Stack
from tests.integration.test_channel_delivery_e2e import LOGIN, POST, RECEIPT, publish

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

PER_CHANNEL = 1_000
IN_FLIGHT = 1_000
"""Room for each channel's share at once (a quarter of the limit, or 4 rounds of its
connections: README, "Web push"); with less, one channel waits for another's room to free."""
BATCH = 500  # items per dispatch batch (the fan-out's most)
# Generous channel and destination rates: this test is about the crash, not pacing.
FLOW_ENV = (
    ("FANFARE_DELIVERY_IN_FLIGHT", str(IN_FLIGHT)),
    ("FANFARE_EMAIL_RATE_PER_MIN", "6000000"),
    ("FANFARE_EMAIL_DOMAIN_RATE_PER_MIN", "6000000"),
    ("FANFARE_SMS_RATE_PER_MIN", "6000000"),
    ("FANFARE_SMS_USER_DAILY_LIMIT", "100"),
    ("FANFARE_SMS_DAILY_LIMIT", "1000000"),
    ("FANFARE_CHAT_RATE_PER_MIN", "6000000"),
    ("FANFARE_CHAT_WEBHOOK_RATE_PER_MIN", "6000000"),
    ("FANFARE_RETRY_BASE_MS", "200"),
    ("FANFARE_RETRY_MAX_BACKOFF_S", "1"),
    # Sends wait for a connection slot, then for a late answer: no send times out before the kill.
    ("FANFARE_SEND_TIMEOUT_MS", "30000"),
)
# Until the kill every server answers late, so that each channel, bound by its connections (email
# 4 SMTP sessions, SMS 32, web push and chat 64), takes half a minute or more for its 1,000 items:
# every channel is still in flight when the last one to start has begun, however the channels'
# starts are spread. After the kill they answer quickly, so the restarted worker finishes soon.
LATENCY_MS = {"email": 250, "sms": 2000, "webpush": 2000, "chat": 2000}
RECOVERY_LATENCY_MS = {"email": 20, "sms": 50, "webpush": 50, "chat": 50}
SERVED = ("email", "sms", "webpush", "chat")


def _items(
    channel: str, info: dict[str, Any], subscriptions: list[str]
) -> list[tuple[str, str, str]]:
    """(user, device, address) of each item: every address its own, so each copy is one item's."""
    chat_base = info["chat"]["slack_example"].rsplit("/", 1)[0]
    out = []
    for i in range(PER_CHANNEL):
        user = f"{channel[:2]}{i:05d}"
        address = {
            "email": f"{user}@d{i % 7}.example",
            "sms": f"+1415{i:07d}",
            "webpush": subscriptions[i % len(subscriptions)],
            "chat": f"{chat_base}/{user}",
            "inapp": user,
        }[channel]
        out.append((user, "inapp" if channel == "inapp" else f"{channel}-{i}", address))
    return out


def _item_of(channel: str, record: dict[str, Any]) -> str:
    """Which item (its notification id) a server's record is a copy of."""
    if channel == "email":
        return str(record["notification_id"])
    if channel == "sms":
        return parse_qs(urlsplit(record["status_callback"]).query)["n"][0]
    if channel == "webpush":
        return str(record["payload"]["notification_id"])
    return f"n_chat:{record['path'].rsplit('/', 1)[1]}"


def test_a_kill_9_mid_send_loses_nothing_on_any_channel_and_repeats_only_sends_in_flight(
    stack: Stack, providers: Providers
) -> None:
    info = providers.info["channels"]
    ctl = ChannelControl(info["control_url"])
    ctl.reset()
    subscriptions = [
        orjson.dumps(ctl.mint_subscription()["subscription"]).decode() for _ in range(20)
    ]
    message = {"email": RECEIPT, "sms": LOGIN, "webpush": POST, "chat": POST, "inapp": RECEIPT}
    tier = {"email": "transactional", "sms": "transactional"}
    due: dict[str, set[str]] = {}
    for channel in (*SERVED, "inapp"):
        items = _items(channel, info, subscriptions)
        due[channel] = {f"n_{channel}:{u}" for u, _, _ in items}
        topic = f"{channel}.{tier.get(channel, 'social')}"
        for start in range(0, len(items), BATCH):
            publish(
                stack,
                topic,
                f"n_{channel}",
                channel,
                items[start : start + BATCH],
                message[channel],
            )
    for channel, ms in LATENCY_MS.items():
        ctl.set_latency(channel, ms)
    total = PER_CHANNEL * len(SERVED)

    def by_channel() -> dict[str, int]:
        return {c: s["accepted"] for c, s in ctl.stats().items() if c in SERVED}

    def served() -> int:
        return sum(by_channel().values())

    def under_way() -> bool:
        # Every served channel has begun and none has finished: sends in flight on each.
        counts = by_channel()
        return min(counts.values()) >= 20 and max(counts.values()) < PER_CHANNEL

    t0 = time.monotonic()
    first = stack.start_flow(*FLOW_ENV, flow="delivery")
    while not under_way():
        if time.monotonic() - t0 > 240:
            raise AssertionError(
                f"not every channel in flight after 240 s: served {by_channel()}\n"
                f"{stack.flow_log()}"
            )
        time.sleep(0.05)
    stack.kill_flow(first)  # SIGKILL, the process group
    at_kill_by_channel = by_channel()
    for channel, ms in RECOVERY_LATENCY_MS.items():
        ctl.set_latency(channel, ms)
    at_kill = sum(at_kill_by_channel.values())
    started = time.monotonic()
    print(f"\nkilled at {at_kill_by_channel} served, {started - t0:.1f} s after the start")
    stack.start_flow(*FLOW_ENV, flow="delivery")

    every = {nid for nids in due.values() for nid in nids}
    terminal: dict[str, list[str]] = defaultdict(list)

    def all_terminal() -> bool:
        terminal.clear()
        for _, _, value in stack.read_topic("delivery_events"):
            e = orjson.loads(value or b"{}")
            if e["outcome"] in TERMINAL_STATES:
                terminal[e["notification_id"]].append(e["outcome"])
        return len(terminal) >= len(every)

    deadline = time.monotonic() + 240
    while not all_terminal():
        if time.monotonic() > deadline:
            stats = {c: (v["accepted"], v["rejected"]) for c, v in ctl.stats().items()}
            raise AssertionError(
                f"{len(terminal)} of {len(every)} items have an outcome after 240 s; "
                f"the servers accepted {stats}\n{stack.flow_log()}"
            )
        time.sleep(1.0)
    recovered_s = time.monotonic() - started
    time.sleep(2)  # anything sent again late would show by now
    all_terminal()

    # delivery_events: one terminal outcome per item, accepted.
    assert set(terminal) == every
    outcomes = Counter(o for v in terminal.values() for o in v)
    assert outcomes == {"accepted": len(every)}, outcomes

    # At the servers: every item, and the copies.
    copies: dict[str, Counter[str]] = {}
    resends_reported: dict[str, int] = {}
    for channel in SERVED:
        records = ctl.accepted(channel)
        copies[channel] = Counter(_item_of(channel, r) for r in records)
        resends_reported[channel] = sum(bool(r.get("resend")) for r in records)
    client = redis.Redis.from_url(REDIS_URL)
    pipe = client.pipeline(transaction=False)
    inapp = sorted(due["inapp"])
    for nid in inapp:
        pipe.xlen(stream_key(stack.env["FANFARE_REDIS_PREFIX"], nid.split(":", 1)[1]))
    copies["inapp"] = Counter({nid: n for nid, n in zip(inapp, pipe.execute(), strict=True) if n})
    repeats = {c: sum(n - 1 for n in copies[c].values()) for c in copies}
    print(
        f"\nkill at {at_kill} of {total} served; recovered in {recovered_s:.1f} s; repeats "
        f"{repeats}; reported by the servers as resends of the same key {resends_reported}"
    )
    for channel, nids in due.items():
        assert set(copies[channel]) == nids, f"{channel}: lost {len(nids - set(copies[channel]))}"
    assert all(0 < n < PER_CHANNEL for n in at_kill_by_channel.values()), at_kill_by_channel
    # Only sends in flight at the kill can go again: at most the in-flight limit in all.
    assert sum(repeats.values()) <= IN_FLIGHT, repeats
    assert repeats["inapp"] == 0  # deduplicated in Redis
    # Where the protocol carries a key, each copy beyond the first is reported as a resend.
    assert resends_reported["email"] == repeats["email"]
    assert resends_reported["webpush"] == repeats["webpush"]
