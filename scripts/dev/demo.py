"""`fanfare demo`: seed a synthetic social graph on the embedded stack, fan out, deliver, summarise.

The demo runs on a throwaway stack of its own: its folder (`$FANFARE_HOME/demo`, fresh each
run), its own Redis key prefix, an embedded broker of its own on a free port and its own local
APNs/FCM servers, all stopped at the end, so a stack of `fanfare dev up` is never touched. It
publishes the graph to the changelog topics (the flow itself loads the follower store from
`follow_changes`), runs `fanfare run fanout`, `fanfare run delivery` and `fanfare run acks`,
and reads the funnel from the workers' /metrics endpoints and `delivery_events`. Some device
tokens are made stale at the providers and FCM is down for two seconds when the posts arrive,
so token clean-up and retries show. Then it plays the apps: every accepted push is acked
`delivered` on `notification_acks` and a quarter `opened` (plus one ack of an unknown
notification, dead-lettered), and it prints one follower's inbox from the notification store.
Last, with the flows still up, it runs `fanfare api` and sends through it to every channel's
local server (scripts/dev/demo_api.py); `--stay` keeps everything up until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import redis

from flows.runtime.metrics_scrape import by_label, scrape, total
from flows.runtime.ports import free_port
from operators.adapters.kafka.admin import create_topics
from operators.adapters.kafka.probes import message_count, read_partition_to_end, topic_partitions
from operators.adapters.kafka.writer import produce_all
from operators.adapters.stores.sqlite_notifications import SQLiteNotificationStore
from operators.config import Settings
from schemas.codecs import format_timestamp
from schemas.topics import DEAD_LETTERS, DELIVERY_EVENTS, NOTIFICATION_ACKS, POST_CREATED
from scripts.commands.arguments import positive_int
from scripts.commands.hints import fanfare_command
from scripts.dev import demo_api, devstack
from scripts.dev.demo_graph import MALFORMED_POSTS, build_graph, demo_posts
from scripts.dev.local_channels.control import ChannelControl
from scripts.dev.local_providers.control import ProviderControl
from scripts.harness.spawn import start_fanfare, stop_fanfare

PROVIDER_VARIABLES = ("FANFARE_APNS_", "FANFARE_FCM_")
OPEN_RATE = 0.25  # the share of delivered pushes the demo's "apps" report opened

MALFORMED_CHANGES = {
    "follow_changes": [(b"a", b'{"author_id": "a", "op": "follow"}')],
    "preference_changes": [
        (
            b"u",
            orjson.dumps(
                {"user_id": "u", "timezone": "Mars/Olympus_Mons", "ts": "2026-01-01T00:00:00Z"}
            ),
        )
    ],
    "device_changes": [
        (
            b"u",
            orjson.dumps(
                {
                    "user_id": "u",
                    "device_id": "d",
                    "provider": "apns",
                    "token": "not-a-token",
                    "active": True,
                    "ts": "2026-01-01T00:00:00Z",
                }
            ),
        )
    ],
}


def _start_stack(settings: Settings) -> None:
    """Redis reachable, and an embedded broker of the demo's own with fanfare's topics."""
    problem = devstack.redis_reachable(settings)
    if problem is not None:
        raise SystemExit(f"fanfare demo: {problem}\n{devstack.REDIS_HOWTO}")
    try:
        pid = devstack.start_broker(settings)
    except devstack.BrokerStartError as exc:
        raise SystemExit(f"fanfare demo: {exc}") from None
    create_topics(settings)
    print(f"  started an embedded broker of its own (pid {pid}) at {settings.kafka_brokers}")


PROGRESS_EVERY_S = 2.0
"""A wait longer than this says how far it got, at this pace."""


def _wait(
    condition_name: str,
    check: Callable[[], bool],
    timeout_s: float,
    flow: subprocess.Popen[bytes],
    log: Path,
    progress: Callable[[], str] | None = None,
) -> None:
    started = time.monotonic()
    deadline = started + timeout_s
    said_at = started
    said = False
    while time.monotonic() < deadline:
        if flow.poll() is not None:
            raise SystemExit(
                f"fanfare demo: the flow exited (code {flow.returncode}) while waiting for "
                f"{condition_name}; the end of {log}:\n{log.read_text(errors='replace')[-3000:]}"
            )
        try:
            if check():
                if said and sys.stdout.isatty():
                    print()  # end the progress line
                return
        except OSError:
            pass  # the metrics endpoint is not up yet
        now = time.monotonic()
        if now - said_at >= PROGRESS_EVERY_S:
            said_at = now
            try:
                how_far = f": {progress()}" if progress is not None else ""
            except OSError:
                how_far = ""
            line = f"  waiting for {condition_name}{how_far} ({now - started:.0f} s)"
            if sys.stdout.isatty():
                print(f"\r{line}\033[K", end="", flush=True)
            else:
                print(line, flush=True)
            said = True
        time.sleep(0.25)
    raise SystemExit(
        f"fanfare demo: timed out after {timeout_s}s waiting for {condition_name}; see {log}"
    )


STALE_TOKEN_SHARE = 0.03  # devices whose token the providers say is gone
FCM_OUTAGE_S = 2.0


def _stale_tokens(devices: list[tuple[bytes, bytes]], seed: int) -> dict[str, dict[str, str]]:
    rng = random.Random(seed + 2)
    stale: dict[str, dict[str, str]] = {"apns": {}, "fcm": {}}
    for _, value in devices:
        d = orjson.loads(value)
        if d.get("active") and rng.random() < STALE_TOKEN_SHARE:
            reason = "Unregistered" if d["provider"] == "apns" else "UNREGISTERED"
            stale[d["provider"]][d["token"]] = reason
    return stale


def _accepted_events(settings: Settings) -> list[dict[str, Any]]:
    """Every `accepted` delivery event (one per device push that reached its provider)."""
    out = []
    kafka = settings.kafka_config()
    for part in topic_partitions(kafka, [DELIVERY_EVENTS]):
        topic, _, p = part.rpartition("/")
        for _, value in read_partition_to_end(kafka, topic, int(p), 0):
            e = orjson.loads(value or b"{}")
            if e.get("outcome") == "accepted":
                out.append(e)
    return out


def _latencies(accepted: list[dict[str, Any]], created: dict[str, float]) -> list[float]:
    """Seconds from each post's created_at to each provider acceptance."""
    return sorted(
        datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp() - created[e["post_id"]]
        for e in accepted
        if e.get("post_id") in created
    )


