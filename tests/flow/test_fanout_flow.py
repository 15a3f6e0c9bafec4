"""The whole fan-out graph with Bytewax's TestingSource/TestingSink, on one and two workers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

from flows.fanout import build_fanout_flow
from operators.config import Settings
from operators.events import CaughtUp, RawEvent
from schemas.records import DeadLetter, DispatchBatch
from tests.fakes import InMemoryFollowerStore, InMemoryPostClaims

TS = "2026-06-01T12:00:00Z"
NOON = datetime(2026, 6, 1, 12, tzinfo=UTC)
PARTS = ["follow_changes/0", "preference_changes/0", "device_changes/0"]


class Events:
    """Builds RawEvents with increasing offsets per topic."""

    def __init__(self) -> None:
        self.offsets: dict[str, int] = {}

    def __call__(self, topic: str, body: dict[str, Any] | bytes) -> RawEvent:
        off = self.offsets.get(topic, 0)
        self.offsets[topic] = off + 1
        value = body if isinstance(body, bytes) else orjson.dumps(body)
        return RawEvent(topic, 0, off, None, value, read_at=1.0)


def post(pid: str, author: str, **extra: Any) -> dict[str, Any]:
    return {
        "event_type": "post_created",
        "post_id": pid,
        "author_id": author,
        "visibility": "public",
        "created_at": TS,
        **extra,
    }


def follow(author: str, follower: str, **extra: Any) -> dict[str, Any]:
    return {"author_id": author, "follower_id": follower, "op": "follow", "ts": TS, **extra}


def device(user: str, dev: str, provider: str = "apns", active: bool = True) -> dict[str, Any]:
    return {
        "user_id": user,
        "device_id": dev,
        "provider": provider,
        "token": ("ab" * 32) if provider == "apns" else "f" * 48,
        "active": active,
        "ts": TS,
    }


def prefs(user: str, **extra: Any) -> dict[str, Any]:
    return {"user_id": user, "timezone": "UTC", "ts": TS, **extra}


def scenario() -> tuple[list[Any], list[Any], set[tuple[str, str, str]], list[str]]:
    """A little world with every rule of the trust contract in it."""
    e = Events()
    changes: list[Any] = [
        e("follow_changes", follow("alice", "bob")),
        e("follow_changes", follow("alice", "carol")),
        e("follow_changes", follow("alice", "dave", notify_on_post=False)),
        e("follow_changes", follow("alice", "erin", muted=True)),
        e("follow_changes", follow("alice", "frank")),
        e("follow_changes", follow("alice", "alice")),
        e("follow_changes", follow("alice", "gina")),
        e("follow_changes", {**follow("alice", "gina"), "op": "unfollow"}),
        e("follow_changes", follow("alice", "hank")),
        e("follow_changes", follow("alice", "ivan")),
        e("follow_changes", follow("zed", "bob")),
        e("device_changes", device("bob", "bob-phone", "apns")),
        e("device_changes", device("bob", "bob-tablet", "fcm")),
        e("device_changes", device("carol", "carol-phone", "fcm")),
        e("device_changes", device("dave", "dave-phone")),
        e("device_changes", device("erin", "erin-phone")),
        e("device_changes", device("frank", "frank-phone")),
        e("device_changes", device("alice", "alice-phone")),
        e("device_changes", device("gina", "gina-phone")),
        e("device_changes", device("ivan", "ivan-old")),
        e("device_changes", device("ivan", "ivan-old", active=False)),
        e("preference_changes", prefs("frank", push_enabled=False)),
        # hank is in quiet hours (11-13 UTC) at noon: deferred, never dropped.
        e("device_changes", device("hank", "hank-phone")),
        e("preference_changes", prefs("hank", quiet_hours_start=11, quiet_hours_end=13)),
        # Malformed changelog events of each kind.
        e("follow_changes", b"{oops"),
        e("preference_changes", orjson.dumps(prefs("x", timezone="Nowhere/City"))),
        e("device_changes", orjson.dumps(device("x", "d", "webpush"))),
    ]
    changes += [CaughtUp(p, 1e12) for p in PARTS]
    posts = [
        e("post_created", post("p1", "alice")),
        e("post_created", post("p1", "alice")),  # duplicate event of the same post
        e("post_created", post("p2", "alice", visibility="private")),
        e("post_created", post("p3", "alice", notify_followers=False)),
        e("post_created", post("p4", "zed", visibility="followers")),
        e("post_created", post("p5", "nobody")),
        e("post_created", b"not json"),
        e("post_created", orjson.dumps(post("p6", "alice", visibility="secret"))),
        e("post_created", orjson.dumps({"post_id": "p7"})),
    ]
    expected = {
        ("p1", "bob", "bob-phone"),
        ("p1", "bob", "bob-tablet"),
        ("p1", "carol", "carol-phone"),
        ("p4", "bob", "bob-phone"),
        ("p4", "bob", "bob-tablet"),
    }
    dead_sources = [
        "follow_changes",
        "preference_changes",
        "device_changes",
        "post_created",
        "post_created",
        "post_created",
    ]
    return changes, posts, expected, dead_sources


def build(
    changes: list[Any],
    posts: list[Any],
    out: list[Any],
    dead: list[Any],
    clock: Callable[[], datetime] = lambda: NOON,
    on_loaded: Callable[[], object] | None = None,
    store: InMemoryFollowerStore | None = None,
    celebrity_threshold: int = 10_000,
) -> Any:
    settings = Settings(
        shard_count=4,
        dispatch_batch_size=2,
        follower_page_size=3,
        expand_budget=5,
        celebrity_threshold=celebrity_threshold,
    )
    shards_store = store or InMemoryFollowerStore(4)
    claims = InMemoryPostClaims()
    return build_fanout_flow(
        settings,
        post_source=TestingSource(posts),
        changelog_source=TestingSource(changes),
        changelog_parts=PARTS,
        channel_sink=TestingSink(out),
        route_batch=lambda b: b.topic,
        dead_letter_sink=TestingSink(dead),
        store=lambda: shards_store,
        claims=lambda: claims,
        clock=clock,
        on_loaded=on_loaded,
    )


def items(out: list[tuple[str, DispatchBatch]]) -> list[tuple[str, str, str]]:
    got = []
    for key, batch in out:
        assert key == batch.topic
        assert 1 <= len(batch.items) <= 2
        got += [(batch.post_id, i["user_id"], i["device_id"]) for i in batch.items]
    return got


@pytest.mark.parametrize("workers", [1, 2])
def test_scenario_exact_dispatch_set(workers: int) -> None:
    changes, posts, expected, dead_sources = scenario()
    out: list[Any] = []
    keyed_dead: list[tuple[str, DeadLetter]] = []
    flow = build(changes, posts, out, keyed_dead)
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=2)
    assert all(k == d.source_topic for k, d in keyed_dead)  # keyed by source topic
    dead = [d for _, d in keyed_dead]
    got = items(out)
    assert sorted(got) == sorted(expected)  # exact, and no duplicates
    assert {b.topic for _, b in out} == {"push.apns", "push.fcm"}
    assert sorted(d.source_topic for d in dead) == sorted(dead_sources)
    reasons = {d.error.split(":")[0] for d in dead}
    assert reasons == {"invalid_json", "unknown_timezone", "schema"}
    assert all(d.raw and d.offset is not None for d in dead)


def test_post_overtaking_its_followers_changelog_waits_for_catch_up() -> None:
    # The post is read before the follow and device changes that were written before it;
    # nothing may fan out until the changelogs have been read to their end.
    e = Events()
    changes: list[Any] = [
        TestingSource.PAUSE(__import__("datetime").timedelta(milliseconds=300)),
        e("follow_changes", follow("alice", "bob")),
        e("device_changes", device("bob", "bob-phone")),
        *[CaughtUp(p, 1e12) for p in PARTS],
    ]
    posts = [e("post_created", post("p1", "alice"))]
    out: list[Any] = []
    run_main(build(changes, posts, out, []))
    assert items(out) == [("p1", "bob", "bob-phone")]


class ColumnThreads(InMemoryFollowerStore):
    """Records the thread of every follower column read."""

    def __init__(self) -> None:
        super().__init__(4)
        self.threads: list[int] = []

    def follower_column(self, author_id: str, shard_id: int) -> Any:
        self.threads.append(threading.get_ident())
        return super().follower_column(author_id, shard_id)


def test_a_celebrity_post_s_columns_are_read_ahead_beside_the_worker() -> None:
    e = Events()
    fans = [f"fan{i}" for i in range(12)]
    changes: list[Any] = [
        *[e("follow_changes", follow("star", f)) for f in fans],
        *[e("device_changes", device(f, f"{f}-phone")) for f in fans],
        *[CaughtUp(p, 1e12) for p in PARTS],
    ]
    # The post comes after the follows were applied, so the planner puts it on the bulk lane.
    posts = [
        TestingSource.PAUSE(timedelta(milliseconds=300)),
        e("post_created", post("p1", "star")),
    ]
    out: list[Any] = []
    store = ColumnThreads()
    run_main(build(changes, posts, out, [], store=store, celebrity_threshold=5))
    assert sorted(items(out)) == sorted(("p1", f, f"{f}-phone") for f in fans)
    assert {b.lane for _, b in out} == {"bulk"}
    assert store.threads and threading.get_ident() not in store.threads


def test_the_process_hears_once_when_all_its_shards_have_caught_up() -> None:
    # Its freed memory goes back to the OS then (flows/fanout.py's get_flow).
    e = Events()
    calls: list[int] = []
    changes: list[Any] = [
        e("follow_changes", follow("alice", "bob")),
        *[CaughtUp(p, 1e12) for p in PARTS[:-1]],
        TestingSource.PAUSE(__import__("datetime").timedelta(milliseconds=100)),
        *[CaughtUp(p, 1e12) for p in PARTS[-1:]],
        *[CaughtUp(p, 2e12) for p in PARTS],  # later markers change nothing
    ]
    out: list[Any] = []
    run_main(build(changes, [], out, [], on_loaded=lambda: calls.append(len(calls))))
    assert calls == [0]


class BrokenFollowerStore(InMemoryFollowerStore):
    def follower_page(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("follower store gone")


def test_a_step_s_error_is_logged_once_with_the_step_s_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In a cluster Bytewax prints no Python error, only "Send thread panic"."""
    e = Events()
    changes: list[Any] = [
        e("follow_changes", follow("alice", "bob")),
        e("device_changes", device("bob", "bob-phone")),
        *[CaughtUp(p, 1e12) for p in PARTS],
    ]
    settings = Settings(shard_count=4, dispatch_batch_size=2, follower_page_size=3, expand_budget=5)
    store = BrokenFollowerStore(4)
    claims = InMemoryPostClaims()
    flow = build_fanout_flow(
        settings,
        post_source=TestingSource([e("post_created", post("p1", "alice"))]),
        changelog_source=TestingSource(changes),
        changelog_parts=PARTS,
        channel_sink=TestingSink([]),
        route_batch=lambda b: b.topic,
        dead_letter_sink=TestingSink([]),
        store=lambda: store,
        claims=lambda: claims,
        clock=lambda: NOON,
    )
    with (
        caplog.at_level(logging.ERROR),
        pytest.raises(RuntimeError, match="expand_follower_shards"),
    ):
        run_main(flow)
    logged = logged_step_errors(caplog.records)
    assert len(logged) == 1 and logged[0].startswith("fanout.expand_follower_shards.on_"), logged
    assert "RuntimeError: follower store gone" in logged[0]


def logged_step_errors(records: Sequence[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.name == "flows.runtime.step_errors"]
