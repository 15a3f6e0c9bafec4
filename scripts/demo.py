"""`fanfare demo`: seed a synthetic social graph on the embedded stack, fan posts out, summarise.

The demo runs in its own folder (`$FANFARE_HOME/demo`, fresh each run) with its own Redis key
prefix, starts the embedded broker if needed, publishes the graph to the changelog topics (the
flow itself loads the follower store from `follow_changes`), runs `fanfare run fanout`, and reads
the funnel from the worker's /metrics endpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import redis

from operators.adapters.kafka_admin import create_topics, wait_for_broker
from operators.adapters.kafka_io import message_count, produce_all
from operators.config import DEAD_LETTERS, POST_CREATED, Settings
from scripts import devstack
from scripts.demo_graph import build_graph, demo_posts
from scripts.metrics_scrape import by_label, scrape, total

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prepare_stack(settings: Settings) -> None:
    """Embedded broker up with empty topics, Redis reachable."""
    problem = devstack.redis_reachable(settings)
    if problem is not None:
        raise SystemExit(f"fanfare demo: {problem}\n{devstack.REDIS_HOWTO}")
    ours = devstack.broker_running(settings)
    if ours is None and wait_for_broker(settings, 2.0):
        print(f"  using the broker that answers at {settings.kafka_brokers}")
    elif ours is None:
        try:
            pid = devstack.start_broker(settings)
        except devstack.BrokerStartError as exc:
            raise SystemExit(f"fanfare demo: {exc}") from None
        print(f"  started the embedded broker (pid {pid}) at {settings.kafka_brokers}")
    create_topics(settings)
    if message_count(settings.kafka_config(), [POST_CREATED]):
        if devstack.broker_running(settings) is None:
            raise SystemExit(
                "fanfare demo: the broker at FANFARE_KAFKA_BROKERS already holds posts and was "
                "not started by `fanfare dev up`; point FANFARE_KAFKA_BROKERS at an empty one"
            )
        # The embedded broker keeps memory only: a restart gives the demo empty topics.
        devstack.stop_broker(settings)
        pid = devstack.start_broker(settings)
        create_topics(settings)
        print(f"  restarted the embedded broker (pid {pid}) so the demo starts from empty topics")


def _wait(
    condition_name: str, check: object, timeout_s: float, flow: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if flow.poll() is not None:
            raise SystemExit(
                f"fanfare demo: the flow exited (code {flow.returncode}) while waiting for "
                f"{condition_name}; the end of {log}:\n{log.read_text(errors='replace')[-3000:]}"
            )
        try:
            if check():  # type: ignore[operator]
                return
        except OSError:
            pass  # the metrics endpoint is not up yet
        time.sleep(0.25)
    raise SystemExit(
        f"fanfare demo: timed out after {timeout_s}s waiting for {condition_name}; see {log}"
    )


def command(args: argparse.Namespace, settings: Settings) -> int:
    """Run the demo end to end and print the summary."""
    run_id = uuid.uuid4().hex[:6]
    demo_home = settings.home / "demo"
    if demo_home.exists():
        shutil.rmtree(demo_home)
    demo_home.mkdir(parents=True)
    demo_prefix = f"{settings.redis_prefix}demo:{run_id}:"
    threshold = max(100, args.users // 4)  # only the celebrity (60% of users) is above it
    metrics_port = _free_port()
    print(f"fanfare demo: {args.users} users, {args.posts} posts, seed {args.seed}")
    _prepare_stack(settings)

    graph = build_graph(args.users, args.seed)
    kafka = settings.kafka_config()
    t_seed = time.monotonic()
    produce_all(kafka, "follow_changes", graph.follows + MALFORMED_CHANGES["follow_changes"])
    produce_all(
        kafka, "preference_changes", graph.preferences + MALFORMED_CHANGES["preference_changes"]
    )
    produce_all(kafka, "device_changes", graph.devices + MALFORMED_CHANGES["device_changes"])
    print(
        f"  published {len(graph.follows)} follow changes (celebrity {graph.celebrity} has "
        f"{graph.followers_of[graph.celebrity]} followers; bulk lane above {threshold}), "
        f"{len(graph.preferences)} preferences, {len(graph.devices)} devices, 3 malformed"
    )

    env = {
        **os.environ,
        "FANFARE_HOME": str(demo_home),
        "FANFARE_STORE_URL": f"sqlite:///{demo_home / 'store.db'}",
        "FANFARE_REDIS_PREFIX": demo_prefix,
        "FANFARE_CELEBRITY_THRESHOLD": str(threshold),
        "FANFARE_METRICS_PORT": str(metrics_port),
        "FANFARE_KAFKA_BROKERS": settings.kafka_brokers,
    }
    log = demo_home / "flow.log"
    with log.open("wb") as out:
        flow = subprocess.Popen(
            [sys.executable, "-m", "scripts.cli", "run", "fanout"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = [f"http://127.0.0.1:{metrics_port}/metrics"]
    try:
        changes = len(graph.follows) + len(graph.preferences) + len(graph.devices)
        _wait(
            "the changelogs to be applied",
            lambda: total(scrape(url), "fanfare_changes_applied_total") >= changes,
            args.timeout,
            flow,
            log,
        )
        print(f"  flow running; changelogs applied in {time.monotonic() - t_seed:.1f} s")
        posts = list(demo_posts(graph, args.posts, args.seed, run_id))
        t0 = time.monotonic()
        produce_all(kafka, POST_CREATED, posts)

        def fanned_out() -> bool:
            m = scrape(url)
            read = total(m, "fanfare_posts_read_total")
            bad = total(m, "fanfare_dead_letters_total", source_topic=POST_CREATED)
            created = total(m, "fanfare_shard_jobs_created_total")
            done = total(m, "fanfare_shard_jobs_completed_total")
            deduped = total(m, "fanfare_deduped_total", stage="shard_job")
            return read + bad >= len(posts) and done + deduped >= created

        _wait("the fan-out", fanned_out, args.timeout, flow, log)
        seconds = time.monotonic() - t0
        # Jobs are done in the shards; wait until the sink has written their batches.
        last = -1.0
        metrics = scrape(url)
        while total(metrics, "fanfare_dispatched_total") != last:
            last = total(metrics, "fanfare_dispatched_total")
            time.sleep(1.0)
            metrics = scrape(url)
        seconds = max(seconds, time.monotonic() - t0 - 1.0)
    finally:
        if flow.poll() is None:
            os.killpg(flow.pid, signal.SIGTERM)
            try:
                flow.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(flow.pid, signal.SIGKILL)
        client = redis.Redis.from_url(settings.redis_url)
        keys = list(client.scan_iter(match=demo_prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    dead_total = message_count(settings.kafka_config(), [DEAD_LETTERS])
    print_summary(metrics, len(posts), seconds, dead_total)
    print(f"\nThe embedded stack is still up (`fanfare dev status`); the flow's log is {log}.")
    return 0


def print_summary(
    m: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    published: int,
    seconds: float,
    dead_on_topic: int,
) -> None:
    """The funnel, readable."""

    def n(value: float) -> str:
        return f"{int(value):,}"

    candidates = total(m, "fanfare_candidates_total")
    print("\nfan-out summary")
    print(f"  posts published          {n(published)}")
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
    print("  dead letters")
    for topic, v in sorted(by_label(m, "fanfare_dead_letters_total", "source_topic").items()):
        print(f"    from {topic:<19} {n(v)}")
    print(f"    on the dead_letters topic {n(dead_on_topic)}")
    rate = candidates / seconds if seconds else 0.0
    print(f"  seconds from publishing to fanned out  {seconds:.2f}  ({rate:,.0f} candidates/s)")
