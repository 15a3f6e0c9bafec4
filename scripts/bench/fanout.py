"""End-to-end benchmark of the fan-out flow on this machine.

    python -m scripts.bench.fanout --users 1000000 --processes 1 [--json out.json]

What it does, in order (everything it starts, it stops, also on error or Ctrl-C):

1. Starts its own embedded Kafka-protocol broker (Tansu, memory storage) on a free port, with a
   temporary FANFARE_HOME, and creates the topics (FANFARE_SHARDS and FANFARE_TOPIC_PARTITIONS
   come from --shards and --partitions).
2. Baseline: runs the flow once with no users at all and records each process's memory, and the
   size of its recovery snapshot (what the flow costs with empty state).
3. Seeds N users: one preference record each (`preference_changes`: a fraction with push turned
   off, a fraction with quiet hours in a few time zones; of those, a known fraction is inside
   quiet hours for the whole benchmark and the rest outside) and one device each
   (`device_changes`: half APNs with 64-hex tokens, half FCM with 152-character tokens). The
   follower store (SQLite in FANFARE_HOME) is bulk-loaded with one celebrity followed by every
   user and a set of normal authors with a few hundred followers each.
4. Starts the flow (`fanfare run fanout --processes P --workers W --fresh`) and times how long it
   takes to apply every changelog event (summed `fanfare_changes_applied_total` over every
   process's /metrics); then leaves it idle for a snapshot interval (CPU it burns meanwhile) and
   records memory and the size of the recovery snapshot.
5. Publishes a steady stream of normal-author posts, then celebrity posts one after the other
   (--celebrity-posts, default 2: the first is "cold", it pays for the flow building its bulk-lane
   writers; the second is "warm"), and reads every channel topic meanwhile: seconds from
   publishing each celebrity post to its last dispatch batch (Kafka message timestamps, set by the
   flow's producer), its item count (checked against what was seeded: exactly the eligible
   followers, each once, on its provider's bulk topic), candidates/s, the whole flow's
   candidates/s, CPU used by each process, and the latency of normal posts (publish -> their last
   dispatch batch) at stream start, before and during each drain.
6. Prints a report (and writes it, with timelines and per-post series, as JSON with --json),
   stops the flow and the broker, and deletes the Redis keys it made.

State per user is estimated two ways: (RSS of the flow processes right after the load - RSS of
the same flow with 0 users) / N, and (recovery files after a snapshot) / N. With --profile-dir,
py-spy profiles of every flow process (load, idle, steady stream, each drain) are summarised by
category and function.

Run `python -m scripts.bench.fanout --help` for every option.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from zlib import crc32
from zoneinfo import ZoneInfo

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from flows.runtime.flow_process import is_flow_process
from flows.runtime.metrics_scrape import Sample, fetch_text, parse
from flows.runtime.ports import free_port, free_port_run
from operators.adapters.kafka.admin import create_topics
from operators.adapters.kafka.probes import topic_partitions
from operators.adapters.kafka.topic_identity import topic_id_of
from operators.adapters.kafka.writer import produce_all
from operators.adapters.stores.sqlite_followers import SQLiteFollowerStore
from operators.config import ConfigError, Settings, load_settings
from operators.fanout.quiet_hours import hour_is_quiet
from operators.fanout.shard import FollowerShard
from operators.fanout.sharding import shard_of
from schemas.codecs import format_timestamp, parse_timestamp
from schemas.records import DeviceChange, PreferenceChange
from schemas.topics import (
    CHANGELOG_TOPICS,
    DEVICE_CHANGES,
    POST_CREATED,
    PREFERENCE_CHANGES,
    channel_topic,
)
from scripts.bench.seed_state import SeededState, seed_checkpoints
from scripts.commands.arguments import number_in, whole_number
from scripts.dev import devstack
from scripts.harness.bench_env import bench_flow_env
from scripts.harness.procfs import (
    children_of,
    cmdline,
    cpu_seconds,
    mem_status,
    stat_fields,
    system_busy_seconds,
)
from scripts.harness.spawn import start_fanfare

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CELEBRITY = "celebrity"
CELEBRITY_POST = "celebrity-post-1"
QUIET_TIMEZONES = (
    "America/New_York",
    "America/Los_Angeles",
    "Europe/Berlin",
    "Asia/Tokyo",
    "Australia/Sydney",
)
TARGET_CANDIDATES_PER_S = 350_000
TARGET_CELEBRITY_S = 3.0
TARGET_BYTES_PER_USER = 300

# User status codes (a bytearray per user keeps the expected results small for 1M+ users).
ELIGIBLE, DISABLED, QUIET_INSIDE, QUIET_OUTSIDE = 0, 1, 2, 3


class BenchError(RuntimeError):
    """The benchmark could not run or a check failed; the message says which."""


def log(msg: str) -> None:
    """Progress on stderr (the report goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- arguments -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench.fanout",
        description="End-to-end benchmark of the fan-out flow: state load time, a celebrity "
        "post's drain time and throughput, normal-post latency meanwhile, and memory per user. "
        "Starts and stops its own broker; needs Redis at FANFARE_REDIS_URL "
        "(default redis://127.0.0.1:6379/0), where it only touches keys under a unique prefix.",
        epilog="Other FANFARE_* variables in the environment (e.g. FANFARE_EXPAND_BUDGET) are "
        "passed to the flow, except the ones this benchmark sets itself.",
    )
    p.add_argument(
        "--users",
        type=whole_number(1, 20_000_000),
        default=1_000_000,
        help="users seeded, all following the celebrity (default 1,000,000)",
    )
    p.add_argument(
        "--processes", type=whole_number(1, 16), default=1, help="flow processes (default 1)"
    )
    p.add_argument(
        "--workers",
        type=whole_number(1, 16),
        default=1,
        help="worker threads per flow process (default 1)",
    )
    p.add_argument(
        "--shards", type=whole_number(1, 65_536), default=32, help="FANFARE_SHARDS (default 32)"
    )
    p.add_argument(
        "--partitions",
        type=whole_number(1, 256),
        default=4,
        help="FANFARE_TOPIC_PARTITIONS (default 4)",
    )
    p.add_argument(
        "--authors",
        type=whole_number(1, 1_000_000),
        default=2_000,
        help="normal authors in the follower store (default 2,000)",
    )
    p.add_argument(
        "--followers-per-author",
        type=whole_number(1, 10_000),
        default=200,
        help="followers of each normal author (default 200; must stay at or below "
        "the celebrity threshold so their posts use the normal lanes)",
    )
    p.add_argument(
        "--post-rate",
        type=number_in(0, 10_000),
        default=50.0,
        help="normal posts per second during the measurement (default 50, about "
        "10k candidates/s with 200 followers each; 0 turns the stream off)",
    )
    p.add_argument(
        "--warmup",
        type=number_in(0, 600),
        default=10.0,
        help="seconds of the normal-post stream before the celebrity post (default 10)",
    )
    p.add_argument(
        "--disabled-fraction",
        type=number_in(0, 1),
        default=0.10,
        help="fraction of users with push_enabled false (default 0.10)",
    )
    p.add_argument(
        "--quiet-fraction",
        type=number_in(0, 1),
        default=0.20,
        help="fraction of users with quiet hours (default 0.20)",
    )
    p.add_argument(
        "--quiet-now-fraction",
        type=number_in(0, 1),
        default=0.25,
        help="of the users with quiet hours, the fraction whose window covers the "
        "whole benchmark (their pushes are deferred, not dispatched); the others' "
        "window starts at least 5 hours from now (default 0.25)",
    )
    p.add_argument(
        "--celebrity-posts",
        type=whole_number(1, 10),
        default=2,
        help="celebrity posts, one after the other (default 2: the first pays for starting the "
        "bulk-lane writers, the second shows the warm figure)",
    )
    p.add_argument(
        "--pause",
        type=number_in(0, 600),
        default=5.0,
        help="seconds between one celebrity post's drain and the next post (default 5)",
    )
    p.add_argument("--seed", type=int, default=7, help="random seed of the synthetic data")
    p.add_argument(
        "--post-cap",
        type=whole_number(0, 65_535),
        default=65_535,
        help="FANFARE_POST_CAP of the flow (default 65535: every push is counted, none is over "
        "the cap, so the item checks stay exact; 0: no cap)",
    )
    p.add_argument(
        "--timeout",
        type=whole_number(10, 7_200),
        default=600,
        help="seconds to wait for the state load, and again for the celebrity drain (default 600)",
    )
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the 0-user baseline run (memory per user then has no RSS estimate)",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the report as JSON here")
    p.add_argument(
        "--profile-dir",
        type=Path,
        metavar="DIR",
        help="record py-spy profiles (raw collapsed stacks) of every flow process "
        "during the state load and during the celebrity drain into DIR; needs py-spy",
    )
    p.add_argument(
        "--profile-rate",
        type=whole_number(1, 1000),
        default=100,
        help="with --profile-dir: samples per second (default 100)",
    )
    p.add_argument(
        "--profile-native",
        action="store_true",
        help="with --profile-dir: include native (Rust/C) frames",
    )
    p.add_argument(
        "--stop-after-load",
        action="store_true",
        help="stop once the state is loaded and measured (memory experiments)",
    )
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=None,
        help="how long the flow is left idle after the load, its CPU measured (default: a "
        "snapshot interval and 2 s; 60 gives a steady idle figure)",
    )
    p.add_argument(
        "--broker-port",
        type=whole_number(1, 65_535),
        default=None,
        help="port of the benchmark's own broker (default: a free one)",
    )
    p.add_argument(
        "--no-restart",
        action="store_true",
        help="skip the restart phase (stop the flow, start it again from its checkpoints and "
        "time it until every shard's changelogs are caught up)",
    )
    p.add_argument(
        "--seed-state",
        choices=("changelogs", "checkpoints"),
        default="changelogs",
        help="how the users' preferences and devices reach the flow: 'changelogs' (default) "
        "publishes 2 messages per user and times the flow's first load from them; "
        "'checkpoints' decodes the same messages with the flow's changelog router, applies "
        "them to the flow's shard classes and writes every shard's checkpoint file directly "
        "(positions at the changelogs' empty ends), so the flow's first start is a start from "
        "checkpoints and the first load from the changelogs is NOT measured. For 10M users: "
        "20M messages through the embedded broker take ~11 min to load and Tansu stopped "
        "answering at that size",
    )
    p.add_argument(
        "--keep-home",
        action="store_true",
        help="keep the temporary FANFARE_HOME (logs, store, recovery) afterwards",
    )
    return p


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser, threshold: int) -> None:
    """Cross-argument checks, with messages that say what to change."""
    if args.users <= threshold:
        parser.error(
            f"--users {args.users} must be above the celebrity threshold ({threshold}, "
            "FANFARE_CELEBRITY_THRESHOLD) so the celebrity post takes the bulk lanes"
        )
    if args.followers_per_author > args.users:
        parser.error(f"--followers-per-author {args.followers_per_author} exceeds --users")
    if args.followers_per_author > threshold:
        parser.error(
            f"--followers-per-author {args.followers_per_author} is above the celebrity "
            f"threshold ({threshold}): normal authors would use the bulk lanes"
        )
    if args.disabled_fraction + args.quiet_fraction > 1:
        parser.error("--disabled-fraction plus --quiet-fraction must not exceed 1")
    if args.profile_dir is not None and shutil.which("py-spy") is None:
        venv_spy = Path(sys.executable).parent / "py-spy"
        if not venv_spy.exists():
            parser.error("--profile-dir needs py-spy: pip install py-spy")


