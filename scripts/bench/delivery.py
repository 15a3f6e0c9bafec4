"""End-to-end benchmark of ONE delivery process (`fanfare run delivery`, 1 worker) on this machine.

    python -m scripts.bench.delivery                        # the default sizes (several minutes)
    python -m scripts.bench.delivery --apns-items 5000 --fcm-items 1000 --duration 10
        --drain-items 20000 --json /tmp/bench-delivery.json   # a quick run (one line)

Everything runs on this machine and shares its cores (2 on the reference machine): the embedded
Kafka-protocol broker (Tansu, memory storage), the local APNs and FCM servers (a process each,
`python -m scripts.dev.local_providers --serve apns|fcm`, so each can use a core of its own),
the delivery flow (one bytewax process, one worker) and this script's own publisher threads.
So every figure below is "on a box where the providers and the broker eat part of the same
CPU"; the CPU table says how it was shared. The figure that does not depend on the servers is
the delivery process's CPU per accepted push (from the first push accepted to the last, start-up
left out); each server's own CPU per push and cores used are beside it: a server near 1.0 core
is saturated (it is single-threaded), and then it, not fanfare, bounds the pushes/s.

Setup: a temporary FANFARE_HOME, a free broker port, a Redis key prefix of its own
(`fanfare-bench-delivery-<random>:`, deleted at the end), the local provider servers in their own
processes (`$FANFARE_HOME/providers/apns` and `.../fcm`; their settings go into the settings
file, where `fanfare run delivery` finds them). Each phase gets a
fresh broker (empty topics), a fresh notification store and recovery directory, and reset
provider records, so phases do not see each other's data. FANFARE_APNS_RATE_PER_MIN and
FANFARE_FCM_RATE_PER_MIN are raised to --rate-per-min (default 600,000,000/min = 10M/s) so the
rate limiter never binds: the figures are the send path's own speed, not the configured quota.

Phases and what each figure means:

1. `apns` / `fcm` throughput: --apns-items (100,000) and, separately, --fcm-items (20,000) dispatch
   items are published before the flow starts, in 500-item batches on push.<provider>.bulk, as
   --throughput-posts celebrity posts (default 1; the fan-out routes all of a post's batches to
   one partition by crc32(post_id), and so does this script). Then the flow starts.
   - "pushes/s (provider)": accepted records / (last accepted - first accepted), both times taken
     by the provider server on receipt (`AcceptedRecord.time`).
   - "wall s": flow start (subprocess spawn) -> last accepted; "startup s": flow start -> first
     accepted (imports, connections, first poll); "wall pushes/s" = items / wall s.
   - "peak 1 s": the most accepted in any one-second bucket.
2. `latency`: with the flow running and warmed up, a background of --background-rate candidates/s
   (5,000/s) is published on the bulk lanes (split --background-fcm-share to push.fcm.bulk, the
   rest to push.apns.bulk; 500-item batches, a paced producer thread), while normal posts arrive
   at --post-rate posts/s (20), each one batch of --post-items items (3) on push.apns and one on
   push.fcm with created_at = now, for --duration s (30). Latency of a normal item = the provider's
   accepted time - the created_at it was published with (the same clock: one machine). p50/p99/max
   per provider; items not accepted within --grace s after publishing stops are "missing".
   The background's accepted rate shows whether the flow kept up with it (backlog at the end).
3. `drain`: the flow is started and warmed up (a normal post per provider accepted), then
   --drain-items (1,000,000) items of one celebrity post are published on push.apns.bulk and
   normal posts arrive as in 2 (no other background) until the backlog is drained or
   --drain-timeout s pass. Only normal items created while the drain was in progress
   (between the first and the last accepted bulk item) count. Also: the drain's pushes/s.

4. `idle`: the flow is started and warmed up, then left with no traffic for --idle-seconds (60):
   the CPU each process uses meanwhile (the flow's and the broker's cost of reading empty
   topics). Then --idle-probes (5) one-item posts per provider on the transactional lanes, 3 s
   apart: their latency is that of a message arriving on a lane that was idle. Not among the
   default phases: name it (`--phases idle`).

Targets printed against the figures: >= 10,000 APNs pushes/s for one delivery process; normal
lane p50 < 100 ms and p99 < 1 s with 5,000 candidates/s background; p99 < 2 s during a 1M drain.

The report also lists outcome counters from the flow's /metrics (accepted, retry_scheduled, held,
provider errors), provider-side duplicates and rejections, and ERROR/Traceback lines of the flow
log ($FANFARE_HOME/logs/flow-<phase>.log; --keep-home keeps the directory). With --profile-dir,
py-spy samples the bytewax process in each phase (py-spy must be installed in the venv).

Every process it starts (broker, providers, flow, py-spy) is stopped at the end, also on Ctrl-C,
SIGTERM or an exception, and the Redis keys under its prefix are deleted.
Run `python -m scripts.bench.delivery --help` for every option.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from zlib import crc32

import orjson
from confluent_kafka import KafkaError, Producer

from flows.runtime.ports import free_port
from operators.adapters.kafka.admin import create_topics
from operators.config import ConfigError, Settings, load_settings
from schemas.codecs import format_timestamp
from schemas.topics import channel_topic
from scripts.bench.fanout import (
    BenchError,
    Broker,
    Flow,
    Profiler,
    delete_redis_keys,
    git_revision,
    log,
    percentile,
    run_bench,
    scrape,
    summarize_profile,
    wait_until,
)
from scripts.commands.arguments import number_in, whole_number
from scripts.dev import devstack
from scripts.dev.local_providers.control import AcceptedRecord, ProviderControl
from scripts.dev.local_providers.runner import ProvidersProcess, spawn_local_providers
from scripts.dev.local_providers.settings_file import write_provider_settings
from scripts.harness.bench_env import bench_flow_env
from scripts.harness.procfs import cpu_seconds, redis_pids, system_busy_seconds
from scripts.harness.spawn import start_fanfare

TARGET_APNS_PER_S = 10_000
TARGET_CPU_PER_PUSH_US = 60
TARGET_P50_S = 0.100
TARGET_P99_S = 1.0
TARGET_DRAIN_P99_S = 2.0
BATCH = 500
PHASES = ("apns", "fcm", "latency", "drain", "idle")
DEFAULT_PHASES = PHASES[:4]  # idle is asked for by name
_FCM_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"


# --- arguments -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench.delivery",
        description="Benchmark one delivery process against the local provider servers "
        "(see the module docstring for what each figure means).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--phases",
        default=",".join(DEFAULT_PHASES),
        help=f"comma-separated subset of {','.join(PHASES)}",
    )
    p.add_argument("--apns-items", type=whole_number(1, 10_000_000), default=100_000)
    p.add_argument("--fcm-items", type=whole_number(1, 10_000_000), default=20_000)
    p.add_argument(
        "--throughput-posts",
        type=whole_number(1, 10_000),
        default=1,
        help="posts the throughput items belong to (each post's batches share one partition)",
    )
    p.add_argument(
        "--background-rate",
        type=number_in(0, 1_000_000),
        default=5_000,
        help="bulk-lane candidates/s published during the latency phase",
    )
    p.add_argument(
        "--background-fcm-share",
        type=number_in(0, 1),
        default=0.5,
        help="share of the background that goes to push.fcm.bulk (the rest to push.apns.bulk)",
    )
    p.add_argument(
        "--background-post-batches",
        type=whole_number(1, 1_000_000),
        default=20,
        help="background batches per synthetic celebrity post (then a new post_id/partition)",
    )
    p.add_argument("--post-rate", type=number_in(0.1, 10_000), default=20.0, help="normal posts/s")
    p.add_argument(
        "--post-items", type=whole_number(1, 500), default=3, help="items per normal batch"
    )
    p.add_argument(
        "--post-providers",
        default="apns,fcm",
        help="providers each normal post is sent to (one batch each)",
    )
    p.add_argument("--duration", type=number_in(1, 3_600), default=30.0, help="latency phase, s")
    p.add_argument(
        "--grace",
        type=number_in(1, 3_600),
        default=60.0,
        help="wait this long after publishing stops for normal items still in flight",
    )
    p.add_argument(
        "--fcm-latency-ms",
        type=float,
        default=0.0,
        help="in the latency phase, the local FCM server answers this late (a slow FCM: does "
        "it delay APNs?)",
    )
    p.add_argument("--drain-items", type=whole_number(1, 50_000_000), default=1_000_000)
    p.add_argument(
        "--drain-timeout",
        type=number_in(5, 7_200),
        default=600.0,
        help="stop the drain phase after this many seconds even if not drained",
    )
    p.add_argument(
        "--idle-seconds",
        type=number_in(5, 3_600),
        default=60.0,
        help="idle phase: how long the warm flow is measured with no traffic",
    )
    p.add_argument(
        "--idle-probes",
        type=whole_number(1, 100),
        default=5,
        help="idle phase: one-item transactional posts sent after the idle window, 3 s apart "
        "(the first read of a lane idle for a while)",
    )
    p.add_argument(
        "--stall-timeout",
        type=number_in(5, 3_600),
        default=60.0,
        help="give a throughput phase up when nothing is accepted for this long",
    )
    p.add_argument("--partitions", type=whole_number(1, 64), default=4, help="partitions per topic")
    p.add_argument(
        "--rate-per-min",
        type=whole_number(1, 10**12),
        default=600_000_000,
        help="FANFARE_APNS/FCM_RATE_PER_MIN for the flow (high: the limiter must not bind)",
    )
    p.add_argument(
        "--bulk-items-per-poll",
        type=whole_number(1, 100_000),
        default=None,
        help="FANFARE_BULK_ITEMS_PER_POLL for the flow (default: the flow's default)",
    )
    p.add_argument(
        "--flow-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the flow (repeatable), e.g. FANFARE_LOG_LEVEL=INFO",
    )
    p.add_argument("--seed", type=int, default=11, help="random seed for tokens")
    p.add_argument("--json", type=Path, default=None, help="write the full report here")
    p.add_argument(
        "--profile-dir", type=Path, default=None, help="py-spy the flow in each phase, into DIR"
    )
    p.add_argument("--profile-rate", type=whole_number(1, 1_000), default=100)
    p.add_argument("--keep-home", action="store_true", help="keep FANFARE_HOME (logs) at the end")
    return p


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks argparse cannot do on its own."""
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown or not phases:
        parser.error(f"--phases: unknown {unknown}; use a subset of {','.join(PHASES)}")
    args.phases = [p for p in PHASES if p in phases]
    providers = [x.strip() for x in args.post_providers.split(",") if x.strip()]
    if not providers or set(providers) - {"apns", "fcm"}:
        parser.error("--post-providers: use apns, fcm or apns,fcm")
    args.post_providers = providers
    for pair in args.flow_env:
        if "=" not in pair:
            parser.error(f"--flow-env {pair!r}: expected NAME=VALUE")
    if args.profile_dir is not None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            parser.error("--profile-dir needs py-spy: pip install py-spy")


