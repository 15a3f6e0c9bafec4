"""In-process benchmark of API notifications in the fan-out: no broker, no Redis.

    python -m scripts.bench.notify [--recipients 100000] [--backlog 100000] [--shards 4]

1. Decisions in one shard (`NotifyShard.work`, no Bytewax): `--recipients` users, each with an
   APNs device and an email address (a third with quiet hours outside their window and a
   locale), sent a transactional request per 1,000 of them on push, inbox and email: CPU
   seconds per recipient and dispatch items per second.
2. Tier isolation in the fan-out graph (Bytewax's TestingSource, one worker, `--shards`
   shards, the default FANFARE_EXPAND_BUDGET): a marketing backlog of `--backlog` recipients
   (in-app only) is read; once its first batch is written, one transactional request is read.
   Reported: read -> its batch written, and how much of the backlog was still waiting then.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from bytewax.testing import TestingSink, TestingSource, run_main

from flows.fanout import build_fanout_flow
from operators.config import Settings
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


def main(argv: Sequence[str] | None = None) -> None:
    """Run both parts and print their figures."""
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.notify", description=__doc__)
    parser.add_argument("--recipients", type=whole_number(1000), default=100_000)
    parser.add_argument("--backlog", type=whole_number(1000), default=100_000)
    parser.add_argument("--shards", type=whole_number(1), default=4)
    args = parser.parse_args(argv)
    decisions(args.recipients)
    isolation(args.backlog, args.shards)


if __name__ == "__main__":
    main()
