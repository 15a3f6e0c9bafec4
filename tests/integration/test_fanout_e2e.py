"""The fan-out flow as users run it (`fanfare run fanout`) on the real broker and Redis."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from operators.adapters.kafka.writer import produce_all
from operators.adapters.stores.sqlite_followers import SQLiteFollowerStore
from schemas.topics import CHANNEL_TOPICS
from tests.conftest import Stack, wait_for

pytestmark = pytest.mark.integration

TS = "2026-06-01T12:00:00Z"


def post(pid: str, author: str, **extra: Any) -> bytes:
    return orjson.dumps(
        {
            "event_type": "post_created",
            "post_id": pid,
            "author_id": author,
            "visibility": "public",
            "created_at": TS,
            **extra,
        }
    )


def follow(author: str, follower: str, **extra: Any) -> bytes:
    return orjson.dumps(
        {"author_id": author, "follower_id": follower, "op": "follow", "ts": TS, **extra}
    )


def device(user: str, dev: str, provider: str = "apns", active: bool = True) -> bytes:
    token = ("0a" * 32) if provider == "apns" else "fcmtoken_" + "x" * 140
    return orjson.dumps(
        {
            "user_id": user,
            "device_id": dev,
            "provider": provider,
            "token": token,
            "active": active,
            "ts": TS,
        }
    )


def prefs(user: str, **extra: Any) -> bytes:
    return orjson.dumps({"user_id": user, "timezone": "UTC", "ts": TS, **extra})


def publish(stack: Stack, topic: str, messages: list[tuple[str, bytes]]) -> None:
    produce_all(stack.settings.kafka_config(), topic, [(k.encode(), v) for k, v in messages])


def quiet_window_now() -> tuple[int, int]:
    """Quiet hours (UTC) that contain the current hour, for a user who is asleep right now."""
    hour = time.gmtime().tm_hour
    return hour, (hour + 2) % 24


def test_scenario_exact_set_and_dead_letters(stack: Stack) -> None:
    start, end = quiet_window_now()
    publish(
        stack,
        "follow_changes",
        [
            ("alice", follow("alice", "bob")),
            ("alice", follow("alice", "carol")),
            ("alice", follow("alice", "dave", notify_on_post=False)),
            ("alice", follow("alice", "erin", muted=True)),
            ("alice", follow("alice", "frank")),
            ("alice", follow("alice", "alice")),
            ("alice", follow("alice", "gina")),
            (
                "alice",
                orjson.dumps(
                    {"author_id": "alice", "follower_id": "gina", "op": "unfollow", "ts": TS}
                ),
            ),
            ("alice", follow("alice", "hank")),
            ("alice", follow("alice", "ivan")),
            ("alice", follow("alice", "nodevice")),
            ("zed", follow("zed", "bob")),
            ("zed", b'{"author_id": "zed"}'),
        ],
    )
    publish(
        stack,
        "device_changes",
        [
            ("bob", device("bob", "bob-phone", "apns")),
            ("bob", device("bob", "bob-tablet", "fcm")),
            ("carol", device("carol", "carol-phone", "fcm")),
            ("dave", device("dave", "dave-phone")),
            ("erin", device("erin", "erin-phone")),
            ("frank", device("frank", "frank-phone")),
            ("alice", device("alice", "alice-phone")),
            ("gina", device("gina", "gina-phone")),
            ("hank", device("hank", "hank-phone")),
            ("ivan", device("ivan", "ivan-old")),
            ("ivan", device("ivan", "ivan-old", active=False)),
            (
                "x",
                orjson.dumps(
                    {
                        "user_id": "x",
                        "device_id": "d",
                        "provider": "apns",
                        "token": "zz",
                        "active": True,
                        "ts": TS,
                    }
                ),
            ),
        ],
    )
    publish(
        stack,
        "preference_changes",
        [
            ("frank", prefs("frank", push_enabled=False)),
            ("hank", prefs("hank", quiet_hours_start=start, quiet_hours_end=end)),
            ("x", prefs("x", timezone="Atlantis/Capital")),
            ("y", prefs("y", quiet_hours_start=25, quiet_hours_end=3)),
        ],
    )
    publish(
        stack,
        "post_created",
        [
            ("alice", post("p1", "alice")),
            ("alice", post("p1", "alice")),  # duplicate post_created
            ("alice", post("p2", "alice", visibility="private")),
            ("alice", post("p3", "alice", notify_followers=False)),
            ("zed", post("p4", "zed", visibility="followers")),
            ("alice", b"\xff\xfe not json"),
            ("alice", post("p5", "alice", visibility="everyone")),
            ("alice", orjson.dumps({"event_type": "post_created", "post_id": "p6"})),
            ("alice", orjson.dumps([1, 2, 3])),
        ],
    )
    expected = {
        ("push.apns", "p1", "bob", "bob-phone", "p1:bob"),
        ("push.fcm", "p1", "bob", "bob-tablet", "p1:bob"),
        ("push.fcm", "p1", "carol", "carol-phone", "p1:carol"),
        ("push.apns", "p4", "bob", "bob-phone", "p4:bob"),
        ("push.fcm", "p4", "bob", "bob-tablet", "p4:bob"),
    }
    stack.start_flow()
    wait_for(
        lambda: len(stack.dispatch_items()) >= len(expected) and len(stack.dead_letters()) >= 8,
        90,
        "the fan-out",
        stack,
    )
    time.sleep(3)  # anything extra (a duplicate, hank's deferred push) would show up now
    items = stack.dispatch_items()
    assert Counter(items) == Counter(expected)  # the exact set, each once
    dead = stack.dead_letters()
    by_topic = Counter(d["source_topic"] for d in dead)
    assert by_topic == {
        "follow_changes": 1,
        "device_changes": 1,
        "preference_changes": 2,
        "post_created": 4,
    }
    for d in dead:
        assert d["error"] and d["offset"] is not None and d["partition"] is not None
    assert any(d["raw"].startswith("\\xff\\xfe") for d in dead)
    assert any("Atlantis/Capital" in d["error"] for d in dead)


def test_restart_mid_fanout_resumes_without_duplicates(stack: Stack) -> None:
    followers = [f"fan{i:06d}" for i in range(100_000)]
    store = SQLiteFollowerStore(
        stack.settings.resolved_store_url.removeprefix("sqlite:///"), stack.settings.shard_count
    )
    store.bulk_load(("celeb", f, 1) for f in followers)
    store.close()
    publish(
        stack,
        "device_changes",
        [(f, device(f, f + "-d", "apns" if i % 2 else "fcm")) for i, f in enumerate(followers)],
    )
    publish(stack, "post_created", [("celeb", post("big", "celeb"))])
    # Small pages and budgets slow the fan-out so that snapshots land in the middle of it (the
    # celebrity post's bulk expansion has its own budget).
    slow = (
        ("FANFARE_EXPAND_BUDGET", "10"),
        ("FANFARE_BULK_EXPAND_BUDGET", "10"),
        ("FANFARE_FOLLOWER_PAGE_SIZE", "10"),
    )
    watcher = stack.watch(CHANNEL_TOPICS)
    first = stack.start_flow(*slow)
    wait_for(lambda: watcher.poll() >= 20_000, 120, "the first pushes", stack, 0.01)
    stack.kill_flow(first)  # kill -9 the whole process group, mid-shard
    watcher.close()
    partial = len(stack.dispatch_items())
    print(f"killed after {partial} of {len(followers)} pushes")
    assert partial < len(followers), "the fan-out finished before the kill; make it slower"
    stack.start_flow(*slow)
    wait_for(
        lambda: len(stack.dispatch_items()) >= len(followers), 180, "the resumed fan-out", stack
    )
    time.sleep(3)
    items = stack.dispatch_items()
    counts = Counter((i[1], i[2], i[3]) for i in items)
    dupes = [k for k, n in counts.items() if n > 1]
    assert not dupes, f"{len(dupes)} duplicate pushes, e.g. {dupes[:3]}"
    assert set(counts) == {("big", f, f + "-d") for f in followers}
    assert {i[0] for i in items} == {"push.apns.bulk", "push.fcm.bulk"}


def test_restart_from_shard_checkpoints_reads_only_the_tail_and_is_exact(stack: Stack) -> None:
    """kill -9 after the shards checkpointed and after a tail of changes was applied in memory.

    The restart loads the checkpoints, reads each preference and device partition from the
    oldest checkpoint's position (not from the beginning), applies the tail once, and a post
    reaches exactly the state of the whole changelog: the same pushes, none twice.
    """
    users = [f"user{i:04d}" for i in range(600)]
    store = SQLiteFollowerStore(
        stack.settings.resolved_store_url.removeprefix("sqlite:///"), stack.settings.shard_count
    )
    store.bulk_load(("star", u, 1) for u in users)
    store.close()
    publish(stack, "device_changes", [(u, device(u, u + "-a", "apns")) for u in users])
    publish(stack, "preference_changes", [(u, prefs(u)) for u in users])
    # One checkpoint per shard, when it first catches up; none after (an hour's interval).
    env = ("FANFARE_CHECKPOINT_INTERVAL_S", "3600"), ("FANFARE_LOG_LEVEL", "INFO")
    first = stack.start_flow(*env)
    folder = stack.settings.shard_state_dir
    wait_for(
        lambda: len(list(folder.glob("shard-*.ckpt"))) == stack.settings.shard_count,
        120,
        "every shard's checkpoint",
        stack,
    )
    # The tail, applied in memory only: devices off, push off, second devices.
    publish(stack, "device_changes", [(u, device(u, u + "-a", active=False)) for u in users[:100]])
    publish(
        stack, "preference_changes", [(u, prefs(u, push_enabled=False)) for u in users[100:200]]
    )
    publish(stack, "device_changes", [(u, device(u, u + "-b", "fcm")) for u in users[200:300]])
    time.sleep(4)  # read and applied (the shards' gauges are caught up long since)
    stack.kill_flow(first)
    second = stack.start_flow(*env)
    publish(stack, "post_created", [("star", post("after", "star"))])
    expected = {("push.apns", "after", u, u + "-a") for u in users[200:]}
    expected |= {("push.fcm", "after", u, u + "-b") for u in users[200:300]}
    wait_for(
        lambda: len(stack.dispatch_items()) >= len(expected), 120, "the post after restart", stack
    )
    time.sleep(3)
    got = Counter((i[0], i[1], i[2], i[3]) for i in stack.dispatch_items())
    assert got == Counter(expected)  # exact, each once
    log = (Path(stack.env["FANFARE_HOME"]) / "flow-1.log").read_text(errors="replace")
    starts = re.findall(r"(?:preference|device)_changes/\d+: starting at offset (-?\d+)", log)
    assert len(starts) == 4 and all(int(offset) > 0 for offset in starts), starts
    assert second.poll() is None
