"""A slow channel's backlog does not keep the delivery worker's other channels waiting.

Email goes through a few SMTP sessions (FANFARE_SMTP_CONNECTIONS); with a backlog of 1,000
messages it used to take the worker's whole in-flight limit (FANFARE_DELIVERY_IN_FLIGHT), its
messages queued behind the sessions, and web push (200 subscriptions on one push service, 64
connections) got a slot only when an email was answered: about 2 pushes a second in the channel
kill -9 test. Now a sender bound by its own sessions holds a few rounds of them in flight
(operators/delivery/engine.py, `room`), so web push sends beside email at once.

Checked in order, not on the clock: the pushes are published once email is under way, and
every one is accepted while most of the email backlog is still to be sent (email at 8 sessions and 150 ms an answer cannot send 500 messages in less
than 9 s), and no push was held or scheduled again.
"""

from __future__ import annotations

import time
from collections import Counter

import orjson
import pytest

from scripts.dev.local_channels.control import ChannelControl
from tests.conftest import Providers, Stack, wait_for
from tests.integration.test_channel_delivery_e2e import POST, RECEIPT, publish

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

EMAILS = 1_000
PUSHES = 200
SESSIONS = 8
BATCH = 500
FLOW_ENV = (
    ("FANFARE_DELIVERY_IN_FLIGHT", "400"),
    ("FANFARE_SMTP_CONNECTIONS", str(SESSIONS)),
    ("FANFARE_EMAIL_RATE_PER_MIN", "6000000"),
    ("FANFARE_EMAIL_DOMAIN_RATE_PER_MIN", "6000000"),
)


def test_web_push_is_sent_beside_an_email_backlog_not_after_it(
    stack: Stack, providers: Providers
) -> None:
    ctl = ChannelControl(providers.info["channels"]["control_url"])
    ctl.reset()
    emails = [(f"em{i:05d}", f"email-{i}", f"em{i:05d}@d{i % 7}.example") for i in range(EMAILS)]
    pushes = [
        (
            f"wp{i:05d}",
            f"webpush-{i}",
            orjson.dumps(ctl.mint_subscription()["subscription"]).decode(),
        )
        for i in range(PUSHES)
    ]
    for start in range(0, EMAILS, BATCH):
        batch = emails[start : start + BATCH]
        publish(stack, "email.transactional", "n_email", "email", batch, RECEIPT)
    ctl.set_latency("email", 150)
    ctl.set_latency("webpush", 50)

    def accepted() -> dict[str, int]:
        return {c: s["accepted"] for c, s in ctl.stats().items() if c in ("email", "webpush")}

    stack.start_flow(*FLOW_ENV, flow="delivery")
    # The pushes come once email has read what it may of its backlog (its sessions are busy).
    wait_for(lambda: accepted()["email"] >= SESSIONS, 120, "email under way", stack, every_s=0.05)
    publish(stack, "webpush.social", "n_webpush", "webpush", pushes, POST)
    wait_for(
        lambda: accepted()["webpush"] >= PUSHES, 120, "every web push accepted", stack, every_s=0.05
    )
    at_last_push = accepted()
    print(f"\nwhen the last web push was accepted: {at_last_push}")
    # Before, web push got the slots email freed, one at a time: the email backlog had to be
    # read to its end (600 or more answered) before web push could go at its own pace.
    assert at_last_push["email"] < EMAILS // 2, at_last_push
    wait_for(lambda: accepted()["email"] >= EMAILS, 120, "every email accepted", stack)

    outcomes: Counter[tuple[str, str]] = Counter()
    deadline = time.monotonic() + 30
    while sum(outcomes.values()) < EMAILS + PUSHES and time.monotonic() < deadline:
        outcomes = Counter(
            (e["provider"], e["outcome"])
            for e in (orjson.loads(v or b"{}") for _, _, v in stack.read_topic("delivery_events"))
        )
        time.sleep(0.5)
    # Nothing held or retried: each push and each email went once, accepted.
    assert outcomes == {("email", "accepted"): EMAILS, ("webpush", "accepted"): PUSHES}, outcomes
    assert ctl.stats()["webpush"]["requests"] == PUSHES