# --- dispatch batches ----------------------------------------------------------------------------


class Tokens:
    """Device tokens in the shapes the local servers accept (strict mode)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def apns(self) -> str:
        """64 hex characters."""
        return f"{self._rng.getrandbits(256):064x}"

    def fcm(self) -> str:
        """A 152-character registration token, `<22>:APA91b<123>`."""
        body = base64.urlsafe_b64encode(self._rng.randbytes(108)).decode()[:145]
        return f"{body[:22]}:APA91b{body[22:]}"

    def token(self, provider: str) -> str:
        """A token for this provider."""
        return self.apns() if provider == "apns" else self.fcm()


def iso(ts: float) -> str:
    """RFC 3339 with microseconds, as the fan-out writes created_at."""
    return format_timestamp(ts)


def partition_of(post_id: str, partitions: int) -> int:
    """The partition the fan-out's channel sink picks for a post (crc32(post_id) % n)."""
    return crc32(post_id.encode()) % partitions


def dispatch_batch(
    provider: str, post_id: str, created_ts: float, users: Sequence[str], tokens: Tokens
) -> bytes:
    """One dispatch_batch/v1 message: notification_id = post_id:user_id, device = provider."""
    device = "ios" if provider == "apns" else "android"
    return orjson.dumps(
        {
            "schema": "dispatch_batch/v1",
            "post_id": post_id,
            "author_id": f"author-{post_id}",
            "provider": provider,
            "created_at": iso(created_ts),
            "items": [
                {
                    "notification_id": f"{post_id}:{u}",
                    "user_id": u,
                    "device_id": device,
                    "token": tokens.token(provider),
                }
                for u in users
            ],
        }
    )


class Publisher:
    """A confluent producer that routes by post like the fan-out and counts failures."""

    def __init__(self, config: dict[str, object], linger_ms: int) -> None:
        self.errors: list[str] = []
        self.sent = 0
        self._producer = Producer(
            cast(dict[str, Any], {**config, "linger.ms": linger_ms, "acks": "all"})
        )

    def _delivered(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self.errors.append(err.str())

    def send(self, topic: str, partition: int, key: bytes, value: bytes) -> None:
        """Queue one message (waits for room when the local queue is full)."""
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, partition=partition, on_delivery=self._delivered
                )
                break
            except BufferError:
                self._producer.poll(0.05)
        self.sent += 1
        self._producer.poll(0)

    def flush(self, timeout: float = 120) -> None:
        """Wait for every queued message; raise BenchError if any failed."""
        left = self._producer.flush(timeout)
        if left or self.errors:
            raise BenchError(f"publishing failed: {left} unsent, errors {self.errors[:3]}")


