"""The channel senders against their local servers, through the real delivery engine.

The local servers (SMTP, SMS, web push, chat) run in this process on a background thread with
the local APNs and FCM (`start_local_providers`, as `fanfare dev up` starts them); the senders
are built by `build_channel_senders` from the settings the servers write, on an event loop
thread as a delivery worker's are, and driven by `DeliveryEngine` with the SQLite store and
in-memory claims, so each answer is followed to its outcome: the delivery event, the retry
record, and for a dead address the `device_changes` event the engine emits. Redis is the real
one (rate-limit buckets, SMS budgets, in-app streams), under a key prefix of this module.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from operators import metrics
from operators.adapters.catalog_files import load_catalog
from operators.adapters.channels.factory import build_channel_senders
from operators.adapters.channels.http import HostGuard
from operators.adapters.providers.event_loop import EventLoopThread
from operators.adapters.redis.live import LiveHub
from operators.adapters.redis.rate_limiter import RedisRateLimiter
from operators.adapters.stores.sqlite_notifications import SQLiteNotificationStore
from operators.config import Settings, load_settings
from operators.delivery.engine import DeliveryEngine, DeliverySettings
from operators.delivery.model import ProviderAnswer, RetryPolicy, SendRequest, Verdict, classify
from operators.delivery.ports import PushSender
from operators.events import MessageOrigin
from schemas.records import ChannelMessage, DeliveryEvent, DeviceChange, RetryRecord
from scripts.dev.local_channels.control import ChannelControl
from scripts.dev.local_channels.runner import channel_settings
from scripts.dev.local_providers import LocalProviders, start_local_providers
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.integration

LOGIN = ChannelMessage(
    category="login_code",
    template_id="login_code",
    tier="transactional",
    data={"code": "482913", "minutes": 10},
)
RECEIPT = ChannelMessage(
    category="receipt",
    template_id="receipt",
    tier="transactional",
    data={"order_id": "1234", "amount": "59.90", "currency": "EUR"},
)
CAMPAIGN = ChannelMessage(
    category="campaign",
    template_id="campaign",
    tier="marketing",
    data={
        "headline": "Winter sale",
        "message": "Everything -20% until Sunday <b>now</b>",
        "link": "https://shop.example.com/sale",
    },
)
_offsets = itertools.count()


@dataclass
class Channels:
    providers: LocalProviders
    control: ChannelControl
    settings: Settings
    prefix: str
    tmp: Path

    def env(self, **changes: str) -> dict[str, str]:
        env = {
            **channel_settings(self.providers.info["channels"]),
            "FANFARE_HOME": str(self.tmp / "home"),
            "FANFARE_REDIS_URL": REDIS_URL,
            "FANFARE_REDIS_PREFIX": self.prefix,
            "FANFARE_SEND_TIMEOUT_MS": "2000",
        }
        env.update(changes)
        return env


@pytest.fixture(scope="module")
def channels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Channels]:
    tmp = tmp_path_factory.mktemp("channels")
    providers = start_local_providers(tmp / "providers")
    prefix = f"fanfare-test-{uuid.uuid4().hex[:8]}:"
    try:
        c = Channels(providers, providers.channel_control(), Settings(), prefix, tmp)
        c.settings = load_settings(c.env())
        yield c
    finally:
        providers.stop()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture
def control(channels: Channels) -> ChannelControl:
    channels.control.reset()
    return channels.control


class Worker:
    """One delivery worker's engine with the channel senders, on its own event loop thread."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.loop = EventLoopThread("test-channels")
        self.settings = settings
        catalog = load_catalog(settings.categories_file, settings.templates_dir)
        limiter = RedisRateLimiter(settings.redis_url, settings.redis_prefix)
        policy = RetryPolicy(max_attempts=5, base_s=1.0, max_backoff_s=60, max_age_s=3600)
        self.senders: dict[str, PushSender] = self.loop.run(
            build_channel_senders(settings, catalog, True, policy)
        )
        self.store = SQLiteNotificationStore(tmp / f"n-{uuid.uuid4().hex[:6]}.db")
        from operators.delivery.edge_claims import InMemoryEdgeClaims

        self.engine = DeliveryEngine(
            claims=InMemoryEdgeClaims(),
            store=self.store,
            limiter=limiter,
            senders=self.senders,
            loop=self.loop,
            settings=DeliverySettings(retry=policy, breaker_failures=1000),
        )

    def deliver(self, *requests: SendRequest) -> list[object]:
        return self.engine.deliver(list(requests))

    def answers(self, provider: str, *requests: SendRequest) -> list[ProviderAnswer]:
        sender = self.senders[provider]
        payloads = [sender.render(r) for r in requests]
        return self.loop.run(sender.send(list(requests), payloads))

    def close(self) -> None:
        for sender in self.senders.values():
            self.loop.run(sender.close())
        self.loop.stop()


