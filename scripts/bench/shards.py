"""In-process benchmark of the follower shards alone: no broker, no Bytewax, no JSON decoding.

    python -m scripts.bench.shards --users 10000000 [--shards 32] [--json out.json]
    python -m scripts.bench.shards --users 1000000 --post-cap 10 [--posts 3]
    python -m scripts.bench.shards --users 1000000 --store sqlite

It applies N users' preference and device changes (the mix of `scripts.bench.fanout`: 10% push
off, 20% quiet hours of which a quarter inside their window now; half APNs 64-hex tokens, half
FCM 152-character ones) to FANFARE_SHARDS shards, then measures what the full benchmark cannot
separate from the broker: RSS per user, a checkpoint of every shard written and loaded again
(`FileShardStateStore`), and one post of an author followed by everyone expanded by every
shard through its cached column, CPU seconds per candidate (decide + dispatch batches) and the
items checked against the seed. Used for the 10M and 20M figures in the README: the embedded
broker (Tansu, memory storage) stops answering offset requests with 20M changelog messages in
it, so the full benchmark cannot run there.

With `--post-cap N` the shards have FANFARE_POST_CAP=N: the report adds what the cap costs in
the decision (`cap_in_the_decision`: the celebrity's columns decided with no cap, under the cap
and over it, best of 7 rounds each, ns per candidate) and the summaries sent when the window
ends (CPU per summary). `--post-cap 1 --posts 3` bundles the second and third posts.

The first post is the cold one: each shard reads the author's followers from the store into its
cached column. `--store sqlite` puts the follow edges in a `SQLiteFollowerStore` (in `--dir`)
instead of the in-memory lists, so the cold post includes the real store's bulk read.
"""

from __future__ import annotations

import argparse
import base64
import functools
import gc
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from operators.adapters.stores.shard_state import FileShardStateStore
from operators.adapters.stores.sqlite_followers import SQLiteFollowerStore
from operators.events import CaughtUp
from operators.fanout.caps import CapRule, FrequencyCap
from operators.fanout.checkpoint import ShardCheckpointer
from operators.fanout.decide import decide_page
from operators.fanout.ports import FollowerRow, FollowerStore
from operators.fanout.prefetch import ColumnPrefetch
from operators.fanout.shard import (
    POST_CATEGORY,
    ChangelogEvent,
    FanoutTally,
    FollowerShard,
    ShardJob,
)
from operators.fanout.sharding import shard_of
from schemas.records import DeviceChange, FollowChange, PreferenceChange
from scripts.commands.arguments import whole_number

SOURCES = ("follow_changes/0", "preference_changes/0", "device_changes/0")
TS = datetime(2026, 1, 1, tzinfo=UTC)


def rss() -> int:
    """Resident bytes of this process."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class CelebrityFollowers(FollowerStore):
    """Everyone follows one author; pages in follower-id order, as the real stores give them."""

    def __init__(self, by_shard: list[list[str]]) -> None:
        self.shard_count = len(by_shard)
        self._by_shard = by_shard

    def apply_follow_changes(self, changes: Sequence[FollowChange]) -> None:
        """Not used."""

    def follower_page(
        self, author_id: str, shard_id: int, after: str | None, limit: int
    ) -> list[FollowerRow]:
        """The shard's followers after the cursor."""
        ids = self._by_shard[shard_id]
        lo = 0 if after is None else _after(ids, after)
        return [(f, 1) for f in ids[lo : lo + limit]]

    def follower_version(self, author_id: str, shard_id: int) -> int | None:
        """Edges never change here."""
        return 1

    def follow_flags(self, author_id: str, follower_id: str) -> int | None:
        """Everyone follows, notify on."""
        return 1

    def follower_count(self, author_id: str) -> int:
        """Everyone."""
        return sum(len(s) for s in self._by_shard)

    def bulk_load(self, edges: Iterable[tuple[str, str, int]]) -> int:
        """Not used."""
        return 0


