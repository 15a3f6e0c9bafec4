"""Redis and the broker restarted under running flows.

- Redis killed in the middle of a delivery and started again EMPTY (no persistence) after 4.5 s:
  the delivery flow rides it out in the same process (edge claims skip their fast path, the
  rate limiter paces each worker on a local bucket at a quarter of the rate), every device gets
  exactly one push at the provider (copies of sent pushes, published during the outage and
  after the restart, are refused by the notification store), nothing is lost, and the sends
  per second during the outage stay within the local bucket, above zero.
- Redis down while posts arrive at the fan-out: post claims wait for it (bounded backoff) and
  the posts are fanned out once when it is back, in the same process.
- The embedded broker (memory only) stopped under a running fan-out and started again, empty,
  on the same port, and posts published at once: the readers notice that the topics were
  re-created (their topic ids changed; their offsets alone cannot tell, as the new posts take
  the old offsets), say so and resume at the beginning, and the new posts are fanned out
  exactly once by the same process.
- A fan-out started from snapshots after the broker lost its data, with the new post already
  at an offset the snapshot had passed: the snapshots carry each log's topic id, so the readers
  see the logs are new and start at their beginning.

Each test runs its own redis-server on a free port (`--save "" --appendonly no`), never the
shared one.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.runtime.ports import free_port
from operators.adapters.kafka.admin import create_topics, list_topics
from scripts.dev import devstack
from tests.conftest import Providers, Stack, wait_for
from tests.integration.test_delivery_e2e import apns_token, publish, wait_terminal
from tests.integration.test_fanout_e2e import device, follow, post
from tests.integration.test_fanout_e2e import publish as publish_topic
from tests.unit.test_redis_outage import OwnRedis

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_S = 3.0  # Redis is started again (empty) this long after it was killed
REDIS_OUTAGE_S = 4.5  # the same under delivery: long enough to measure the local pace


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(free_port(), tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def full_log(stack: Stack) -> str:
    """Every flow log of the test, whole (Stack.flow_log keeps only each one's end)."""
    home = Path(stack.env["FANFARE_HOME"])
    return "\n".join(p.read_text(errors="replace") for p in sorted(home.glob("flow-*.log")))


def _per_second(times: list[float], start: float, stop: float) -> list[int]:
    """Sends in each whole second of [start, stop)."""
    buckets = [0] * max(0, int(stop - start))
    for t in times:
        i = int(t - start)
        if start <= t < stop and i < len(buckets):
            buckets[i] += 1
    return buckets


def test_redis_restarted_empty_mid_delivery_no_duplicate_none_lost_local_pace(
    stack: Stack, providers: Providers, own_redis: OwnRedis
) -> None:
    rng = random.Random(61)
    ctl = providers.control
    n_bulk, n_late, n_dup, n_tail = 1_000, 100, 100, 20
    n = n_bulk + n_late + n_tail
    rate_per_s = 100.0  # FANFARE_APNS_RATE_PER_MIN=6000
    local_rate = rate_per_s / 4  # the local bucket while Redis is unreachable
    burst_s = 1.0  # FANFARE_RATE_BURST_MS=1000: the shared bucket holds 100, the local one 25
    local_capacity = local_rate * burst_s
    items = [(f"u{i}", "ios", apns_token(rng)) for i in range(n_bulk)]
    publish(stack, "apns", "p-redis", items, lane="bulk")
    flow = stack.start_flow(
        ("FANFARE_REDIS_URL", own_redis.url),
        ("FANFARE_APNS_RATE_PER_MIN", str(int(rate_per_s * 60))),
        ("FANFARE_RATE_BURST_MS", str(int(burst_s * 1000))),
        flow="delivery",
    )
    wait_for(
        lambda: ctl.stats()["apns"]["accepted"] >= 300, 90, "sends under way", stack, every_s=0.1
    )
    assert own_redis.client().dbsize() > 0, "the flow did not use this test's Redis"
    sent_before = {r.token for r in ctl.accepted("apns")}
    assert len(sent_before) >= 2 * n_dup
    sent_items = [i for i in items if i[2] in sent_before]
    killed_at = time.time()
    own_redis.kill()
    # Fresh items while Redis is away: their edge claims meet the outage.
    late = [(f"v{i}", "ios", apns_token(rng)) for i in range(n_late)]
    publish(stack, "apns", "p-late", late)
    # Copies of pushes already sent, in new messages (another identity) on the normal lane:
    # their edge claims are skipped now, and gone with Redis' data after the restart, so only
    # the notification store's unique key stands between them and a second push.
    publish(stack, "apns", "p-redis", sent_items[:n_dup])
    time.sleep(max(0.0, killed_at + REDIS_OUTAGE_S - time.time()))
    restarted_at = time.time()
    own_redis.start()  # empty: no RDB, no AOF
    publish(stack, "apns", "p-redis", sent_items[n_dup : 2 * n_dup])
    # Fresh items behind the last copies (same key, same partition): when they are done, the
    # copies before them were decided.
    tail = [(f"w{i}", "ios", apns_token(rng)) for i in range(n_tail)]
    publish(stack, "apns", "p-redis", tail)
    outcomes = wait_terminal(stack, n, 180)
    finished_at = time.time()

    # Nothing lost: every item reached exactly one terminal outcome, and it is `accepted`.
    assert len(outcomes) == n
    assert all(v == ["accepted"] for v in outcomes.values()), Counter(
        tuple(v) for v in outcomes.values()
    )
    # No duplicate: one push per device at the provider. No repeat at all: the apns-id is
    # derived from (notification, device), so a copy would carry the same one, and with no
    # crash here there is no interrupted send to excuse a resend.
    records = ctl.accepted("apns")
    per_device = Counter((r.token, r.notification_id) for r in records)
    assert len(per_device) == n
    repeats = [k for k, c in per_device.items() if c > 1]
    assert not repeats, f"{len(repeats)} devices pushed twice, e.g. {repeats[:3]}"

    # Rode it out: the same process, never restarted by the supervisor.
    log = full_log(stack)
    assert flow.poll() is None, log
    assert "restarting in" not in log, log
    assert "rate limiter (pacing on a local bucket" in log, log
    assert "edge claims (skipped: the store decides): Redis unreachable" in log, log

    # The pace during the outage: the local bucket (a quarter of the rate, a quarter of the
    # burst). Measured from 1 s after the kill (sends Redis granted before it finish first)
    # to the restart: at most a full local bucket plus its refill, with half a second more
    # refill for sends granted just before the window and received in it.
    times = sorted(r.time for r in records)
    start, stop = killed_at + 1.0, restarted_at
    during = [t for t in times if start <= t < stop]
    allowed = local_capacity + local_rate * (stop - start + 0.5)
    outage_rate = len(during) / (stop - start)
    before = [t for t in times if killed_at - 2.0 <= t < killed_at]
    print(
        f"\nsends/s: before the kill {len(before) / 2.0:.1f}, during the outage "
        f"{outage_rate:.1f} ({len(during)} in {stop - start:.2f} s, at most {allowed:.0f}; "
        f"configured {rate_per_s:.0f}/s, local bucket {local_rate:.0f}/s), repeats {len(repeats)}"
    )
    half_seconds = [0] * 2 * int(REDIS_OUTAGE_S + 6)
    for t in times:
        i = int((t - killed_at + 2.0) * 2)
        if 0 <= i < len(half_seconds):
            half_seconds[i] += 1
    print(f"sends per half second from 2 s before the kill: {half_seconds}")
    assert len(during) <= allowed, (len(during), allowed)  # paced, not open
    assert outage_rate >= local_rate * 0.4, "delivery stalled during the outage"  # not closed
    # Back on the shared bucket after the restart: the first second above the local rate.
    seconds = _per_second(times, restarted_at, finished_at)
    print(f"sends per second after the restart: {seconds[:8]}")
    recovered = next((i for i, c in enumerate(seconds) if c > local_rate * 1.6), None)
    assert recovered is not None and recovered <= 5, seconds
    print(f"back to the shared rate within {recovered + 1} s of Redis' restart")


# --- the fan-out ---------------------------------------------------------------------------------

FOLLOWERS = [f"f{i:02d}" for i in range(20)]


def seed_followers(stack: Stack) -> None:
    """alice's 20 followers, each with one device (half APNs, half FCM)."""
    publish_topic(stack, "follow_changes", [("alice", follow("alice", f)) for f in FOLLOWERS])
    publish_devices(stack)


def publish_devices(stack: Stack) -> None:
    publish_topic(
        stack,
        "device_changes",
        [(f, device(f, f + "-d", "apns" if i % 2 else "fcm")) for i, f in enumerate(FOLLOWERS)],
    )


def pushes(stack: Stack, post_id: str) -> Counter[tuple[str, str]]:
    return Counter((i[2], i[3]) for i in stack.dispatch_items() if i[1] == post_id)


def expected_pushes() -> Counter[tuple[str, str]]:
    return Counter((f, f + "-d") for f in FOLLOWERS)


def test_fanout_waits_for_redis_and_fans_out_once(stack: Stack, own_redis: OwnRedis) -> None:
    """Post claims are the dedupe authority: a post read while Redis is down waits for it."""
    seed_followers(stack)
    publish_topic(stack, "post_created", [("alice", post("p1", "alice"))])
    flow = stack.start_flow(("FANFARE_REDIS_URL", own_redis.url))
    wait_for(lambda: pushes(stack, "p1") == expected_pushes(), 120, "p1 fanned out", stack)
    own_redis.kill()
    publish_topic(stack, "post_created", [("alice", post("p2", "alice"))])
    time.sleep(OUTAGE_S)
    assert not pushes(stack, "p2"), "p2 went through without its claim"
    restarted_at = time.monotonic()
    own_redis.start()  # empty
    wait_for(lambda: pushes(stack, "p2") == expected_pushes(), 60, "p2 fanned out", stack, 0.2)
    print(f"\np2 fanned out {time.monotonic() - restarted_at:.1f} s after Redis came back")
    # Its claim was written after the restart: a duplicate post_created is dropped.
    publish_topic(stack, "post_created", [("alice", post("p2", "alice"))])
    time.sleep(4)
    assert pushes(stack, "p2") == expected_pushes()
    assert pushes(stack, "p1") == expected_pushes()
    log = full_log(stack)
    assert flow.poll() is None and "restarting in" not in log, log
    assert "post claims: Redis unreachable" in log and "post claims: Redis answers again" in log


def test_broker_restarted_empty_under_a_running_fanout(stack: Stack, own_redis: OwnRedis) -> None:
    """The same process resumes: readers rewind from offsets past the new partitions' ends."""
    seed_followers(stack)
    publish_topic(stack, "post_created", [("alice", post("p1", "alice"))])
    flow = stack.start_flow(("FANFARE_REDIS_URL", own_redis.url))
    wait_for(lambda: pushes(stack, "p1") == expected_pushes(), 120, "p1 fanned out", stack)
    time.sleep(2)  # a snapshot or two with the offsets past p1 and the changelogs
    stopping = time.monotonic()
    devstack.stop_broker(stack.settings)
    stopped = time.monotonic()
    time.sleep(3)
    devstack.start_broker(stack.settings)  # the same port, memory only: every topic is gone
    create_topics(stack.settings)  # at once: a producer that reconnects first auto-creates
    back = time.monotonic()
    assert set(list_topics(stack.settings).values()) == {2}, list_topics(stack.settings)
    assert stack.count_messages(("post_created", "follow_changes", "push.apns", "push.fcm")) == 0
    # p1's old offset 0 now holds p2: a reader that stayed at offset 1 would skip it.
    publish_topic(
        stack, "post_created", [("alice", post("p2", "alice")), ("alice", post("p3", "alice"))]
    )
    wait_for(
        lambda: pushes(stack, "p2") == pushes(stack, "p3") == expected_pushes(),
        120,
        "p2 and p3 fanned out after the broker restart",
        stack,
        0.2,
    )
    resumed = time.monotonic()
    time.sleep(4)  # a duplicate would show up now
    assert pushes(stack, "p2") == pushes(stack, "p3") == expected_pushes()  # exactly once
    assert not pushes(stack, "p1")  # gone with the broker, and not fanned out again
    log = full_log(stack)
    assert flow.poll() is None and "restarting in" not in log, log  # the same process
    assert "the topic was re-created" in log, log  # noticed by the topic id, not by offsets
    print(
        f"\nbroker stop took {stopped - stopping:.1f} s, down {back - stopped:.1f} s; new posts "
        f"fanned out {resumed - back:.1f} s after the topics were re-created"
    )


def test_fanout_started_after_the_broker_lost_its_data(stack: Stack, own_redis: OwnRedis) -> None:
    """A flow (re)started from snapshots whose offsets the broker no longer has."""
    seed_followers(stack)
    publish_topic(stack, "post_created", [("alice", post("p1", "alice"))])
    env = ("FANFARE_REDIS_URL", own_redis.url)
    first = stack.start_flow(env)
    wait_for(lambda: pushes(stack, "p1") == expected_pushes(), 120, "p1 fanned out", stack)
    time.sleep(2)
    stack.kill_flow(first)  # kill -9, as the supervisor's restart would find it
    devstack.stop_broker(stack.settings)
    devstack.start_broker(stack.settings)
    create_topics(stack.settings)
    # The changelogs went with the broker: the devices are published again (follow edges
    # live in the follower store); then a new post.
    publish_devices(stack)
    publish_topic(stack, "post_created", [("alice", post("p2", "alice"))])
    started = time.monotonic()
    second = stack.start_flow(env)
    wait_for(lambda: pushes(stack, "p2") == expected_pushes(), 180, "p2 fanned out", stack, 0.2)
    took = time.monotonic() - started
    time.sleep(4)
    assert pushes(stack, "p2") == expected_pushes()
    log = full_log(stack)
    assert second.poll() is None, log
    assert "post_created/0: the topic was re-created" in log, log  # by the snapshot's topic id
    print(f"\np2 fanned out {took:.1f} s after the flow was started again")
