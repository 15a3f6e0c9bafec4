"""In-process benchmark of API notifications in the fan-out: no broker, no Redis.

    python -m scripts.bench.notify [--recipients 100000] [--backlog 100000] [--shards 4]
    python -m scripts.bench.notify --broker [--campaign 200000] [--probes 50]

1. Decisions in one shard (`NotifyShard.work`, no Bytewax): `--recipients` users, each with an
   APNs device and an email address (a third with quiet hours outside their window and a
   locale), sent a transactional request per 1,000 of them on push, inbox and email: CPU
   seconds per recipient and dispatch items per second.
2. Tier isolation in the fan-out graph (Bytewax's TestingSource, one worker, `--shards`
   shards, the default FANFARE_EXPAND_BUDGET): a marketing backlog of `--backlog` recipients
   (in-app only) is read; once its first batch is written, one transactional request is read.
   Reported: read -> its batch written, and how much of the backlog was still waiting then.
3. With `--broker` instead: the fan-out half of tier isolation on the real flow. Its own
   embedded broker (a temporary FANFARE_HOME, a free port) and `fanfare run fanout`; a campaign
   of `--campaign` one-recipient messages (in-app) published to `notify.marketing` at once, then
   `--probes` transactional requests (in-app, one user each), one every 100 ms, while the
   campaign drains. Reported: each probe's publish -> its batch on `inapp.transactional`
   (Kafka timestamps: the producer's and the flow's, one clock), p50 / p99 / max, and the
   campaign's drain (first to last batch on `inapp.marketing`) around them. Needs Redis
   (FANFARE_REDIS_URL); its keys are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import orjson
import redis
from bytewax.testing import TestingSink, TestingSource, run_main
from confluent_kafka import Consumer, Producer, TopicPartition

from flows.fanout import build_fanout_flow
from flows.runtime.ports import free_port
from operators.adapters.kafka.admin import create_topics
from operators.adapters.kafka.client_log import client_config
from operators.adapters.kafka.probes import split_part, topic_partitions
from operators.adapters.kafka.writer import produce_all
from operators.config import Settings, load_settings
from operators.events import CaughtUp, RawEvent
from operators.fanout.notify import NotifyShard, NotifyTally, RecipientJob
from operators.fanout.ports import FollowerRow, FollowerStore, PostClaims
from operators.fanout.shard import FollowerShard
from schemas.codecs import encode_notification_request
from schemas.records import (
    Channel,
    DeviceChange,
    DispatchBatch,
    FollowChange,
    NotificationRequest,
    PreferenceChange,
    Tier,
)
from scripts.commands.arguments import whole_number
from scripts.dev import devstack
from scripts.harness.spawn import start_fanfare, stop_fanfare

NOON = datetime(2026, 6, 1, 12, tzinfo=UTC)
PARTS = ["follow_changes/0", "preference_changes/0", "device_changes/0"]


def request(
    nid: str, users: Sequence[str], tier: Tier, channels: tuple[Channel, ...]
) -> NotificationRequest:
    """A request of the benchmark's category."""
    return NotificationRequest(
        nid, tier, "bench", "bench", tuple(users), {}, channels, False, False, "bench", NOON
    )


def decisions(recipients: int) -> None:
    """Part 1: a shard's per-recipient decisions, timed."""
    shard = FollowerShard([], notify=NotifyShard({}))
    for i in range(recipients):
        user = f"user{i}"
        shard.apply_device(DeviceChange(user, "phone", "apns", "ab" * 32, True, NOON))
        shard.apply_device(DeviceChange(user, "mail", "email", f"{user}@example.com", True, NOON))
        if i % 3 == 0:  # 22:00-07:00 in Paris: not quiet at noon UTC
            shard.apply_preference(
                PreferenceChange(user, True, 22, 7, "Europe/Paris", NOON, locale="fr")
            )
    users = [f"user{i}" for i in range(recipients)]
    for k in range(0, recipients, 1000):
        r = request(f"n{k}", users[k : k + 1000], "transactional", ("push", "inbox", "email"))
        shard.notify.add_job(RecipientJob(r, r.recipients, 0, 0.0))
    cpu, wall = time.process_time(), time.perf_counter()
    out = shard.notify.work(shard.users, NOON, lambda read_at: True, NotifyTally())
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    items = sum(len(b.items) for b in out)
    print(
        f"decisions: {recipients:,} recipients x 3 channels -> {items:,} items in {len(out)} "
        f"batches; {wall:.2f} s wall, {cpu / recipients * 1e6:.1f} us CPU per recipient, "
        f"{items / wall:,.0f} items/s"
    )


