"""Delivery end to end: the real broker, Redis, the local provider servers, with `fanfare run
delivery` as users run it; each test on each transport (`transport`: libcurl, the default, and
the providers' libraries, aioapns and firebase-admin)."""

from __future__ import annotations

import bisect
import random
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from flows.runtime.ports import free_port_run
from operators.adapters.kafka.writer import produce_all
from operators.delivery.model import TERMINAL_STATES
from schemas.codecs import format_timestamp
from tests.conftest import Providers, Stack, wait_for

TRANSPORTS = {
    "curl": (("FANFARE_APNS_CLIENT", "curl"), ("FANFARE_FCM_CLIENT", "curl")),
    "libraries": (("FANFARE_APNS_CLIENT", "aioapns"), ("FANFARE_FCM_CLIENT", "firebase-admin")),
}


@pytest.fixture(params=list(TRANSPORTS))
def transport(request: pytest.FixtureRequest) -> tuple[tuple[str, str], ...]:
    """The delivery flow's client settings: every test runs on each transport."""
    return TRANSPORTS[request.param]


FAST_RETRIES = (
    ("FANFARE_RETRY_BASE_MS", "200"),
    ("FANFARE_RETRY_MAX_BACKOFF_S", "1"),
    ("FANFARE_BREAKER_COOLDOWN_S", "1"),
    ("FANFARE_SEND_TIMEOUT_MS", "3000"),
)


def apns_token(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(64))


def fcm_token(rng: random.Random) -> str:
    body = "".join(
        rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
        for _ in range(140)
    )
    return f"{body[:22]}:APA91b{body[22:]}"


def iso(dt: datetime) -> str:
    return format_timestamp(dt)


def publish(
    stack: Stack,
    provider: str,
    post: str,
    items: list[tuple[str, str, str]],
    *,
    lane: str = "normal",
    created_at: datetime | None = None,
) -> None:
    """Dispatch batches of up to 500 items, as the fan-out writes them."""
    created = iso(created_at or datetime.now(UTC))
    topic = f"push.{provider}" if lane == "normal" else f"push.{provider}.bulk"
    messages = []
    for start in range(0, len(items), 500):
        body = {
            "schema": "dispatch_batch/v1",
            "post_id": post,
            "author_id": "author-1",
            "provider": provider,
            "created_at": created,
            "items": [
                {"notification_id": f"{post}:{u}", "user_id": u, "device_id": d, "token": t}
                for u, d, t in items[start : start + 500]
            ],
        }
        messages.append((post.encode(), orjson.dumps(body)))
    produce_all(stack.settings.kafka_config(), topic, messages)


def delivery_events(stack: Stack) -> list[dict[str, Any]]:
    return [orjson.loads(v or b"{}") for _, _, v in stack.read_topic("delivery_events")]


def terminal(events: list[dict[str, Any]]) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for e in events:
        if e["outcome"] in TERMINAL_STATES:
            out.setdefault((e["notification_id"], e["device_id"]), []).append(e["outcome"])
    return out


def wait_terminal(
    stack: Stack, expected: int, timeout_s: float
) -> dict[tuple[str, str], list[str]]:
    result: dict[tuple[str, str], list[str]] = {}

    def done() -> bool:
        nonlocal result
        result = terminal(delivery_events(stack))
        return len(result) >= expected

    wait_for(done, timeout_s, f"{expected} terminal outcomes", stack, every_s=1.0)
    return result