def _app_acks(accepted: list[dict[str, Any]], seed: int) -> list[tuple[bytes, bytes]]:
    """What the apps would send back: every push delivered, a quarter opened, one unknown."""
    rng = random.Random(seed)
    ts = format_timestamp(time.time())
    acks = []
    for e in accepted:
        events = ["delivered", "opened"] if rng.random() < OPEN_RATE else ["delivered"]
        for event in events:
            body = {"notification_id": e["notification_id"], "device_id": e["device_id"]}
            acks.append(
                (e["notification_id"].encode(), orjson.dumps({**body, "event": event, "ts": ts}))
            )
    unknown = {"notification_id": "no-such-post:u0", "device_id": "d0", "event": "opened"}
    acks.append((b"no-such-post:u0", orjson.dumps({**unknown, "ts": ts})))
    return acks


def add_parser(sub: Any) -> None:
    """Register `fanfare demo`."""
    demo = sub.add_parser(
        "demo",
        help="seed a synthetic social graph, fan out posts, deliver them, send through the API "
        "to every channel, summarise",
        description="Run fanfare end to end on a throwaway stack of its own (an embedded broker "
        "on a free port, local APNs, FCM and channel servers, `fanfare api`, a Redis key prefix), "
        "in $FANFARE_HOME/demo: seed a social graph, fan out posts, deliver them, play the apps' "
        "acks, send a receipt and a login code through the API to every channel, and print what "
        "happened. A `fanfare dev up` stack is never touched. Needs Redis (FANFARE_REDIS_URL).",
    )
    demo.add_argument(
        "--users", type=positive_int, default=5_000, help="users to seed (default 5000)"
    )
    demo.add_argument(
        "--posts",
        type=positive_int,
        default=40,
        help="posts to publish, one of them twice (default 40); 2 malformed ones are added",
    )
    demo.add_argument(
        "--seed", type=int, default=7, help="random seed of the synthetic graph (default 7)"
    )
    demo.add_argument(
        "--timeout",
        type=positive_int,
        default=180,
        help="seconds to wait for each stage before giving up (default 180)",
    )
    demo.add_argument(
        "--stay",
        action="store_true",
        help="after the summary, keep the API, the flows and the local servers up (with curl "
        "lines to try) until Ctrl-C",
    )
    demo.set_defaults(func=command)