@pytest.fixture
def worker(channels: Channels) -> Iterator[Worker]:
    w = Worker(channels.settings, channels.tmp)
    try:
        yield w
    finally:
        w.close()


def worker_with(channels: Channels, **env: str) -> Worker:
    return Worker(load_settings(channels.env(**env)), channels.tmp)


def send_request(
    provider: str,
    token: str,
    user: str = "u1",
    device: str | None = None,
    message: ChannelMessage | None = None,
    locale: str | None = None,
) -> SendRequest:
    n = uuid.uuid4().hex[:10]
    item: dict[str, Any] = {
        "notification_id": f"n_{n}:{user}",
        "user_id": user,
        "device_id": device or f"{provider}-{n}",
        "token": token,
    }
    if locale:
        item["locale"] = locale
    tier = message["tier"] if message else "social"
    return SendRequest(
        provider=provider,  # type: ignore[arg-type]
        lane="bulk" if tier == "marketing" else "normal",
        post_id=f"n_{n}",
        author_id="api:k1",
        created_at="2026-12-06T10:00:00Z",
        created_ts=time.time(),
        item=item,  # type: ignore[arg-type]
        origin=MessageOrigin(f"{provider}.{tier}", 0, next(_offsets)),
        message=message,
    )


def outcome(out: list[object]) -> list[tuple[str, str, int | None]]:
    return [(e.device_id, e.outcome, e.status) for e in out if isinstance(e, DeliveryEvent)]


def deactivated(out: list[object]) -> list[DeviceChange]:
    return [c for c in out if isinstance(c, DeviceChange)]


def retries(out: list[object]) -> list[RetryRecord]:
    return [r for r in out if isinstance(r, RetryRecord)]


# --- email ------------------------------------------------------------------------------------


def test_email_is_accepted_over_starttls_with_auth_as_text_and_html(
    worker: Worker, control: ChannelControl
) -> None:
    request = send_request("email", "ada@example.com", message=RECEIPT, locale="fr-CA")
    out = worker.deliver(request)
    assert outcome(out) == [(request.item["device_id"], "accepted", 250)]
    [mail] = control.accepted("email")
    assert mail["rcpt_to"] == ["ada@example.com"] and mail["tls"] and mail["authenticated"]
    assert mail["subject"] == "Reçu de la commande 1234"  # fr-CA falls back to fr
    assert mail["content_type"] == "multipart/alternative"
    assert "Vous avez payé 59.90 EUR" in mail["text"] and "Vous avez payé 59.90 EUR" in mail["html"]
    assert mail["notification_id"] == request.item["notification_id"]
    assert mail["list_unsubscribe"] is None  # a receipt is not a subscription


def test_marketing_email_has_a_one_click_unsubscribe_header_and_escaped_html(
    channels: Channels, control: ChannelControl
) -> None:
    worker = worker_with(channels, FANFARE_PUBLIC_URL="https://notify.example.com")
    try:
        request = send_request("email", "bob@example.org", user="u9", message=CAMPAIGN)
        assert outcome(worker.deliver(request))[0][1] == "accepted"
    finally:
        worker.close()
    [mail] = control.accepted("email")
    assert mail["list_unsubscribe"].startswith("<https://notify.example.com/v1/unsubscribe/")
    assert mail["list_unsubscribe_post"] == "List-Unsubscribe=One-Click"
    assert "&lt;b&gt;now&lt;/b&gt;" in mail["html"] and "<b>now</b>" not in mail["html"]
    assert 'href="https://shop.example.com/sale"' in mail["html"]


