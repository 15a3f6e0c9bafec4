"""End-to-end tier isolation: transactional pushes at the providers while a campaign drains.

    python -m scripts.bench.tiers                       # 200,000 users (several minutes)
    python -m scripts.bench.tiers --users 5000 --idle-probes 6 --json /tmp/tiers.json  # smoke

Everything runs on this machine and shares its cores: the embedded broker (Tansu), Redis,
`fanfare run fanout` and `fanfare run delivery` (one process, one worker each), the local APNs
and FCM servers (a process each, as in scripts/bench/delivery.py) and this script.

1. Seed: --users users, each with one device (APNs for even users, FCM for odd ones) on
   `device_changes` and push on without quiet hours on `preference_changes` (the records
   scripts/bench/fanout.py seeds), plus a few warm-up users; then both flows start.
2. Warm-up: a transactional and a campaign push to each warm-up user, waited for at the
   providers (every writer and sender is built on its first message; that is not measured).
3. Idle: --idle-probes transactional requests (category login_code, push, --probe-recipients
   users each), --rate a second, on `notify.transactional`.
4. Drain: a campaign to every seeded user is published on `notify.marketing` at once, one
   message per user (id `campaign_id:user_id`, keyed by it), as `fanfare api scheduler` emits
   a campaign (that is the marketing tier's traffic; 1,000-recipient requests are what
   `POST /v1/notifications` writes, not what a campaign does). Transactional requests go on at
   --rate a second until every campaign push was accepted.

A probe push's latency is its publish (this script's time.time() before producing) -> its
acceptance at the local provider (the server's time.time() on receipt; one clock). Probes
published between the campaign's first and last accepted push count as "during the drain".
The drain rate is campaign pushes accepted / (last - first accepted). CPU per item is each
process's CPU seconds from the campaign's publication to its last accepted push, divided by
the pushes accepted in that span (campaign and probes); cores = CPU seconds / wall seconds.

Every process it starts is stopped at the end, also on Ctrl-C, SIGTERM or an error, and its
Redis keys (a prefix of its own) are deleted. Needs Redis at FANFARE_REDIS_URL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from flows.runtime.ports import free_port
from operators.adapters.kafka.admin import create_topics
from operators.adapters.kafka.client_log import client_config
from operators.adapters.kafka.probes import split_part, topic_partitions
from operators.adapters.kafka.writer import produce_all
from operators.config import ConfigError, load_settings
from schemas.codecs import encode_notification_request
from schemas.records import NotificationRequest
from scripts.bench.delivery import DeliveryFlow, SplitControl
from scripts.bench.fanout import (
    BenchError,
    Broker,
    Flow,
    Seed,
    delete_redis_keys,
    device_messages,
    git_revision,
    log,
    percentile,
    preference_messages,
    run_bench,
    wait_until,
)
from scripts.commands.arguments import number_in, whole_number
from scripts.dev import devstack
from scripts.dev.local_providers.control import ProviderControl
from scripts.dev.local_providers.runner import ProvidersProcess, spawn_local_providers
from scripts.dev.local_providers.settings_file import write_provider_settings
from scripts.harness.bench_env import bench_flow_env
from scripts.harness.procfs import cpu_seconds, redis_pids, system_busy_seconds

CAMPAIGN = "c_tierbench"
WARM_CAMPAIGN = "c_tierwarm"
PROBE_PREFIX = "n_tier"
WARM_USERS = 8
TARGET_P99_S = 1.0
PROVIDERS = ("apns", "fcm")


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench.tiers",
        description="Tier isolation end to end: transactional publish -> accepted at the local "
        "providers, on an idle system and while a campaign to every user drains, through "
        "`fanfare run fanout` and `fanfare run delivery` on an embedded broker. Needs Redis at "
        "FANFARE_REDIS_URL (default redis://127.0.0.1:6379/0); only keys under a prefix of its "
        "own are touched.",
    )
    p.add_argument(
        "--users",
        type=whole_number(10, 5_000_000),
        default=200_000,
        help="users seeded (a device each) and in the campaign (default 200,000)",
    )
    p.add_argument(
        "--rate",
        type=number_in(0.1, 100),
        default=2.0,
        help="transactional requests a second (default 2)",
    )
    p.add_argument(
        "--probe-recipients",
        type=whole_number(1, 100),
        default=3,
        help="recipients per transactional request (default 3)",
    )
    p.add_argument(
        "--idle-probes",
        type=whole_number(1, 10_000),
        default=20,
        help="transactional requests before the campaign (default 20)",
    )
    p.add_argument(
        "--partitions",
        type=whole_number(1, 64),
        default=4,
        help="partitions per topic (default 4, fanfare's default)",
    )
    p.add_argument(
        "--stall-timeout",
        type=number_in(5, 3600),
        default=120.0,
        help="give up when no campaign push is accepted for this many seconds (default 120)",
    )
    p.add_argument(
        "--grace",
        type=number_in(1, 600),
        default=30.0,
        help="seconds to wait for the last probes after the drain (default 30)",
    )
    p.add_argument("--seed", type=int, default=17, help="random seed (default 17)")
    p.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    p.add_argument("--keep-home", action="store_true", help="keep the temporary FANFARE_HOME")
    return p


# --- what is published ----------------------------------------------------------------------------


def campaign_request(campaign: str, user: str) -> NotificationRequest:
    """A campaign's per-user message, as `fanfare api scheduler` emits it."""
    return NotificationRequest(
        campaign,
        "marketing",
        "campaign",
        "campaign",
        (user,),
        {"headline": "Winter sale", "message": "Everything -20% until Sunday", "link": ""},
        ("push",),
        True,
        True,
        "bench",
        datetime.now(UTC),
        campaign_id=campaign,
    )


