"""Benchmark of `fanfare outbox relay` on this machine: rows/s, commit -> publish latency, CPU.

    python -m scripts.bench.outbox                          # 50,000 rows, 20 s at 200 posts/s
    python -m scripts.bench.outbox --rows 10000 --duration 5 --json /tmp/bench-outbox.json

Everything shares this machine's cores: PostgreSQL (FANFARE_OUTBOX_URL, else
postgresql://postgres@127.0.0.1:5432/test; a schema `fanfare_bench_<random>` of its own, dropped
at the end), the embedded broker (a free port, a temporary FANFARE_HOME), the relays
(`fanfare outbox relay` processes) and this script (the writer and a consumer).

1. Throughput: --rows rows (post_created, --keys authors) are committed in one transaction
   while --relays relays wait; "rows/s" = rows / (commit -> the outbox empty, polled every
   10 ms). "CPU s/row" = the relays' user + system CPU over that time (from /proc) / rows.
2. Latency: one post per transaction at --rate posts/s for --duration s, as a post service
   writes them. "commit -> publish" = a consumer's receipt of the message (reading the topic's
   partitions from their end, fetch.wait.max.ms 5) - the moment commit() returned in the
   writer; one clock. Also the relay's own histogram, insert -> broker ack
   (fanfare_outbox_publish_delay_seconds, from /metrics), and the CPU s/row of that phase.

Every process it starts is stopped at the end, also on Ctrl-C or an exception.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import orjson
import psycopg
from confluent_kafka import OFFSET_END, Consumer, TopicPartition

from flows.runtime.ports import free_port
from operators.adapters.kafka.admin import create_topics
from operators.adapters.kafka.probes import topic_partitions
from operators.config import load_settings
from scripts.commands.arguments import positive_int, positive_seconds, whole_number
from scripts.dev import devstack
from scripts.harness.procfs import cpu_seconds
from scripts.harness.spawn import start_fanfare, stop_fanfare

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench.outbox", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rows", type=positive_int, default=50_000, help="throughput rows")
    parser.add_argument("--keys", type=positive_int, default=1_000, help="distinct authors")
    parser.add_argument("--relays", type=whole_number(1, 8), default=1, help="relay processes")
    parser.add_argument(
        "--batch-size", type=whole_number(1, 10_000), default=500, help="rows per transaction"
    )
    parser.add_argument("--rate", type=positive_int, default=200, help="latency phase posts/s")
    parser.add_argument(
        "--duration", type=positive_seconds, default=20.0, help="latency phase seconds"
    )
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    return parser


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def post(n: int, author: str) -> str:
    """A post_created value whose post_id carries its sequence number."""
    return orjson.dumps(
        {
            "event_type": "post_created",
            "post_id": f"bench-{n}",
            "author_id": author,
            "visibility": "public",
            "created_at": "2026-06-01T12:00:00Z",
        }
    ).decode()


class Receipts(threading.Thread):
    """Reads post_created from its end; the time each bench post arrived."""

    def __init__(self, kafka: dict[str, object]) -> None:
        super().__init__(daemon=True)
        conf = {**kafka, "group.id": "bench-outbox", "fetch.wait.max.ms": 5}
        self._consumer = Consumer(cast(dict[str, Any], conf))
        parts = [int(p.rsplit("/", 1)[1]) for p in topic_partitions(kafka, ["post_created"])]
        self._consumer.assign([TopicPartition("post_created", p, OFFSET_END) for p in parts])
        self.seen: dict[int, float] = {}
        self.produced: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        """Consume until stopped: receipt time and message timestamp per post."""
        while not self.stop.is_set():
            for m in self._consumer.consume(1000, 0.05):
                if m.error() is None:
                    now = time.time()
                    n = int(orjson.loads(m.value() or b"{}")["post_id"].split("-")[1])
                    self.seen.setdefault(n, now)
                    # CreateTime: when the relay handed the message to its producer (ms).
                    self.produced.setdefault(n, m.timestamp()[1] / 1000)
        self._consumer.close()


def delay_buckets(port: int) -> list[tuple[float, float]]:
    """(le, cumulative count) of a relay's fanfare_outbox_publish_delay_seconds."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith("fanfare_outbox_publish_delay_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
    return buckets