def test_a_hard_bounce_deactivates_the_address_and_4xx_is_retried(
    worker: Worker, control: ChannelControl
) -> None:
    control.set_address_errors(
        "email",
        {
            "gone@example.com": {"code": 550, "message": "5.1.1 No such user"},
            "grey@example.com": {"code": 451, "message": "4.7.1 Greylisted, try later"},
            "full@example.com": {"code": 552, "message": "5.2.2 Mailbox full"},
        },
    )
    gone = send_request("email", "gone@example.com", user="u2", message=RECEIPT)
    grey = send_request("email", "grey@example.com", user="u3", message=RECEIPT)
    full = send_request("email", "full@example.com", user="u4", message=RECEIPT)
    ok = send_request("email", "fine@example.com", user="u5", message=RECEIPT)
    out = worker.deliver(gone, grey, full, ok)
    states = {d: (o, s) for d, o, s in outcome(out)}
    assert states[gone.item["device_id"]] == ("invalid_token", 550)
    assert states[grey.item["device_id"]] == ("retry_scheduled", 451)
    assert states[full.item["device_id"]] == ("retry_scheduled", 552)
    assert states[ok.item["device_id"]] == ("accepted", 250)
    [change] = deactivated(out)
    assert (change.user_id, change.device_id, change.provider, change.active) == (
        "u2",
        gone.item["device_id"],
        "email",
        False,
    )
    assert {r.item["device_id"] for r in retries(out)} == {
        grey.item["device_id"],
        full.item["device_id"],
    }
    assert [m["rcpt_to"] for m in control.accepted("email")] == [
        ["fine@example.com"]
    ]  # the session went on after the refusals


def test_relay_outage_and_slow_relay_are_retried(worker: Worker, control: ChannelControl) -> None:
    control.set_outage("email", 30, status=451)
    answer = worker.answers("email", send_request("email", "a@example.com", message=RECEIPT))[0]
    assert (answer.status, classify("email", answer)) == (451, Verdict.TRANSIENT)
    control.set_outage("email", 0)
    control.set_latency("email", 3000)  # longer than FANFARE_SEND_TIMEOUT_MS (2 s)
    answer = worker.answers("email", send_request("email", "b@example.com", message=RECEIPT))[0]
    assert (
        answer == ProviderAnswer(None, "timeout") and classify("email", answer) is Verdict.TRANSIENT
    )
    control.set_latency("email", 0)
    answer = worker.answers("email", send_request("email", "c@example.com", message=RECEIPT))[0]
    assert answer.status == 250  # the session that timed out was dropped, a new one works


def test_wrong_smtp_credentials_are_a_transient_auth_failure(
    channels: Channels, control: ChannelControl
) -> None:
    wrong = channels.tmp / "wrong-password"
    wrong.write_text("not-the-password\n")
    worker = worker_with(channels, FANFARE_SMTP_PASSWORD_FILE=str(wrong))
    try:
        [answer] = worker.answers("email", send_request("email", "a@example.com", message=RECEIPT))
    finally:
        worker.close()
    assert answer.status == 535 and answer.reason and answer.reason.startswith("AUTH")
    assert classify("email", answer) is Verdict.TRANSIENT
    assert control.stats()["email"]["rejected"]["auth"] >= 1  # aiosmtplib tries PLAIN, then LOGIN


def test_each_recipient_domain_has_its_own_bucket(
    channels: Channels, control: ChannelControl
) -> None:
    worker = worker_with(channels, FANFARE_EMAIL_DOMAIN_RATE_PER_MIN="60")  # one token at once
    try:
        same = [
            send_request("email", f"user{i}@busy.example", user=f"b{i}", message=RECEIPT)
            for i in range(3)
        ]
        other = send_request("email", "x@quiet.example", user="q1", message=RECEIPT)
        answers = worker.answers("email", *same, other)
    finally:
        worker.close()
    assert [a.status for a in answers] == [250, None, None, 250]
    for held in answers[1:3]:
        assert (
            classify("email", held) is Verdict.HELD
            and held.retry_after_s
            and held.retry_after_s >= 0.5
        )
    assert len(control.accepted("email")) == 2


# --- SMS --------------------------------------------------------------------------------------


def test_sms_is_accepted_with_basic_auth_and_its_cost_is_counted(
    worker: Worker, control: ChannelControl
) -> None:
    cost_before = metrics.SMS_COST.labels("USD")._value.get()
    request = send_request("sms", "+14155550123", user="s1", message=LOGIN)
    out = worker.deliver(request)
    assert outcome(out) == [(request.item["device_id"], "accepted", 201)]
    [message] = control.accepted("sms")
    assert message["to"] == "+14155550123" and message["from"] == "+15005550006"
    assert message["body"].startswith("Your login code\n482913 is your code")
    assert message["status_callback"].endswith(
        f"/v1/callbacks/sms?n={request.item['notification_id'].replace(':', '%3A')}&d={request.item['device_id']}&u=s1"
    )
    assert metrics.SMS_COST.labels("USD")._value.get() - cost_before == 7900