def probe_request(nid: str, users: tuple[str, ...]) -> NotificationRequest:
    """A transactional login code to a few users (no quiet hours, no caps: its category's)."""
    return NotificationRequest(
        nid,
        "transactional",
        "login_code",
        "login_code",
        users,
        {"code": "482913", "minutes": 10},
        ("push",),
        False,
        False,
        "bench",
        datetime.now(UTC),
    )


def seed_users(users: int) -> Seed:
    """`users` + the warm-up users, every one eligible, APNs for even ones, FCM for odd ones."""
    n = users + WARM_USERS
    return Seed(
        n,
        max(7, len(str(n - 1))),
        bytearray(n),  # ELIGIBLE: push on, no quiet hours
        bytearray(i % 2 == 0 for i in range(n)),
        [],
        {},
        datetime.now(UTC),
    )


# --- the providers' records -----------------------------------------------------------------------


@dataclass
class Accepted:
    """The providers' accepted records, read incrementally and sorted by what they belong to."""

    control: SplitControl
    next_index: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROVIDERS, 0))
    campaign_times: list[float] = field(default_factory=list)
    campaign_seen: Counter[str] = field(default_factory=Counter)
    probe_times: dict[str, list[float]] = field(default_factory=dict)  # "nid:user" -> accepts
    warm: set[str] = field(default_factory=set)

    def poll(self) -> None:
        """Fetch every record accepted since the last poll."""
        for provider in PROVIDERS:
            records = self.control.accepted(provider, since=self.next_index[provider])
            self.next_index[provider] += len(records)
            for r in records:
                nid = r.notification_id or ""
                if nid.startswith(CAMPAIGN + ":"):
                    self.campaign_seen[nid] += 1
                    if self.campaign_seen[nid] == 1:
                        self.campaign_times.append(r.time)
                elif nid.startswith(PROBE_PREFIX):
                    self.probe_times.setdefault(nid, []).append(r.time)
                else:
                    self.warm.add(nid)

    def has_all(self, probes: Iterable[str]) -> bool:
        """Poll, then whether every one of these probe pushes was accepted."""
        self.poll()
        return all(k in self.probe_times for k in probes)