def prepublish(
    config: dict[str, object],
    provider: str,
    items: int,
    posts: int,
    prefix: str,
    partitions: int,
    tokens: Tokens,
) -> dict[str, Any]:
    """Publish `items` bulk items as `posts` celebrity posts, before the flow starts."""
    started = time.time()
    pub = Publisher(config, linger_ms=5)
    topic = channel_topic(provider, "bulk")
    per_post = [items // posts + (1 if i < items % posts else 0) for i in range(posts)]
    batches = 0
    for j, count in enumerate(per_post):
        post_id = f"{prefix}{j:05d}"
        part = partition_of(post_id, partitions)
        created = time.time()
        for start in range(0, count, BATCH):
            users = [f"u{i}" for i in range(start, min(count, start + BATCH))]
            pub.send(
                topic,
                part,
                post_id.encode(),
                dispatch_batch(provider, post_id, created, users, tokens),
            )
            batches += 1
    pub.flush()
    return {
        "topic": topic,
        "items": items,
        "posts": posts,
        "batches": batches,
        "publish_s": round(time.time() - started, 2),
    }


class PacedThread(threading.Thread):
    """Base of the publisher threads: call `tick` on a fixed period until stopped."""

    def __init__(self, name: str, period_s: float) -> None:
        super().__init__(name=name, daemon=True)
        self.period_s = period_s
        self.error: str | None = None
        self._stop_evt = threading.Event()

    def tick(self, now: float) -> None:
        """One period's work."""
        raise NotImplementedError

    def finish(self) -> None:
        """After the last tick (flush)."""

    def run(self) -> None:
        """Tick until stopped; late ticks catch up (at most 1 s behind)."""
        next_at = time.monotonic()
        try:
            while not self._stop_evt.is_set():
                delay = next_at - time.monotonic()
                if delay > 0:
                    self._stop_evt.wait(delay)
                    continue
                self.tick(time.time())
                next_at = max(next_at + self.period_s, time.monotonic() - 1.0)
            self.finish()
        except Exception as exc:  # reported, not swallowed
            self.error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        """Ask the thread to finish, and wait for it."""
        self._stop_evt.set()
        self.join(60)


class NormalPosts(PacedThread):
    """Normal-lane posts at a steady rate: one small batch per provider, created_at = now."""

    def __init__(
        self,
        config: dict[str, object],
        rate: float,
        items: int,
        providers: Sequence[str],
        partitions: int,
        tokens: Tokens,
        prefix: str,
    ) -> None:
        super().__init__("normal-posts", 1.0 / rate)
        self.items = items
        self.providers = list(providers)
        self.partitions = partitions
        self.tokens = tokens
        self.prefix = prefix
        self.created: dict[tuple[str, str], float] = {}  # (provider, nid) -> ts
        self.posts = 0
        self._pub = Publisher(config, linger_ms=0)

    def tick(self, now: float) -> None:
        """Publish one post."""
        post_id = f"{self.prefix}{self.posts:07d}"
        self.posts += 1
        users = [f"u{i}" for i in range(self.items)]
        part = partition_of(post_id, self.partitions)
        for provider in self.providers:
            for u in users:
                self.created[(provider, f"{post_id}:{u}")] = now
        for provider in self.providers:
            value = dispatch_batch(provider, post_id, now, users, self.tokens)
            self._pub.send(channel_topic(provider, "normal"), part, post_id.encode(), value)

    def finish(self) -> None:
        """Flush."""
        self._pub.flush(30)


class BulkBackground(PacedThread):
    """Bulk-lane candidates at a steady rate, as 500-item batches of synthetic celebrity posts."""

    def __init__(
        self,
        config: dict[str, object],
        rate: float,
        fcm_share: float,
        batches_per_post: int,
        partitions: int,
        tokens: Tokens,
    ) -> None:
        super().__init__("bulk-background", 0.05)
        self.rates = {"apns": rate * (1 - fcm_share), "fcm": rate * fcm_share}
        self.batches_per_post = batches_per_post
        self.partitions = partitions
        self.tokens = tokens
        self.items = {"apns": 0, "fcm": 0}
        self._owed = {"apns": 0.0, "fcm": 0.0}
        self._batches = {"apns": 0, "fcm": 0}
        self._last: float | None = None
        self._pub = Publisher(config, linger_ms=5)

    def tick(self, now: float) -> None:
        """Publish the whole batches owed by now."""
        dt = 0.0 if self._last is None else now - self._last
        self._last = now
        for provider, rate in self.rates.items():
            self._owed[provider] += rate * dt
            while self._owed[provider] >= BATCH:
                self._owed[provider] -= BATCH
                n = self._batches[provider]
                self._batches[provider] += 1
                post_id = f"b{provider[0]}{n // self.batches_per_post:06d}"
                first = (n % self.batches_per_post) * BATCH
                users = [f"u{i}" for i in range(first, first + BATCH)]
                value = dispatch_batch(provider, post_id, now, users, self.tokens)
                self._pub.send(
                    channel_topic(provider, "bulk"),
                    partition_of(post_id, self.partitions),
                    post_id.encode(),
                    value,
                )
                self.items[provider] += BATCH

    def finish(self) -> None:
        """Flush."""
        self._pub.flush(60)


# --- provider records ----------------------------------------------------------------------------


@dataclass
class Collector:
    """Reads the providers' accepted records incrementally and sorts them into lanes."""

    control: SplitControl
    normal: dict[tuple[str, str], float]  # (provider, notification_id) -> created ts
    next_index: dict[str, int] = field(default_factory=lambda: {"apns": 0, "fcm": 0})
    normal_accepted: dict[tuple[str, str], float] = field(default_factory=dict)  # first accept
    bulk_times: dict[str, array[float]] = field(
        default_factory=lambda: {"apns": array("d"), "fcm": array("d")}
    )
    repeats: int = 0

    def poll(self) -> None:
        """Fetch every record accepted since the last poll."""
        for provider in ("apns", "fcm"):
            records = self.control.accepted(provider, since=self.next_index[provider])
            self.next_index[provider] += len(records)
            for r in records:
                nid = (provider, r.notification_id or "")
                if nid in self.normal:
                    if nid in self.normal_accepted:
                        self.repeats += 1
                    else:
                        self.normal_accepted[nid] = r.time
                else:
                    self.bulk_times[provider].append(r.time)

    def missing(self, created_before: float | None = None) -> int:
        """Normal items not accepted (optionally only those created before a time)."""
        return sum(
            1
            for nid, ts in list(self.normal.items())
            if nid not in self.normal_accepted and (created_before is None or ts < created_before)
        )

    def latencies(
        self, provider: str, window: tuple[float, float] | None = None
    ) -> tuple[list[float], int]:
        """(accepted - created) of one provider's normal items, and how many are missing."""
        lat: list[float] = []
        missing = 0
        for nid, ts in list(self.normal.items()):
            if nid[0] != provider or (window is not None and not window[0] <= ts <= window[1]):
                continue
            at = self.normal_accepted.get(nid)
            if at is None:
                missing += 1
            else:
                lat.append(at - ts)
        return lat, missing


def latency_row(lat: list[float], missing: int) -> dict[str, Any]:
    """p50/p99/max of a latency sample, in seconds."""
    return {
        "items": len(lat) + missing,
        "accepted": len(lat),
        "missing": missing,
        "p50_s": _r(percentile(lat, 50)),
        "p90_s": _r(percentile(lat, 90)),
        "p99_s": _r(percentile(lat, 99)),
        "max_s": _r(max(lat) if lat else None),
    }


def rate_summary(times: Sequence[float], t0: float) -> dict[str, Any]:
    """Throughput figures from server-side accept times; t0 = flow start (epoch s)."""
    if not times:
        return {"accepted": 0}
    ts = sorted(times)
    first, last = ts[0], ts[-1]
    span = last - first
    buckets: dict[int, int] = {}
    for t in ts:
        k = int(t - first)
        buckets[k] = buckets.get(k, 0) + 1
    per_second = [buckets.get(i, 0) for i in range(int(span) + 1)]
    return {
        "accepted": len(ts),
        "first_accepted_s": round(first - t0, 3),
        "last_accepted_s": round(last - t0, 3),
        "accept_span_s": round(span, 3),
        "pushes_per_s": round(len(ts) / span) if span > 0 else None,
        "wall_s": round(last - t0, 3),
        "wall_pushes_per_s": round(len(ts) / (last - t0)) if last > t0 else None,
        "peak_1s": max(per_second),
        "per_second": per_second,
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


# --- processes -----------------------------------------------------------------------------------


class DeliveryFlow(Flow):
    """`fanfare run delivery --fresh` (1 process, 1 worker) as a subprocess."""

    def start(self, fresh: bool = True) -> None:
        """Start it in its own session (a terminal Ctrl-C reaches only the benchmark)."""
        self.started_at = time.time()
        argv = ["run", "delivery", "--workers", "1"] + (["--fresh"] if fresh else [])
        self.proc = start_fanfare(argv, self.env, self.logfile)


def log_problems(path: Path, limit: int = 12) -> dict[str, Any]:
    """ERROR / Traceback / WARNING lines of a flow log."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return {"errors": 0, "warnings": 0, "lines": []}
    bad = [ln for ln in lines if "ERROR" in ln or "Traceback" in ln or "Error:" in ln]
    warn = [ln for ln in lines if "WARNING" in ln]
    return {
        "errors": len(bad),
        "warnings": len(warn),
        "lines": (bad + warn)[:limit],
    }


def flow_counters(port: int) -> dict[str, float]:
    """Delivery counters from the flow's /metrics, by name{labels} (0-valued ones left out)."""
    try:
        snap = scrape(port)
    except OSError:
        return {}
    out: dict[str, float] = {}
    for (name, labels), value in snap.items():
        if not name.startswith(
            (
                "fanfare_delivery_outcomes_total",
                "fanfare_provider_sends_total",
                "fanfare_provider_errors_total",
                "fanfare_delivery_held_total",
                "fanfare_delivery_deduped_total",
                "fanfare_delivery_resends_total",
                "fanfare_rate_limit_wait_seconds_total",
                "fanfare_dead_letters_total",
            )
        ):
            continue
        if value:
            key = name + "{" + ",".join(f"{k}={v}" for k, v in labels) + "}"
            out[key] = value
    return out


class CpuMeter:
    """CPU seconds of the benchmark's processes between start() and stop()."""

    def __init__(self, pids: Callable[[], dict[str, list[int]]]) -> None:
        self._pids = pids
        self._start: dict[str, float] = {}
        self._t0 = 0.0
        self._busy0 = 0.0

    def _read(self) -> dict[str, float]:
        out = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self._pids().items()}
        t = os.times()
        out["benchmark (publishers, collector)"] = t.user + t.system
        return out

    def start(self) -> None:
        """Remember the counters now."""
        self._start = self._read()
        self._t0 = time.monotonic()
        self._busy0 = system_busy_seconds()

    def stop(self) -> dict[str, Any]:
        """Cores used by each process since start() (1.0 = one core fully busy)."""
        end = self._read()
        span = max(1e-6, time.monotonic() - self._t0)
        cores = {
            name: round((end[name] - self._start.get(name, 0.0)) / span, 2)
            for name in end
            if name in self._start
        }
        machine = (system_busy_seconds() - self._busy0) / span
        cores["rest of the machine"] = round(machine - sum(cores.values()), 2)
        cores["whole machine"] = round(machine, 2)
        return {"seconds": round(span, 1), "cores": cores}


class SplitControl:
    """The control APIs of the APNs and the FCM server processes, as one `ProviderControl`."""

    def __init__(self, controls: dict[str, ProviderControl]) -> None:
        self._controls = controls

    def stats(self) -> dict[str, Any]:
        """Each provider's stats, from its own process."""
        return {p: c.stats()[p] for p, c in self._controls.items()}

    def accepted(self, provider: str, since: int = 0) -> list[AcceptedRecord]:
        """A provider's accepted records."""
        return self._controls[provider].accepted(provider, since=since)

    def set_latency(self, provider: str, ms: float) -> None:
        """Hold a provider's answers back this long."""
        self._controls[provider].set_latency(provider, ms)

    def reset(self, provider: str | None = None) -> None:
        """Forget records and counters (one provider, or both)."""
        for p, c in self._controls.items():
            if provider in (None, p):
                c.reset(p)


def process_cpu(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) of some processes."""
    return sum(cpu_seconds(p) for p in pids)


@dataclass
class CpuWindow:
    """CPU of the delivery process and of a provider server between two accepted counts."""

    t: float
    accepted: int
    flow: float
    server: float

    @classmethod
    def now(cls, bench: Bench, provider: str, accepted: int) -> CpuWindow:
        """Sample now."""
        pids = bench.pids()
        return cls(
            time.monotonic(),
            accepted,
            process_cpu(pids.get("delivery flow (runner + bytewax)", [])),
            process_cpu(pids.get(f"local {SERVER_NAMES[provider]} server", [])),
        )

    def per_push(self, end: CpuWindow) -> dict[str, Any]:
        """CPU per accepted push of the flow and of the server, and the server's cores."""
        pushes = end.accepted - self.accepted
        span = max(1e-6, end.t - self.t)
        if pushes <= 0:
            return {"pushes": 0}
        return {
            "pushes": pushes,
            "seconds": round(span, 2),
            "flow_us_per_push": round((end.flow - self.flow) / pushes * 1e6, 1),
            "flow_cores": round((end.flow - self.flow) / span, 2),
            "server_us_per_push": round((end.server - self.server) / pushes * 1e6, 1),
            "server_cores": round((end.server - self.server) / span, 2),
        }


SERVER_NAMES = {"apns": "APNs", "fcm": "FCM"}


@dataclass
class Bench:
    """What every phase shares: the home, Redis prefix, providers and the running pieces."""

    args: argparse.Namespace
    home: Path
    redis_prefix: str
    base_env: dict[str, str]
    control: SplitControl | None = None
    provider_procs: dict[str, ProvidersProcess] = field(default_factory=dict)
    broker: Broker | None = None
    broker_pid: int | None = None
    flow: DeliveryFlow | None = None
    threads: list[PacedThread] = field(default_factory=list)
    profiler: Profiler | None = None
    settings: Settings | None = None
    metrics_port: int = 0
    base_env_phase: dict[str, str] = field(default_factory=dict)

    def pids(self) -> dict[str, list[int]]:
        """The processes whose CPU the report shows."""
        out: dict[str, list[int]] = {}
        if self.flow is not None:
            runner = [self.flow.proc.pid] if self.flow.proc is not None else []
            out["delivery flow (runner + bytewax)"] = runner + self.flow.pids()
        out["redis-server"] = redis_pids()
        for provider, proc in self.provider_procs.items():
            out[f"local {SERVER_NAMES[provider]} server"] = [proc.proc.pid]
        if self.broker_pid is not None:
            out["broker (tansu)"] = [self.broker_pid]
        return out

    # -- per phase -----------------------------------------------------------------------
    def open_phase(self, name: str) -> Settings:
        """A fresh broker with fanfare's topics, fresh notification store, reset providers."""
        self.close_phase()
        port = free_port()
        self.metrics_port = free_port()
        env = dict(self.base_env)
        env["FANFARE_KAFKA_BROKERS"] = f"127.0.0.1:{port}"
        env["FANFARE_METRICS_PORT"] = str(self.metrics_port)
        env["FANFARE_READY_PORT"] = "0"  # not used here; never collides with a flow of the host
        store = self.home / "phases" / name / "notifications.db"
        store.parent.mkdir(parents=True, exist_ok=True)
        env["FANFARE_NOTIFICATION_STORE_URL"] = f"sqlite:///{store}"
        self.base_env_phase = env
        settings = load_settings(env)
        self.settings = settings
        self.broker = Broker(settings)
        self.broker.start()
        self.broker_pid = self.broker.pid
        create_topics(settings)
        assert self.control is not None
        self.control.reset()
        return settings

    def start_flow(self, name: str) -> DeliveryFlow:
        """Start the delivery flow of this phase (and py-spy on it, if asked)."""
        flow = DeliveryFlow(self.base_env_phase, 1, 1, self.home / "logs" / f"flow-{name}.log")
        self.flow = flow
        flow.start()
        return flow

    def start_profile(self, name: str) -> None:
        """py-spy on the bytewax process, once it is there."""
        if self.args.profile_dir is None or self.flow is None:
            return
        flow = self.flow
        wait_until("the bytewax process", lambda: len(flow.pids()) == 1, 60, flow, 0.1)
        self.profiler = Profiler(self.args.profile_dir, False, self.args.profile_rate)
        self.profiler.start(name, flow.pids())

    def stop_profile(self) -> dict[str, Any] | None:
        """Stop py-spy; the summary of what it recorded."""
        if self.profiler is None:
            return None
        files = self.profiler.stop()
        self.profiler = None
        return summarize_profile(files[0], top=15) if files else None

    def close_phase(self) -> None:
        """Stop the phase's threads, profiler, flow and broker (safe to call twice)."""
        for t in self.threads:
            with contextlib.suppress(Exception):
                t.stop()
        self.threads = []
        if self.profiler is not None:
            with contextlib.suppress(Exception):
                self.profiler.stop()
            self.profiler = None
        if self.flow is not None:
            with contextlib.suppress(Exception):
                self.flow.stop()
            self.flow = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
            self.broker_pid = None

    def phase_extras(self, name: str) -> dict[str, Any]:
        """Counters and log problems at the end of a phase (while the flow still runs)."""
        assert self.control is not None
        stats = self.control.stats()
        return {
            "flow_counters": flow_counters(self.metrics_port),
            "provider_stats": {
                p: {
                    k: s.get(k)
                    for k in ("requests", "accepted", "distinct", "duplicates", "rejected")
                }
                for p, s in stats.items()
            },
            "flow_log": log_problems(self.home / "logs" / f"flow-{name}.log"),
            "flow_alive": self.flow is not None
            and self.flow.proc is not None
            and self.flow.proc.poll() is None,
        }


def check_threads(threads: Sequence[PacedThread]) -> None:
    """Raise if a publisher thread failed."""
    for t in threads:
        if t.error:
            raise BenchError(f"{t.name} failed: {t.error}")


# --- phases --------------------------------------------------------------------------------------


def phase_throughput(bench: Bench, provider: str, items: int) -> dict[str, Any]:
    """Pre-publish `items` bulk items, start the flow, time until every one is accepted."""
    args = bench.args
    name = provider
    settings = bench.open_phase(name)
    assert bench.control is not None
    ctl = bench.control
    log(f"[{name}] publishing {items:,} items on {channel_topic(provider, 'bulk')}")
    pub = prepublish(
        settings.kafka_config(),
        provider,
        items,
        args.throughput_posts,
        f"t{provider}-",
        settings.partitions_for(channel_topic(provider, "bulk")),
        Tokens(args.seed + (1 if provider == "apns" else 2)),
    )
    log(f"[{name}] published in {pub['publish_s']} s; starting the flow")
    cpu = CpuMeter(bench.pids)
    flow = bench.start_flow(name)
    t0 = flow.started_at
    cpu.start()
    bench.start_profile(name)
    last_count, last_change = 0, time.monotonic()
    deadline = time.monotonic() + max(600.0, items / 100)
    complete = True
    first_cpu: CpuWindow | None = None
    while True:
        flow.check_alive()
        count = int(ctl.stats()[provider].get("accepted", 0))
        now = time.monotonic()
        if first_cpu is None and count > 0:
            first_cpu = CpuWindow.now(bench, provider, count)  # startup left out
        if count != last_count:
            last_count, last_change = count, now
        if count >= items:
            break
        if now - last_change > args.stall_timeout or now > deadline:
            log(f"[{name}] giving up: {count:,}/{items:,} accepted, no progress")
            complete = False
            break
        time.sleep(0.25)
    end_cpu = CpuWindow.now(bench, provider, last_count)
    usage = cpu.stop()
    profile = bench.stop_profile()
    log(f"[{name}] {last_count:,} accepted; reading the provider records")
    records: list[AcceptedRecord] = ctl.accepted(provider)
    result = {
        "provider": provider,
        "published": pub,
        "complete": complete,
        **rate_summary([r.time for r in records], t0),
        "distinct_notifications": len({r.notification_id for r in records}),
        "cpu": usage,
        "cpu_per_push": first_cpu.per_push(end_cpu) if first_cpu is not None else {},
        **bench.phase_extras(name),
    }
    if profile is not None:
        result["profile"] = profile
    bench.close_phase()
    return result


def _wait_warm(
    bench: Bench, flow: Flow, tokens: Tokens, settings: Settings, devices: int = 1
) -> float:
    """Send one normal post per provider (to `devices` devices) and wait until all are accepted.

    With many devices the outcomes reach every delivery_events partition, whose writers read
    the partitions' ends when they first write (start-up work that holds the worker).
    """
    assert bench.control is not None
    ctl = bench.control
    pub = Publisher(settings.kafka_config(), linger_ms=0)
    now = time.time()
    users = [f"u{i}" for i in range(devices)]
    for provider in bench.args.post_providers:
        pub.send(
            channel_topic(provider, "normal"),
            0,
            b"warmup",
            dispatch_batch(provider, "warmup", now, users, tokens),
        )
    pub.flush(30)
    providers = bench.args.post_providers
    at = wait_until(
        "the warm-up post to be accepted",
        lambda: all(ctl.stats()[p].get("accepted", 0) >= devices for p in providers),
        120,
        flow,
    )
    ctl.reset()
    return at - flow.started_at


def phase_latency(bench: Bench) -> dict[str, Any]:
    """Normal posts over a steady bulk background; p50/p99 of created -> accepted."""
    args = bench.args
    settings = bench.open_phase("latency")
    assert bench.control is not None
    tokens = Tokens(args.seed + 3)
    flow = bench.start_flow("latency")
    warm_s = _wait_warm(bench, flow, tokens, settings, devices=32)
    log(f"[latency] flow ready after {warm_s:.1f} s; publishing for {args.duration:.0f} s")
    if args.fcm_latency_ms:
        bench.control.set_latency("fcm", args.fcm_latency_ms)  # a slow FCM beside APNs
    parts = settings.topic_partitions
    kafka = settings.kafka_config()
    posts = NormalPosts(
        kafka, args.post_rate, args.post_items, args.post_providers, parts, tokens, "nl"
    )
    background = BulkBackground(
        kafka,
        args.background_rate,
        args.background_fcm_share,
        args.background_post_batches,
        parts,
        Tokens(args.seed + 4),
    )
    collector = Collector(bench.control, posts.created)
    bench.threads += [background, posts]
    cpu = CpuMeter(bench.pids)
    cpu.start()
    flow_cpu0 = process_cpu(bench.pids().get("delivery flow (runner + bytewax)", []))
    accepted0 = sum(int(s.get("accepted", 0)) for s in bench.control.stats().values())
    bench.start_profile("latency")
    t0 = time.time()
    if args.background_rate > 0:
        background.start()
    posts.start()
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        flow.check_alive()
        check_threads(bench.threads)
        collector.poll()
        time.sleep(1.0)
    posts.stop()
    background.stop()
    check_threads(bench.threads)
    t_stop = time.time()
    usage = cpu.stop()
    flow_cpu = process_cpu(bench.pids().get("delivery flow (runner + bytewax)", [])) - flow_cpu0
    accepted = sum(int(s.get("accepted", 0)) for s in bench.control.stats().values()) - accepted0
    profile = bench.stop_profile()
    log("[latency] publishing stopped; waiting for normal items still in flight")
    grace_end = time.monotonic() + args.grace
    while time.monotonic() < grace_end:
        collector.poll()
        if collector.missing() == 0:
            break
        flow.check_alive()
        time.sleep(0.5)
    collector.poll()
    bg_items = dict(background.items)
    bulk = {}
    for p in ("apns", "fcm"):
        during = [t for t in collector.bulk_times[p] if t <= t_stop]
        bulk[p] = {
            "published": bg_items[p],
            "accepted_while_publishing": len(during),
            "accepted_per_s_while_publishing": round(len(during) / max(1e-6, t_stop - t0)),
            "accepted_by_end": len(collector.bulk_times[p]),
            "backlog_at_stop": bg_items[p] - len(during),
        }
    result: dict[str, Any] = {
        "warmup_s": round(warm_s, 2),
        "duration_s": round(t_stop - t0, 2),
        "fcm_latency_ms": args.fcm_latency_ms,
        "posts": posts.posts,
        "normal": {p: latency_row(*collector.latencies(p)) for p in args.post_providers},
        "normal_all": latency_row(*_merge(collector.latencies(p) for p in args.post_providers)),
        "repeated_normal_accepts": collector.repeats,
        "background": bulk,
        "cpu": usage,
        "flow_us_per_accepted_push": round(flow_cpu / accepted * 1e6, 1) if accepted else None,
        "accepted_while_publishing": accepted,
        **bench.phase_extras("latency"),
    }
    if profile is not None:
        result["profile"] = profile
    bench.close_phase()
    return result


def _merge(parts: Iterator[tuple[list[float], int]]) -> tuple[list[float], int]:
    lat: list[float] = []
    missing = 0
    for lst, m in parts:
        lat += lst
        missing += m
    return lat, missing


def phase_drain(bench: Bench) -> dict[str, Any]:
    """A bulk backlog drains while normal posts arrive; their latency meanwhile.

    The flow is started and warmed up first (a post per provider accepted), then the backlog
    is published: the figure is the drain's steady state, not the flow's start-up (its first
    writes to delivery_events read the topic's ends, which holds the worker a few seconds).
    """
    args = bench.args
    settings = bench.open_phase("drain")
    assert bench.control is not None
    ctl = bench.control
    items = args.drain_items
    topic = channel_topic("apns", "bulk")
    tokens = Tokens(args.seed + 6)
    flow = bench.start_flow("drain")
    warm_s = _wait_warm(bench, flow, tokens, settings, devices=32)
    log(f"[drain] flow ready after {warm_s:.1f} s; publishing {items:,} items on {topic}")
    pub = prepublish(
        settings.kafka_config(),
        "apns",
        items,
        1,
        "drain-",
        settings.partitions_for(topic),
        Tokens(args.seed + 5),
    )
    log(f"[drain] published in {pub['publish_s']} s; starting the normal posts")
    posts = NormalPosts(
        settings.kafka_config(),
        args.post_rate,
        args.post_items,
        args.post_providers,
        settings.topic_partitions,
        tokens,
        "nd",
    )
    collector = Collector(ctl, posts.created)
    bench.threads.append(posts)
    cpu = CpuMeter(bench.pids)
    t0 = time.time()
    cpu.start()
    first_cpu: CpuWindow | None = None
    posts.start()
    bench.start_profile("drain")
    deadline = time.monotonic() + args.drain_timeout
    drained = False
    progress: list[tuple[float, int]] = []
    while time.monotonic() < deadline:
        flow.check_alive()
        check_threads(bench.threads)
        collector.poll()
        done = len(collector.bulk_times["apns"])
        progress.append((round(time.time() - t0, 1), done))
        if first_cpu is None and done > 0:
            first_cpu = CpuWindow.now(bench, "apns", done)
        if done >= items:
            drained = True
            break
        time.sleep(1.0)
    end_cpu = CpuWindow.now(bench, "apns", len(collector.bulk_times["apns"]))
    posts.stop()
    check_threads(bench.threads)
    t_stop = time.time()
    usage = cpu.stop()
    profile = bench.stop_profile()
    log(f"[drain] {'drained' if drained else 'NOT drained'}; waiting for normal items in flight")
    grace_end = time.monotonic() + args.grace
    while time.monotonic() < grace_end:
        collector.poll()
        if collector.missing() == 0:
            break
        flow.check_alive()
        time.sleep(0.5)
    collector.poll()
    bulk_times = collector.bulk_times["apns"]
    first = min(bulk_times) if bulk_times else t0
    last = max(bulk_times) if drained and bulk_times else t_stop
    window = (first, last)
    result: dict[str, Any] = {
        "published": pub,
        "drained": drained,
        "drain": rate_summary(list(bulk_times), t0),
        "window_s": round(last - first, 2),
        "normal_during_drain": {
            p: latency_row(*collector.latencies(p, window)) for p in args.post_providers
        },
        "normal_during_drain_all": latency_row(
            *_merge(collector.latencies(p, window) for p in args.post_providers)
        ),
        "normal_whole_phase": {
            p: latency_row(*collector.latencies(p)) for p in args.post_providers
        },
        "progress": progress,
        "normal_series": sorted(
            (round(ts - t0, 3), round(collector.normal_accepted[nid] - ts, 3))
            for nid, ts in collector.normal.items()
            if nid in collector.normal_accepted
        ),
        "cpu": usage,
        # The drain's pushes (normal posts' few included in the flow's CPU, not in the count).
        "cpu_per_push": first_cpu.per_push(end_cpu) if first_cpu is not None else {},
        **bench.phase_extras("drain"),
    }
    result["drain"].pop("per_second", None)
    if profile is not None:
        result["profile"] = profile
    bench.close_phase()
    return result


def phase_idle(bench: Bench) -> dict[str, Any]:
    """A warm flow with no traffic: the CPU each process uses just reading empty topics.

    Then --idle-probes one-item posts on the transactional lanes, each after 3 s of quiet:
    the latency of a message arriving on a lane that was idle (how long an idle partition
    waits between two looks, plus the broker's fetch wait, adds to it).
    """
    args = bench.args
    settings = bench.open_phase("idle")
    assert bench.control is not None
    tokens = Tokens(args.seed + 7)
    flow = bench.start_flow("idle")
    warm_s = _wait_warm(bench, flow, tokens, settings, devices=32)
    log(f"[idle] flow ready after {warm_s:.1f} s; measuring {args.idle_seconds:.0f} s idle")
    time.sleep(2.0)  # the warm-up's outcomes written, the partitions back to idle
    cpu = CpuMeter(bench.pids)
    cpu.start()
    bench.start_profile("idle")
    time.sleep(args.idle_seconds)
    flow.check_alive()
    usage = cpu.stop()
    profile = bench.stop_profile()
    created: dict[tuple[str, str], float] = {}
    collector = Collector(bench.control, created)
    pub = Publisher(settings.kafka_config(), linger_ms=0)
    for n in range(args.idle_probes):
        time.sleep(3.0)
        for provider in args.post_providers:
            post_id = f"idle{n}"
            now = time.time()
            created[(provider, f"{post_id}:u0")] = now
            pub.send(
                channel_topic(provider, "transactional"),
                partition_of(post_id, settings.topic_partitions),
                post_id.encode(),
                dispatch_batch(provider, post_id, now, ["u0"], tokens),
            )
        pub.flush(30)
    deadline = time.monotonic() + args.grace
    while time.monotonic() < deadline and collector.missing() > 0:
        collector.poll()
        time.sleep(0.2)
    collector.poll()
    result: dict[str, Any] = {
        "idle_s": args.idle_seconds,
        "warmup_s": round(warm_s, 1),
        "cpu": usage,
        "after_idle": latency_row(*_merge(collector.latencies(p) for p in args.post_providers)),
        **bench.phase_extras("idle"),
    }
    if profile is not None:
        result["profile"] = profile
    bench.close_phase()
    return result


# --- the run -------------------------------------------------------------------------------------


def bench_env(args: argparse.Namespace, home: Path, redis_prefix: str) -> dict[str, str]:
    """The flow's environment: the caller's, with this benchmark's FANFARE_* settings."""
    env = bench_flow_env(
        home,
        redis_prefix,
        {
            "FANFARE_TOPIC_PARTITIONS": str(args.partitions),
            "FANFARE_TOPIC_PARTITIONS_OVERRIDES": "",
            "FANFARE_APNS_RATE_PER_MIN": str(args.rate_per_min),
            "FANFARE_FCM_RATE_PER_MIN": str(args.rate_per_min),
            "FANFARE_METRICS_SERVER": "fanfare",
        },
    )
    if args.bulk_items_per_poll is not None:
        env["FANFARE_BULK_ITEMS_PER_POLL"] = str(args.bulk_items_per_poll)
    for pair in args.flow_env:
        k, _, v = pair.partition("=")
        env[k] = v
    return env


def run(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Run the phases asked for, filling `report`; stops everything it started."""
    home = Path(tempfile.mkdtemp(prefix="fanfare-bench-delivery-"))
    redis_prefix = f"fanfare-bench-delivery-{uuid.uuid4().hex[:12]}:"
    env = bench_env(args, home, redis_prefix)
    settings = load_settings({**env, "FANFARE_KAFKA_BROKERS": "127.0.0.1:1"})
    flow_settings = load_settings(env)
    report["config"] = {
        "phases": args.phases,
        "apns_items": args.apns_items,
        "fcm_items": args.fcm_items,
        "throughput_posts": args.throughput_posts,
        "background_rate": args.background_rate,
        "background_fcm_share": args.background_fcm_share,
        "post_rate": args.post_rate,
        "post_items": args.post_items,
        "post_providers": args.post_providers,
        "duration_s": args.duration,
        "drain_items": args.drain_items,
        "partitions": args.partitions,
        "rate_per_min": args.rate_per_min,
        "bulk_items_per_poll": flow_settings.bulk_items_per_poll,
        "send_timeout_ms": flow_settings.send_timeout_ms,
        "snapshot_interval_s": flow_settings.snapshot_interval_s,
        "flow_env": args.flow_env,
        "home": str(home),
        "redis_prefix": redis_prefix,
    }
    report["git"] = git_revision()
    report["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
    }
    bench = Bench(args, home, redis_prefix, env)
    ok = False
    try:
        log(f"FANFARE_HOME={home}; starting the local APNs and FCM servers, a process each")
        for provider in ("apns", "fcm"):
            try:
                bench.provider_procs[provider] = spawn_local_providers(
                    home / "providers" / provider, only=provider
                )
            except RuntimeError as exc:
                raise BenchError(str(exc)) from None
        apns_info = bench.provider_procs["apns"].info
        fcm_info = bench.provider_procs["fcm"].info
        # Where fanfare finds them: its settings file, as `fanfare dev up` writes it.
        write_provider_settings(settings.settings_path, {**apns_info, "fcm": fcm_info["fcm"]})
        bench.control = SplitControl(
            {
                p: ProviderControl(proc.control_url, timeout_s=60)
                for p, proc in bench.provider_procs.items()
            }
        )
        report["providers"] = {
            p: {"pid": proc.proc.pid, "control_url": proc.control_url}
            for p, proc in bench.provider_procs.items()
        }
        phases = report.setdefault("phases", {})
        for phase in args.phases:
            if phase in ("apns", "fcm"):
                items = args.apns_items if phase == "apns" else args.fcm_items
                phases[phase] = phase_throughput(bench, phase, items)
            elif phase == "latency":
                phases[phase] = phase_latency(bench)
            elif phase == "drain":
                phases[phase] = phase_drain(bench)
            else:
                phases[phase] = phase_idle(bench)
        ok = True
    finally:
        bench.close_phase()
        for proc in bench.provider_procs.values():
            with contextlib.suppress(Exception):
                proc.stop()
        report["redis_keys_deleted"] = delete_redis_keys(settings, redis_prefix)
        if args.keep_home or not ok:
            report["home_kept"] = str(home)
        else:
            shutil.rmtree(home, ignore_errors=True)


# --- the report ----------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:,.0f} ms"


def _n(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def _ok(flag: bool) -> str:
    return "MET" if flag else "NOT MET"


def _latency_table(rows: dict[str, dict[str, Any]]) -> None:
    print(f"    {'':8} {'items':>7} {'missing':>7} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9}")
    for name, r in rows.items():
        print(
            f"    {name:8} {r['items']:>7,} {r['missing']:>7,} {_ms(r['p50_s']):>9} "
            f"{_ms(r['p90_s']):>9} {_ms(r['p99_s']):>9} {_ms(r['max_s']):>9}"
        )


def _extras(r: dict[str, Any]) -> None:
    cpu = r.get("cpu", {})
    if cpu:
        cores = ", ".join(f"{k} {v:.2f}" for k, v in cpu["cores"].items())
        print(f"    CPU cores used over {cpu['seconds']} s: {cores}")
    counters = r.get("flow_counters", {})
    if counters:
        print("    flow counters: " + "; ".join(f"{k} {v:,.0f}" for k, v in counters.items()))
    for p, s in r.get("provider_stats", {}).items():
        if s.get("requests"):
            print(
                f"    {p} server: requests {s['requests']:,}, accepted {s['accepted']:,}, "
                f"distinct {s['distinct']:,}, duplicates {s['duplicates']:,}, "
                f"rejected {s['rejected'] or {}}"
            )
    fl = r.get("flow_log", {})
    if fl.get("errors") or fl.get("warnings"):
        print(f"    flow log: {fl['errors']} error lines, {fl['warnings']} warnings, e.g.:")
        for line in fl["lines"][:6]:
            print(f"      {line[:160]}")
    if not r.get("flow_alive", True):
        print("    THE FLOW HAD EXITED at the end of the phase")
    prof = r.get("profile")
    if prof:
        print(f"    py-spy ({prof['samples']} samples), top self / inclusive:")
        for name, pct in prof["self_pct"][:8]:
            print(f"      self {pct:5.1f}%  {name[:120]}")
        for name, pct in prof["inclusive_pct"][:12]:
            print(f"      incl {pct:5.1f}%  {name[:120]}")


def _cpu_per_push(c: dict[str, Any], server: str) -> None:
    if not c.get("pushes"):
        return
    met = c["flow_us_per_push"] <= TARGET_CPU_PER_PUSH_US
    print(
        f"    delivery process CPU per accepted push: {c['flow_us_per_push']:,.0f} µs "
        f"({c['flow_cores']:.2f} cores; target <= {TARGET_CPU_PER_PUSH_US} µs: {_ok(met)}); "
        f"local {server} server: {c['server_us_per_push']:,.0f} µs per push, "
        f"{c['server_cores']:.2f} cores"
        + (" (its one core is saturated: the stub is the bound)" if c["server_cores"] > 0.9 else "")
        + f"; over {c['pushes']:,} pushes, {c['seconds']} s from the first accepted"
    )


def print_report(r: dict[str, Any]) -> None:
    """The readable report (the JSON has everything, plus per-second series)."""
    c = r["config"]
    m = r.get("machine", {})
    print("\n=== fanfare delivery benchmark: ONE `fanfare run delivery` process, 1 worker ===")
    print(
        f"machine: {m.get('cpus')} cores shared by the broker, the local providers, the flow "
        f"and this script's publishers; python {m.get('python')}"
    )
    print(
        f"rate limiter: FANFARE_APNS_RATE_PER_MIN = FANFARE_FCM_RATE_PER_MIN = "
        f"{c['rate_per_min']:,}/min ({c['rate_per_min'] / 60:,.0f}/s): set so it does not bind"
    )
    print(
        f"topics: {c['partitions']} partitions; bulk items per poll "
        f"{c.get('bulk_items_per_poll')}; 500-item bulk batches"
    )
    phases = r.get("phases", {})
    for p in ("apns", "fcm"):
        t = phases.get(p)
        if not t:
            continue
        pub = t["published"]
        print(
            f"\n[{p} throughput] {pub['items']:,} items pre-published on {pub['topic']} as "
            f"{pub['posts']} post(s), {pub['batches']} batches ({pub['publish_s']} s)"
        )
        print(
            f"    accepted {t.get('accepted', 0):,}/{pub['items']:,}"
            + ("" if t["complete"] else "  (INCOMPLETE: gave up)")
            + f"; distinct notifications {t.get('distinct_notifications', 0):,}"
        )
        if t.get("accepted"):
            line = (
                f"    pushes/s (provider, first->last accepted): {_n(t['pushes_per_s'])}   "
                f"peak 1 s: {_n(t['peak_1s'])}   startup (flow start -> first accepted): "
                f"{t['first_accepted_s']:.1f} s   wall (flow start -> last): {t['wall_s']:.1f} s "
                f"= {_n(t['wall_pushes_per_s'])}/s"
            )
            print(line)
        if p == "apns":
            ok = (t.get("pushes_per_s") or 0) >= TARGET_APNS_PER_S
            print(f"    target >= {TARGET_APNS_PER_S:,} APNs pushes/s: {_ok(ok)}")
        _cpu_per_push(t.get("cpu_per_push", {}), SERVER_NAMES[p])
        _extras(t)
    lat = phases.get("latency")
    if lat:
        print(
            f"\n[latency] {c['post_rate']:g} normal posts/s x {c['post_items']} items on "
            f"{'+'.join(c['post_providers'])} for {lat['duration_s']} s, over "
            f"{c['background_rate']:,.0f} bulk candidates/s ({c['background_fcm_share']:.0%} FCM); "
            f"flow ready {lat['warmup_s']} s after start"
            + (
                f"; FCM answering {lat['fcm_latency_ms']:,.0f} ms late"
                if lat.get("fcm_latency_ms")
                else ""
            )
        )
        _latency_table({**lat["normal"], "all": lat["normal_all"]})
        a = lat["normal_all"]
        print(
            f"    targets: p50 < {_ms(TARGET_P50_S)}: "
            f"{_ok(a['p50_s'] is not None and a['p50_s'] < TARGET_P50_S and not a['missing'])}; "
            f"p99 < {_ms(TARGET_P99_S)}: "
            f"{_ok(a['p99_s'] is not None and a['p99_s'] < TARGET_P99_S and not a['missing'])}"
        )
        per_push = lat.get("flow_us_per_accepted_push")
        if per_push is not None:
            print(
                f"    delivery process CPU per accepted push: {per_push:,.0f} µs "
                f"({lat['accepted_while_publishing']:,} accepted while publishing)"
            )
        for p, b in lat["background"].items():
            print(
                f"    background {p}: published {b['published']:,}, accepted while publishing "
                f"{b['accepted_while_publishing']:,} ({b['accepted_per_s_while_publishing']:,}/s),"
                f" backlog at stop {b['backlog_at_stop']:,}"
            )
        _extras(lat)
    dr = phases.get("drain")
    if dr:
        d = dr["drain"]
        print(
            f"\n[drain] {dr['published']['items']:,} items pre-published on push.apns.bulk "
            f"({dr['published']['publish_s']} s); "
            + ("drained" if dr["drained"] else "NOT DRAINED (timed out)")
            + f": {d.get('accepted', 0):,} accepted at {_n(d.get('pushes_per_s'))}/s "
            f"(provider clock), wall {d.get('wall_s', 0):.1f} s from its publication (flow warm)"
        )
        print(f"    normal items created during the drain ({dr['window_s']} s window):")
        _latency_table({**dr["normal_during_drain"], "all": dr["normal_during_drain_all"]})
        a = dr["normal_during_drain_all"]
        met = a["p99_s"] is not None and a["p99_s"] < TARGET_DRAIN_P99_S and not a["missing"]
        print(f"    target p99 < {_ms(TARGET_DRAIN_P99_S)} during the drain: {_ok(met)}")
        _cpu_per_push(dr.get("cpu_per_push", {}), "APNs")
        _extras(dr)
    idle = phases.get("idle")
    if idle:
        print(f"\n[idle] a warm flow, no traffic, for {idle['idle_s']:g} s")
        cores = idle["cpu"]["cores"]
        print("    CPU cores used: " + ", ".join(f"{k} {v}" for k, v in cores.items()))
        a = idle["after_idle"]
        print(
            f"    one-item transactional posts after 3 s of quiet: p50 {_ms(a['p50_s'])}, "
            f"max {_ms(a['max_s'])}, missing {a['missing']}"
        )
        _extras(idle)
    print(f"\nredis keys deleted: {r.get('redis_keys_deleted')}")
    if r.get("home_kept"):
        print(f"FANFARE_HOME kept: {r['home_kept']}")
    if r.get("error"):
        print(f"ERROR: {r['error']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run, print the report; exit 0 ok, 1 failed, 2 usage, 130 Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)

    return run_bench(
        "scripts.bench.delivery",
        argv,
        args,
        run,
        print_report,
        (BenchError, ConfigError, devstack.BrokerStartError),
    )


if __name__ == "__main__":
    sys.exit(main())