def _after(ids: list[str], cursor: str) -> int:
    import bisect

    return bisect.bisect_right(ids, cursor)


def build(args: argparse.Namespace) -> tuple[list[FollowerShard], list[list[str]], int, float]:
    """Shards with N users applied; (shards, ids by shard, expected pushes, CPU seconds)."""
    rng = random.Random(args.seed)
    caps = CapRule(POST_CATEGORY, args.post_cap, args.cap_window_s)
    shards = [FollowerShard(SOURCES, settle_s=0, caps=caps) for _ in range(args.shards)]
    for shard in shards:
        for source in SOURCES:
            shard.note_caught_up(CaughtUp(source, 1e12))
    by_shard: list[list[str]] = [[] for _ in range(args.shards)]
    offsets = [0] * args.shards
    width = max(7, len(str(args.users - 1)))
    hour = datetime.now(UTC).hour
    inside, outside = ((hour - 3) % 24, (hour + 4) % 24), ((hour + 6) % 24, (hour + 12) % 24)
    expected = 0
    cpu = 0.0
    for i in range(args.users):
        uid = f"u{i:0{width}d}"
        s = shard_of(uid, args.shards)
        by_shard[s].append(uid)
        roll = rng.random()
        push = roll >= 0.10
        window = inside if roll >= 0.95 else outside if roll >= 0.80 else None
        if push and window is not inside:
            expected += 1
        if i % 2:
            provider, token = "apns", rng.randbytes(32).hex()
        else:
            raw = base64.urlsafe_b64encode(rng.randbytes(114)).decode()
            provider, token = "fcm", raw[:22] + ":" + raw[23:]
        pref = PreferenceChange(
            uid, push, window[0] if window else None, window[1] if window else None, "UTC", TS
        )
        dev = DeviceChange(uid, rng.randbytes(8).hex(), provider, token, True, TS)  # type: ignore[arg-type]
        t0 = time.process_time()
        shards[s].apply(ChangelogEvent(pref, s, "preference_changes/0", offsets[s], "p"))
        shards[s].apply(ChangelogEvent(dev, s, "device_changes/0", offsets[s], "d"))
        cpu += time.process_time() - t0
        offsets[s] += 1
    for shard in shards:
        shard.users.compact()
    for ids in by_shard:
        ids.sort()
    return shards, by_shard, expected, cpu


def _same(store: FollowerStore) -> FollowerStore:
    return store


def wait_at_the_gate(
    shards: list[FollowerShard], store: FollowerStore, post: str, gate_s: float, read_at: float
) -> float:
    """Queue the post's jobs behind a shut gate for `gate_s`, then open it; CPU meanwhile.

    As in the flow: each shard asks for its column as the job arrives (`ColumnPrefetch`) and
    builds it on the activations while the job waits (every 20 ms here).
    """
    for shard_id, shard in enumerate(shards):
        job = ShardJob(post, "celebrity", "2026-01-01T00:00:00Z", "bulk", read_at, shard_id)
        shard.add_job(job, 0, FanoutTally())
    c0 = time.process_time()
    until = time.perf_counter() + gate_s
    while time.perf_counter() < until:
        time.sleep(0.02)
        for shard in shards:
            shard.build_columns_ahead(lambda: store)
    for shard in shards:
        for source in SOURCES:
            shard.note_caught_up(CaughtUp(source, read_at + 1))
    return time.process_time() - c0


def fan_out(
    shards: list[FollowerShard], store: FollowerStore, post: str, queued: bool = False
) -> tuple[int, int, float, float]:
    """(items, batches, CPU seconds, wall seconds) of one post expanded by every shard.

    `queued`: the jobs are in the shards already (`wait_at_the_gate`).
    """
    now = datetime.now(UTC)
    items = batches = 0
    t0, w0 = time.process_time(), time.perf_counter()
    for shard_id, shard in enumerate(shards):
        if not queued:
            shard.add_job(
                ShardJob(post, "celebrity", "2026-01-01T00:00:00Z", "bulk", 0.0, shard_id),
                0,
                FanoutTally(),
            )
        while shard.jobs:
            for b in shard.expand(store, now, 2_000, FanoutTally(), bulk_budget=100_000):
                items += b.count
                batches += 1
    return items, batches, time.process_time() - t0, time.perf_counter() - w0