# --- metrics --------------------------------------------------------------------------------------


def scrape(port: int, timeout: float = 5.0) -> dict[Sample, float]:
    """One /metrics endpoint as {(name, labels): value}, every family (process_* too)."""
    return parse(fetch_text(f"http://127.0.0.1:{port}/metrics", timeout), prefixes=("",))


class Metrics:
    """Sums fanfare's counters over every process's endpoint."""

    def __init__(self, ports: Sequence[int]) -> None:
        self.ports = list(ports)

    def all_up(self) -> bool:
        """Whether every process's /metrics answers."""
        for port in self.ports:
            try:
                scrape(port, timeout=1.0)
            except (OSError, urllib.error.URLError):
                return False
        return True

    def snapshot(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every endpoint's samples, summed by (name, labels)."""
        total: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for port in self.ports:
            for key, value in scrape(port).items():
                total[key] = total.get(key, 0.0) + value
        return total

    @staticmethod
    def get(
        snap: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
    ) -> float:
        """Sum of a metric over the series matching the labels given."""
        want = set(labels.items())
        return sum(v for (n, lab), v in snap.items() if n == name and want <= set(lab))


# --- the embedded broker --------------------------------------------------------------------------


class Broker:
    """The embedded Tansu broker, started and stopped through scripts.dev.devstack."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid: int | None = None

    def start(self) -> None:
        """Start the broker and wait until it answers."""
        try:
            self.pid = devstack.start_broker(self.settings)
        except devstack.BrokerStartError as exc:
            raise BenchError(str(exc)) from None

    def stop(self) -> None:
        """Stop the broker started here."""
        with contextlib.suppress(Exception):
            devstack.stop_broker(self.settings)


# --- the flow -------------------------------------------------------------------------------------


class Flow:
    """`fanfare run fanout` as a subprocess, and its bytewax.run children."""

    def __init__(self, env: dict[str, str], processes: int, workers: int, logfile: Path) -> None:
        self.env = env
        self.processes = processes
        self.workers = workers
        self.logfile = logfile
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._pids: list[int] = []

    def start(self, fresh: bool = True) -> None:
        """Start `fanfare run fanout [--fresh]` in its own session, output to the log file."""
        argv = ["run", "fanout", "--processes", str(self.processes)]
        argv += ["--workers", str(self.workers)] + (["--fresh"] if fresh else [])
        self.started_at = time.time()
        self.proc = start_fanfare(argv, self.env, self.logfile)

    def check_alive(self) -> None:
        """Raise BenchError with the log's end if the flow exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(
                f"the flow exited with code {self.proc.returncode}; the end of {self.logfile}:\n"
                + tail(self.logfile)
            )

    def pids(self) -> list[int]:
        """The bytewax.run processes (children of the runner), in process-id order."""
        if self.proc is None:
            return []
        if len(self._pids) < self.processes:
            kids = [k for k in children_of(self.proc.pid) if is_flow_process(cmdline(k))]
            if len(kids) == self.processes:
                self._pids = sorted(kids, key=_process_index)
            else:
                return kids
        return list(self._pids)

    def stop(self) -> None:
        """SIGTERM the runner (it stops its processes); SIGKILL what is left."""
        if self.proc is None:
            return
        kids = self.pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in kids:  # the runner waits for them, but make sure
            if stat_fields(pid) is not None and is_flow_process(cmdline(pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc = None
        self._pids = []


def _process_index(pid: int) -> int:
    argv = cmdline(pid)
    if "-i" in argv:
        return int(argv[argv.index("-i") + 1])
    return 0


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, indented, for error messages."""
    try:
        return "\n".join("    " + s for s in path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "    (no log)"


def wait_until(
    what: str,
    cond: Callable[[], bool],
    timeout: float,
    flow: Flow | None = None,
    interval: float = 0.25,
) -> float:
    """Poll cond until true; returns the time (epoch s) it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if flow is not None:
            flow.check_alive()
        if cond():
            return time.time()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --- recovery snapshot size -----------------------------------------------------------------------


def recovery_size(recovery: Path) -> dict[str, Any]:
    """Files on disk, and the bytes of each state key's latest snapshot, by step."""
    files = 0
    by_step: dict[str, int] = {}
    keys: dict[str, int] = {}
    for part in sorted(recovery.glob("part-*.sqlite3")):
        for extra in ("", "-wal", "-shm"):
            f = Path(str(part) + extra)
            if f.exists():
                files += f.stat().st_size
        for attempt in range(10):
            try:
                conn = sqlite3.connect(f"file:{part}?mode=ro", uri=True, timeout=30)
                try:
                    rows = conn.execute(
                        "SELECT step_id, state_key, length(ser_change) FROM snaps s "
                        "WHERE snap_epoch = (SELECT MAX(snap_epoch) FROM snaps t "
                        "WHERE t.step_id = s.step_id AND t.state_key = s.state_key)"
                    ).fetchall()
                finally:
                    conn.close()
                break
            except sqlite3.OperationalError:
                if attempt == 9:
                    raise
                time.sleep(0.5)
        for step, _key, length in rows:
            step_name = step.rsplit(".", 1)[-1]
            by_step[step_name] = by_step.get(step_name, 0) + (length or 0)
            keys[step_name] = keys.get(step_name, 0) + 1
    return {
        "file_bytes": files,
        "latest_snapshot_bytes_by_step": by_step,
        "state_keys_by_step": keys,
    }


def snapshot_epochs(recovery: Path, step: str) -> dict[str, int]:
    """The latest snapshot epoch of each state key of a step (to see which keys were re-saved)."""
    out: dict[str, int] = {}
    for part in sorted(recovery.glob("part-*.sqlite3")):
        try:
            conn = sqlite3.connect(f"file:{part}?mode=ro", uri=True, timeout=30)
            try:
                rows = conn.execute(
                    "SELECT state_key, MAX(snap_epoch) FROM snaps WHERE step_id LIKE ? "
                    "GROUP BY state_key",
                    (f"%{step}",),
                ).fetchall()
            finally:
                conn.close()
        except sqlite3.OperationalError:
            continue
        for key, epoch in rows:
            out[key] = max(out.get(key, -1), epoch)
    return out


# --- synthetic data -------------------------------------------------------------------------------


@dataclass
class Seed:
    """What was seeded, and what the flow must therefore produce."""

    users: int
    width: int
    status: bytearray  # per user: ELIGIBLE, DISABLED, QUIET_INSIDE, QUIET_OUTSIDE
    apns: bytearray  # per user: 1 if the device is APNs
    author_followers: list[list[int]]
    quiet_windows: dict[str, dict[str, tuple[int, int]]]
    seeded_at: datetime
    counts: dict[str, int] = field(default_factory=dict)

    def uid(self, i: int) -> str:
        """The user id of user number i."""
        return f"u{i:0{self.width}d}"

    def eligible(self, i: int) -> bool:
        """Whether user i gets a push now (push on, not inside quiet hours)."""
        return self.status[i] in (ELIGIBLE, QUIET_OUTSIDE)

    def expected_for_author(self, j: int) -> int:
        """Items a post by normal author j must produce (one device per user)."""
        return sum(1 for f in self.author_followers[j] if self.eligible(f))


def make_seed(args: argparse.Namespace) -> Seed:
    """Decide every user's preferences, device provider and follows (deterministic)."""
    rng = random.Random(args.seed)
    n = args.users
    status = bytearray(n)
    n_disabled = round(n * args.disabled_fraction)
    n_quiet = round(n * args.quiet_fraction)
    n_inside = round(n_quiet * args.quiet_now_fraction)
    order = list(range(n))
    rng.shuffle(order)
    for i in order[:n_disabled]:
        status[i] = DISABLED
    for i in order[n_disabled : n_disabled + n_inside]:
        status[i] = QUIET_INSIDE
    for i in order[n_disabled + n_inside : n_disabled + n_quiet]:
        status[i] = QUIET_OUTSIDE
    del order
    apns = bytearray(i % 2 == 0 for i in range(n))
    now = datetime.now(UTC)
    windows: dict[str, dict[str, tuple[int, int]]] = {}
    for tz in QUIET_TIMEZONES:
        h = now.astimezone(ZoneInfo(tz)).hour
        # Inside: now is 3 hours into a 7-hour window, so it stays inside for >= 3 hours.
        # Outside: the window opens 6 hours from now's hour, so >= 5 hours stay outside.
        inside = ((h - 3) % 24, (h + 4) % 24)
        outside = ((h + 6) % 24, (h + 12) % 24)
        assert hour_is_quiet(h, *inside) and not hour_is_quiet(h, *outside)
        windows[tz] = {"inside": inside, "outside": outside}
    followers = [rng.sample(range(n), args.followers_per_author) for _ in range(args.authors)]
    seed = Seed(n, max(7, len(str(n - 1))), status, apns, followers, windows, now)
    eligible = sum(1 for s in status if s in (ELIGIBLE, QUIET_OUTSIDE))
    eligible_apns = sum(1 for i in range(n) if apns[i] and status[i] in (ELIGIBLE, QUIET_OUTSIDE))
    seed.counts = {
        "users": n,
        "push_disabled": n_disabled,
        "quiet_hours": n_quiet,
        "quiet_inside_now": n_inside,
        "quiet_outside_now": n_quiet - n_inside,
        "devices_apns": sum(apns),
        "devices_fcm": n - sum(apns),
        "celebrity_expected_items": eligible,
        "celebrity_expected_apns": eligible_apns,
        "celebrity_expected_fcm": eligible - eligible_apns,
    }
    return seed


def preference_messages(seed: Seed, rng: random.Random) -> Iterator[tuple[bytes, bytes]]:
    """One preference_changes message per user, keyed by user id."""
    for key, value, _change in seeded_preferences(seed, rng):
        yield key, value


def device_messages(seed: Seed, rng: random.Random) -> Iterator[tuple[bytes, bytes]]:
    """One active device_changes message per user, keyed by user id."""
    for key, value, _change in seeded_devices(seed, rng):
        yield key, value


def seeded_preferences(
    seed: Seed, rng: random.Random
) -> Iterator[tuple[bytes, bytes, PreferenceChange]]:
    """Each user's preference message and the change it decodes to."""
    ts = format_timestamp(seed.seeded_at)
    at = parse_timestamp(ts)
    tzs = QUIET_TIMEZONES
    for i in range(seed.users):
        uid = seed.uid(i)
        s = seed.status[i]
        rec: dict[str, Any] = {
            "user_id": uid,
            "push_enabled": s != DISABLED,
            "quiet_hours_start": None,
            "quiet_hours_end": None,
            "timezone": "UTC",
            "ts": ts,
        }
        if s in (QUIET_INSIDE, QUIET_OUTSIDE):
            tz = tzs[rng.randrange(len(tzs))]
            start, end = seed.quiet_windows[tz]["inside" if s == QUIET_INSIDE else "outside"]
            rec.update(quiet_hours_start=start, quiet_hours_end=end, timezone=tz)
        change = PreferenceChange(
            uid,
            rec["push_enabled"],
            rec["quiet_hours_start"],
            rec["quiet_hours_end"],
            rec["timezone"],
            at,
        )
        yield uid.encode(), orjson.dumps(rec), change


def seeded_devices(seed: Seed, rng: random.Random) -> Iterator[tuple[bytes, bytes, DeviceChange]]:
    """Each user's device message and the change it decodes to."""
    ts = format_timestamp(seed.seeded_at)
    at = parse_timestamp(ts)
    for i in range(seed.users):
        uid = seed.uid(i)
        if seed.apns[i]:
            provider, token = "apns", rng.randbytes(32).hex()
        else:
            raw = base64.urlsafe_b64encode(rng.randbytes(114)).decode()  # 152 characters
            provider, token = "fcm", raw[:22] + ":" + raw[23:]
        rec = {
            "user_id": uid,
            "device_id": rng.randbytes(8).hex(),
            "provider": provider,
            "token": token,
            "active": True,
            "ts": ts,
        }
        change = DeviceChange(uid, rec["device_id"], provider, token, True, at)  # type: ignore[arg-type]
        yield uid.encode(), orjson.dumps(rec), change


def follower_edges(seed: Seed, shard_count: int) -> Iterator[tuple[str, str, int]]:
    """Celebrity -> every user, then each normal author's followers, in primary-key order."""
    shards = [shard_of(seed.uid(i), shard_count) for i in range(seed.users)]
    by_shard: list[list[int]] = [[] for _ in range(shard_count)]
    for i, s in enumerate(shards):
        by_shard[s].append(i)
    for bucket in by_shard:
        for i in bucket:
            yield CELEBRITY, seed.uid(i), 1
    for j, fols in enumerate(seed.author_followers):
        for i in sorted(fols, key=lambda i: (shards[i], i)):
            yield author_id(j), seed.uid(i), 1


def seed_shard_checkpoints(settings: Settings, seed: Seed, rng: random.Random) -> SeededState:
    """Write the shards' checkpoints of the seeded users (`--seed-state checkpoints`).

    The shards are built as the flow builds them (`flows.fanout.new_follower_shard`, without the
    read-ahead pool, which a checkpoint does not hold); the positions are the changelogs'
    ends now, so the flow reads only what is published after this.
    """
    kafka = settings.kafka_config()
    parts = topic_partitions(kafka, CHANGELOG_TOPICS)

    from flows.fanout import new_follower_shard  # Bytewax's operators: only when seeding

    def new_shard() -> FollowerShard:
        return new_follower_shard(settings, parts)

    user_topics = (PREFERENCE_CHANGES, DEVICE_CHANGES)
    return seed_checkpoints(
        settings.shard_state_dir,
        new_shard,
        settings.shard_count,
        topic_id_of(kafka),
        # Given with their changes: the flow's decoding checks one message in 1,000.
        {
            PREFERENCE_CHANGES: seeded_preferences(seed, rng),
            DEVICE_CHANGES: seeded_devices(seed, rng),
        },
        changelog_ends(kafka, [p for p in parts if p.rpartition("/")[0] in user_topics]),
    )


def changelog_ends(kafka: dict[str, object], sources: Sequence[str]) -> dict[str, int]:
    """Each "topic/partition" source's end offset now (its high watermark)."""
    consumer = Consumer({**kafka, "group.id": f"fanfare-bench-ends-{uuid.uuid4().hex[:8]}"})
    try:
        ends = {}
        for source in sources:
            topic, _, partition = source.rpartition("/")
            _low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, int(partition)), timeout=10
            )
            ends[source] = int(high)
        return ends
    finally:
        consumer.close()