def test_every_outcome_path(
    stack: Stack, providers: Providers, transport: tuple[tuple[str, str], ...]
) -> None:
    rng = random.Random(1)
    ctl = providers.control
    apns = {name: apns_token(rng) for name in ("ok1", "ok2", "gone", "bad", "topic", "broken")}
    fcm = {name: fcm_token(rng) for name in ("ok", "unreg", "mismatch", "invalid", "flaky")}
    ctl.set_token_errors(
        "apns",
        {
            apns["gone"]: "Unregistered",
            apns["bad"]: "BadDeviceToken",
            apns["topic"]: "TopicDisallowed",
            apns["broken"]: "InternalServerError",
        },
    )
    ctl.set_token_errors(
        "fcm",
        {
            fcm["unreg"]: "UNREGISTERED",
            fcm["mismatch"]: "SENDER_ID_MISMATCH",
            fcm["invalid"]: "INVALID_ARGUMENT",
        },
    )
    publish(stack, "apns", "p1", [(n, "ios", t) for n, t in apns.items()])
    publish(
        stack,
        "apns",
        "p-old",
        [("late", "ios", apns_token(rng))],
        created_at=datetime.now(UTC) - timedelta(hours=2),
    )
    stack.start_flow(
        *transport,
        *FAST_RETRIES,
        ("FANFARE_RETRY_MAX_ATTEMPTS", "3"),
        ("FANFARE_BREAKER_FAILURES", "1000"),
        flow="delivery",
    )
    wait_for(
        lambda: any(e["user_id"] == "ok1" for e in delivery_events(stack)),
        60,
        "the flow to send",
        stack,
    )
    # FCM is down for 2 s when its batch arrives: 503 with Retry-After, then a retry succeeds.
    ctl.set_outage("fcm", 2.0)
    publish(stack, "fcm", "p1", [(n, "android", t) for n, t in fcm.items()])

    outcomes = wait_terminal(stack, 12, 90)
    by_user = {nid.split(":")[1]: o for (nid, _), o in outcomes.items()}
    assert by_user == {
        "ok1": ["accepted"],
        "ok2": ["accepted"],
        "gone": ["invalid_token"],
        "bad": ["invalid_token"],
        "topic": ["failed"],
        "broken": ["dead_lettered"],
        "ok": ["accepted"],
        "unreg": ["invalid_token"],
        "mismatch": ["invalid_token"],
        "invalid": ["invalid_token"],
        "flaky": ["accepted"],
        "late": ["expired"],
    }
    events = delivery_events(stack)
    retried = {e["user_id"] for e in events if e["outcome"] == "retry_scheduled"}
    assert {
        "broken",
        "ok",
        "flaky",
    } <= retried  # the FCM outage and the 500s went through push.retry
    broken = [e for e in events if e["user_id"] == "broken"]
    assert [e["attempt"] for e in broken] == [1, 2, 3] and broken[-1]["outcome"] == "dead_lettered"
    # Token hygiene: every permanent token error deactivated its device.
    changes = [orjson.loads(v or b"{}") for _, _, v in stack.read_topic("device_changes")]
    assert sorted((c["user_id"], c["active"]) for c in changes) == [
        ("bad", False),
        ("gone", False),
        ("invalid", False),
        ("mismatch", False),
        ("unreg", False),
    ]
    # Failed and dead-lettered sends are in dead_letters with why.
    letters = [e["error"].split(":")[0] for e in stack.dead_letters()]
    assert sorted(letters) == ["dead_lettered", "failed"]
    # What the providers accepted is exactly the accepted outcomes, each once.
    accepted = [
        (r.provider, r.notification_id, r.device_id)
        for p in ("apns", "fcm")
        for r in ctl.accepted(p)
    ]
    assert sorted(accepted) == sorted(
        [
            ("apns", "p1:ok1", "ios"),
            ("apns", "p1:ok2", "ios"),
            ("fcm", "p1:ok", "android"),
            ("fcm", "p1:flaky", "android"),
        ]
    )
    [record] = [r for r in ctl.accepted("apns") if r.notification_id == "p1:ok1"]
    assert record.collapse_id == "p1" and record.size <= 4096


