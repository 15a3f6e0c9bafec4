"""/metrics of running flows: the funnel counts a known scenario exactly, and the Grafana
dashboard queries only metrics that the workers expose.

The fan-out, delivery and acks flows run as users run them (`fanfare run FLOW`) on the real
broker, Redis and the local APNs / FCM servers; counters are read from each flow's /metrics.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from flows.runtime.metrics_scrape import Sample, by_labels, exposed_names, fetch_text, parse
from operators.adapters.kafka.writer import produce_all
from operators.adapters.stores.sqlite_followers import SQLiteFollowerStore
from operators.fanout.sharding import shard_of
from tests.conftest import Providers, Stack, wait_for
from tests.integration.test_delivery_e2e import apns_token, fcm_token, iso

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "scripts" / "deploy" / "grafana" / "dashboards"
FAST_RETRIES = (
    ("FANFARE_RETRY_BASE_MS", "200"),
    ("FANFARE_RETRY_MAX_BACKOFF_S", "1"),
    ("FANFARE_RETRY_MAX_ATTEMPTS", "2"),
    ("FANFARE_BREAKER_FAILURES", "1000"),
    ("FANFARE_SEND_TIMEOUT_MS", "3000"),
)
CELEBRITY_THRESHOLD = 11  # alice has 9 followers (normal lane), celeb 12 (bulk lane)


# --- helpers ------------------------------------------------------------------------------------


def metrics_url(stack: Stack, proc: subprocess.Popen[bytes]) -> str:
    """The /metrics of a flow `stack.start_flow` started (its port is in the child's env)."""
    port: list[bytes] = []

    def read() -> bool:
        assert proc.poll() is None, f"the flow exited ({proc.returncode})\n{stack.flow_log()}"
        env = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        port.extend(v.split(b"=", 1)[1] for v in env if v.startswith(b"FANFARE_METRICS_PORT="))
        return bool(port)

    wait_for(read, 10, "the flow's environment", stack, 0.05)
    return f"http://127.0.0.1:{port[0].decode()}/metrics"


def scrape(url: str) -> dict[Sample, float]:
    try:
        return parse(fetch_text(url, 2.0))
    except OSError:
        return {}


def value(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """One series' value (0 when it does not exist); labels must match exactly."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def series(samples: dict[Sample, float], name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """Every non-zero series of a metric, keyed by the label values asked for."""
    return {k: v for k, v in by_labels(samples, name, labels).items() if v}


def now_iso(delta: timedelta = timedelta(0)) -> str:
    return iso(datetime.now(UTC) + delta)


def publish(stack: Stack, topic: str, messages: list[tuple[str, Any]]) -> None:
    produce_all(
        stack.settings.kafka_config(),
        topic,
        [(k.encode(), v if isinstance(v, bytes) else orjson.dumps(v)) for k, v in messages],
    )


def follow(author: str, follower: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    body = {"author_id": author, "follower_id": follower, "op": "follow", "ts": now_iso()}
    return author, {**body, **extra}


def device(user: str, dev: str, provider: str, token: str, active: bool = True) -> tuple[str, Any]:
    body = {"user_id": user, "device_id": dev, "provider": provider, "token": token}
    return user, {**body, "active": active, "ts": now_iso()}


def prefs(user: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    return user, {"user_id": user, "timezone": "UTC", "ts": now_iso(), **extra}


def post(pid: str, author: str, created: str | None = None, **extra: Any) -> tuple[str, Any]:
    body = {
        "event_type": "post_created",
        "post_id": pid,
        "author_id": author,
        "visibility": "public",
        "created_at": created or now_iso(),
    }
    return author, {**body, **extra}


def ack(nid: str, dev: str, event: str) -> tuple[str, dict[str, str]]:
    return nid, {"notification_id": nid, "device_id": dev, "event": event, "ts": now_iso()}


def batches_expected(receivers: dict[str, list[str]], shards: int) -> int:
    """Dispatch batches of one post and provider at most: one per follower shard with receivers.

    The sink joins the shards' batches of a post that reach it in one write, so fewer is right.
    """
    return len({shard_of(u, shards) for users in receivers.values() for u in users})


# --- the exact funnel ---------------------------------------------------------------------------


def test_every_funnel_counter_moves_exactly_as_the_scenario_says(
    stack: Stack, providers: Providers
) -> None:
    started = time.monotonic()
    rng = random.Random(5)
    shards = stack.settings.shard_count
    tok = {name: apns_token(rng) for name in ("bob", "dave", "erin", "frank", "alice", "hank")}
    tok |= {name: apns_token(rng) for name in ("ivan", "gina")}
    ftok = {name: fcm_token(rng) for name in ("bob", "carol")}
    celeb_fans = [f"c{i:02d}" for i in range(1, 13)]
    ctok = {f: apns_token(rng) for f in celeb_fans}
    cftok = {f: fcm_token(rng) for f in celeb_fans}
    # Provider answers by token: the rest are accepted.
    providers.control.set_token_errors(
        "apns",
        {
            ctok["c01"]: "BadDeviceToken",  # invalid_token
            ctok["c02"]: "TopicDisallowed",  # failed (permanent), a dead letter
            ctok["c03"]: "InternalServerError",  # retried once, then dead_lettered
        },
    )
    providers.control.set_token_errors("fcm", {ftok["carol"]: "UNREGISTERED"})

    # celeb's 12 followers are in the store before the flow starts: the post takes the bulk lane.
    store = SQLiteFollowerStore(
        stack.settings.resolved_store_url.removeprefix("sqlite:///"), shards
    )
    store.bulk_load(("celeb", f, 1) for f in celeb_fans)
    store.close()
    hour = time.gmtime().tm_hour
    publish(
        stack,
        "follow_changes",
        [
            follow("alice", "bob"),
            follow("alice", "carol"),
            follow("alice", "dave", notify_on_post=False),  # notify_off
            follow("alice", "erin", muted=True),  # muted
            follow("alice", "frank"),  # push_disabled
            follow("alice", "alice"),  # self
            follow("alice", "hank"),  # quiet hours now: deferred
            follow("alice", "nodev"),  # no_device
            follow("alice", "ivan"),  # no_device (deactivated)
            follow("alice", "gina"),
            (
                "alice",
                {"author_id": "alice", "follower_id": "gina", "op": "unfollow", "ts": now_iso()},
            ),
            ("zed", b'{"author_id": "zed"}'),  # schema
        ],
    )
    c_devices = [device(f, f"{f}-ios", "apns", ctok[f]) for f in celeb_fans[:6]]
    c_devices += [device(f, f"{f}-android", "fcm", cftok[f]) for f in celeb_fans[6:10]]
    c_devices += [device("c11", "c11-ios", "apns", ctok["c11"])]
    c_devices += [device("c11", "c11-android", "fcm", cftok["c11"])]  # c12: no device
    alice_devices = [
        device("bob", "bob-ios", "apns", tok["bob"]),
        device("bob", "bob-android", "fcm", ftok["bob"]),
        device("carol", "carol-android", "fcm", ftok["carol"]),
        *(device(u, f"{u}-ios", "apns", tok[u]) for u in ("dave", "erin", "frank", "alice")),
        device("hank", "hank-ios", "apns", tok["hank"]),
        device("ivan", "ivan-ios", "apns", tok["ivan"]),
        device("ivan", "ivan-ios", "apns", tok["ivan"], active=False),
        device("gina", "gina-ios", "apns", tok["gina"]),
    ]
    bad_device = device("x", "x-1", "apns", "zz")  # schema: not an APNs token
    publish(stack, "device_changes", [*alice_devices, *c_devices, bad_device])
    publish(
        stack,
        "preference_changes",
        [
            prefs("frank", push_enabled=False),
            prefs("hank", quiet_hours_start=hour, quiet_hours_end=(hour + 2) % 24),
            prefs("x", timezone="Atlantis/Capital"),  # unknown_timezone
            prefs("y", quiet_hours_start=25, quiet_hours_end=3),  # schema
        ],
    )
    publish(
        stack,
        "post_created",
        [
            post("p1", "alice"),
            post("p1", "alice"),  # a duplicate post_created: dropped by the claim
            post("p-old", "alice", created=now_iso(-timedelta(hours=2)), visibility="followers"),
            post("p-priv", "alice", visibility="private"),
            post("p-quiet", "alice", notify_followers=False),
            post("pc", "celeb"),
            ("alice", b"\xff\xfe not json"),  # invalid_json
            post("p-bad", "alice", visibility="everyone"),  # schema
            ("alice", {"event_type": "post_created", "post_id": "p6"}),  # schema
            ("alice", [1, 2, 3]),  # schema
        ],
    )

    # 1. The fan-out, alone until it wrote every push (delivery's token clean-up would
    #    otherwise race it through device_changes).
    fanout = stack.start_flow(("FANFARE_CELEBRITY_THRESHOLD", str(CELEBRITY_THRESHOLD)))
    fanout_url = metrics_url(stack, fanout)
    wait_for(lambda: len(stack.dispatch_items()) >= 18, 90, "18 dispatch items", stack)
    m = scrape(fanout_url)
    assert value(m, "fanfare_posts_read_total") == 6
    assert series(m, "fanfare_posts_fanned_out_total", "lane") == {("normal",): 2, ("bulk",): 1}
    assert series(m, "fanfare_posts_suppressed_total", "reason") == {
        ("private",): 1,
        ("notify_followers_off",): 1,
    }
    assert series(m, "fanfare_deduped_total", "stage") == {("post_claim",): 1}
    assert value(m, "fanfare_candidates_total") == 9 + 9 + 12  # p1, p-old, pc
    assert series(m, "fanfare_suppressed_total", "reason") == {
        ("self",): 2,
        ("notify_off",): 2,
        ("muted",): 2,
        ("push_disabled",): 2,
        ("no_device",): 2 + 2 + 1,  # nodev and ivan for both posts of alice, c12
    }
    assert value(m, "fanfare_deferred_total") == 2  # hank, for p1 and p-old
    assert value(m, "fanfare_released_total") == 0
    dispatched = {
        ("apns", "normal"): 2,  # bob, p1 and p-old
        ("fcm", "normal"): 4,  # bob and carol, p1 and p-old
        ("apns", "bulk"): 7,  # c01-c06, c11
        ("fcm", "bulk"): 5,  # c07-c10, c11
    }
    assert series(m, "fanfare_dispatched_total", "provider", "lane") == dispatched
    normal = {"apns": ["bob"], "fcm": ["bob", "carol"]}
    most_batches = {
        ("apns", "normal"): 2 * batches_expected({"apns": normal["apns"]}, shards),
        ("fcm", "normal"): 2 * batches_expected({"fcm": normal["fcm"]}, shards),
        ("apns", "bulk"): batches_expected({"x": [*celeb_fans[:6], "c11"]}, shards),
        ("fcm", "bulk"): batches_expected({"x": [*celeb_fans[6:11]]}, shards),
    }
    # Two normal posts, one bulk post: at least one batch each.
    fewest_batches = {
        ("apns", "normal"): 2,
        ("fcm", "normal"): 2,
        ("apns", "bulk"): 1,
        ("fcm", "bulk"): 1,
    }
    batches = series(m, "fanfare_dispatch_batches_total", "provider", "lane")
    assert batches.keys() == most_batches.keys()
    for key, most in most_batches.items():
        assert fewest_batches[key] <= batches[key] <= most, (key, batches[key])
    # One latency observation per dispatched item; p-old's three are two hours old.
    counts = series(m, "fanfare_post_to_dispatched_seconds_count", "provider", "lane")
    assert counts == dispatched
    old = series(m, "fanfare_post_to_dispatched_seconds_bucket", "le")
    assert old[("3600.0",)] == 18 - 3 and old[("21600.0",)] == 18
    assert series(m, "fanfare_dead_letters_total", "source_topic", "reason") == {
        ("post_created", "invalid_json"): 1,
        ("post_created", "schema"): 3,
        ("follow_changes", "schema"): 1,
        ("device_changes", "schema"): 1,
        ("preference_changes", "unknown_timezone"): 1,
        ("preference_changes", "schema"): 1,
    }
    assert series(m, "fanfare_dead_letters_written_total", "source_topic", "reason") == series(
        m, "fanfare_dead_letters_total", "source_topic", "reason"
    )

    # 2. Delivery of the 18 pushes, then 3. the apps' acks.
    delivery = stack.start_flow(*FAST_RETRIES, flow="delivery")
    delivery_url = metrics_url(stack, delivery)

    def terminal() -> float:
        d = scrape(delivery_url)
        return sum(
            v
            for (name, labels), v in d.items()
            if name == "fanfare_delivery_outcomes_total"
            and dict(labels)["outcome"] != "retry_scheduled"
        )

    wait_for(lambda: terminal() >= 18, 90, "18 terminal outcomes", stack)
    publish(
        stack,
        "notification_acks",
        [
            ack("p1:bob", "bob-ios", "delivered"),
            ack("p1:bob", "bob-android", "opened"),
            ack("p1:nobody", "x", "delivered"),  # unknown_notification
            ("p1:bob", {"notification_id": "p1:bob"}),  # schema
        ],
    )
    acks = stack.start_flow(flow="acks")
    acks_url = metrics_url(stack, acks)
    wait_for(
        lambda: sum(series(scrape(acks_url), "fanfare_acks_total", "outcome").values()) >= 3,
        60,
        "3 acks",
        stack,
    )
    time.sleep(2)  # anything extra would show now

    d = scrape(delivery_url)
    assert series(d, "fanfare_delivery_outcomes_total", "provider", "outcome") == {
        ("apns", "accepted"): 5,  # bob p1; c04, c05, c06, c11
        ("apns", "invalid_token"): 1,  # c01
        ("apns", "failed"): 1,  # c02
        ("apns", "retry_scheduled"): 1,  # c03 after its first 500
        ("apns", "dead_lettered"): 1,  # c03 after its second (FANFARE_RETRY_MAX_ATTEMPTS=2)
        ("apns", "expired"): 1,  # bob p-old
        ("fcm", "accepted"): 6,  # bob p1; c07-c11
        ("fcm", "invalid_token"): 1,  # carol p1
        ("fcm", "expired"): 2,  # bob and carol p-old
    }
    assert series(d, "fanfare_provider_sends_total", "provider", "lane") == {
        ("apns", "normal"): 1,
        ("apns", "bulk"): 8,  # c01-c06, c11, and c03's retry
        ("fcm", "normal"): 2,
        ("fcm", "bulk"): 5,
    }
    assert series(d, "fanfare_provider_errors_total", "provider", "reason") == {
        ("apns", "BadDeviceToken"): 1,
        ("apns", "TopicDisallowed"): 1,
        ("apns", "InternalServerError"): 2,
        ("fcm", "UNREGISTERED"): 1,
    }
    assert series(d, "fanfare_tokens_deactivated_total", "provider") == {
        ("apns",): 1,
        ("fcm",): 1,
    }
    assert series(d, "fanfare_post_to_accepted_seconds_count", "provider", "lane") == {
        ("apns", "normal"): 1,
        ("apns", "bulk"): 4,
        ("fcm", "normal"): 1,
        ("fcm", "bulk"): 5,
    }
    assert by_labels(d, "fanfare_circuit_state", ("provider",)) == {("apns",): 0, ("fcm",): 0}
    for quiet in (
        "fanfare_delivery_held_total",
        "fanfare_delivery_deduped_total",
        "fanfare_delivery_resends_total",
    ):
        assert not series(d, quiet, "provider"), quiet
    assert series(d, "fanfare_dead_letters_written_total", "reason") == {
        ("failed",): 1,
        ("dead_lettered",): 1,
    }
    a = scrape(acks_url)
    assert series(a, "fanfare_acks_total", "event", "outcome") == {
        ("delivered", "applied"): 1,
        ("opened", "applied"): 1,
        ("delivered", "unknown_notification"): 1,
    }
    assert series(a, "fanfare_dead_letters_written_total", "source_topic", "reason") == {
        ("notification_acks", "unknown_notification"): 1,
        ("notification_acks", "schema"): 1,
    }
    # The fan-out applied every valid changelog event, and the two deactivations delivery sent.
    wait_for(
        lambda: (
            value(scrape(fanout_url), "fanfare_changes_applied_total", topic="device_changes")
            == len(alice_devices) + len(c_devices) + 2
        ),
        30,
        "the token clean-up to reach the fan-out",
        stack,
    )
    m = scrape(fanout_url)
    assert series(m, "fanfare_changes_applied_total", "topic") == {
        ("follow_changes",): 11,
        ("preference_changes",): 2,
        ("device_changes",): len(alice_devices) + len(c_devices) + 2,
    }

    # Consumer lag: a gauge per source partition each flow reads, 0 once all is read.
    urls = (fanout_url, delivery_url, acks_url)

    def lag() -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for url in urls:
            out |= by_labels(scrape(url), "fanfare_consumer_lag_messages", ("topic", "partition"))
        return out

    wait_for(lambda: not any(lag().values()), 30, "lag 0 everywhere", stack)
    topics = {t for t, _ in lag()}
    assert {
        "post_created",
        "follow_changes",
        "preference_changes",
        "device_changes",
        "push.apns",
        "push.fcm",
        "push.apns.bulk",
        "push.fcm.bulk",
        "push.retry",
        "notification_acks",
    } <= topics
    partitions = Counter(t for t, _ in lag())
    assert all(
        partitions[t] == stack.settings.topic_partitions for t in ("post_created", "push.retry")
    )

    # `fanfare metrics` on the three endpoints and one that does not answer.
    result = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "metrics", *urls, "127.0.0.1:1"],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    print(out)
    assert "3 endpoint(s)" in out and "unreachable: http://127.0.0.1:1/metrics" in out
    for line in (
        r"candidates \(follow edges\)\s+30$",
        r"suppressed, no_device\s+5$",
        r"deferred \(quiet hours\)\s+2$",
        r"apns bulk\s+7  in \d+ batches$",
        r"dead_lettered\s+1$",
        r"circuit\s+apns closed  fcm closed$",
        r"delivered applied\s+1$",
        r"push.retry\s+0  2 partition\(s\), largest 0$",
    ):
        assert re.search(line, out, re.MULTILINE), line
    # With no URL it finds the three flows from their run files in $FANFARE_HOME/run.
    result = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "metrics"],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "3 endpoint(s)" in result.stdout and "unreachable" not in result.stdout
    for url, flow in zip(urls, ("fanout", "delivery", "acks"), strict=True):
        where = url.removeprefix("http://").removesuffix("/metrics")
        # Each endpoint says when its process started: its counts are since then.
        line = rf"{where}\s+{flow}  \(process started \d\d:\d\d:\d\dZ\)$"
        assert re.search(line, result.stdout, re.MULTILINE), result.stdout
    print(f"scenario took {time.monotonic() - started:.1f} s")


# --- the dashboard ------------------------------------------------------------------------------

_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords,
    label names (in `{...}` matchers and `by (...)` lists), strings, durations or variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors ([5m], [$__rate_interval])
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    expr = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr
    )  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", expr):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def dashboard_queries() -> dict[str, list[str]]:
    """{dashboard file: every PromQL expression in it, rows' nested panels included}."""
    out: dict[str, list[str]] = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        exprs = []
        stack = list(dashboard["panels"])
        while stack:
            panel = stack.pop()
            stack.extend(panel.get("panels", []))
            exprs += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
        out[path.name] = exprs
    return out


def test_promql_metric_names_handles_the_shapes_the_dashboard_uses() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, lane) (rate(fanfare_x_seconds_bucket{a="b:c",'
        'le!="1"}[$__rate_interval]))) / on (lane) group_left sum without (provider) '
        "(increase(fanfare_y_total[5m] offset 1h)) > bool 0 and max(fanfare_z)"
    )
    assert promql_metric_names(expr) == {"fanfare_x_seconds_bucket", "fanfare_y_total", "fanfare_z"}


def test_the_dashboard_queries_only_metrics_running_workers_expose(
    stack: Stack, providers: Providers
) -> None:
    queries = dashboard_queries()
    assert queries and all(queries.values()), "no dashboard, or one without queries"
    rng = random.Random(9)
    publish(stack, "follow_changes", [follow("ann", "ben")])
    publish(
        stack,
        "device_changes",
        [
            device("ben", "ben-ios", "apns", apns_token(rng)),
            device("ben", "ben-android", "fcm", fcm_token(rng)),
        ],
    )
    publish(stack, "post_created", [post("q1", "ann")])
    publish(stack, "notification_acks", [ack("q1:ben", "ben-ios", "delivered")])
    # As docker-compose.yml runs them: Bytewax's API server, whose bytewax_* step metrics the
    # step panel reads (fanfare's own server has the rest).
    bytewax = (("FANFARE_METRICS_SERVER", "bytewax"), ("FANFARE_METRICS_HOST", "0.0.0.0"))
    urls = [
        metrics_url(stack, stack.start_flow(*bytewax)),
        metrics_url(stack, stack.start_flow(*bytewax, flow="delivery")),
        metrics_url(stack, stack.start_flow(*bytewax, flow="acks")),
    ]

    def accepted() -> bool:
        return sum(series(scrape(urls[1]), "fanfare_post_to_accepted_seconds_count").values()) >= 2

    wait_for(accepted, 90, "both pushes accepted", stack)
    exposed: set[str] = set()
    for url in urls:
        exposed |= exposed_names(fetch_text(url))
    for name, exprs in queries.items():
        for expr in exprs:
            names = promql_metric_names(expr)
            assert names, f"{name}: no metric in {expr!r}"
            missing = names - exposed
            assert not missing, f"{name}: {expr!r} queries {missing}, which no worker exposes"
    # The latency panels' histograms have observations, the lag panel's gauge has series.
    fanout = scrape(urls[0])
    assert sum(series(fanout, "fanfare_post_to_dispatched_seconds_count").values()) == 2
    assert by_labels(fanout, "fanfare_consumer_lag_messages", ("topic",))