def bucket_quantiles(
    before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> dict[str, float]:
    """Rows and the p50/p99 bucket bounds of what was observed between two scrapes."""
    delta = [(le, n - m) for (le, n), (_, m) in zip(after, before, strict=True)]
    total = delta[-1][1] if delta else 0.0
    out = {"rows": total}
    for name, q in (("p50_le_s", 0.5), ("p99_le_s", 0.99)):
        out[name] = next((le for le, n in delta if n >= q * total), float("inf"))
    return out


@contextlib.contextmanager
def bench_stack() -> Iterator[tuple[dict[str, str], str]]:
    """A broker, topics and an outbox schema; the environment for relays."""
    home = Path(tempfile.mkdtemp(prefix="fanfare-bench-outbox-"))
    url = os.environ.get("FANFARE_OUTBOX_URL") or DEFAULT_URL
    schema = f"fanfare_bench_{uuid.uuid4().hex[:8]}"
    env = {
        "FANFARE_HOME": str(home),
        "FANFARE_KAFKA_BROKERS": f"127.0.0.1:{free_port()}",
        "FANFARE_TOPIC_PARTITIONS": "4",
        "FANFARE_OUTBOX_URL": url,
        "FANFARE_OUTBOX_TABLE": f"{schema}.fanfare_outbox",
        "FANFARE_LOG_LEVEL": "WARNING",
    }
    settings = load_settings(env)
    devstack.start_broker(settings)
    try:
        create_topics(settings)
        yield env, url
    finally:
        devstack.stop_broker(settings)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run both phases and print the figures."""
    args = build_parser().parse_args(argv)
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    with bench_stack() as (env, url):
        table = env["FANFARE_OUTBOX_TABLE"]
        full_env = {**os.environ, **env}
        log = Path(env["FANFARE_HOME"]) / "migrate.log"
        migrated = start_fanfare(["outbox", "migrate"], full_env, log)
        if migrated.wait(60) != 0:
            print(log.read_text(), file=sys.stderr)
            return 1
        ports = [free_port() for _ in range(args.relays)]
        relays = [
            start_fanfare(
                [
                    "outbox",
                    "relay",
                    "--batch-size",
                    str(args.batch_size),
                    "--metrics-port",
                    str(port),
                ],
                full_env,
                Path(env["FANFARE_HOME"]) / f"relay-{i}.log",
            )
            for i, port in enumerate(ports)
        ]
        try:
            time.sleep(3)  # imports, sessions, LISTEN
            with psycopg.connect(url) as conn:

                def pending() -> int:
                    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                    conn.commit()
                    return int(row[0]) if row else 0

                # 1. Throughput.
                rows = [
                    ("post_created", f"author-{n % args.keys}", post(n, f"author-{n % args.keys}"))
                    for n in range(args.rows)
                ]
                with conn.cursor() as cur:
                    cur.executemany(
                        f"INSERT INTO {table} (topic, key, payload) VALUES (%s, %s, %s)", rows
                    )
                cpu0 = sum(cpu_seconds(r.pid) for r in relays)
                conn.commit()
                committed = time.monotonic()
                while pending():
                    time.sleep(0.01)
                took = time.monotonic() - committed
                cpu = sum(cpu_seconds(r.pid) for r in relays) - cpu0
                report["throughput"] = {
                    "rows": args.rows,
                    "seconds": round(took, 3),
                    "rows_per_s": round(args.rows / took),
                    "cpu_s_per_row": cpu / args.rows,
                }
                print(
                    f"throughput: {args.rows:,} rows in {took:.2f} s = {args.rows / took:,.0f} "
                    f"rows/s; relay CPU {cpu:.2f} s = {cpu / args.rows * 1e6:.0f} us/row "
                    f"({args.relays} relay(s), batch {args.batch_size})"
                )

                # 2. Latency.
                receipts = Receipts(load_settings(env).kafka_config())
                receipts.start()
                time.sleep(1)
                committed_at: dict[int, float] = {}
                count = int(args.rate * args.duration)
                base = args.rows
                cpu0 = sum(cpu_seconds(r.pid) for r in relays)
                histograms = [delay_buckets(port) for port in ports]
                start = time.monotonic()
                for i in range(count):
                    due = start + i / args.rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    n = base + i
                    author = f"author-{n % args.keys}"
                    conn.execute(
                        f"INSERT INTO {table} (topic, key, payload) VALUES (%s, %s, %s)",
                        ["post_created", author, post(n, author)],
                    )
                    conn.commit()
                    committed_at[n] = time.time()
                deadline = time.monotonic() + 30
                # (The consumer's start at the end may include a few throughput rows: the
                # embedded broker's watermark can trail the end.)
                while not committed_at.keys() <= receipts.seen.keys():
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                cpu = sum(cpu_seconds(r.pid) for r in relays) - cpu0
                receipts.stop.set()
                published = [
                    receipts.produced[n] - t
                    for n, t in committed_at.items()
                    if n in receipts.produced
                ]
                received = [
                    receipts.seen[n] - t for n, t in committed_at.items() if n in receipts.seen
                ]
                missing = count - len(received)

                def ms(values: list[float], q: float) -> float:
                    return round(percentile(values, q) * 1000, 1) if values else float("nan")

                report["latency"] = {
                    "posts": count,
                    "rate_per_s": args.rate,
                    "missing": missing,
                    "commit_to_publish_ms": {
                        "p50": ms(published, 0.5),
                        "p99": ms(published, 0.99),
                        "max": ms(published, 1.0),
                    },
                    "commit_to_consumer_ms": {
                        "p50": ms(received, 0.5),
                        "p99": ms(received, 0.99),
                        "max": ms(received, 1.0),
                    },
                    "cpu_s_per_row": cpu / count,
                    "relay_insert_to_ack": [
                        bucket_quantiles(b, delay_buckets(port))
                        for b, port in zip(histograms, ports, strict=True)
                    ],
                }
                lat = report["latency"]
                pub, rec = lat["commit_to_publish_ms"], lat["commit_to_consumer_ms"]
                print(
                    f"latency: {count:,} posts at {args.rate}/s, one per transaction "
                    f"({missing} missing); relay CPU {cpu / count * 1e6:.0f} us/row\n"
                    f"  commit -> publish (the message's CreateTime, ms): p50 {pub['p50']} ms, "
                    f"p99 {pub['p99']} ms, max {pub['max']} ms\n"
                    f"  commit -> consumer receipt: p50 {rec['p50']} ms, p99 {rec['p99']} ms, "
                    f"max {rec['max']} ms"
                )
                for i, h in enumerate(lat["relay_insert_to_ack"]):
                    print(
                        f"  relay {i}, insert -> broker ack (its histogram): {h['rows']:.0f} "
                        f"rows, p50 <= {h['p50_le_s'] * 1000:g} ms, p99 <= "
                        f"{h['p99_le_s'] * 1000:g} ms"
                    )
                if missing:
                    lost = sorted(set(committed_at) - set(receipts.seen))
                    print(f"  not received: {lost[:10]}", file=sys.stderr)
        finally:
            for relay in relays:
                stop_fanfare(relay)
    if args.json:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0 if report.get("latency", {}).get("missing", 1) == 0 else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