def test_outage_opens_the_circuit_and_everything_is_delivered_after_recovery(
    stack: Stack, providers: Providers, transport: tuple[tuple[str, str], ...]
) -> None:
    rng = random.Random(2)
    ctl = providers.control
    items = [(f"u{i}", "ios", apns_token(rng)) for i in range(300)]
    started = time.monotonic()
    # The outage lasts until the breaker has opened, however long the flow took to start and
    # to send (a fixed 4 s outage could end before the first send on a loaded machine).
    ctl.set_outage("apns", 120.0)
    stack.start_flow(*transport, *FAST_RETRIES, ("FANFARE_BREAKER_FAILURES", "20"), flow="delivery")
    publish(stack, "apns", "p-outage", items)

    def reasons() -> Counter[str]:
        events = delivery_events(stack)
        return Counter(e["reason"] for e in events if e["outcome"] == "retry_scheduled")

    wait_for(lambda: reasons()["circuit_open"] > 0, 90, "the circuit to open", stack)
    time.sleep(2.0)  # the breaker holds the sends for a while: probes only
    rejected_while_open = ctl.stats()["apns"]["rejected"].get("ServiceUnavailable", 0)
    ctl.set_outage("apns", 0.0)  # the provider is back
    outcomes = wait_terminal(stack, 300, 120)
    assert Counter(o for v in outcomes.values() for o in v) == {"accepted": 300}
    assert reasons()["503 ServiceUnavailable"] >= 20
    # The breaker held sends instead of hammering the provider: after the first batch met the
    # outage, only probes reached it (without the breaker, each item retries every ~0.2-1 s).
    stats = ctl.stats()["apns"]
    assert stats["accepted"] == stats["distinct"] == 300
    assert 300 <= rejected_while_open <= 310, rejected_while_open
    assert time.monotonic() - started < 120


def test_rate_limit_holds_the_send_rate(
    stack: Stack, providers: Providers, transport: tuple[tuple[str, str], ...]
) -> None:
    rng = random.Random(3)
    items = [(f"u{i}", "ios", apns_token(rng)) for i in range(900)]
    publish(stack, "apns", "p-paced", items, lane="bulk")
    stack.start_flow(
        *transport,
        ("FANFARE_APNS_RATE_PER_MIN", "12000"),
        ("FANFARE_RATE_BURST_MS", "100"),
        flow="delivery",
    )
    wait_terminal(stack, 900, 120)
    times = sorted(r.time for r in providers.control.accepted("apns"))
    assert len(times) == 900
    # 200/s with a 100 ms burst: no one-second window holds more than 200 + 20 sends, as the
    # provider received them (it held 25 where 20 fit when grants were pooled).
    assert most_in_window(times, 1.0) <= 220, most_in_window(times, 1.0)
    assert times[-1] - times[0] >= (900 - 20) / 200 * 0.95


def most_in_window(times: list[float], w: float) -> int:
    """The most of the (sorted) times in any window [t, t + w)."""
    return max((bisect.bisect_left(times, t + w) - i for i, t in enumerate(times)), default=0)


# The limits: 10 APNs and 9 FCM sends a second, the default burst (one second of the
# rate) and the default send slack.
RATES_PER_MIN = {"apns": 600, "fcm": 540}
# Two celebrity posts on the bulk lanes, on different partitions (with two processes, each
# reads one partition of each topic), and normal posts published one a second while they drain.
CELEBRITIES = {"celeb-a": 1, "celeb-d": 0}  # post_id: its partition
BULK_PER_POST = {"apns": 90, "fcm": 80}
NORMAL_POSTS, NORMAL_DEVICES = 15, 2