def command(args: argparse.Namespace, settings: Settings) -> int:
    """Run the demo end to end and print the summary."""
    run_id = uuid.uuid4().hex[:6]
    demo_home = settings.home / "demo"
    if demo_home.exists():
        shutil.rmtree(demo_home)
    demo_home.mkdir(parents=True)
    demo_prefix = f"{settings.redis_prefix}demo:{run_id}:"
    threshold = max(100, args.users // 4)  # only the celebrity (60% of users) is above it
    metrics_port = free_port()
    demo_settings = settings.with_overrides(
        home=demo_home,
        settings_file=str(demo_home / "settings.env"),  # where its local providers say where
        kafka_brokers=f"127.0.0.1:{free_port()}",
        redis_prefix=demo_prefix,
    )
    print(
        f"fanfare demo: {args.users} users, {args.posts} posts (one of them sent twice) and "
        f"{MALFORMED_POSTS} malformed post messages, seed {args.seed}"
    )
    _start_stack(demo_settings)
    try:
        return _run(args, settings, demo_settings, run_id, threshold, metrics_port)
    finally:
        devstack.stop_providers(demo_settings)
        devstack.stop_broker(demo_settings)
        client = redis.Redis.from_url(settings.redis_url)
        keys = list(client.scan_iter(match=demo_prefix + "*", count=1000))
        if keys:
            client.delete(*keys)


def _run(
    args: argparse.Namespace,
    settings: Settings,
    demo_settings: Settings,
    run_id: str,
    threshold: int,
    metrics_port: int,
) -> int:
    demo_home = demo_settings.home
    graph = build_graph(args.users, args.seed)
    kafka = demo_settings.kafka_config()
    t_seed = time.monotonic()
    produce_all(kafka, "follow_changes", graph.follows + MALFORMED_CHANGES["follow_changes"])
    produce_all(
        kafka, "preference_changes", graph.preferences + MALFORMED_CHANGES["preference_changes"]
    )
    produce_all(kafka, "device_changes", graph.devices + MALFORMED_CHANGES["device_changes"])
    print(
        f"  published {len(graph.follows)} follow changes (celebrity {graph.celebrity} has "
        f"{graph.followers_of[graph.celebrity]} followers; bulk lane above {threshold}), "
        f"{len(graph.preferences)} preferences, {len(graph.devices)} devices, "
        f"{len(MALFORMED_CHANGES)} malformed changes"
    )
    # Its flows send to its own local providers: the shell's provider settings are left out.
    shell = {k: v for k, v in os.environ.items() if not k.startswith(PROVIDER_VARIABLES)}
    env = {
        **shell,
        "FANFARE_HOME": str(demo_home),
        "FANFARE_SETTINGS_FILE": str(demo_settings.settings_path),
        "FANFARE_STORE_URL": f"sqlite:///{demo_home / 'store.db'}",
        "FANFARE_REDIS_PREFIX": demo_settings.redis_prefix,
        "FANFARE_CELEBRITY_THRESHOLD": str(threshold),
        "FANFARE_METRICS_PORT": str(metrics_port),
        "FANFARE_READY_PORT": str(free_port()),
        # The demo reads its flows' /metrics on the loopback, whatever the shell says.
        "FANFARE_METRICS_HOST": "127.0.0.1",
        "FANFARE_METRICS_SERVER": "fanfare",
        "FANFARE_KAFKA_BROKERS": demo_settings.kafka_brokers,
    }
    devstack.start_providers(demo_settings)
    providers = devstack.providers_info(demo_settings) or {}
    control = ProviderControl(providers["control_url"])
    channels = ChannelControl(providers["channels"]["control_url"])
    stale = _stale_tokens(graph.devices, args.seed)
    for provider, errors in stale.items():
        control.set_token_errors(provider, errors)
    print(
        f"  local APNs, FCM and channel servers up; "
        f"{len(stale['apns']) + len(stale['fcm'])} device tokens are stale at the providers"
    )
    log = demo_home / "flow.log"
    delivery_log = demo_home / "delivery.log"
    delivery_port = free_port()
    # The key first: if that fails, no process of the demo's is left running.
    api_log = demo_home / "api.log"
    api_key = demo_api.create_key(env, api_log)
    api, api_port = demo_api.start_api(env, api_log)
    print(
        f"  API key created with `fanfare api keys create`; fanfare api starting at "
        f"http://127.0.0.1:{api_port}"
    )
    flow = start_fanfare(["run", "fanout"], env, log)
    delivery = start_fanfare(
        ["run", "delivery"],
        {
            **env,
            "FANFARE_METRICS_PORT": str(delivery_port),
            "FANFARE_READY_PORT": str(free_port()),
            "FANFARE_RETRY_BASE_MS": "250",
            "FANFARE_BREAKER_COOLDOWN_S": "1",
        },
        delivery_log,
    )
    url = [f"http://127.0.0.1:{metrics_port}/metrics"]
    delivery_url = [f"http://127.0.0.1:{delivery_port}/metrics"]
    acks_log = demo_home / "acks.log"
    acks_port = free_port()
    acks_flow = start_fanfare(
        ["run", "acks"],
        {**env, "FANFARE_METRICS_PORT": str(acks_port), "FANFARE_READY_PORT": str(free_port())},
        acks_log,
    )
    acks_url = [f"http://127.0.0.1:{acks_port}/metrics"]
    created: dict[str, float] = {}
    try:
        changes = len(graph.follows) + len(graph.preferences) + len(graph.devices)

        def applied() -> float:
            return total(scrape(url), "fanfare_changes_applied_total")

        _wait(
            "the changelogs to be applied",
            lambda: applied() >= changes,
            args.timeout,
            flow,
            log,
            lambda: f"{applied():,.0f} of {changes:,} changes",
        )
        print(f"  flow running; changelogs applied in {time.monotonic() - t_seed:.1f} s")
        posts = list(demo_posts(graph, args.posts, args.seed, run_id))
        for _, value in posts:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                body = orjson.loads(value)
                created[body["post_id"]] = datetime.fromisoformat(
                    body["created_at"].replace("Z", "+00:00")
                ).timestamp()
        t0 = time.monotonic()
        produce_all(kafka, POST_CREATED, posts)
        # FCM goes down for a moment once pushes flow, so retries (and Retry-After) show.
        _wait(
            "the first FCM push",
            lambda: control.stats()["fcm"]["accepted"] > 0,
            args.timeout,
            delivery,
            delivery_log,
        )
        control.set_outage("fcm", FCM_OUTAGE_S)

        def fanned_out() -> bool:
            m = scrape(url)
            read = total(m, "fanfare_posts_read_total")
            bad = total(m, "fanfare_dead_letters_total", source_topic=POST_CREATED)
            created = total(m, "fanfare_shard_jobs_created_total")
            done = total(m, "fanfare_shard_jobs_completed_total")
            deduped = total(m, "fanfare_deduped_total", stage="shard_job")
            return read + bad >= len(posts) and done + deduped >= created

        def shard_jobs() -> str:
            m = scrape(url)
            done = total(m, "fanfare_shard_jobs_completed_total")
            return f"{done:,.0f} of {total(m, 'fanfare_shard_jobs_created_total'):,.0f} shard jobs"

        _wait("the fan-out", fanned_out, args.timeout, flow, log, shard_jobs)
        seconds = time.monotonic() - t0
        # Jobs are done in the shards; wait until the sink has written their batches.
        last = -1.0
        metrics = scrape(url)
        while total(metrics, "fanfare_dispatched_total") != last:
            last = total(metrics, "fanfare_dispatched_total")
            time.sleep(1.0)
            metrics = scrape(url)
        seconds = max(seconds, time.monotonic() - t0 - 1.0)
        dispatched = total(metrics, "fanfare_dispatched_total")

        def settled() -> float:
            m = scrape(delivery_url)
            return sum(
                v
                for outcome, v in by_label(m, "fanfare_delivery_outcomes_total", "outcome").items()
                if outcome != "retry_scheduled"
            )

        _wait(
            "every push to reach an outcome",
            lambda: settled() >= dispatched,
            args.timeout,
            delivery,
            delivery_log,
            lambda: f"{settled():,.0f} of {dispatched:,.0f} pushes",
        )
        delivery_seconds = time.monotonic() - t0
        # Held and retried sends settle after the count first matches: wait until it is still.
        last = -1.0
        delivery_metrics = scrape(delivery_url)
        while total(delivery_metrics, "fanfare_delivery_outcomes_total") != last:
            last = total(delivery_metrics, "fanfare_delivery_outcomes_total")
            time.sleep(2.0)
            delivery_metrics = scrape(delivery_url)
        provider_stats = control.stats()
        accepted = _accepted_events(demo_settings)
        # The apps answer: acks on notification_acks, applied to the store by the acks flow.
        acks = _app_acks(accepted, args.seed)
        produce_all(kafka, NOTIFICATION_ACKS, acks)

        def acks_applied() -> float:
            return total(scrape(acks_url), "fanfare_acks_total")

        _wait(
            "the acks to be applied",
            lambda: acks_applied() >= len(acks),
            args.timeout,
            acks_flow,
            acks_log,
            lambda: f"{acks_applied():,.0f} of {len(acks):,} acks",
        )
        acks_metrics = scrape(acks_url)
        _wait(
            "fanfare api to answer /health",
            lambda: demo_api.healthy(api_port),
            args.timeout,
            api,
            api_log,
        )
        shown = demo_api.ApiDemo(api_port, api_key, graph.users[1:4])
        t_api = time.monotonic()
        registered = demo_api.register_addresses(
            shown, channels, providers["channels"]["chat"]["slack_example"]
        )
        _wait(
            "the channel addresses to reach the fan-out",
            lambda: applied() >= changes + registered,
            args.timeout,
            flow,
            log,
            lambda: f"{applied() - changes:,.0f} of {registered} addresses",
        )
        demo_api.send_notifications(shown, run_id)

        def channels_settled() -> bool:
            shown.dispatched = demo_api.channel_dispatched(url)
            shown.settled = demo_api.channel_settled(delivery_url)
            return all(0 < shown.dispatched[c] <= shown.settled[c] for c in demo_api.CHANNELS)

        _wait(
            "every channel's sends to reach an outcome",
            channels_settled,
            args.timeout,
            delivery,
            delivery_log,
            lambda: ", ".join(
                f"{c} {shown.settled.get(c, 0):.0f}/{shown.dispatched.get(c, 0):.0f}"
                for c in demo_api.CHANNELS
            ),
        )
        api_seconds = time.monotonic() - t_api
        demo_api.read_servers(shown, channels, demo_settings)
        shown.status = demo_api.receipt_status(shown)
        dead_total = message_count(kafka, [DEAD_LETTERS])
        print_summary(metrics, len(posts), seconds)
        print_delivery(
            delivery_metrics, provider_stats, _latencies(accepted, created), delivery_seconds
        )
        print_acks_and_inbox(acks_metrics, demo_settings, accepted, acks)
        print_dead_letters([metrics, delivery_metrics, acks_metrics], dead_total)
        print_channels(shown, api_seconds, args.stay)
        if args.stay:
            demo_api.stay(
                [("fanout", flow), ("delivery", delivery), ("acks", acks_flow), ("api", api)]
            )
    finally:
        stop_fanfare(api, 20)
        stop_fanfare(flow, 20)
        stop_fanfare(delivery, 20)
        stop_fanfare(acks_flow, 20)
    print(
        f"\nThe demo's broker, API and local servers are stopped; its store and the logs "
        f"stay in {demo_home} ({log.name}, {delivery_log.name}, {acks_log.name}, "
        f"{api_log.name})."
    )
    return 0


def print_channels(shown: demo_api.ApiDemo, seconds: float, stay: bool) -> None:
    """The API part: each channel's sends, what its local server received, the status."""
    print("\nthe API and every channel (fanfare api -> fan-out -> delivery -> local servers)")
    print(f"  receipt {shown.receipt_id} (email, in-app, chat) to {', '.join(shown.users)}")
    print(
        f"  login_code {shown.login_id} (push, else SMS) to {shown.users[0]} (push), "
        f"{demo_api.SMS_ONLY_USER} (SMS)"
    )
    print("  channel   dispatched  settled  server received  sample")
    # in-app has no server: "received" is what the users' live streams in Redis hold.
    for c in demo_api.CHANNELS:
        print(
            f"  {c:<8} {shown.dispatched.get(c, 0):>11.0f} {shown.settled.get(c, 0):>8.0f} "
            f"{shown.received.get(c, 0):>16}  {shown.samples.get(c, '-')}"
        )
    print(f"  seconds from the first request to every channel settled  {seconds:.2f}")
    state = shown.status.get("state", "?")
    counts = shown.status.get("recipient_status", {})
    by_status = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(f"  GET /v1/notifications/{shown.receipt_id}/status: {state}, recipients {by_status}")
    if not stay:
        print(
            "  (`fanfare demo --stay` keeps the API, the flows and the local servers up "
            "afterwards, with curl lines to try)"
        )
        return
    print("  try it (the API stays up until Ctrl-C):")
    for line in demo_api.hints(shown):
        print(f"    {line}")
    print(f"  the live inbox page: {demo_api.inbox_page(shown)}")


def print_delivery(
    m: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    provider_stats: dict[str, Any],
    latencies: list[float],
    seconds: float,
) -> None:
    """What delivery did, per provider."""

    def n(value: float) -> str:
        return f"{int(value):,}"

    print("\ndelivery summary")
    outcomes = by_label(m, "fanfare_delivery_outcomes_total", "outcome")
    for provider in ("apns", "fcm"):
        accepted = total(
            m, "fanfare_delivery_outcomes_total", provider=provider, outcome="accepted"
        )
        at_server = provider_stats.get(provider, {}).get("distinct", 0)
        print(
            f"  delivered via {provider:<5}        {n(accepted):>9} "
            f"(the {provider} server counted {n(at_server)})"
        )
    print(
        f"  invalid tokens cleaned     {n(total(m, 'fanfare_tokens_deactivated_total')):>9} "
        "(device_changes active: false)"
    )
    print(f"  retries scheduled          {n(outcomes.get('retry_scheduled', 0)):>9}")
    print(f"  expired                    {n(outcomes.get('expired', 0)):>9}")
    failed = outcomes.get("failed", 0) + outcomes.get("dead_lettered", 0)
    print(f"  failed / dead-lettered     {n(failed):>9}")
    print(f"  duplicate sends skipped    {n(total(m, 'fanfare_delivery_deduped_total')):>9}")
    if latencies:
        p50 = latencies[len(latencies) // 2]
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(
            f"  post created -> provider accepted  p50 {p50:.2f} s  p99 {p99:.2f} s  "
            f"max {latencies[-1]:.2f} s"
        )
    print(f"  seconds from publishing to every push settled  {seconds:.2f}")


def print_acks_and_inbox(
    m: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    settings: Settings,
    accepted: list[dict[str, Any]],
    acks: list[tuple[bytes, bytes]],
) -> None:
    """The acks the flow applied, and one follower's inbox as `fanfare inbox` shows it."""

    def n(value: float) -> str:
        return f"{int(value):,}"

    print("\nopen tracking (notification_acks -> the notification store)")
    print(f"  acks published             {n(len(acks)):>9}")
    for event in ("delivered", "opened"):
        applied = total(m, "fanfare_acks_total", event=event, outcome="applied")
        print(f"  {event + ' acks applied':<26} {n(applied):>9}")
    unknown = sum(
        v for k, v in by_label(m, "fanfare_acks_total", "outcome").items() if k != "applied"
    )
    print(f"  unknown, dead-lettered     {n(unknown):>9}")
    if not accepted:
        return
    store = SQLiteNotificationStore(
        settings.resolved_notification_store_url.removeprefix("sqlite:///"),
        ttl_s=settings.store_ttl_s,
    )
    try:
        counts: dict[str, int] = {}
        for e in accepted:
            counts[e["user_id"]] = counts.get(e["user_id"], 0) + 1
        user = max(counts, key=lambda u: (counts[u], u))
        page = store.inbox(user, None, 5)
        print(f"\ninbox of {user} (the first page; newest first)")
        for note in page.notifications:
            when = datetime.fromtimestamp(note.created_ms / 1000, UTC).strftime("%H:%M:%S")
            print(f"  {when}Z  {note.status:<10} {note.notification_id}")
    finally:
        store.close()
    home = {"FANFARE_HOME": str(settings.home)}
    print("  see more:")
    print(f"    {fanfare_command(['inbox', user, '--limit', '3'], overrides=home)}")
    print(
        f"    {fanfare_command(['status', page.notifications[0].notification_id], overrides=home)}"
    )


def print_summary(
    m: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    published: int,
    seconds: float,
) -> None:
    """The funnel, readable."""

    def n(value: float) -> str:
        return f"{int(value):,}"

    candidates = total(m, "fanfare_candidates_total")
    print("\nfan-out summary")
    print(
        f"  messages published       {n(published)}  ({n(published - MALFORMED_POSTS)} posts, "
        f"{MALFORMED_POSTS} malformed)"
    )
    print(f"  posts read (valid)       {n(total(m, 'fanfare_posts_read_total'))}")
    for lane, v in sorted(by_label(m, "fanfare_posts_fanned_out_total", "lane").items()):
        print(f"    fanned out, {lane:<6}     {n(v)}")
    for reason, v in sorted(by_label(m, "fanfare_posts_suppressed_total", "reason").items()):
        print(f"    suppressed, {reason:<22} {n(v)}")
    print(f"    duplicate posts dropped {n(total(m, 'fanfare_deduped_total', stage='post_claim'))}")
    print(f"  candidates (follow edges) {n(candidates)}")
    for reason, v in sorted(by_label(m, "fanfare_suppressed_total", "reason").items()):
        print(f"    suppressed, {reason:<14} {n(v)}")
    print(f"    deferred (quiet hours)  {n(total(m, 'fanfare_deferred_total'))}")
    deduped = total(m, "fanfare_deduped_total", stage="shard_job") + total(
        m, "fanfare_deduped_total", stage="replay"
    )
    print(f"    deduped                 {n(deduped)}")
    print("  dispatched (device pushes, batches)")
    batches = {
        (dict(ls)["provider"], dict(ls)["lane"]): v
        for (name, ls), v in m.items()
        if name == "fanfare_dispatch_batches_total"
    }
    for (name, ls), v in sorted(m.items()):
        if name == "fanfare_dispatched_total":
            labels = dict(ls)
            key = (labels["provider"], labels["lane"])
            print(
                f"    {labels['provider']:<5} {labels['lane']:<6}          {n(v):>9} in "
                f"{n(batches.get(key, 0))} batches"
            )
    rate = candidates / seconds if seconds else 0.0
    print(f"  seconds from publishing to fanned out  {seconds:.2f}  ({rate:,.0f} candidates/s)")


def print_dead_letters(
    flows: Sequence[dict[tuple[str, tuple[tuple[str, str], ...]], float]], on_topic: int
) -> None:
    """Every flow's dead letters by source topic, and what the dead_letters topic holds."""
    sources: dict[str, float] = {}
    for m in flows:
        for topic, v in by_label(m, "fanfare_dead_letters_total", "source_topic").items():
            sources[topic] = sources.get(topic, 0.0) + v
    print("\ndead letters (bad input, each kept with its reason)")
    for topic, v in sorted(sources.items()):
        print(f"  from {topic:<21} {int(v):>5}")
    print(f"  on the dead_letters topic  {on_topic:>5}")