class _NoFollowers(FollowerStore):
    """API notifications read no follower: the shard never asks."""

    shard_count = 0

    def apply_follow_changes(self, changes: Sequence[FollowChange]) -> None:
        """Nothing to keep."""

    def follower_page(
        self, author_id: str, shard_id: int, after: str | None, limit: int
    ) -> list[FollowerRow]:
        """None."""
        return []

    def follow_flags(self, author_id: str, follower_id: str) -> int | None:
        """None."""
        return None

    def follower_count(self, author_id: str) -> int:
        """None."""
        return 0

    def bulk_load(self, edges: Iterable[tuple[str, str, int]]) -> int:
        """Nothing."""
        return 0


class _Claims(PostClaims):
    def __init__(self) -> None:
        self._owners: dict[str, str] = {}
        self._lock = threading.Lock()

    def claim(self, claims: Sequence[tuple[str, str]]) -> list[bool]:
        with self._lock:
            return [self._owners.setdefault(i, who) == who for i, who in claims]


class _Stamped(list[tuple[float, Any]]):
    """The sink's list, with when each item was written."""

    def __iadd__(self, items: Iterable[Any]) -> _Stamped:  # type: ignore[override,misc]
        now = time.perf_counter()
        self.extend((now, item) for item in items)
        return self