@pytest.mark.parametrize("processes", [1, 2])
def test_provider_rate_limit_holds_in_every_window_for_the_whole_cluster(
    stack: Stack, providers: Providers, processes: int, transport: tuple[tuple[str, str], ...]
) -> None:
    """At a binding rate, with both lanes busy and one or two delivery processes, the
    providers receive at most rate x W + burst in any W seconds (W = 1, 5, 10), every push is
    accepted once, and the cluster never restarts (two processes crash-looped on
    "Send thread panic": an engine built on every call, until two firebase apps shared a name).
    """
    rng = random.Random(20 + processes)
    tokens = {"apns": apns_token, "fcm": fcm_token}
    expected = {"apns": 0, "fcm": 0}
    for post in CELEBRITIES:
        for provider, n in BULK_PER_POST.items():
            items = [(f"{post}-{provider}{i}", "d", tokens[provider](rng)) for i in range(n)]
            publish(stack, provider, post, items, lane="bulk")
            expected[provider] += n
    # The test proves the cluster case only if both processes have a bulk lane to drain.
    partitions = {p for p, _, _ in stack.read_topic("push.apns.bulk")}
    assert partitions == set(CELEBRITIES.values()), partitions
    flow = stack.start_flow(
        *transport,
        *((f"FANFARE_{p.upper()}_RATE_PER_MIN", str(r)) for p, r in RATES_PER_MIN.items()),
        ("FANFARE_METRICS_PORT", str(free_port_run(processes))),
        flow="delivery",
        args=["--processes", str(processes)],
    )
    ctl = providers.control
    wait_for(lambda: ctl.stats()["apns"]["accepted"] > 0, 60, "the first sends", stack)
    for j in range(NORMAL_POSTS):  # the normal lanes, busy while the bulk ones drain
        for provider in ("apns", "fcm"):
            devices = [
                (f"n{j}", f"{provider}{k}", tokens[provider](rng)) for k in range(NORMAL_DEVICES)
            ]
            publish(stack, provider, f"post-{j}", devices)
            expected[provider] += NORMAL_DEVICES
        time.sleep(1.0)
    outcomes = wait_terminal(stack, sum(expected.values()), 120)

    log = stack.flow_log()
    assert flow.poll() is None, log
    assert "restarting in" not in log and "Send thread panic" not in log, log
    assert Counter(o for v in outcomes.values() for o in v) == {"accepted": sum(expected.values())}
    stats = ctl.stats()
    report: dict[str, Any] = {}
    # One client per process for the whole run (FCM: one more connection for its OAuth token).
    # A worker made a new engine, with new connections, on every call before.
    connections = {"apns": processes, "fcm": 2 * processes}
    for provider, per_min in RATES_PER_MIN.items():
        rate = per_min / 60
        assert stats[provider]["accepted"] == stats[provider]["distinct"] == expected[provider]
        assert stats[provider]["connections_total"] <= connections[provider], stats[provider]
        times = sorted(r.time for r in ctl.accepted(provider))
        windows = {w: (most_in_window(times, w), rate * w + rate * 1.0) for w in (1, 5, 10)}
        report[provider] = {**windows, "connections": stats[provider]["connections_total"]}
        assert all(got <= allowed for got, allowed in windows.values()), (provider, windows)
        # The limit did bind: the pushes took as long as the rate makes them.
        assert times[-1] - times[0] >= (expected[provider] - 2 * rate) / rate, provider
    print(f"\n{processes} process(es), most received in W s (got, allowed): {report}")


def test_killed_mid_batch_no_device_gets_two_pushes_and_none_is_skipped(
    stack: Stack, providers: Providers, transport: tuple[tuple[str, str], ...]
) -> None:
    rng = random.Random(4)
    ctl = providers.control
    ctl.set_latency("apns", 20)
    n = 12_000
    items = [(f"u{i}", "ios", apns_token(rng)) for i in range(n)]
    publish(stack, "apns", "p-kill", items, lane="bulk")
    flow = stack.start_flow(*transport, ("FANFARE_BULK_ITEMS_PER_POLL", "300"), flow="delivery")
    wait_for(
        lambda: ctl.stats()["apns"]["accepted"] > 3_000, 90, "sends under way", stack, every_s=0.2
    )
    stack.kill_flow(flow)
    before = ctl.stats()["apns"]["accepted"]
    assert before < n, "the flow finished before it was killed; the test proves nothing"
    stack.start_flow(*transport, ("FANFARE_BULK_ITEMS_PER_POLL", "300"), flow="delivery")
    outcomes = wait_terminal(stack, n, 180)
    assert all(v == ["accepted"] for v in outcomes.values()), Counter(
        tuple(v) for v in outcomes.values()
    )
    records = ctl.accepted("apns")
    per_device = Counter((r.token, r.notification_id) for r in records)
    assert len(per_device) == n  # none skipped
    repeats = {k for k, c in per_device.items() if c > 1}
    # A send interrupted by the kill may be repeated, and only with the same apns-id: what
    # APNs' own protocol allows (and collapses on the device, with the same collapse id).
    for key in repeats:
        ids = {r.message_id for r in records if (r.token, r.notification_id) == key}
        assert len(ids) == 1, key
    assert len(repeats) <= 2_000, len(repeats)