def cap_overhead(shards: list[FollowerShard], rule: CapRule, rounds: int = 7) -> dict[str, float]:
    """What a cap adds to deciding the celebrity's columns, in ns per candidate (best round).

    The same columns decided with no cap, under a cap (every push counted) and over it (every
    push bundled, by a new author each round), one after the other in each round, so the noise
    of a shared machine touches all three alike.
    """
    now = datetime.now(UTC)
    ts = now.timestamp()
    candidates = sum(len(c.rows) for s in shards for c in s.columns.values())
    best = {"no_cap": float("inf"), "under_cap": float("inf"), "over_cap": float("inf")}
    for k in range(rounds):
        for name in best:
            limit = 65_535 if name == "under_cap" else 1
            admits: list[Any] = []
            for shard in shards:
                if name == "no_cap":
                    admits.append(None)
                    continue
                cap = FrequencyCap(CapRule(rule.category, limit, 3_600))
                if name == "over_cap":  # everyone had their one push this window
                    cap.admit(np.arange(shard.users.rows, dtype=np.int32), "first", ts)
                admits.append(functools.partial(cap.admit, author_id=f"author{k}", now_ts=ts))
            t0 = time.process_time()
            for shard, admit in zip(shards, admits, strict=True):
                hours = shard.zone_hours.hours(shard.users.zones, now)
                for col in shard.columns.values():
                    decide_page(shard.users, col.rows, col.flags, -1, hours, now, admit)
            best[name] = min(best[name], time.process_time() - t0)
    return {
        "candidates": candidates,
        **{f"{n}_ns_per_candidate": round(v / candidates * 1e9, 1) for n, v in best.items()},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything, as a report."""
    if args.store == "memory":
        return _run(args, None)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        return _run(args, Path(folder) / "followers.db")


def _run(args: argparse.Namespace, sqlite_path: Path | None) -> dict[str, Any]:
    gc.collect()
    rss0 = rss()
    t0 = time.perf_counter()
    shards, by_shard, expected, apply_cpu = build(args)
    caps = shards[0].caps.rule if shards[0].caps is not None else None
    build_s = time.perf_counter() - t0
    ids_bytes = sum(sys.getsizeof(x) for ids in by_shard for x in ids) + sum(
        sys.getsizeof(ids) for ids in by_shard
    )
    gc.collect()
    rss1 = rss()
    store: FollowerStore = CelebrityFollowers(by_shard)
    if sqlite_path is not None:
        store = SQLiteFollowerStore(sqlite_path, args.shards)
        store.bulk_load(("celebrity", f, 1) for ids in by_shard for f in ids)
    report: dict[str, Any] = {
        "users": args.users,
        "shards": args.shards,
        "store": args.store,
        "build_s": round(build_s, 1),
        "apply_cpu_us_per_event": round(apply_cpu / (2 * args.users) * 1e6, 2),
        "rss_per_user_after_build": round((rss1 - rss0 - ids_bytes) / args.users),
    }
    posts = []
    prefetch = ColumnPrefetch(functools.partial(_same, store)) if args.gate_ms else None
    for shard in shards:
        shard.prefetch = prefetch
    for k in range(args.posts):
        gate_cpu = None
        if prefetch is not None:
            post_read_at = 2e12 + 10 * k  # after every changelog's end so far: the gate is shut
            gate_cpu = wait_at_the_gate(
                shards, store, f"celebrity-post-{k}", args.gate_ms / 1000, post_read_at
            )
        items, batches, cpu, wall = fan_out(
            shards, store, f"celebrity-post-{k}", queued=prefetch is not None
        )
        posts.append(
            {
                **(
                    {}
                    if gate_cpu is None
                    else {"cpu_s_at_the_gate (columns read and built ahead)": round(gate_cpu, 2)}
                ),
                "items": items,
                # Over the cap from the (cap + 1)th post on: every push joins its bundle.
                "expected": expected if k < args.post_cap or not args.post_cap else 0,
                "batches": batches,
                "cpu_s": round(cpu, 2),
                "wall_s": round(wall, 2),
                "cpu_us_per_candidate": round(cpu / args.users * 1e6, 3),
            }
        )
    if prefetch is not None:
        prefetch.close()
        for shard in shards:
            shard.prefetch = None
    report["post_cap"] = args.post_cap
    report["gate_ms"] = args.gate_ms
    report["posts (first builds the cached columns)"] = posts
    gc.collect()
    report["rss_per_user_with_columns"] = round((rss() - rss0 - ids_bytes) / args.users)
    if caps is not None:
        report["cap_in_the_decision"] = cap_overhead(shards, caps)
        # The window ends: one summary push per user over the cap (its devices, quiet hours).
        later = datetime.now(UTC) + timedelta(seconds=caps.window_s)
        tally = FanoutTally()
        t0 = time.process_time()
        summary_items = sum(
            len(b.items) for shard in shards for b in shard.send_summaries(later, tally)
        )
        cpu = time.process_time() - t0
        report["summaries"] = {
            "users": tally.summaries,
            "items": summary_items,
            "cpu_s": round(cpu, 2),
            "cpu_us_per_summary": (
                round(cpu / tally.summaries * 1e6, 2) if tally.summaries else None
            ),
        }
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        states = FileShardStateStore(
            Path(folder), args.shards, {"preference_changes": "p", "device_changes": "d"}.get
        )
        t0 = time.perf_counter()
        for shard_id, shard in enumerate(shards):
            ShardCheckpointer(states, shard_id, 60).save(shard)
            states.flush()
        report["checkpoint_write_s"] = round(time.perf_counter() - t0, 2)
        report["checkpoint_bytes_per_user"] = round(
            sum(p.stat().st_size for p in Path(folder).glob("*.ckpt")) / args.users
        )
        store.close()
        del shards, store, prefetch
        gc.collect()
        t0 = time.perf_counter()
        loaded = [FollowerShard(SOURCES, settle_s=0, caps=caps) for _ in range(args.shards)]
        for shard_id, shard in enumerate(loaded):
            ShardCheckpointer(states, shard_id, 60).load_into(shard)
        report["checkpoint_load_s"] = round(time.perf_counter() - t0, 2)
    gc.collect()
    report["rss_per_user_after_load_from_checkpoints"] = round(
        (rss() - rss0 - ids_bytes) / args.users
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Run and print the report (JSON)."""
    p = argparse.ArgumentParser(prog="python -m scripts.bench.shards", description=__doc__)
    p.add_argument("--users", type=whole_number(1, 50_000_000), default=10_000_000)
    p.add_argument("--shards", type=whole_number(1, 1024), default=32)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--posts", type=whole_number(1, 1000), default=2, help="celebrity posts")
    p.add_argument(
        "--post-cap",
        type=whole_number(0, 65_535),
        default=0,
        help="FANFARE_POST_CAP of the shards (default 0: no cap)",
    )
    p.add_argument(
        "--cap-window-s", type=whole_number(0, 7 * 86_400), default=3_600, help="the cap's window"
    )
    p.add_argument(
        "--store",
        choices=("memory", "sqlite"),
        default="memory",
        help="where the follow edges are (default: in-memory lists)",
    )
    p.add_argument(
        "--dir",
        default=None,
        help="where the checkpoints (and the SQLite store) go (a temporary folder)",
    )
    p.add_argument(
        "--gate-ms",
        type=whole_number(0, 60_000),
        default=0,
        help="each post's jobs first wait this long at a shut gate, while the shards read and "
        "build their columns ahead (ColumnPrefetch); its CPU, that of the reading threads too, "
        "is reported apart, the post's CPU and wall from the gate's opening (default 0: no "
        "gate, no read ahead)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