def _trims(metrics: Metrics) -> float:
    try:
        return Metrics.get(metrics.snapshot(), "fanfare_memory_trims_total")
    except (OSError, urllib.error.URLError):
        return 0.0


def caught_up_shards(metrics: Metrics) -> float:
    """How many shards report their changelogs caught up (0 while /metrics does not answer)."""
    try:
        snap = metrics.snapshot()
    except (OSError, urllib.error.URLError):
        return 0.0
    return Metrics.get(snap, "fanfare_changelogs_caught_up_shards")


def author_id(j: int) -> str:
    """The id of normal author number j."""
    return f"a{j:05d}"


# --- measuring the output -------------------------------------------------------------------------


@dataclass
class PostOut:
    """What the channel topics carried for one post."""

    items: int = 0
    batches: int = 0
    first_ts: float = float("inf")  # message timestamps (s)
    last_ts: float = 0.0
    last_seen: float = 0.0  # when the benchmark read its last batch back from the broker
    by_topic: dict[str, int] = field(default_factory=dict)
    distinct: int = 0  # distinct (notification, device) items (normal posts, parsed exactly)
    duplicates: int = 0


class ChannelReader(threading.Thread):
    """Reads channel topics from the beginning; tallies items per post.

    `shares`, when given, is another reader whose tallies this one adds to: one reader per
    lane, as the delivery flow reads them, so a normal batch is not read back behind a
    celebrity post's backlog in one consumer's queue (that measured this benchmark's own
    reading, not the flow's output).
    """

    def __init__(
        self,
        config: dict[str, object],
        topics: Sequence[str],
        partitions: dict[str, int],
        keep_values_of: set[str],
        shares: ChannelReader | None = None,
    ) -> None:
        super().__init__(name=f"channel-reader-{'+'.join(topics)}", daemon=True)
        if shares is None:
            self.posts: dict[str, PostOut] = {}
            self.kept: dict[str, list[tuple[str, bytes]]] = {}
            self._identities: dict[str, set[tuple[str, str]]] = {}
            self.errors: list[str] = []
            self.lock = threading.Lock()
        else:
            self.posts, self.kept = shares.posts, shares.kept
            self._identities, self.errors, self.lock = (
                shares._identities,
                shares.errors,
                shares.lock,
            )
        self._keep = keep_values_of
        self._stop_evt = threading.Event()
        conf = {
            **config,
            "group.id": f"fanfare-bench-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
            "enable.partition.eof": False,
        }
        self._consumer = Consumer(cast(dict[str, Any], conf))
        self._consumer.assign(
            [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in range(partitions[t])]
        )

    def run(self) -> None:
        """Consume until stopped, tallying items per post (key = post_id)."""
        count_marker = b'"notification_id"'
        try:
            while not self._stop_evt.is_set():
                msgs = self._consumer.consume(1000, 0.05)
                now = time.time()
                with self.lock:
                    for m in msgs:
                        err = m.error()
                        if err is not None:
                            if err.code() != KafkaError._PARTITION_EOF:
                                self.errors.append(err.str())
                            continue
                        key = (m.key() or b"").decode()
                        value = m.value() or b""
                        kind, ts_ms = m.timestamp()
                        ts = ts_ms / 1000 if kind != 0 and ts_ms > 0 else now
                        out = self.posts.get(key)
                        if out is None:
                            out = self.posts[key] = PostOut()
                        n = value.count(count_marker)
                        topic = cast(str, m.topic())
                        out.items += n
                        out.batches += 1
                        out.first_ts = min(out.first_ts, ts)
                        out.last_ts = max(out.last_ts, ts)
                        out.last_seen = now
                        out.by_topic[topic] = out.by_topic.get(topic, 0) + n
                        if key in self._keep:
                            self.kept.setdefault(key, []).append((topic, value))
                        else:  # a normal post: its items parsed, each counted once
                            ids = self._identities.setdefault(key, set())
                            for item in orjson.loads(value)["items"]:
                                ident = (item["notification_id"], item["device_id"])
                                if ident in ids:
                                    out.duplicates += 1
                                ids.add(ident)
                            out.distinct = len(ids)
        finally:
            self._consumer.close()

    def get(self, post_id: str) -> PostOut:
        """A copy of what was seen for a post so far."""
        with self.lock:
            out = self.posts.get(post_id)
            return (
                PostOut()
                if out is None
                else PostOut(
                    out.items,
                    out.batches,
                    out.first_ts,
                    out.last_ts,
                    out.last_seen,
                    dict(out.by_topic),
                    out.distinct,
                    out.duplicates,
                )
            )

    def take_kept(self, post_id: str) -> list[tuple[str, bytes]]:
        """The raw batches kept for a post, handed over (and forgotten here)."""
        with self.lock:
            return self.kept.pop(post_id, [])

    def stop(self) -> None:
        """Ask the thread to finish."""
        self._stop_evt.set()