class Written(threading.Thread):
    """When the fan-out wrote each push: the dispatch batches on the push lanes' topics.

    Kafka's timestamp of each batch (the fan-out's producer, the host's clock) splits a probe's
    latency into fan-out (publish -> batch written) and delivery (written -> accepted).
    """

    TOPICS = tuple(f"push.{p}.{lane}" for p in PROVIDERS for lane in ("transactional", "bulk"))

    def __init__(self, config: dict[str, object]) -> None:
        super().__init__(name="written", daemon=True)
        self._config = config
        self._stop_event = threading.Event()
        self.campaign_times: list[float] = []
        self.probe_times: dict[str, float] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        """Read the topics from their start until stopped."""
        try:
            consumer = Consumer(
                client_config(
                    self._config, **{"group.id": "bench-tiers", "enable.auto.commit": False}
                )
            )
            parts = [split_part(p) for p in topic_partitions(self._config, list(self.TOPICS))]
            consumer.assign([TopicPartition(t, n, OFFSET_BEGINNING) for t, n in parts])
            while not self._stop_event.is_set():
                for m in consumer.consume(500, 0.1):
                    if m.error() is not None:
                        continue
                    at = m.timestamp()[1] / 1000
                    for item in orjson.loads(m.value() or b"{}").get("items", ()):
                        nid = item.get("notification_id", "")
                        if nid.startswith(CAMPAIGN + ":"):
                            self.campaign_times.append(at)
                        elif nid.startswith(PROBE_PREFIX):
                            self.probe_times.setdefault(nid, at)
            consumer.close()
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def stop(self) -> None:
        """Stop reading."""
        self._stop_event.set()
        self.join(10)


# --- CPU ------------------------------------------------------------------------------------------


@dataclass
class Processes:
    """The processes whose CPU the report shows."""

    broker: Broker
    providers: dict[str, ProvidersProcess]
    fanout: Flow
    delivery: DeliveryFlow

    def pids(self) -> dict[str, list[int]]:
        """Name -> process ids (a flow: its runner and its bytewax process)."""
        out: dict[str, list[int]] = {}
        for name, flow in (("fanout", self.fanout), ("delivery", self.delivery)):
            runner = [flow.proc.pid] if flow.proc is not None else []
            out[name] = runner + flow.pids()
        out["broker"] = [self.broker.pid] if self.broker.pid is not None else []
        for provider, proc in self.providers.items():
            out[f"{provider} server"] = [proc.proc.pid]
        out["redis-server"] = redis_pids()
        return out

    def cpu(self) -> dict[str, float]:
        """CPU seconds of each, and of this script."""
        out = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids().items()}
        t = os.times()
        out["this script"] = t.user + t.system
        return out


# --- the run --------------------------------------------------------------------------------------


def bench_env(args: argparse.Namespace, home: Path, prefix: str) -> dict[str, str]:
    """The flows' environment: the caller's, with this benchmark's FANFARE_* settings."""
    return bench_flow_env(
        home,
        prefix,
        {
            "FANFARE_KAFKA_BROKERS": f"127.0.0.1:{free_port()}",
            "FANFARE_TOPIC_PARTITIONS": str(args.partitions),
            "FANFARE_TOPIC_PARTITIONS_OVERRIDES": "",
            "FANFARE_READY_PORT": "0",  # not used here; never collides with a flow of the host
        },
    )


class Prober:
    """Publishes transactional requests and remembers when each was published."""

    def __init__(self, config: dict[str, object], users: int, recipients: int, seed: int) -> None:
        self._producer = Producer(client_config(config, **{"linger.ms": 0}))
        self._rng = random.Random(seed)
        self._users = users
        self._recipients = recipients
        self._seed = seed_users(users)
        self.sent: dict[str, float] = {}  # "nid:user" -> publish time
        self.phase: dict[str, str] = {}  # "nid:user" -> idle | drain
        self.count = 0

    def send(self, phase: str) -> None:
        """One request to `recipients` distinct seeded users."""
        nid = f"{PROBE_PREFIX}{self.count}"
        self.count += 1
        picks = self._rng.sample(range(self._users), self._recipients)
        users = tuple(self._seed.uid(i) for i in picks)
        request = probe_request(nid, users)
        at = time.time()
        self._producer.produce(
            "notify.transactional", encode_notification_request(request), request.key.encode()
        )
        self._producer.poll(0)
        for u in users:
            self.sent[f"{nid}:{u}"] = at
            self.phase[f"{nid}:{u}"] = phase

    def flush(self) -> None:
        """Wait until every request is written."""
        if self._producer.flush(30):
            raise BenchError("transactional requests could not be written to the broker")