def test_an_opted_out_number_is_deactivated_and_429_waits_for_retry_after(
    worker: Worker, control: ChannelControl
) -> None:
    control.set_address_errors("sms", {"+14155550999": {"code": 21610}})
    stop = send_request("sms", "+14155550999", user="s2", message=LOGIN)
    out = worker.deliver(stop)
    assert outcome(out) == [(stop.item["device_id"], "invalid_token", 400)]
    [change] = deactivated(out)
    assert (change.user_id, change.provider, change.active) == ("s2", "sms", False)
    control.set_address_errors("sms", {})
    control.set_rate_limit("sms", 0.001, retry_after_s=30)
    worker.answers(
        "sms", send_request("sms", "+14155550100", user="s3", message=LOGIN)
    )  # the one token
    limited = send_request("sms", "+14155550101", user="s3", message=LOGIN)
    before = time.time()
    out = worker.deliver(limited)
    assert outcome(out) == [(limited.item["device_id"], "retry_scheduled", 429)]
    [retry] = retries(out)
    assert retry.due_at >= before + 30  # never earlier than the provider's Retry-After


def test_sms_only_for_eligible_categories_and_within_the_daily_budgets(
    channels: Channels, control: ChannelControl
) -> None:
    worker = worker_with(
        channels, FANFARE_SMS_USER_DAILY_LIMIT="2", FANFARE_SMS_DAILY_LIMIT="1000000"
    )
    try:
        receipt = send_request("sms", "+14155550123", user="b1", message=RECEIPT)
        assert outcome(worker.deliver(receipt)) == [(receipt.item["device_id"], "failed", 403)]
        sent = [send_request("sms", "+14155550123", user="b1", message=LOGIN) for _ in range(3)]
        out = worker.deliver(*sent)
        assert sorted(o for _, o, _ in outcome(out)) == ["accepted", "accepted", "failed"]
        assert [
            e.reason for e in out if isinstance(e, DeliveryEvent) and e.outcome == "failed"
        ] == ["402 sms_budget_user"]
        # A message the provider refused gives its unit back.
        control.set_address_errors("sms", {"+14155550777": {"code": 21602, "status": 400}})
        refused = send_request("sms", "+14155550777", user="b2", message=LOGIN)
        assert outcome(worker.deliver(refused))[0][1] == "failed"
        again = send_request("sms", "+14155550124", user="b2", message=LOGIN)
        again2 = send_request("sms", "+14155550124", user="b2", message=LOGIN)
        assert [o for _, o, _ in outcome(worker.deliver(again, again2))] == ["accepted", "accepted"]
    finally:
        worker.close()
    worker = worker_with(channels, FANFARE_SMS_DAILY_LIMIT="0")
    try:
        request = send_request("sms", "+14155550123", user="b3", message=LOGIN)
        out = worker.deliver(request)
        assert [e.reason for e in out if isinstance(e, DeliveryEvent)] == ["402 sms_budget_global"]
    finally:
        worker.close()


# --- web push ---------------------------------------------------------------------------------


def test_web_push_is_encrypted_for_the_subscription_and_signed_with_vapid(
    worker: Worker, control: ChannelControl
) -> None:
    import json

    minted = control.mint_subscription()
    token = json.dumps(minted["subscription"])
    from schemas.addresses import check_subscription

    request = send_request(
        "webpush", check_subscription(token, allow_dev=True), user="w1", message=LOGIN
    )
    out = worker.deliver(request)
    assert outcome(out) == [(request.item["device_id"], "accepted", 201)]
    [push] = control.accepted("webpush")
    assert push["subscription_id"] == minted["id"] and push["urgency"] == "high"
    assert 0 < push["ttl"] <= 3600 and push["topic"] and len(push["topic"]) <= 32
    payload = push["payload"]  # decrypted by the local push service with the subscription's keys
    assert payload["title"] == "Your login code" and "482913" in payload["body"]
    assert payload["notification_id"] == request.item["notification_id"]