def isolation(backlog: int, shards: int) -> None:
    """Part 2: a transactional request behind a marketing backlog, in the graph."""
    offsets: dict[str, int] = {}

    def event(r: NotificationRequest) -> RawEvent:
        topic = f"notify.{r.tier}"
        offset = offsets[topic] = offsets.get(topic, -1) + 1
        return RawEvent(topic, 0, offset, None, encode_notification_request(r), read_at=1.0)

    marketing = [
        event(request(f"c{i}", [f"m{i}-{j}" for j in range(1000)], "marketing", ("inbox",)))
        for i in range(backlog // 1000)
    ]
    out = _Stamped()
    read_at: list[float] = []

    def tier(b: Any) -> str:
        batch: DispatchBatch = b[1]
        return batch.message["tier"] if batch.message is not None else ""

    def transactional() -> Iterator[Any]:
        while not any(tier(b) == "marketing" for _, b in list(out)):
            yield TestingSource.PAUSE(timedelta(milliseconds=1))
        read_at.append(time.perf_counter())
        yield event(request("t1", ["u1"], "transactional", ("inbox",)))

    flow = build_fanout_flow(
        Settings(shard_count=shards),
        post_source=TestingSource([]),
        changelog_source=TestingSource([CaughtUp(p, 1e12) for p in PARTS]),
        changelog_parts=PARTS,
        channel_sink=TestingSink(out),
        route_batch=lambda b: b.topic,
        dead_letter_sink=TestingSink([]),
        store=_NoFollowers,
        claims=_Claims,
        clock=lambda: NOON,
        notify_sources=[
            ("transactional", TestingSource(transactional())),
            ("marketing", TestingSource(marketing, batch_size=100)),
        ],
        notification_claims=_Claims,
    )
    run_main(flow)  # type: ignore[no-untyped-call]
    [written] = [t for t, b in out if tier(b) == "transactional"]
    drained = [t for t, b in out if tier(b) == "marketing"]
    waiting = sum(len(b[1].items) for t, b in out if tier(b) == "marketing" and t > written)
    print(
        f"isolation: a {backlog:,}-recipient marketing backlog drained in "
        f"{drained[-1] - drained[0]:.2f} s; a transactional request read -> batch written in "
        f"{(written - read_at[0]) * 1000:.0f} ms, with {waiting:,} of the backlog still waiting"
    )


def _notification(nid: str, user: str, tier: Tier, campaign: str | None = None) -> bytes:
    r = NotificationRequest(
        nid,
        tier,
        "bench",
        "bench",
        (user,),
        {},
        ("inbox",),
        False,
        False,
        "bench",
        datetime.now(UTC),
        campaign_id=campaign,
    )
    return encode_notification_request(r)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def on_broker(campaign: int, probes: int) -> None:
    """Part 3: a transactional probe's latency through the real flow while a campaign drains."""
    home = Path(tempfile.mkdtemp(prefix="fanfare-bench-notify-"))
    prefix = f"fanfare-bench-{uuid.uuid4().hex[:8]}:"
    env = {
        **os.environ,
        "FANFARE_HOME": str(home),
        "FANFARE_KAFKA_BROKERS": f"127.0.0.1:{free_port()}",
        "FANFARE_REDIS_PREFIX": prefix,
        "FANFARE_METRICS_PORT": str(free_port()),
        "FANFARE_READY_PORT": str(free_port()),
    }
    settings = load_settings(env)
    kafka = settings.kafka_config()
    devstack.start_broker(settings)
    flow = None
    seen: dict[str, list[tuple[str, float]]] = {"inapp.transactional": [], "inapp.marketing": []}
    stop = threading.Event()

    def read() -> None:
        consumer = Consumer(client_config(kafka, **{"group.id": "bench-notify"}))
        parts = [split_part(p) for p in topic_partitions(kafka, list(seen))]
        consumer.assign([TopicPartition(t, n, 0) for t, n in parts])
        while not stop.is_set():
            for m in consumer.consume(500, 0.05):
                if m.error() is None:
                    batch = orjson.loads(m.value() or b"{}")
                    at = m.timestamp()[1] / 1000
                    seen[cast(str, m.topic())].extend((i["user_id"], at) for i in batch["items"])
        consumer.close()

    reader = threading.Thread(target=read, daemon=True)
    try:
        create_topics(settings)
        flow = start_fanfare(["run", "fanout", "--fresh"], env, home / "fanout.log")
        reader.start()
        # Warm up: every partition writer of both output topics is built on its first batch
        # (it asks the broker where the partition ends), which is not what is measured.
        warm = [f"w{i}" for i in range(32)]
        tiers: tuple[Tier, ...] = ("transactional", "marketing")
        for tier in tiers:
            produce_all(
                kafka,
                f"notify.{tier}",
                [(w.encode(), _notification(f"{w}{tier[0]}", w, tier)) for w in warm],
            )
        deadline = time.time() + 120
        while not all(
            set(warm) <= {u for u, _ in seen[t]} for t in ("inapp.transactional", "inapp.marketing")
        ):
            if time.time() > deadline or flow.poll() is not None:
                raise SystemExit(f"the flow did not answer; see {home / 'fanout.log'}")
            time.sleep(0.1)
        produce_all(
            kafka,
            "notify.marketing",
            (
                (f"c1:m{i}".encode(), _notification("c1", f"m{i}", "marketing", "c1"))
                for i in range(campaign)
            ),
        )
        sent: dict[str, float] = {}
        producer = Producer(client_config(kafka, **{"linger.ms": 0}))
        for k in range(probes):
            user = f"t{k}"
            sent[user] = time.time()
            producer.produce(
                "notify.transactional", _notification(f"t{k}", user, "transactional"), user.encode()
            )
            producer.poll(0)
            time.sleep(0.1)
        producer.flush(30)
        deadline = time.time() + 600
        while (
            len({u for u, _ in seen["inapp.marketing"]}) < campaign + len(warm)
            or len({u for u, _ in seen["inapp.transactional"]} & set(sent)) < probes
        ):
            if time.time() > deadline or flow.poll() is not None:
                raise SystemExit(f"not everything arrived; see {home / 'fanout.log'}")
            time.sleep(0.2)
    finally:
        stop.set()
        if reader.is_alive():
            reader.join(5)
        if flow is not None:
            stop_fanfare(flow)
        devstack.stop_broker(settings)
        client = redis.Redis.from_url(settings.redis_url)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        shutil.rmtree(home, ignore_errors=True)
    arrived = {u: t for u, t in seen["inapp.transactional"] if u in sent}
    latency = [(arrived[u] - sent[u]) * 1000 for u in sent]
    marketing = [t for u, t in seen["inapp.marketing"] if not u.startswith("w")]
    during = sum(1 for u in sent if arrived[u] < max(marketing))
    drain = max(max(marketing) - min(marketing), 1e-9)
    print(
        f"broker: a {campaign:,}-message campaign drained in {drain:.1f} s "
        f"({campaign / drain:,.0f} recipients/s); {probes} "
        f"transactional probes, {during} of them while it drained: publish -> batch p50 "
        f"{_percentile(latency, 0.5):.0f} ms, p99 {_percentile(latency, 0.99):.0f} ms, max "
        f"{max(latency):.0f} ms"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the in-process parts, or the broker part, and print their figures."""
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.notify", description=__doc__)
    parser.add_argument("--recipients", type=whole_number(1000), default=100_000)
    parser.add_argument("--backlog", type=whole_number(1000), default=100_000)
    parser.add_argument("--shards", type=whole_number(1), default=4)
    parser.add_argument("--broker", action="store_true", help="run part 3 (the real flow)")
    parser.add_argument("--campaign", type=whole_number(1), default=200_000)
    parser.add_argument("--probes", type=whole_number(1), default=50)
    args = parser.parse_args(argv)
    if args.broker:
        on_broker(args.campaign, args.probes)
        return
    decisions(args.recipients)
    isolation(args.backlog, args.shards)


if __name__ == "__main__":
    main()