def latency_row(values: list[float]) -> dict[str, Any]:
    """p50/p99/max in milliseconds."""
    if not values:
        return {"pushes": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}

    def ms(q: float) -> float:
        v = percentile(values, q)
        return round((v or 0.0) * 1000, 1)

    return {
        "pushes": len(values),
        "p50_ms": ms(50),
        "p99_ms": ms(99),
        "max_ms": round(max(values) * 1000, 1),
    }


def run(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Start everything, run the phases, fill `report`; stops everything it started."""
    home = Path(tempfile.mkdtemp(prefix="fanfare-bench-tiers-"))
    prefix = f"fanfare-bench-tiers-{uuid.uuid4().hex[:12]}:"
    env = bench_env(args, home, prefix)
    settings = load_settings(env)
    kafka = settings.kafka_config()
    report["config"] = {
        "users": args.users,
        "campaign": "one message per user on notify.marketing, as the campaign scheduler emits",
        "rate_per_s": args.rate,
        "probe_recipients": args.probe_recipients,
        "idle_probes": args.idle_probes,
        "partitions": args.partitions,
        "home": str(home),
    }
    report["git"] = git_revision()
    report["machine"] = {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}
    providers: dict[str, ProvidersProcess] = {}
    broker = Broker(settings)
    fanout = Flow({**env, "FANFARE_METRICS_PORT": str(free_port())}, 1, 1, home / "fanout.log")
    delivery = DeliveryFlow(
        {**env, "FANFARE_METRICS_PORT": str(free_port())}, 1, 1, home / "delivery.log"
    )
    procs = Processes(broker, providers, fanout, delivery)
    written: Written | None = None
    ok = False
    try:
        log(f"FANFARE_HOME={home}; the local APNs and FCM servers, a process each")
        for provider in PROVIDERS:
            try:
                providers[provider] = spawn_local_providers(
                    home / "providers" / provider, only=provider
                )
            except RuntimeError as exc:
                raise BenchError(str(exc)) from None
        info = {**providers["apns"].info, "fcm": providers["fcm"].info["fcm"]}
        write_provider_settings(settings.settings_path, info)
        control = SplitControl(
            {p: ProviderControl(proc.control_url, timeout_s=60) for p, proc in providers.items()}
        )
        accepted = Accepted(control)
        broker.start()
        create_topics(settings)
        written = Written(kafka)
        written.start()
        seed = seed_users(args.users)
        rng = random.Random(args.seed)
        t0 = time.monotonic()
        produce_all(kafka, "preference_changes", preference_messages(seed, rng))
        produce_all(kafka, "device_changes", device_messages(seed, rng))
        report["seed_s"] = round(time.monotonic() - t0, 1)
        log(f"seeded {seed.users:,} users in {report['seed_s']} s; starting both flows")
        fanout.start()
        delivery.start()
        started = time.time()

        # Warm-up: both tiers to every warm-up user, so every writer and sender exists.
        warm = [seed.uid(args.users + i) for i in range(WARM_USERS)]
        produce_all(
            kafka,
            "notify.transactional",
            [(b"n_warm", encode_notification_request(probe_request("n_warm", tuple(warm))))],
        )
        produce_all(
            kafka,
            "notify.marketing",
            [(f"{WARM_CAMPAIGN}:{u}".encode(), campaign_bytes(WARM_CAMPAIGN, u)) for u in warm],
        )

        def warmed() -> bool:
            for flow in (fanout, delivery):
                flow.check_alive()
            accepted.poll()
            return len(accepted.warm) >= 2 * WARM_USERS

        wait_until("the warm-up pushes to be accepted", warmed, 300, None, 0.5)
        report["ready_s"] = round(time.time() - started, 1)
        log(f"both flows answered {report['ready_s']} s after start; idle probes")

        prober = Prober(kafka, args.users, args.probe_recipients, args.seed)
        period = 1 / args.rate
        for _ in range(args.idle_probes):
            prober.send("idle")
            time.sleep(period)
            accepted.poll()
        prober.flush()
        idle_keys = [k for k, p in prober.phase.items() if p == "idle"]
        wait_until(
            "the idle probes to be accepted",
            lambda: accepted.has_all(idle_keys),
            60 + args.grace,
            fanout,
            0.25,
        )

        log(f"publishing the campaign to {args.users:,} users; probes go on meanwhile")
        cpu0, mono0, campaign_t0 = procs.cpu(), time.monotonic(), time.time()
        busy0 = system_busy_seconds()
        published: dict[str, float] = {}
        failure: list[BaseException] = []

        def publish_campaign() -> None:
            try:
                published["start"] = time.time()
                produce_all(
                    kafka,
                    "notify.marketing",
                    (
                        (
                            f"{CAMPAIGN}:{seed.uid(i)}".encode(),
                            campaign_bytes(CAMPAIGN, seed.uid(i)),
                        )
                        for i in range(args.users)
                    ),
                )
                published["end"] = time.time()
            except BaseException as exc:  # reported by the main thread
                failure.append(exc)

        publisher = threading.Thread(target=publish_campaign, name="campaign", daemon=True)
        publisher.start()
        last_count, last_change = 0, time.monotonic()
        next_probe = time.monotonic()
        while len(accepted.campaign_times) < args.users:
            now = time.monotonic()
            if now >= next_probe:
                prober.send("drain")
                next_probe += period
            accepted.poll()
            if failure:
                raise BenchError(f"publishing the campaign failed: {failure[0]}")
            for flow in (fanout, delivery):
                flow.check_alive()
            count = len(accepted.campaign_times)
            if count != last_count:
                last_count, last_change = count, now
            elif now - last_change > args.stall_timeout:
                raise BenchError(
                    f"the campaign stalled: {count:,}/{args.users:,} accepted, none for "
                    f"{args.stall_timeout:.0f} s; see {home}/fanout.log and delivery.log"
                )
            time.sleep(max(0.0, min(0.2, next_probe - time.monotonic())))
        cpu1, mono1, busy1 = procs.cpu(), time.monotonic(), system_busy_seconds()
        publisher.join(60)
        prober.flush()
        log("the campaign drained; waiting for the last probes")
        wait_until(
            "every probe to be accepted",
            lambda: accepted.has_all(prober.sent),
            args.grace,
            None,
            0.25,
        )
        time.sleep(2)  # a push sent twice would show by now
        accepted.poll()
        ok = True
    finally:
        if ok:
            report["load_average_at_end"] = os.getloadavg()
        for flow in (fanout, delivery):
            with contextlib.suppress(Exception):
                flow.stop()
        if written is not None:
            written.stop()
        broker.stop()
        for proc in providers.values():
            with contextlib.suppress(Exception):
                proc.stop()
        report["redis_keys_deleted"] = delete_redis_keys(settings, prefix)
        if args.keep_home or not ok:
            report["home_kept"] = str(home)
        else:
            shutil.rmtree(home, ignore_errors=True)

    first, last = min(accepted.campaign_times), max(accepted.campaign_times)
    accepts = {k: accepted.probe_times.get(k, []) for k in prober.sent}
    idle = [accepts[k][0] - prober.sent[k] for k in prober.sent if prober.phase[k] == "idle"]
    during = [
        accepts[k][0] - prober.sent[k]
        for k in prober.sent
        if prober.phase[k] == "drain" and first <= prober.sent[k] <= last
    ]
    after = [
        k for k in prober.sent if prober.phase[k] == "drain" and not first <= prober.sent[k] <= last
    ]
    span = max(1e-6, mono1 - mono0)
    pushes = len(accepted.campaign_times) + sum(
        1 for k in prober.sent if prober.phase[k] == "drain" and accepts[k]
    )
    cpu = {
        name: {
            "cpu_s": round(cpu1[name] - cpu0.get(name, 0.0), 2),
            "cores": round((cpu1[name] - cpu0.get(name, 0.0)) / span, 2),
            "us_per_push": round((cpu1[name] - cpu0.get(name, 0.0)) / pushes * 1e6, 1),
        }
        for name in cpu1
    }
    report["campaign"] = {
        "users": args.users,
        "published_s": round(published.get("end", last) - published.get("start", campaign_t0), 1),
        "accepted": len(accepted.campaign_times),
        "accepted_more_than_once": sum(1 for n in accepted.campaign_seen.values() if n > 1),
        "publish_to_first_accepted_s": round(first - campaign_t0, 1),
        "drain_s": round(last - first, 1),
        "accepted_per_s": round(len(accepted.campaign_times) / max(1e-6, last - first)),
    }
    fanned = sorted(written.campaign_times) if written is not None else []
    if fanned:
        report["campaign"]["fanout_written"] = len(fanned)
        report["campaign"]["fanout_drain_s"] = round(fanned[-1] - fanned[0], 1)
        report["campaign"]["fanout_written_per_s"] = round(
            len(fanned) / max(1e-6, fanned[-1] - fanned[0])
        )
    batch_at = written.probe_times if written is not None else {}

    def fanout_half(phase: str) -> list[float]:
        return [
            batch_at[k] - prober.sent[k]
            for k in prober.sent
            if k in batch_at
            and prober.phase[k] == phase
            and (phase == "idle" or first <= prober.sent[k] <= last)
        ]

    report["transactional"] = {
        "requests": prober.count,
        "pushes": len(prober.sent),
        "accepted_once": sum(1 for v in accepts.values() if len(v) == 1),
        "accepted_more_than_once": sum(1 for v in accepts.values() if len(v) > 1),
        "missing": sum(1 for v in accepts.values() if not v),
        "idle": latency_row(idle),
        "during_drain": latency_row(during),
        "fanout_half_idle": latency_row(fanout_half("idle")),
        "fanout_half_during_drain": latency_row(fanout_half("drain")),
        "outside_drain_window": len(after),
        # When the tail happens (seconds after the campaign's publication began) tells a stall
        # of the whole flow (every probe of a moment slow) from one slow item.
        "slowest": [
            {
                "sent_s": round(prober.sent[k] - campaign_t0, 2),
                "phase": prober.phase[k],
                "total_ms": round((accepts[k][0] - prober.sent[k]) * 1000),
                "fanout_ms": round((batch_at[k] - prober.sent[k]) * 1000)
                if k in batch_at
                else None,
            }
            for k in sorted(
                (k for k in prober.sent if accepts[k]),
                key=lambda k: accepts[k][0] - prober.sent[k],
                reverse=True,
            )[:12]
        ],
    }
    ours = sum(row["cpu_s"] for row in cpu.values())
    report["cpu"] = {
        "seconds": round(span, 1),
        "pushes": pushes,
        "by_process": cpu,
        # Whether the processes were starved: what the whole machine ran meanwhile.
        "machine_busy_cores": round((busy1 - busy0) / span, 2),
        "other_processes_cores": round((busy1 - busy0 - ours) / span, 2),
    }


def campaign_bytes(campaign: str, user: str) -> bytes:
    """A campaign's message to one user, encoded."""
    return encode_notification_request(campaign_request(campaign, user))


def print_report(r: dict[str, Any]) -> None:
    """The readable report (the JSON has the same figures)."""
    c = r.get("config", {})
    m = r.get("machine", {})
    print(
        f"\n=== fanfare tier isolation, end to end: {c.get('users', 0):,} users, one "
        f"`fanfare run fanout` and one `fanfare run delivery` (1 worker each) ==="
    )
    print(
        f"machine: {m.get('cpus')} cores, load average at start "
        f"{', '.join(f'{x:.1f}' for x in m.get('loadavg_at_start', ()))}; commit "
        f"{r.get('git', {}).get('commit')}"
    )
    if "campaign" not in r:
        if r.get("error"):
            print(f"ERROR: {r['error']}")
        if r.get("home_kept"):
            print(f"FANFARE_HOME kept: {r['home_kept']}")
        return
    camp, tx, cpu = r["campaign"], r["transactional"], r["cpu"]
    print(
        f"campaign: {camp['accepted']:,}/{camp['users']:,} pushes accepted "
        f"({camp['accepted_more_than_once']} more than once); published in "
        f"{camp['published_s']} s; first accepted {camp['publish_to_first_accepted_s']} s after "
        f"its publication began; drained in {camp['drain_s']} s = {camp['accepted_per_s']:,} "
        "accepted/s"
    )
    if "fanout_written" in camp:
        print(
            f"    the fan-out wrote its {camp['fanout_written']:,} pushes in "
            f"{camp['fanout_drain_s']} s = {camp['fanout_written_per_s']:,}/s (Kafka timestamps)"
        )
    print(
        f"transactional: {tx['requests']} login_code requests at {c.get('rate_per_s')}/s, "
        f"{c.get('probe_recipients')} recipients each = {tx['pushes']} pushes; accepted once "
        f"{tx['accepted_once']}, more than once {tx['accepted_more_than_once']}, missing "
        f"{tx['missing']}"
    )
    print(f"    {'publish -> accepted':24} {'pushes':>7} {'p50':>10} {'p99':>10} {'max':>10}")
    rows = (
        ("idle system", tx["idle"]),
        ("during the drain", tx["during_drain"]),
        ("  fan-out half, idle", tx["fanout_half_idle"]),
        ("  fan-out half, drain", tx["fanout_half_during_drain"]),
    )
    for name, row in rows:

        def ms(x: float | None) -> str:
            return "n/a" if x is None else f"{x:,.0f} ms"

        print(
            f"    {name:24} {row['pushes']:>7} {ms(row['p50_ms']):>10} {ms(row['p99_ms']):>10} "
            f"{ms(row['max_ms']):>10}"
        )
    if tx.get("slowest"):
        print(
            "    slowest pushes (sent, s after the campaign began: total / fan-out half ms): "
            + ", ".join(
                f"{x['sent_s']:+.1f} s: {x['total_ms']}/{x['fanout_ms']}" for x in tx["slowest"]
            )
        )
    p99 = tx["during_drain"]["p99_ms"]
    met = p99 is not None and p99 < TARGET_P99_S * 1000 and not tx["missing"]
    print(
        f"    target p99 < {TARGET_P99_S * 1000:,.0f} ms during the drain: "
        + ("MET" if met else "NOT MET")
    )
    print(
        f"CPU from the campaign's publication to its last accepted push ({cpu['seconds']} s, "
        f"{cpu['pushes']:,} pushes):"
    )
    print(f"    {'process':16} {'CPU s':>8} {'cores':>6} {'us/push':>8}")
    for name, row in cpu["by_process"].items():
        print(f"    {name:16} {row['cpu_s']:>8.1f} {row['cores']:>6.2f} {row['us_per_push']:>8.0f}")
    if "machine_busy_cores" in cpu:
        print(
            f"    the whole machine: {cpu['machine_busy_cores']:.2f} cores busy, of which "
            f"{cpu['other_processes_cores']:.2f} for processes this benchmark did not start"
        )
    load = r.get("load_average_at_end")
    if load:
        print(f"load average at the end: {', '.join(f'{x:.1f}' for x in load)}")
    if r.get("error"):
        print(f"ERROR: {r['error']}")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the report; exit 0 ok, 1 failed, 2 usage, 130 Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.probe_recipients > args.users:
        parser.error(
            f"--probe-recipients {args.probe_recipients} is more than --users {args.users}"
        )
    return run_bench(
        "scripts.bench.tiers",
        argv,
        args,
        run,
        print_report,
        (BenchError, ConfigError, devstack.BrokerStartError),
    )


if __name__ == "__main__":
    sys.exit(main())