class PostStream(threading.Thread):
    """Publishes normal-author posts at a steady rate; remembers when each was published."""

    def __init__(self, config: dict[str, object], rate: float, authors: int, seed: int) -> None:
        super().__init__(name="post-stream", daemon=True)
        self.rate = rate
        self.authors = authors
        self.published: list[tuple[str, int, float]] = []  # (post_id, author index, time)
        self.errors: list[str] = []
        self._stop_evt = threading.Event()
        self._rng = random.Random(seed + 1)
        self._producer = Producer(cast(dict[str, Any], {**config, "linger.ms": 1, "acks": "all"}))

    def _delivered(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self.errors.append(err.str())

    def run(self) -> None:
        """Publish at the set rate until stopped."""
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        n = 0
        while not self._stop_evt.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop_evt.wait(delay)
                continue
            j = self._rng.randrange(self.authors)
            post_id = f"n{n:07d}"
            n += 1
            published = time.time()
            body = orjson.dumps(
                {
                    "event_type": "post_created",
                    "post_id": post_id,
                    "author_id": author_id(j),
                    "visibility": "public",
                    "created_at": format_timestamp(time.time()),
                }
            )
            self._producer.produce(
                POST_CREATED, value=body, key=author_id(j).encode(), on_delivery=self._delivered
            )
            self._producer.poll(0)
            self.published.append((post_id, j, published))
            next_at += interval
        self._producer.flush(30)

    def stop(self) -> None:
        """Ask the thread to finish (it flushes what it produced)."""
        self._stop_evt.set()


class Sampler(threading.Thread):
    """Every 0.5 s: summed counters and each flow process's RSS (a timeline for the report)."""

    def __init__(self, metrics: Metrics, flow: Flow) -> None:
        super().__init__(name="sampler", daemon=True)
        self.metrics = metrics
        self.flow = flow
        self.samples: list[dict[str, Any]] = []
        self._stop_evt = threading.Event()

    def run(self) -> None:
        """Sample until stopped."""
        while not self._stop_evt.wait(0.5):
            try:
                snap = self.metrics.snapshot()
            except (OSError, urllib.error.URLError):
                continue
            self.samples.append(
                {
                    "t": time.time(),
                    "candidates": Metrics.get(snap, "fanfare_candidates_total"),
                    "dispatched_bulk": Metrics.get(snap, "fanfare_dispatched_total", lane="bulk"),
                    "dispatched_normal": Metrics.get(
                        snap, "fanfare_dispatched_total", lane="normal"
                    ),
                    "rss": [mem_status(p).get("VmRSS", 0) for p in self.flow.pids()],
                }
            )

    def stop(self) -> None:
        """Ask the thread to finish."""
        self._stop_evt.set()


class Profiler:
    """py-spy record on each flow process until stopped."""

    def __init__(self, out_dir: Path, native: bool, rate: int = 100) -> None:
        self.out_dir = out_dir
        self.rate = rate
        self.native = native
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.exe = exe

    def start(self, label: str, pids: Sequence[int]) -> None:
        """Start one py-spy per process, writing DIR/LABEL-processI.txt."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for idx, pid in enumerate(pids):
            out = self.out_dir / f"{label}-process{idx}.txt"
            cmd = [
                self.exe,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(self.rate),
                "--format",
                "raw",
            ]
            cmd += ["--output", str(out)]
            # Native stacks need the process paused while sampled; Python-only ones do not.
            cmd.append("--native" if self.native else "--nonblocking")
            logf = (self.out_dir / f"{label}-process{idx}.log").open("wb")
            self.procs.append((subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), out))

    def stop(self) -> list[Path]:
        """Stop every py-spy (SIGINT makes it write its output); returns the files."""
        done = []
        for proc, out in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            if out.exists():
                done.append(out)
            else:
                log(f"py-spy wrote no {out.name}: {tail(out.with_suffix('.log'), 3).strip()}")
        self.procs = []
        return done


# Where a sample's time goes, by the first rule its stack matches (order matters).
PROFILE_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("cross-process exchange: (un)pickling items", ("TdPyAny$u20$as$u20$serde", "PickleVisitor")),
    ("recovery snapshot: pickle.dumps of the state", ("_pickle",)),
    ("Python cyclic GC", ("gc_collect_main",)),
    (
        "channel sink: encode + produce",
        ("_ChannelPartitionWriter", "encode_dispatch_batch", "route_key", "_count_written"),
    ),
    (
        "changelog/post decode + JSON Schema validation",
        ("schemas/codecs.py", "validate_https", "fastjsonschema"),
    ),
    ("follower store page reads", ("follower_page", "follower_count")),
    ("recovery snapshot: SQLite write", ("pwrite64", "pread64", "fdatasync", "sqlite3")),
    (
        "shard expansion: _decide_page, _emit, batches",
        ("_decide_page", "_emit", "dispatch_batches"),
    ),
    (
        "shard gate and bookkeeping",
        ("gate_open_for", "has_runnable_jobs", "notify_at", "note_caught_up", "add_job"),
    ),
    ("changelog apply", ("apply_preference", "apply_device")),
    ("Kafka source next_batch", ("next_batch",)),
    ("prometheus_client", ("prometheus_client",)),
    (
        "routing: ChangelogRouter, ShardJobPlanner",
        ("ChangelogRouter", "ShardJobPlanner", "shard_key"),
    ),
    ("other fanfare code", ("operators/", "flows/")),
]


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive sample share per function, and per category, from py-spy raw output."""
    self_s: dict[str, int] = {}
    incl: dict[str, int] = {}
    cats: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        self_s[frames[-1]] = self_s.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
        cat = "other: Rust runtime, librdkafka, libc, interpreter"
        leaf = frames[-1]
        if leaf.startswith("clock_nanosleep") or (
            leaf.startswith("syscall") and "step_or_park" in stack
        ):
            cat = "idle: parked or sleeping (native profiles sample it)"
        for name, needles in PROFILE_CATEGORIES if not cat.startswith("idle") else []:
            if any(n in stack for n in needles):
                cat = name
                break
        cats[cat] = cats.get(cat, 0) + count

    def top_of(d: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [(k, round(100 * v / total, 1)) for k, v in ranked] if total else []

    return {
        "samples": total,
        "categories_pct": top_of(cats),
        "self_pct": top_of(self_s),
        "inclusive_pct": top_of(incl),
    }


# --- the benchmark --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank percentile q (0-100) of values, or None if empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


def flow_memory(flow: Flow) -> list[dict[str, int]]:
    """Memory figures of each flow process."""
    return [mem_status(p) for p in flow.pids()]


def bench_env(
    args: argparse.Namespace, home: Path, broker_port: int, metrics_port: int, redis_prefix: str
) -> dict[str, str]:
    """The flow's environment: the caller's, with this benchmark's FANFARE_* settings."""
    return bench_flow_env(
        home,
        redis_prefix,
        {
            "FANFARE_KAFKA_BROKERS": f"127.0.0.1:{broker_port}",
            "FANFARE_SHARDS": str(args.shards),
            "FANFARE_TOPIC_PARTITIONS": str(args.partitions),
            "FANFARE_POST_CAP": str(args.post_cap),
            "FANFARE_METRICS_PORT": str(metrics_port),
            "FANFARE_METRICS_SERVER": "fanfare",
            "FANFARE_READY_PORT": "0",  # not used here; never collides with a flow of the host
        },
    )


def run(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Run the whole benchmark, filling `report`; stops everything it started."""
    home = Path(tempfile.mkdtemp(prefix="fanfare-bench-"))
    broker_port = args.broker_port or free_port()
    metrics_port = free_port_run(args.processes)
    redis_prefix = f"fanfare-bench-{uuid.uuid4().hex[:12]}:"
    env = bench_env(args, home, broker_port, metrics_port, redis_prefix)
    settings = load_settings(env)
    report["config"] = {
        "users": args.users,
        "processes": args.processes,
        "workers": args.workers,
        "shards": settings.shard_count,
        "topic_partitions": settings.topic_partitions,
        "authors": args.authors,
        "followers_per_author": args.followers_per_author,
        "post_rate": args.post_rate,
        "warmup_s": args.warmup,
        "celebrity_threshold": settings.celebrity_threshold,
        "expand_budget": settings.expand_budget,
        "follower_page_size": settings.follower_page_size,
        "dispatch_batch_size": settings.dispatch_batch_size,
        "snapshot_interval_s": settings.snapshot_interval_s,
        "home": str(home),
        "broker": settings.kafka_brokers,
        "metrics_ports": [metrics_port + i for i in range(args.processes)],
        "redis_prefix": redis_prefix,
        "seed": args.seed,
    }
    report["git"] = git_revision()
    report["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
    }
    broker = Broker(settings)
    flow: Flow | None = None
    profiler = (
        Profiler(args.profile_dir, args.profile_native, args.profile_rate)
        if args.profile_dir
        else None
    )
    threads: list[Any] = []
    kafka = settings.kafka_config()
    metrics = Metrics([metrics_port + i for i in range(args.processes)])
    try:
        log(f"FANFARE_HOME={home}; starting the broker at {settings.kafka_brokers}")
        broker.start()
        report["broker_pid"] = broker.pid
        create_topics(settings)

        # -- baseline: the same flow with no users ------------------------------------------------
        if not args.no_baseline:
            log("baseline: running the flow with 0 users")
            base_flow = Flow(env, args.processes, args.workers, home / "logs" / "baseline.log")
            flow = base_flow
            flow.start()
            wait_until("the baseline flow's /metrics", metrics.all_up, 120, flow)
            wait_until(
                "the baseline flow's processes",
                lambda: len(base_flow.pids()) == args.processes,
                30,
                flow,
            )
            time.sleep(settings.snapshot_interval_s + 2)
            base_mem = flow_memory(flow)
            base_rec = recovery_size(settings.recovery_dir("fanout"))
            report["baseline"] = {
                "memory": base_mem,
                "memory_breakdown": [rss_breakdown(p) for p in flow.pids()],
                "recovery": base_rec,
            }
            flow.stop()
            flow = None

        # -- seed ---------------------------------------------------------------------------------
        t0 = time.time()
        log(f"seeding {args.users:,} users")
        seed = make_seed(args)
        rng = random.Random(args.seed + 2)
        t1 = time.time()
        seeded: SeededState | None = None
        if args.seed_state == "checkpoints":
            seeded = seed_shard_checkpoints(settings, seed, rng)
            n_prefs = n_devs = 0  # none published: the flow starts from the checkpoints
            t2 = t1 + seeded.apply_s
        else:
            n_prefs = produce_all(kafka, PREFERENCE_CHANGES, preference_messages(seed, rng))
            t2 = time.time()
            n_devs = produce_all(kafka, DEVICE_CHANGES, device_messages(seed, rng))
        t3 = time.time()
        store = SQLiteFollowerStore(
            settings.resolved_store_url.removeprefix("sqlite:///"), settings.shard_count
        )
        n_edges = store.bulk_load(follower_edges(seed, settings.shard_count))
        store.close()
        t4 = time.time()
        report["seed"] = {
            **seed.counts,
            "quiet_windows": {
                tz: {k: list(v) for k, v in w.items()} for tz, w in seed.quiet_windows.items()
            },
            "seeded_at": seed.seeded_at.isoformat(),
            "edges": n_edges,
            "preference_events": n_prefs,
            "device_events": n_devs,
            "plan_s": round(t1 - t0, 2),
            "publish_preferences_s": round(t2 - t1, 2),
            "publish_devices_s": round(t3 - t2, 2),
            "store_bulk_load_s": round(t4 - t3, 2),
            "seed_state": args.seed_state,
            "checkpoints": (
                None
                if seeded is None
                else {
                    "events_applied": seeded.events,
                    "users": seeded.users,
                    "apply_s": round(seeded.apply_s, 2),
                    "write_s": round(seeded.write_s, 2),
                    "bytes": seeded.checkpoint_bytes,
                }
            ),
            "store_bytes": Path(settings.resolved_store_url.removeprefix("sqlite:///"))
            .stat()
            .st_size,
        }
        log(
            f"seeded in {t4 - t0:.1f}s: {n_prefs:,} preferences, {n_devs:,} devices, "
            f"{n_edges:,} follow edges"
        )

        # -- state load ---------------------------------------------------------------------------
        log("starting the flow; waiting until every changelog event is applied")
        main_flow = Flow(env, args.processes, args.workers, home / "logs" / "flow.log")
        flow = main_flow
        flow.start()
        if profiler is not None:
            wait_until(
                "the flow's processes",
                lambda: len(main_flow.pids()) == args.processes,
                60,
                flow,
                0.05,
            )
            profiler.start("load", flow.pids())

        def applied() -> tuple[float, float]:
            try:
                snap = metrics.snapshot()
            except (OSError, urllib.error.URLError):
                return (0.0, 0.0)
            return (
                Metrics.get(snap, "fanfare_changes_applied_total", topic=PREFERENCE_CHANGES),
                Metrics.get(snap, "fanfare_changes_applied_total", topic=DEVICE_CHANGES),
            )

        metrics_up_at = wait_until("the flow's /metrics", metrics.all_up, 120, flow, 0.1)
        if seeded is None:
            loaded_at = wait_until(
                "the flow to apply every preference and device change",
                lambda: applied() == (float(n_prefs), float(n_devs)),
                args.timeout,
                flow,
                0.2,
            )
        else:
            loaded_at = wait_until(
                "the flow to load its seeded checkpoints and catch up",
                lambda: caught_up_shards(metrics) >= settings.shard_count,
                args.timeout,
                flow,
                0.05,
            )
        load_profiles = profiler.stop() if profiler is not None else []
        wait_until(
            "the flow's processes", lambda: len(main_flow.pids()) == args.processes, 30, flow
        )
        mem_after_load = flow_memory(flow)
        snap = metrics.snapshot()
        report["load"] = {
            "flow_start_to_metrics_s": round(metrics_up_at - flow.started_at, 2),
            "flow_start_to_all_applied_s": round(loaded_at - flow.started_at, 2),
            "events": n_prefs + n_devs,
            "events_per_s": round((n_prefs + n_devs) / (loaded_at - flow.started_at)),
            "memory_after_load": mem_after_load,
            "memory_breakdown_after_load": [rss_breakdown(p) for p in flow.pids()],
            "dead_letters": Metrics.get(snap, "fanfare_dead_letters_total"),
            "profiles": [str(p) for p in load_profiles],
        }
        log(f"state loaded {loaded_at - flow.started_at:.1f}s after the flow started")
        # Idle (no posts) for a snapshot interval and a bit: what does the flow do meanwhile?
        time.sleep(1.0)
        idle_epochs0 = snapshot_epochs(settings.recovery_dir("fanout"), "expand_follower_shards")
        idle_cpu0 = [cpu_seconds(p) for p in flow.pids()]
        idle_broker0 = cpu_seconds(broker.pid) if broker.pid else 0.0
        idle_t0 = time.time()
        if profiler is not None:
            profiler.start("idle", flow.pids())
        idle_for = (
            args.idle_seconds if args.idle_seconds is not None else settings.snapshot_interval_s + 2
        )
        time.sleep(idle_for)
        flow.check_alive()
        idle_cpu1 = [cpu_seconds(p) for p in flow.pids()]
        idle_broker1 = cpu_seconds(broker.pid) if broker.pid else 0.0
        idle_profiles = profiler.stop() if profiler is not None else []
        idle_s = time.time() - idle_t0
        idle_epochs1 = snapshot_epochs(settings.recovery_dir("fanout"), "expand_follower_shards")
        report["load"]["idle"] = {
            "seconds": round(idle_s, 2),
            "flow_cpu_seconds": [
                round(b - a, 2) for a, b in zip(idle_cpu0, idle_cpu1, strict=True)
            ],
            "flow_cpu_per_s": [
                round((b - a) / idle_s, 3) for a, b in zip(idle_cpu0, idle_cpu1, strict=True)
            ],
            "broker_cpu_per_s": round((idle_broker1 - idle_broker0) / idle_s, 3),
            "load_average": os.getloadavg()[0],
            "shard_keys_resnapshotted": sum(
                1 for k, e in idle_epochs1.items() if e > idle_epochs0.get(k, -1)
            ),
            "shard_keys": len(idle_epochs1),
        }
        report["load"]["memory_after_snapshot"] = flow_memory(flow)
        report["load"]["recovery"] = recovery_size(settings.recovery_dir("fanout"))

        if args.stop_after_load:
            report["memory"] = memory_summary(report, flow_memory(flow), args.users)
            report["profile_summaries"] = {
                str(p): summarize_profile(p) for p in [*load_profiles, *idle_profiles]
            }
            return
        # -- measurement --------------------------------------------------------------------------
        from confluent_kafka.admin import AdminClient

        topics_meta = AdminClient(cast(dict[str, Any], dict(kafka))).list_topics(timeout=10).topics
        channels = [channel_topic(p, lane) for lane in ("normal", "bulk") for p in ("apns", "fcm")]
        bulk_parts = len(topics_meta[channel_topic("apns", "bulk")].partitions)
        post_ids = celebrity_post_ids(args.celebrity_posts, bulk_parts)
        parts = {t: len(topics_meta[t].partitions) for t in channels}
        reader = ChannelReader(kafka, channels[:2], parts, set(post_ids))
        bulk_reader = ChannelReader(kafka, channels[2:], parts, set(post_ids), shares=reader)
        for lane_reader in (reader, bulk_reader):
            lane_reader.start()
            threads.append(lane_reader)
        sampler = Sampler(metrics, flow)
        sampler.start()
        threads.append(sampler)
        stream = None
        steady_rates = {"flow": 0.0, "broker": 0.0}
        steady_profiles: list[Path] = []
        stream_started = time.time()
        if args.post_rate > 0:
            stream = PostStream(kafka, args.post_rate, args.authors, args.seed)
            stream.start()
            threads.append(stream)
            log(f"normal-post stream at {args.post_rate:g}/s; warming up {args.warmup:g}s")
            if profiler is not None:
                profiler.start("steady", flow.pids())
            # The flow's and broker's CPU per second with normal posts only (the second half of
            # the warm-up): subtracted from a drain's CPU to see what the celebrity post cost.
            time.sleep(args.warmup / 2)
            steady0, steady_t0 = _cpu(flow.pids(), broker.pid), time.time()
            time.sleep(args.warmup / 2)
            steady1, steady_t1 = _cpu(flow.pids(), broker.pid), time.time()
            span = steady_t1 - steady_t0
            steady_rates = {
                "flow": (sum(steady1["flow"]) - sum(steady0["flow"])) / span,
                "broker": (steady1["broker"] - steady0["broker"]) / span,
            }
            report["steady_cpu_per_s"] = {k: round(v, 3) for k, v in steady_rates.items()}
        if profiler is not None:
            steady_profiles = profiler.stop()
        flow.check_alive()
        results: list[dict[str, Any]] = []
        drain_profiles: list[Path] = []
        for k, post_id in enumerate(post_ids):
            label = (
                "cold: first bulk-lane post since the flow started"
                if k == 0
                else ("warm: same bulk partitions, already in use")
            )
            res = measure_celebrity(
                post_id,
                label,
                args,
                seed,
                flow,
                broker,
                metrics,
                reader,
                sampler,
                profiler,
                stream,
                kafka,
                steady_rates,
            )
            drain_profiles.extend(Path(p) for p in res["throughput"]["profiles"])
            results.append(res)
            if k + 1 < len(post_ids):
                time.sleep(args.pause)
        report["celebrity_posts"] = results
        if stream is not None:
            stream.stop()
            stream.join(30)
        # Let the normal posts published so far finish (their expected counts are known).
        published = list(stream.published) if stream is not None else []
        pending_deadline = time.monotonic() + 20
        while time.monotonic() < pending_deadline:
            if all(
                reader.get(pid).distinct >= seed.expected_for_author(j) for pid, j, _ in published
            ):
                break
            time.sleep(0.2)
        sampler.stop()
        reader.stop()
        reader.join(30)
        flow.check_alive()
        mem_end = flow_memory(flow)
        report["memory_breakdown_end"] = [rss_breakdown(p) for p in flow.pids()]

        # -- results ------------------------------------------------------------------------------
        first_celebrity = results[0]["published_at"] if results else time.time()
        warm_until = stream_started + min(5.0, args.warmup / 2)
        report["normal_posts"] = {
            "stream_start": latency_summary(
                seed, [p for p in published if p[2] < warm_until], reader, stream_started
            ),
            "steady_before_celebrity": latency_summary(
                seed,
                [p for p in published if warm_until <= p[2] < first_celebrity],
                reader,
                stream_started,
            ),
        }
        for res in results:
            during = [p for p in published if res["published_at"] <= p[2] <= res["drained_at"]]
            res["normal_posts_during_drain"] = latency_summary(
                seed, during, reader, res["published_at"]
            )
        report["timeline"] = [
            {
                "t": round(s["t"] - first_celebrity, 2),
                "candidates": s["candidates"],
                "dispatched_bulk": s["dispatched_bulk"],
                "dispatched_normal": s["dispatched_normal"],
                "rss": s["rss"],
            }
            for s in sampler.samples
        ]
        report["memory"] = memory_summary(report, mem_end, args.users)
        report["profile_summaries"] = {
            str(p): summarize_profile(p)
            for p in [*load_profiles, *idle_profiles, *steady_profiles, *drain_profiles]
        }
        if not args.no_restart:
            flow = measure_restart(args, settings, env, home, flow, metrics, seed, report)
        final = metrics.snapshot()
        report["errors"] = {
            "reader": reader.errors[:5],
            "stream": stream.errors[:5] if stream else [],
            "dead_letters": Metrics.get(final, "fanfare_dead_letters_total"),
        }
    finally:
        for t in threads:
            t.stop()
        if profiler is not None:
            profiler.stop()
        if flow is not None:
            log("stopping the flow")
            flow.stop()
        log("stopping the broker")
        broker.stop()
        report["redis_keys_deleted"] = delete_redis_keys(settings, redis_prefix)
        if args.keep_home:
            log(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def measure_restart(
    args: argparse.Namespace,
    settings: Settings,
    env: dict[str, str],
    home: Path,
    flow: Flow,
    metrics: Metrics,
    seed: Seed,
    report: dict[str, Any],
) -> Flow:
    """Stop the flow and start it again (not fresh): time it until the changelogs are caught up.

    Before stopping, a tail of changelog events (the preference record of 1% of the users,
    published again unchanged) is written after the shards' checkpoints, so the restart loads
    the checkpoints and reads that tail.
    """
    folder = settings.shard_state_dir
    wait_until(
        "every shard's checkpoint",
        lambda: len(list(folder.glob("shard-*.ckpt"))) >= settings.shard_count,
        120,
        flow,
    )
    tail_n = max(1, args.users // 100)
    rng = random.Random(args.seed + 3)
    tail_msgs = list(itertools.islice(preference_messages(seed, rng), tail_n))
    produce_all(settings.kafka_config(), PREFERENCE_CHANGES, tail_msgs)
    time.sleep(1.0)
    log("restart: stopping the flow")
    flow.stop()
    ckpt_bytes = sum(p.stat().st_size for p in folder.glob("shard-*.ckpt"))
    restarted = Flow(env, args.processes, args.workers, home / "logs" / "restart.log")
    log("restart: starting it again from its recovery directory and checkpoints")
    restarted.start(fresh=False)
    try:
        return _time_restart(args, settings, metrics, restarted, tail_n, ckpt_bytes, report)
    except BaseException:
        restarted.stop()  # the caller's cleanup only knows the flow it passed in
        raise


def _time_restart(
    args: argparse.Namespace,
    settings: Settings,
    metrics: Metrics,
    restarted: Flow,
    tail_n: int,
    ckpt_bytes: int,
    report: dict[str, Any],
) -> Flow:

    def caught_up() -> bool:
        return caught_up_shards(metrics) >= settings.shard_count

    up_at = wait_until("the restarted flow's /metrics", metrics.all_up, 120, restarted, 0.05)
    ready_at = wait_until("the flow to catch up again", caught_up, args.timeout, restarted, 0.05)
    # CPU from each process's start to the catch-up: the figure a busy machine does not skew.
    flow_cpu = [cpu_seconds(p) for p in restarted.pids()]
    runner_cpu = cpu_seconds(restarted.proc.pid) if restarted.proc is not None else 0.0
    snap = metrics.snapshot()
    wait_until(
        "the restarted flow's processes",
        lambda: len(restarted.pids()) == args.processes,
        30,
        restarted,
    )
    report["restart"] = {
        "tail_events_published": tail_n,
        "checkpoint_bytes": ckpt_bytes,
        "checkpoint_bytes_per_user": round(ckpt_bytes / args.users),
        "start_to_metrics_s": round(up_at - restarted.started_at, 2),
        "start_to_caught_up_s": round(ready_at - restarted.started_at, 2),
        "checkpoints_loaded": Metrics.get(snap, "fanfare_shard_checkpoints_loaded_total"),
        "changes_applied_after_restart": Metrics.get(snap, "fanfare_changes_applied_total"),
        "flow_cpu_s_to_caught_up": [round(c, 2) for c in flow_cpu],
        "runner_cpu_s_to_caught_up": round(runner_cpu, 2),
        "load_average_at_caught_up": os.getloadavg()[0],
        "memory_after_restart": flow_memory(restarted),
    }
    base = report.get("baseline")
    if base is not None:
        # The shards compact their tables once all caught up, then the memory is handed back.
        wait_until(
            "the restarted flow to hand its freed memory back",
            lambda: _trims(metrics) >= args.processes,
            120,
            restarted,
            0.1,
        )
        time.sleep(2.0)  # the checkpoints the restart wrote after its catch-up are written
        rss = sum(m.get("VmRSS", 0) for m in flow_memory(restarted))
        base_rss = sum(m.get("VmRSS", 0) for m in base["memory"])
        report["restart"]["state_bytes_per_user_rss"] = round((rss - base_rss) / args.users)
    log(f"restart: caught up {ready_at - restarted.started_at:.1f}s after the start")
    return restarted


def celebrity_post_ids(count: int, partitions: int) -> list[str]:
    """Post ids for the celebrity posts, all routed to the same bulk-lane partition.

    The channel sink routes a batch by crc32(post_id) % partitions, and builds a partition's
    writer on its first batch; the first post pays for that (cold), the later ones do not (warm).
    """
    ids = [CELEBRITY_POST]
    want = crc32(CELEBRITY_POST.encode()) % partitions
    n = 2
    while len(ids) < count:
        candidate = f"celebrity-post-{n}"
        n += 1
        if crc32(candidate.encode()) % partitions == want:
            ids.append(candidate)
    return ids


def _cpu(pids: Sequence[int], broker_pid: int | None) -> dict[str, Any]:
    return {
        "flow": [cpu_seconds(p) for p in pids],
        "broker": cpu_seconds(broker_pid) if broker_pid else 0.0,
        "bench": cpu_seconds(os.getpid()),
        "machine": system_busy_seconds(),
    }


def measure_celebrity(
    post_id: str,
    label: str,
    args: argparse.Namespace,
    seed: Seed,
    flow: Flow,
    broker: Broker,
    metrics: Metrics,
    reader: ChannelReader,
    sampler: Sampler,
    profiler: Profiler | None,
    stream: PostStream | None,
    kafka: dict[str, object],
    steady_rates: dict[str, float],
) -> dict[str, Any]:
    """Publish one celebrity post and measure its drain; the reader must be running."""
    pids = flow.pids()
    if profiler is not None:
        profiler.start(f"drain-{post_id}", pids)
        time.sleep(0.5)
    cpu0 = _cpu(pids, broker.pid)
    snap0 = metrics.snapshot()
    s0 = time.time()
    expected = seed.counts["celebrity_expected_items"]
    log(f"publishing {post_id} ({args.users:,} followers, {expected:,} eligible; {label})")
    t_pub = time.time()
    body = {
        "event_type": "post_created",
        "post_id": post_id,
        "author_id": CELEBRITY,
        "visibility": "public",
        "created_at": format_timestamp(time.time()),
    }
    produce_all(kafka, POST_CREATED, [(CELEBRITY.encode(), orjson.dumps(body))])
    t_acked = time.time()
    timed_out = False
    try:
        done_at = wait_until(
            f"the dispatch batches of {post_id}",
            lambda: reader.get(post_id).items >= expected,
            args.timeout,
            flow,
            0.05,
        )
    except BenchError as exc:
        timed_out = True
        done_at = time.time()
        log(str(exc))
    snap1 = metrics.snapshot()
    s1 = time.time()
    cpu1 = _cpu(pids, broker.pid)
    profiles = profiler.stop() if profiler is not None else []
    log(f"{post_id} drained" if not timed_out else f"{post_id} NOT drained")
    time.sleep(2.0)  # anything extra (duplicates) would arrive now
    out = reader.get(post_id)
    checks = verify_celebrity(seed, reader.take_kept(post_id), expected)
    window = s1 - s0
    cand = Metrics.get(snap1, "fanfare_candidates_total") - Metrics.get(
        snap0, "fanfare_candidates_total"
    )
    # The headline is when the benchmark read the last batch back from the broker: the
    # producer's timestamp alone would leave out the broker's share of the work.
    drain_s = out.last_seen - t_pub if out.items else None
    flow_cpu = sum(b - a for a, b in zip(cpu0["flow"], cpu1["flow"], strict=True))
    broker_cpu = cpu1["broker"] - cpu0["broker"]
    return {
        "post_id": post_id,
        "label": label,
        "followers": args.users,
        "expected_items": expected,
        "items": out.items,
        "items_by_topic": out.by_topic,
        "batches": out.batches,
        "items_match_expected": out.items == expected,
        "verification": checks,
        "timed_out": timed_out,
        "published_at": t_pub,
        "drained_at": out.last_ts if out.items else done_at,
        "publish_ack_s": round(t_acked - t_pub, 3),
        "first_batch_s": round(out.first_ts - t_pub, 3) if out.items else None,
        "last_batch_s": round(drain_s, 3) if drain_s is not None else None,
        "last_batch_produced_s": round(out.last_ts - t_pub, 3) if out.items else None,
        "first_to_last_batch_s": round(out.last_ts - out.first_ts, 3) if out.items else None,
        "candidates_per_s": round(args.users / drain_s) if drain_s else None,
        "candidates_per_s_first_to_last_batch": (
            round(args.users / (out.last_ts - out.first_ts))
            if out.items and out.last_ts > out.first_ts
            else None
        ),
        "throughput": {
            "window_s": round(window, 3),
            "candidates": cand,
            "candidates_per_s": round(cand / window) if window > 0 else None,
            "peak_1s_candidates_per_s": peak_rate(sampler.samples, "candidates", t_pub),
            "cpu_seconds_per_1m_candidates": {
                "flow": round(flow_cpu / cand * 1e6, 3) if cand else None,
                "broker": round(broker_cpu / cand * 1e6, 3) if cand else None,
            },
            # The drain's CPU less what the normal-post stream and idling cost per second
            # before it (steady_cpu_per_s), per follower of the celebrity post.
            "celebrity_cpu_seconds_per_1m_followers": {
                "flow": round((flow_cpu - steady_rates["flow"] * window) / args.users * 1e6, 3),
                "broker": round(
                    (broker_cpu - steady_rates["broker"] * window) / args.users * 1e6, 3
                ),
            },
            "cpu_seconds_in_window": {
                "flow_processes": [
                    round(b - a, 2) for a, b in zip(cpu0["flow"], cpu1["flow"], strict=True)
                ],
                "broker": round(cpu1["broker"] - cpu0["broker"], 2),
                "benchmark": round(cpu1["bench"] - cpu0["bench"], 2),
                "machine_total": round(cpu1["machine"] - cpu0["machine"], 2),
            },
            "profiles": [str(p) for p in profiles],
        },
    }


def rss_breakdown(pid: int) -> dict[str, int]:
    """Resident bytes of a process by kind of mapping, from /proc/PID/smaps.

    `heap` is the brk heap (glibc's main arena), `anon` every anonymous mapping (pymalloc's
    arenas, glibc's per-thread arenas of librdkafka's and the runtime's threads, large
    allocations), `file` the mapped files (libraries, and the follower store through SQLite's mmap).
    """
    out = {"heap": 0, "anon": 0, "file": 0}
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return out
    kind = "anon"
    for line in text.splitlines():
        head = line.split()
        if not head:
            continue
        if not head[0].endswith(":"):  # a mapping's header line
            path = head[5] if len(head) > 5 else ""
            kind = "heap" if path == "[heap]" else "file" if path.startswith("/") else "anon"
        elif head[0] == "Rss:":
            out[kind] += int(head[1]) * 1024
    return out


def git_revision() -> dict[str, Any]:
    """The commit the flow code comes from, and whether flow code differs from it."""

    def git(*a: str) -> str:
        try:
            return subprocess.run(
                ["git", *a], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git(
        "status", "--porcelain", "--", "flows", "operators", "schemas", "flows/runtime/runner.py"
    )
    return {"commit": git("rev-parse", "--short", "HEAD"), "flow_code_modified": dirty.splitlines()}


def peak_rate(samples: list[dict[str, Any]], key: str, after: float) -> int | None:
    """Highest rate over any >= 1 s span between samples taken after `after`."""
    pts = [(s["t"], s[key]) for s in samples if s["t"] >= after - 0.5]
    best = None
    j = 0
    for i in range(len(pts)):
        while j < i and pts[i][0] - pts[j + 1][0] >= 1.0:
            j += 1
        span = pts[i][0] - pts[j][0]
        if span >= 1.0:
            rate = (pts[i][1] - pts[j][1]) / span
            best = rate if best is None else max(best, rate)
    return None if best is None else round(best)


def verify_celebrity(seed: Seed, kept: list[tuple[str, bytes]], expected: int) -> dict[str, Any]:
    """Every eligible follower exactly once, on its provider's bulk topic; nobody else."""
    seen: dict[str, int] = {}
    wrong_provider = wrong_topic = 0
    width = seed.width
    for topic, value in kept:
        batch = orjson.loads(value)
        provider = batch["provider"]
        if topic != channel_topic(provider, "bulk"):
            wrong_topic += len(batch["items"])
        for item in batch["items"]:
            uid = item["user_id"]
            seen[uid] = seen.get(uid, 0) + 1
            i = int(uid[1:]) if len(uid) == width + 1 else -1
            if i < 0 or i >= seed.users or (provider == "apns") != bool(seed.apns[i]):
                wrong_provider += 1
    duplicates = sum(c - 1 for c in seen.values() if c > 1)
    unexpected = sum(1 for uid in seen if not seed.eligible(int(uid[1:])))
    missing = expected - (len(seen) - unexpected)
    return {
        "distinct_users": len(seen),
        "duplicates": duplicates,
        "missing": missing,
        "not_eligible_but_notified": unexpected,
        "wrong_provider": wrong_provider,
        "wrong_topic": wrong_topic,
        "ok": duplicates == 0
        and missing == 0
        and unexpected == 0
        and wrong_provider == 0
        and wrong_topic == 0,
    }


def latency_summary(
    seed: Seed, posts: list[tuple[str, int, float]], reader: ChannelReader, origin: float
) -> dict[str, Any]:
    """Latency publish -> last dispatch batch read back, of normal posts (complete ones only).

    Items are counted exactly: each batch parsed, each (notification, device) once; a post is
    complete when its distinct items are exactly the expected count and none came twice.
    """
    lat: list[float] = []
    stamped: list[float] = []  # publish -> the flow's producer stamped the post's last batch
    messages: list[int] = []  # Kafka messages (dispatch batches) of each complete post
    series: list[tuple[str, float, float | None]] = []
    incomplete = no_items = extra = duplicates = 0
    for post_id, j, at in posts:
        want = seed.expected_for_author(j)
        got = reader.get(post_id)
        done = False
        duplicates += got.duplicates
        if want == 0:
            no_items += 1
        elif got.distinct == want and not got.duplicates:
            lat.append(got.last_seen - at)
            stamped.append(got.last_ts - at)
            messages.append(got.batches)
            done = True
        elif got.distinct > want or got.duplicates:
            extra += 1
        else:
            incomplete += 1
        series.append((post_id, round(at - origin, 3), _r(got.last_seen - at) if done else None))
    return {
        "posts": len(posts),
        "measured": len(lat),
        "incomplete": incomplete,
        "more_items_than_expected": extra,
        "duplicate_items": duplicates,
        "nobody_eligible": no_items,
        "p50_s": _r(percentile(lat, 50)),
        "p99_s": _r(percentile(lat, 99)),
        "max_s": _r(max(lat) if lat else None),
        "mean_s": _r(statistics.fmean(lat) if lat else None),
        "stamped_p50_s": _r(percentile(stamped, 50)),
        "stamped_p99_s": _r(percentile(stamped, 99)),
        "messages_per_post": _r(statistics.fmean(messages) if messages else None),
        "items_per_post": _r(
            statistics.fmean(seed.expected_for_author(j) for _, j, _ in posts) if posts else None
        ),
        "series": series,
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def memory_summary(
    report: dict[str, Any], mem_end: list[dict[str, int]], users: int
) -> dict[str, Any]:
    """Memory figures and the two state-per-user estimates."""
    load = report["load"]
    after = load["memory_after_load"]
    rss_after = sum(m.get("VmRSS", 0) for m in after)
    anon_after = sum(m.get("RssAnon", 0) for m in after)
    out: dict[str, Any] = {
        "peak_rss_per_process": [m.get("VmHWM", 0) for m in mem_end],
        "rss_end_per_process": [m.get("VmRSS", 0) for m in mem_end],
        "rss_after_load_per_process": [m.get("VmRSS", 0) for m in after],
        "rss_after_load_total": rss_after,
        "rss_after_first_snapshot_total": sum(
            m.get("VmRSS", 0) for m in load["memory_after_snapshot"]
        ),
    }
    base = report.get("baseline")
    if base is not None:
        base_rss = sum(m.get("VmRSS", 0) for m in base["memory"])
        base_anon = sum(m.get("RssAnon", 0) for m in base["memory"])
        out["baseline_rss_total"] = base_rss
        out["state_bytes_per_user_rss"] = round((rss_after - base_rss) / users)
        out["state_bytes_per_user_rss_anon"] = round((anon_after - base_anon) / users)
    rec = load["recovery"]
    step = rec["latest_snapshot_bytes_by_step"].get("expand_follower_shards", 0)
    base_files = base["recovery"]["file_bytes"] if base is not None else 0
    out["recovery_file_bytes"] = rec["file_bytes"]
    out["recovery_shard_snapshot_bytes"] = step
    out["state_bytes_per_user_recovery_files"] = round((rec["file_bytes"] - base_files) / users)
    out["state_bytes_per_user_snapshot_blobs"] = round(step / users)
    return out


def delete_redis_keys(settings: Settings, prefix: str) -> int:
    """Delete every Redis key under the prefix; returns how many (-1 on error)."""
    import redis

    try:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
        client.close()
        return len(keys)
    except Exception as exc:  # cleanup must not hide the real result
        log(f"could not delete Redis keys {prefix}*: {exc}")
        return -1


# --- the report -----------------------------------------------------------------------------------


def _mb(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 1e6:,.0f} MB"


def _ok(flag: bool) -> str:
    return "MET" if flag else "NOT MET"


def _breakdown(rows: list[dict[str, int]]) -> str:
    return "; ".join(
        ", ".join(f"{k} {_mb(row.get(k, 0))}" for k in ("heap", "anon", "file")) for row in rows
    )


def print_report(r: dict[str, Any]) -> None:
    """The human-readable report (the JSON has everything, plus timelines and series)."""
    c = r["config"]
    print("\nfanfare fan-out benchmark")
    print("=" * 78)
    m = r["machine"]
    g = r.get("git", {})
    print(f"command   {' '.join(r['command'][1:])}")
    g_end = r.get("git_at_end", g)
    if g_end.get("commit") != g.get("commit"):
        print(f"WARNING   the checkout moved to {g_end.get('commit')} during the run")
    print(
        f"code      commit {g.get('commit')}"
        + (
            f", flow code modified: {g['flow_code_modified']}"
            if g.get("flow_code_modified")
            else ""
        )
    )
    print(
        f"machine   {m['cpus']} CPUs, Python {m['python']}, load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}"
    )
    print(
        f"flow      {c['processes']} process(es) x {c['workers']} worker(s), "
        f"{c['shards']} shards, {c['topic_partitions']} partitions/topic, expand budget "
        f"{c['expand_budget']:,}, page {c['follower_page_size']:,}, snapshot every "
        f"{c['snapshot_interval_s']}s, celebrity threshold {c['celebrity_threshold']:,}"
    )
    if "seed" in r:
        s = r["seed"]
        n = s["users"]
        print(
            f"seed      {n:,} users, 1 device each ({s['devices_apns']:,} APNs 64-hex tokens, "
            f"{s['devices_fcm']:,} FCM 152-char tokens; 16-hex device ids), one preference "
            "record each"
        )
        print(
            f"          push off: {s['push_disabled']:,} ({s['push_disabled'] / n:.0%}); quiet "
            f"hours: {s['quiet_hours']:,} ({s['quiet_hours'] / n:.0%}): "
            f"{s['quiet_inside_now']:,} ({s['quiet_inside_now'] / n:.1%} of users) inside their "
            "window all run long (deferred, not dispatched),"
        )
        print(
            f"          {s['quiet_outside_now']:,} outside it (their window opens >= 5 h later); "
            f"zones {', '.join(s['quiet_windows'])}"
        )
        print(
            f"          follower store: {s['edges']:,} edges (celebrity -> all {n:,}; "
            f"{c['authors']:,} authors x {c['followers_per_author']} followers), "
            f"{_mb(s['store_bytes'])}"
        )
        ck = s.get("checkpoints")
        if ck:
            print(
                f"          seeded as checkpoints (no changelog messages): plan {s['plan_s']}s, "
                f"{ck['events_applied']:,} events applied in {ck['apply_s']}s, "
                f"{ck['users']:,} users' checkpoints written in {ck['write_s']}s "
                f"({_mb(ck['bytes'])}), store bulk_load {s['store_bulk_load_s']}s"
            )
        else:
            print(
                f"          seeding took: plan {s['plan_s']}s, publish {s['preference_events']:,} "
                f"preferences {s['publish_preferences_s']}s, {s['device_events']:,} devices "
                f"{s['publish_devices_s']}s, store bulk_load {s['store_bulk_load_s']}s"
            )
        print(
            f"          expected per celebrity post: {s['celebrity_expected_items']:,} items "
            f"({s['celebrity_expected_apns']:,} APNs + {s['celebrity_expected_fcm']:,} FCM)"
        )
    if "load" in r:
        ld = r["load"]
        if r.get("seed", {}).get("checkpoints"):
            print(
                "\nstate load NOT measured (--seed-state checkpoints): the first start loaded "
                f"the seeded checkpoints and caught up {ld['flow_start_to_all_applied_s']}s "
                f"after starting the flow (/metrics after {ld['flow_start_to_metrics_s']}s)"
            )
        print(
            f"\nstate load: {ld['events']:,} changelog events applied "
            f"{ld['flow_start_to_all_applied_s']}s after starting the flow "
            f"({ld['events_per_s']:,} events/s incl. start-up; /metrics answered after "
            f"{ld['flow_start_to_metrics_s']}s); dead letters {ld['dead_letters']:.0f}"
        )
        idle = ld.get("idle")
        if idle:
            print(
                f"  then idle (no posts) for {idle['seconds']}s: the flow used "
                f"{idle['flow_cpu_seconds']} CPU-seconds ({idle['flow_cpu_per_s']} of a core; "
                f"broker {idle['broker_cpu_per_s']}; load average {idle['load_average']:.1f}); "
                f"{idle['shard_keys_resnapshotted']} of {idle['shard_keys']} shard states were "
                "snapshotted again meanwhile"
            )
    for ce in r.get("celebrity_posts", []):
        v = ce["verification"]
        t = ce["throughput"]
        cpu = t["cpu_seconds_in_window"]
        print(f"\ncelebrity post {ce['post_id']} ({ce['followers']:,} followers; {ce['label']})")
        print(
            f"  items {ce['items']:,} in {ce['batches']:,} batches, expected "
            f"{ce['expected_items']:,} -> {'OK' if ce['items_match_expected'] else 'MISMATCH'}; "
            f"{ce['items_by_topic']}"
        )
        print(
            f"  check: {v['distinct_users']:,} distinct users, {v['duplicates']} duplicates, "
            f"{v['missing']} missing, {v['not_eligible_but_notified']} not eligible, "
            f"{v['wrong_provider']} wrong provider, {v['wrong_topic']} wrong topic -> "
            f"{'OK' if v['ok'] else 'FAILED'}"
        )
        print(
            f"  publish -> first batch {ce['first_batch_s']}s -> last batch read back from the "
            f"broker {ce['last_batch_s']}s (the flow's producer stamped it at "
            f"{ce['last_batch_produced_s']}s)" + (" TIMED OUT" if ce["timed_out"] else "")
        )
        cps = ce["candidates_per_s"]
        cps2 = ce["candidates_per_s_first_to_last_batch"]
        print(
            f"  candidates/s for this post: {cps:,} (publish -> last batch)"
            + (f"; {cps2:,} (first -> last batch)" if cps2 else "")
            if cps
            else "  candidates/s: n/a"
        )
        if t["candidates_per_s"] is not None:
            print(
                f"  whole flow, publish -> drained ({t['window_s']}s): {t['candidates']:,.0f} "
                f"candidates = {t['candidates_per_s']:,}/s (best 1 s: "
                f"{t['peak_1s_candidates_per_s'] or 0:,}/s, from /metrics every 0.5 s)"
            )
        per_m = t["cpu_seconds_per_1m_candidates"]
        print(
            f"  CPU-seconds per 1M candidates: flow {per_m['flow']}, broker {per_m['broker']} "
            f"(flow target <= 0.8)"
        )
        cel = t["celebrity_cpu_seconds_per_1m_followers"]
        print(
            f"  the celebrity post alone (less the steady rate of {r.get('steady_cpu_per_s')} "
            f"CPU-s/s x the window), per 1M followers: flow {cel['flow']}, broker {cel['broker']}"
        )
        print(
            f"  CPU-seconds meanwhile: flow {cpu['flow_processes']}, broker {cpu['broker']}, "
            f"benchmark {cpu['benchmark']}, whole machine {cpu['machine_total']} of "
            f"{t['window_s'] * (r['machine']['cpus'] or 1):.1f}"
        )
        others = cpu["machine_total"] - sum(cpu["flow_processes"]) - cpu["broker"]
        others -= cpu["benchmark"]
        if others > 0.1 * t["window_s"] * (r["machine"]["cpus"] or 1):
            print(
                f"  WARNING: other processes used {others:.1f} CPU-seconds meanwhile; "
                "these figures are disturbed"
            )
        d = ce.get("normal_posts_during_drain")
        if d:
            print(
                f"  normal posts published meanwhile: {d['posts']} ({d['measured']} complete, "
                f"{d['incomplete']} incomplete, {d['more_items_than_expected']} with extra "
                f"items, {d['duplicate_items']} duplicate items); publish -> read back p50 "
                f"{d['p50_s']}s, p99 {d['p99_s']}s, max {d['max_s']}s (last batch stamped by "
                f"the flow's producer p50 {d['stamped_p50_s']}s, p99 {d['stamped_p99_s']}s)"
            )
    if "normal_posts" in r:
        for label, s in r["normal_posts"].items():
            print(
                f"\nnormal posts, {label.replace('_', ' ')}: {s['posts']} published, "
                f"{s['measured']} complete, {s['incomplete']} incomplete, "
                f"{s['more_items_than_expected']} with extra items, {s['duplicate_items']} "
                f"duplicate items; publish -> last batch read back p50 {s['p50_s']}s, "
                f"p99 {s['p99_s']}s, max {s['max_s']}s (stamped by the flow's producer p50 "
                f"{s['stamped_p50_s']}s, p99 {s['stamped_p99_s']}s); "
                f"{s['messages_per_post']} Kafka messages per complete post "
                f"({s['items_per_post']} items per post)"
            )
    if "memory" in r:
        mm = r["memory"]
        print("\nmemory (per flow process)")
        if "baseline" in r:
            print(
                f"  0-user baseline: RSS "
                f"{[_mb(x.get('VmRSS')) for x in r['baseline']['memory']]}, recovery files "
                f"{_mb(r['baseline']['recovery']['file_bytes'])}"
            )
        print(
            f"  RSS right after load {[_mb(x) for x in mm['rss_after_load_per_process']]}; "
            f"after the first snapshot {_mb(mm['rss_after_first_snapshot_total'])} in total; "
            f"at the end {[_mb(x) for x in mm['rss_end_per_process']]}"
        )
        print(f"  peak RSS (VmHWM): {[_mb(x) for x in mm['peak_rss_per_process']]}")
        if r.get("load", {}).get("memory_breakdown_after_load"):
            print(
                f"  after load by mapping: {_breakdown(r['load']['memory_breakdown_after_load'])}"
            )
        if "state_bytes_per_user_rss" in mm:
            print(
                f"  state per user = (RSS after load - 0-user RSS) / N: "
                f"{mm['state_bytes_per_user_rss']} B (anonymous only: "
                f"{mm['state_bytes_per_user_rss_anon']} B)"
            )
        if mm["state_bytes_per_user_snapshot_blobs"] < 16:
            print(
                "  (the shard snapshots hold no user table: it is rebuilt from the changelogs on "
                "every start, so the snapshot figures below are not a state size)"
            )
        print(
            f"  state per user = recovery files after a snapshot / N: "
            f"{mm['state_bytes_per_user_recovery_files']} B ({_mb(mm['recovery_file_bytes'])} "
            f"on disk); the latest shard snapshots alone: "
            f"{mm['state_bytes_per_user_snapshot_blobs']} B"
        )
    for path, sm in (r.get("profile_summaries") or {}).items():
        print(f"\nprofile {path} ({sm['samples']} samples); time by category:")
        for name, pct in sm.get("categories_pct", []):
            print(f"  {pct:5.1f}%  {name}")
        print("  top self time:")
        for name, pct in sm["self_pct"][:8]:
            print(f"  {pct:5.1f}%  {name[:110]}")
    posts = r.get("celebrity_posts") or []
    if posts and "memory" in r:
        mm = r["memory"]
        best = max(posts, key=lambda p: p["candidates_per_s"] or 0)
        print("\ntargets")
        whole = max(p["throughput"]["candidates_per_s"] or 0 for p in posts)
        per_post = ", ".join(f"{p['candidates_per_s'] or 0:,}" for p in posts)
        whole_flow = ", ".join(f"{p['throughput']['candidates_per_s'] or 0:,}" for p in posts)
        drains = ", ".join(f"{p['last_batch_s']}s" for p in posts)
        print(
            f"  >= {TARGET_CANDIDATES_PER_S:,} candidates/s: celebrity post {per_post}; "
            f"whole flow {whole_flow} -> "
            f"{_ok(max(best['candidates_per_s'] or 0, whole) >= TARGET_CANDIDATES_PER_S)}"
        )
        big = best["followers"] >= 1_000_000
        ok = all(
            p["last_batch_s"] is not None and p["last_batch_s"] <= TARGET_CELEBRITY_S for p in posts
        )
        print(
            f"  1M-follower post in <= {TARGET_CELEBRITY_S:g}s: {drains} for "
            f"{best['followers']:,} followers -> "
            + (_ok(ok) if big else "n/a (fewer than 1M followers)")
        )
        per_user = mm.get("state_bytes_per_user_rss")
        blobs = mm["state_bytes_per_user_snapshot_blobs"]
        print(
            f"  <= {TARGET_BYTES_PER_USER} B state/user: {per_user} B by RSS, {blobs} B by "
            f"snapshot -> RSS: {_ok(per_user is not None and per_user <= TARGET_BYTES_PER_USER)}, "
            "snapshot: "
            + (_ok(blobs <= TARGET_BYTES_PER_USER) if blobs >= 16 else "n/a (no user table in it)")
        )
    rs = r.get("restart")
    if rs:
        print(
            f"\nrestart (stop, start again from checkpoints; {rs['tail_events_published']:,} "
            f"changelog events published after them): /metrics after {rs['start_to_metrics_s']}s, "
            f"every shard's changelogs caught up after {rs['start_to_caught_up_s']}s; "
            f"{rs['checkpoints_loaded']:.0f} checkpoints loaded ({_mb(rs['checkpoint_bytes'])}, "
            f"{rs['checkpoint_bytes_per_user']} B/user), {rs['changes_applied_after_restart']:.0f} "
            "changes applied after the restart; CPU to the catch-up: flow "
            f"{rs.get('flow_cpu_s_to_caught_up')} s, "
            f"runner {rs.get('runner_cpu_s_to_caught_up')} s "
            f"(load average {rs.get('load_average_at_caught_up')})"
        )
        if "state_bytes_per_user_rss" in rs:
            print(
                "  state per user after the restart = (RSS - 0-user RSS) / N: "
                f"{rs['state_bytes_per_user_rss']} B (the columns loaded side by side from "
                "the checkpoints, none of the load's freed memory in between)"
            )
    print(f"\nredis keys deleted: {r.get('redis_keys_deleted')}")
    if r.get("error"):
        print(f"ERROR: {r['error']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run, print the report; exit 0 ok, 1 failed check, 2 usage, 130 Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        threshold = load_settings().celebrity_threshold
    except ConfigError as exc:
        parser.error(f"configuration error: {exc}")
    validate(args, parser, threshold)

    def verdict(report: dict[str, Any], code: int) -> int:
        for ce in report.get("celebrity_posts", []):
            if not (ce["items_match_expected"] and ce["verification"]["ok"]) or ce["timed_out"]:
                code = code or 1
        report["git_at_end"] = git_revision()
        return code

    return run_bench(
        "scripts.bench.fanout", argv, args, run, print_report, (BenchError, ConfigError), verdict
    )


def run_bench(
    module: str,
    argv: Sequence[str] | None,
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace, dict[str, Any]], None],
    print_report: Callable[[dict[str, Any]], None],
    errors: tuple[type[Exception], ...],
    verdict: Callable[[dict[str, Any], int], int] = lambda report, code: code,
) -> int:
    """Run a benchmark, print and save its report; exit 0 ok, 1 failed, 130 Ctrl-C.

    Shared by the benchmarks: SIGTERM and SIGINT become KeyboardInterrupt so everything started
    is stopped, a partial report is still printed and written, `verdict` may fail the run.
    """

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started with SIGINT ignored (`cmd &`)
    report: dict[str, Any] = {
        "command": [
            sys.executable,
            "-m",
            module,
            *(argv if argv is not None else sys.argv[1:]),
        ],
        "started_at": datetime.now(UTC).isoformat(),
    }
    code = 0
    try:
        run(args, report)
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        report["error"] = "interrupted"
        code = 130
    except errors as exc:
        log(f"failed: {exc}")
        report["error"] = str(exc)
        code = 1
    code = verdict(report, code)
    try:
        print_report(report)
    except Exception:  # a partial report (after a failure) may lack fields
        import traceback

        traceback.print_exc()
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
        log(f"report written to {args.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())