@pytest.mark.parametrize(
    ("status", "verdict", "state"),
    [
        (410, Verdict.INVALID_TOKEN, "invalid_token"),
        (404, Verdict.INVALID_TOKEN, "invalid_token"),
        (429, Verdict.TRANSIENT, "retry_scheduled"),
    ],
)
def test_web_push_gone_subscriptions_are_cleaned_up_and_429_retried(
    worker: Worker, control: ChannelControl, status: int, verdict: Verdict, state: str
) -> None:
    import json

    from schemas.addresses import check_subscription

    minted = control.mint_subscription()
    control.set_address_errors("webpush", {minted["id"]: {"status": status, "retry_after_s": 7}})
    request = send_request(
        "webpush",
        check_subscription(json.dumps(minted["subscription"]), allow_dev=True),
        user="w2",
        message=CAMPAIGN,
    )
    before = time.time()
    out = worker.deliver(request)
    assert outcome(out) == [(request.item["device_id"], state, status)]
    if verdict is Verdict.INVALID_TOKEN:
        assert [(c.provider, c.active) for c in deactivated(out)] == [("webpush", False)]
    else:
        assert retries(out)[0].due_at >= before + 7


def test_the_host_guard_refuses_names_that_resolve_to_private_addresses() -> None:
    async def main() -> tuple[str | None, str | None]:
        guard = HostGuard(allow_dev=False)
        return await guard.refusal("https://localhost:8443/x"), await HostGuard(
            allow_dev=True
        ).refusal("https://localhost/x")

    refused, allowed = asyncio.run(main())
    assert refused is not None and "non-public" in refused and allowed is None


# --- chat -------------------------------------------------------------------------------------


def test_slack_and_teams_webhooks_get_their_own_format(
    worker: Worker, control: ChannelControl, channels: Channels
) -> None:
    chat = channels.providers.info["channels"]["chat"]
    slack = send_request("chat", chat["slack_example"], user="ops", message=RECEIPT)
    teams = send_request("chat", chat["teams_example"], user="ops", message=RECEIPT)
    out = worker.deliver(slack, teams)
    assert sorted(o for _, o, _ in outcome(out)) == ["accepted", "accepted"]
    records = {r["kind"]: r["body"] for r in control.accepted("chat")}
    assert records["slack"]["text"] == "Receipt for order 1234: You paid 59.90 EUR. Thank you!"
    assert records["slack"]["blocks"][0]["text"]["text"].startswith("*Receipt for order 1234*")
    assert (
        records["teams"]["@type"] == "MessageCard"
        and records["teams"]["title"] == "Receipt for order 1234"
    )


def test_removed_webhooks_are_disabled_and_rate_limits_retried(
    worker: Worker, control: ChannelControl, channels: Channels
) -> None:
    origin = channels.providers.info["channels"]["chat"]["origin"]
    control.set_address_errors(
        "chat",
        {
            "/services/T1/B1/gone": {"status": 404, "body": "no_service"},
            "/services/T1/B1/archived": {"status": 410, "body": "channel_is_archived"},
            "/services/T1/B1/busy": {"status": 429, "retry_after_s": 9},
        },
    )
    gone, archived, busy = (
        send_request("chat", f"{origin}/services/T1/B1/{p}", user="ops", message=RECEIPT)
        for p in ("gone", "archived", "busy")
    )
    before = time.time()
    out = worker.deliver(gone, archived, busy)
    states = {d: (o, s) for d, o, s in outcome(out)}
    assert states[gone.item["device_id"]] == ("invalid_token", 404)
    assert states[archived.item["device_id"]] == ("invalid_token", 410)
    assert states[busy.item["device_id"]] == ("retry_scheduled", 429)
    assert {c.device_id for c in deactivated(out)} == {
        gone.item["device_id"],
        archived.item["device_id"],
    }
    assert retries(out)[0].due_at >= before + 9


def test_a_slow_webhook_times_out_and_each_webhook_is_paced(
    channels: Channels, control: ChannelControl
) -> None:
    origin = channels.providers.info["channels"]["chat"]["origin"]
    worker = worker_with(channels, FANFARE_CHAT_WEBHOOK_RATE_PER_MIN="60")
    try:
        control.set_latency("chat", 3000)
        [slow] = worker.answers(
            "chat", send_request("chat", f"{origin}/services/T/B/slow", message=RECEIPT)
        )
        assert slow == ProviderAnswer(None, "timeout")
        control.set_latency("chat", 0)
        burst = [
            send_request("chat", f"{origin}/services/T/B/burst", message=RECEIPT) for _ in range(3)
        ]
        answers = worker.answers("chat", *burst)
    finally:
        worker.close()
    assert [a.status for a in answers] == [200, None, None]
    assert all(classify("chat", a) is Verdict.HELD for a in answers[1:])


# --- in-app -----------------------------------------------------------------------------------


def test_in_app_notifications_reach_a_listener_and_stay_in_the_users_stream(
    worker: Worker, channels: Channels
) -> None:
    import json

    async def main() -> tuple[tuple[str, str], list[tuple[str, str]]]:
        hub = LiveHub(REDIS_URL, channels.prefix, 100)
        listener = await hub.listen("live-1")
        request = send_request("inapp", "live-1", user="live-1", device="inapp", message=RECEIPT)
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(None, worker.deliver, request)
        assert outcome(out) == [("inapp", "accepted", 200)]
        event = await asyncio.wait_for(listener.queue.get(), 5)
        # The same send again, as the engine repeats one whose answer a crash lost: accepted,
        # not appended or published twice.
        sender = worker.senders["inapp"]
        again = await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(
                sender.send([request], [sender.render(request)]), worker.loop.loop
            )
        )
        assert [a.status for a in again] == [200]
        history = await hub.history("live-1", "0")
        assert listener.queue.empty()
        await hub.leave(listener)
        await hub.close()
        return event, history

    (event_id, payload), history = asyncio.run(main())
    body = json.loads(payload)
    assert body["title"] == "Receipt for order 1234" and body["category"] == "receipt"
    assert history == [(event_id, payload)]


def test_the_hub_beats_idle_listeners_spread_over_the_interval(channels: Channels) -> None:
    from operators.adapters.redis.live import HEARTBEAT

    async def main() -> list[float]:
        hub = LiveHub(REDIS_URL, channels.prefix, 100, heartbeat_s=2.0)
        listeners = [await hub.listen(f"beat-{i}") for i in range(4)]
        started = time.monotonic()
        beats = []
        for listener in listeners:
            assert await asyncio.wait_for(listener.queue.get(), 5) == HEARTBEAT
            beats.append(time.monotonic() - started)
        for listener in listeners:
            await hub.leave(listener)
        await hub.close()
        return beats

    beats = asyncio.run(main())
    assert max(beats) <= 4.0  # every idle listener within an interval (and a tick)


def test_an_sms_whose_budget_check_fails_does_not_fail_its_siblings_already_sent(
    channels: Channels, control: ChannelControl, worker: Worker
) -> None:
    """Redis refusing one budget check (its pool full: MaxConnectionsError) once failed the
    whole `send`: the siblings the provider had accepted were retried, and sent twice."""
    from redis.exceptions import MaxConnectionsError

    sender: Any = worker.senders["sms"]
    budget = sender._budget

    class OneRefused:
        async def take(self, user_id: str) -> str | None:
            if user_id == "pool-full":
                raise MaxConnectionsError("Too many connections")
            await asyncio.sleep(0.05)  # the refusal comes while the others are being sent
            result: str | None = await budget.take(user_id)
            return result

        async def give_back(self, user_id: str) -> None:
            await budget.give_back(user_id)

    sender._budget = OneRefused()
    try:
        before = control.stats()["sms"]["accepted"]
        ok = [
            send_request("sms", f"+1415555{i:04d}", user=f"s{i}", message=LOGIN) for i in range(3)
        ]
        refused = send_request("sms", "+14155559999", user="pool-full", message=LOGIN)
        answers = worker.answers("sms", *ok, refused)
        assert [a.status for a in answers[:3]] == [201, 201, 201]
        assert answers[3].status is None and answers[3].reason == "sms_budget: MaxConnectionsError"
        assert classify("sms", answers[3]) is Verdict.TRANSIENT  # sent again later
        time.sleep(0.3)
        assert control.stats()["sms"]["accepted"] - before == 3  # each once
    finally:
        sender._budget = budget


def test_more_sms_at_once_than_redis_connections_all_pass_their_budget_check(
    channels: Channels, control: ChannelControl
) -> None:
    """The delivery engine lets SMS have 4 to 5 times its 32 connections in flight, each with a
    budget check in Redis at once: the pool waits for a free connection, never refuses."""
    from operators.adapters.channels.factory import REDIS_CONNECTIONS

    worker = worker_with(channels, FANFARE_SMS_DAILY_LIMIT="1000000")
    try:
        n = REDIS_CONNECTIONS + 50
        before = control.stats()["sms"]["accepted"]
        sent = [
            send_request("sms", f"+1415666{i:04d}", user=f"p{i}", message=LOGIN) for i in range(n)
        ]
        answers = worker.answers("sms", *sent)
        assert Counter((a.status, a.reason) for a in answers) == {(201, None): n}
        assert control.stats()["sms"]["accepted"] - before == n
    finally:
        worker.close()
