"""`python -m scripts.harness.chaos` (`fanfare chaos`): what fanfare survives, with figures.

Each scenario runs on a fresh embedded stack (broker, topics, Redis prefix, FANFARE_HOME, local
APNs and FCM servers; `scripts/harness/chaos_stack.py`), injects one fault and counts, at the
provider servers, what was due, what was delivered, lost and repeated, and how long recovery took:

  crash-fanout    kill -9 the fan-out worker in the middle of a celebrity post's fan-out (the
                  supervisor restarts it from its recovery directory); delivery runs throughout
  crash-delivery  kill -9 the delivery worker in the middle of sending (APNs and FCM)
  cluster         the same scenario through `fanfare run fanout --processes 2` and
                  `--processes 1` (fresh homes): the dispatch sets must be identical
  apns-outage     APNs answers 503 for a while under steady traffic
  fcm-429         FCM answers 429 QUOTA_EXCEEDED with Retry-After above a low rate
  goaway          both providers send HTTP/2 GOAWAY every second with answers in flight
  slow-responses  APNs answers later than FANFARE_SEND_TIMEOUT_MS
  redis-restart   Redis killed under steady delivery and started again empty (no persistence)
  broker-restart  the embedded broker stopped under both flows and started again (empty: it
                  keeps memory only), new posts published at once

The reliability tests (`tests/reliability/`) run these same functions at the small scale and
assert that each comes back without problems. Everything a run starts is stopped at the end,
on Ctrl-C or SIGTERM too; temporary homes and Redis keys are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from operators.adapters.kafka.admin import create_topics
from operators.config import Settings, load_settings
from operators.fanout.eligibility import edge_flags
from schemas.topics import channel_topic
from scripts.dev import devstack
from scripts.dev.local_providers.control import AcceptedRecord
from scripts.harness.chaos_stack import (
    ChaosError,
    ChaosStack,
    CircuitSampler,
    DispatchCounter,
    FlowRun,
    Key,
    Outcomes,
    RedisServer,
    Tally,
    Traffic,
    iso,
    last_delivery,
    say,
    tally,
    token_for,
    wait_until,
)


@dataclass(frozen=True)
class Scale:
    """Sizes and settings of one run of the scenarios."""

    name: str
    crash_followers: int
    crash_fanout_env: Mapping[str, str]
    delivery_items: int
    cluster_users: int
    fault_s: float
    pre_s: float
    post_s: float
    rates: Mapping[str, int]
    flow_env: Mapping[str, str]
    stack_env: Mapping[str, str]
    send_timeout_ms: int
    crash_fcm_every: int = 5  # every 5th follower's device is on FCM, the others on APNs
    kill_at: float = 0.3  # kill once this share of the pushes is through
    wait_s: float = 300.0  # the longest wait for completion beyond what the size needs


# CI: fast retries and cooldowns, so a run fits in minutes on two shared cores.
SMALL = Scale(
    name="small",
    crash_followers=50_000,
    # Small pages and budgets slow the fan-out so the kill lands in the middle of it (the
    # celebrity post's bulk expansion has its own budget: without it, 50,000 are written in
    # well under a second, too quick to land a kill in).
    crash_fanout_env={
        "FANFARE_EXPAND_BUDGET": "10",
        "FANFARE_BULK_EXPAND_BUDGET": "10",
        "FANFARE_FOLLOWER_PAGE_SIZE": "10",
    },
    delivery_items=8_000,
    cluster_users=3_000,
    fault_s=5.0,
    pre_s=2.0,
    post_s=3.0,
    rates={"apns": 100, "fcm": 40},
    flow_env={
        "FANFARE_RETRY_BASE_MS": "200",
        "FANFARE_RETRY_MAX_BACKOFF_S": "2",
        "FANFARE_BREAKER_COOLDOWN_S": "1",
    },
    stack_env={},
    send_timeout_ms=1_000,
)
# The figures for the README: larger sizes, longer faults, the shipped retry and breaker
# settings, the shipped shard, partition and snapshot settings.
FULL = Scale(
    name="full",
    crash_followers=200_000,
    crash_fanout_env={"FANFARE_EXPAND_BUDGET": "10", "FANFARE_FOLLOWER_PAGE_SIZE": "10"},
    delivery_items=40_000,
    cluster_users=20_000,
    fault_s=30.0,
    pre_s=5.0,
    post_s=5.0,
    rates={"apns": 200, "fcm": 80},
    flow_env={},
    stack_env={
        "FANFARE_TOPIC_PARTITIONS": "4",
        "FANFARE_SHARDS": "32",
        "FANFARE_SNAPSHOT_INTERVAL_S": "5",
    },
    send_timeout_ms=2_000,
    wait_s=900.0,
)
SCALES = {"small": SMALL, "full": FULL}


@dataclass
class Result:
    """One scenario's figures and whatever went wrong."""

    scenario: str
    fault: str
    measured_at: str  # "providers" (accepted pushes) or "push.*" (dispatch items)
    counts: dict[str, int] = field(default_factory=dict)
    recover_delivered_s: float | None = None  # fault end -> last due push delivered
    recover_healthy_s: float | None = None  # fault end -> the flow healthy again
    took_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # findings that are not failures
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.problems


# --- events, as the services upstream write them -------------------------------------------------


def post_created(post_id: str, author: str, **extra: Any) -> bytes:
    """A post_created event created now (delivery expires old posts)."""
    return orjson.dumps(
        {
            "event_type": "post_created",
            "post_id": post_id,
            "author_id": author,
            "visibility": "public",
            "created_at": iso(time.time()),
            **extra,
        }
    )


def follow(author: str, follower: str, notify: bool = True, muted: bool = False) -> bytes:
    """A follow_changes event."""
    return orjson.dumps(
        {
            "author_id": author,
            "follower_id": follower,
            "op": "follow",
            "notify_on_post": notify,
            "muted": muted,
            "ts": iso(time.time()),
        }
    )


def device(user: str, device_id: str, provider: str, active: bool = True) -> bytes:
    """A device_changes event with a token of the provider's shape."""
    return orjson.dumps(
        {
            "user_id": user,
            "device_id": device_id,
            "provider": provider,
            "token": token_for(provider, f"{user}/{device_id}"),
            "active": active,
            "ts": iso(time.time()),
        }
    )


def preferences(user: str, push_enabled: bool) -> bytes:
    """A preference_changes event without quiet hours."""
    return orjson.dumps(
        {"user_id": user, "push_enabled": push_enabled, "timezone": "UTC", "ts": iso(time.time())}
    )


# --- shared steps ---------------------------------------------------------------------------------


def _settle(stack: ChaosStack, quiet_s: float = 2.0, max_s: float = 20.0) -> None:
    """Wait until the providers accept nothing more for `quiet_s` (late repeats show up)."""
    last = [stack.accepted_count(), time.monotonic()]

    def quiet() -> bool:
        now = stack.accepted_count()
        if now != last[0]:
            last[0], last[1] = now, time.monotonic()
        return time.monotonic() - last[1] >= quiet_s

    wait_until(quiet, max_s, every_s=0.5)


def _wait_outcomes(
    name: str,
    outcomes: Outcomes,
    due: Sequence[Key],
    timeout_s: float,
    flows: Sequence[FlowRun],
    done: Callable[[], bool] | None = None,
) -> bool:
    """Wait until every due push has a terminal outcome (`done` may watch more on the way)."""

    def check() -> bool:
        for run in flows:
            if not run.running():
                raise ChaosError(f"{run.flow} exited ({run.proc.returncode}):\n{run.log_tail()}")
        return done() if done is not None else outcomes.done(due)

    return wait_until(
        check,
        timeout_s,
        every_s=1.0,
        progress=lambda: (
            f"{name}: {len(due) - outcomes.missing(due):,} of {len(due):,} pushes have an outcome"
        ),
    )


def _delivery_problems(
    t: Tally, outcomes: Outcomes, due: Sequence[Key], complete: bool
) -> list[str]:
    problems = []
    if not complete:
        problems.append(f"{outcomes.missing(due):,} pushes never got an outcome")
    if t.lost:
        problems.append(f"lost {t.lost:,} (e.g. {t.examples['lost'][:2]})")
    if t.duplicated:
        problems.append(f"duplicated {t.duplicated:,} (e.g. {t.examples['duplicated'][:2]})")
    if t.unexpected:
        problems.append(f"{t.unexpected:,} pushes nobody was due (e.g. {t.examples['unexpected']})")
    bad = {o: n for o, n in outcomes.summary().items() if o != "accepted"}
    if bad:
        problems.append(f"outcomes other than accepted: {bad}")
    return problems


def _dispatch_repeats(items: Sequence[tuple[str, ...]]) -> int:
    return sum(n - 1 for n in Counter(items).values() if n > 1)


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(max(0.0, x), 2)


# --- worker crashes -------------------------------------------------------------------------------


def crash_fanout(stack: ChaosStack, scale: Scale) -> Result:
    """A `kill -9` of the fan-out worker mid fan-out, counted at the providers (delivery runs)."""
    n = scale.crash_followers
    result = Result(
        "crash-fanout",
        f"kill -9 the fan-out worker after {scale.kill_at:.0%} of a {n:,}-follower post",
        "providers",
    )
    followers = [f"fan{i:06d}" for i in range(n)]

    def provider(i: int) -> str:
        return "fcm" if i % scale.crash_fcm_every == 0 else "apns"

    stack.load_followers(("celeb", f, edge_flags(True, False)) for f in followers)
    stack.publish(
        "device_changes",
        ((f, device(f, f"{f}-d", provider(i))) for i, f in enumerate(followers)),
    )
    stack.publish("post_created", [("celeb", post_created("big", "celeb"))])
    due: list[Key] = [(provider(i), f"big:{f}", f"{f}-d") for i, f in enumerate(followers)]
    outcomes = Outcomes(stack)
    counter = DispatchCounter(stack)
    delivery = stack.start_flow("delivery", env=scale.flow_env)
    fanout = stack.start_flow("fanout", env=scale.crash_fanout_env)
    if not wait_until(lambda: counter.poll() >= scale.kill_at * n, 120 + n / 500, every_s=0.01):
        raise ChaosError(
            f"the fan-out dispatched {counter.items:,} of {n:,} in time:\n{fanout.log_tail()}"
        )
    killed = fanout.kill_member(0)
    killed_at = time.time()
    at_kill = counter.poll()
    say(f"crash-fanout: killed the fan-out worker (pid {killed}) at {at_kill:,} of {n:,} items")
    restarted = fanout.wait_restarted(killed, 180)
    healthy_at = time.time() if restarted else None
    dispatched_at: list[float] = []

    def dispatched() -> bool:
        if not dispatched_at and counter.poll() >= n:
            dispatched_at.append(time.time())
        return outcomes.done(due)

    complete = _wait_outcomes(
        "crash-fanout", outcomes, due, scale.wait_s + n / 300, [delivery, fanout], dispatched
    )
    _settle(stack)
    t = tally(due, stack.accepted(), fcm_resends_allowed=False)
    items = [(i.post_id, i.user_id, i.device_id) for i in stack.dispatch_items()]
    result.counts = t.row()
    last = last_delivery(t, due)
    result.recover_delivered_s = _rounded(last - killed_at) if last else None
    result.recover_healthy_s = _rounded(healthy_at - killed_at) if healthy_at else None
    restarts = fanout.live().get("restarts")
    result.details = {
        "dispatched_at_kill": at_kill,
        "kill_to_all_dispatched_s": _rounded(dispatched_at[0] - killed_at)
        if dispatched_at
        else None,
        "dispatch_items": len(items),
        "dispatch_repeats": _dispatch_repeats(items),
        "fanout_restarts": restarts,
        "outcomes": outcomes.summary(),
    }
    result.problems = _delivery_problems(t, outcomes, due, complete)
    if at_kill >= n:
        result.problems.append("the kill came after the fan-out had finished: it proves nothing")
    if not restarted:
        result.problems.append("the fan-out was not ready again within 180 s of the kill")
    if restarts != 1:
        result.problems.append(f"the supervisor restarted the fan-out {restarts} times, not once")
    return result


def crash_delivery(stack: ChaosStack, scale: Scale) -> Result:
    """A `kill -9` of the delivery worker mid-send (APNs and FCM), counted at the providers."""
    n = scale.delivery_items
    per_poll = 300
    in_flight = 2_000
    result = Result(
        "crash-delivery",
        f"kill -9 the delivery worker after {scale.kill_at:.0%} of {n:,} pushes",
        "providers",
    )
    n_fcm = n // 4
    items = {
        "apns": [(f"u{i:06d}", "ios", token_for("apns", f"c{i}")) for i in range(n - n_fcm)],
        "fcm": [(f"v{i:06d}", "android", token_for("fcm", f"c{i}")) for i in range(n_fcm)],
    }
    due: list[Key] = [(p, f"p-crash:{u}", d) for p, its in items.items() for u, d, _ in its]
    # Answers held back a little so that many sends are in flight when the kill comes.
    stack.control.set_latency("apns", 20)
    stack.control.set_latency("fcm", 20)
    for provider, its in items.items():
        stack.publish_dispatch(provider, "p-crash", its, lane="bulk")
    outcomes = Outcomes(stack)
    env = {
        **scale.flow_env,
        "FANFARE_BULK_ITEMS_PER_POLL": str(per_poll),
        "FANFARE_DELIVERY_IN_FLIGHT": str(in_flight),
    }
    delivery = stack.start_flow("delivery", env=env)
    if not wait_until(lambda: stack.accepted_count() >= scale.kill_at * n, 120 + n / 100):
        raise ChaosError(f"the delivery flow did not get going:\n{delivery.log_tail()}")
    in_flight_at_kill = sum(
        v for (name, _), v in delivery.metrics().items() if name == "fanfare_delivery_in_flight"
    )
    killed = delivery.kill_member(0)
    killed_at = time.time()
    at_kill = stack.accepted_count()
    say(f"crash-delivery: killed the delivery worker (pid {killed}) at {at_kill:,} accepted")
    restarted = delivery.wait_restarted(killed, 180)
    healthy_at = time.time() if restarted else None
    complete = _wait_outcomes("crash-delivery", outcomes, due, scale.wait_s + n / 200, [delivery])
    _settle(stack)
    t = tally(due, stack.accepted(), fcm_resends_allowed=True)
    result.counts = t.row()
    last = last_delivery(t, due)
    result.recover_delivered_s = _rounded(last - killed_at) if last else None
    result.recover_healthy_s = _rounded(healthy_at - killed_at) if healthy_at else None
    resend_metric = sum(
        v for (name, _), v in delivery.metrics().items() if name == "fanfare_delivery_resends_total"
    )
    result.details = {
        "accepted_at_kill": at_kill,
        "in_flight_at_kill": in_flight_at_kill,
        "resends_counted_by_fanfare": resend_metric,
        "bulk_items_per_poll": per_poll,
        "in_flight_limit": in_flight,
        "restarts": delivery.live().get("restarts"),
        "outcomes": outcomes.summary(),
    }
    result.problems = _delivery_problems(t, outcomes, due, complete)
    if at_kill >= n:
        result.problems.append("the kill came after every push was sent: it proves nothing")
    if not restarted:
        result.problems.append("the delivery flow was not ready again within 180 s of the kill")
    # Only the sends in flight at the kill may go out again: at most the in-flight limit.
    if t.apns_resends + t.fcm_resends > in_flight:
        result.problems.append(
            f"{t.apns_resends + t.fcm_resends} resends: more than the sends the worker can have "
            f"in flight ({in_flight})"
        )
    return result


# --- a cluster against one process ----------------------------------------------------------------


@dataclass
class Graph:
    """A small social graph as changelog events, its posts, and the dispatch set it must give."""

    follows: list[tuple[str, bytes]] = field(default_factory=list)
    prefs: list[tuple[str, bytes]] = field(default_factory=list)
    devices: list[tuple[str, bytes]] = field(default_factory=list)
    posts: list[tuple[str, bytes]] = field(default_factory=list)
    expected: set[tuple[str, str, str, str]] = field(default_factory=set)


def cluster_graph(users: int, threshold: int, seed: int = 11) -> Graph:
    """A celebrity followed by everyone, 20 authors with 100 followers, opt-outs of every kind.

    The expected set applies the trust contract (docs/design.md) to what was generated: edge
    notify_on_post and not muted, push enabled, not the author, each active device; the lane
    is bulk above the celebrity threshold.
    """
    rng = random.Random(seed)
    g = Graph()
    ids = [f"u{i:06d}" for i in range(users)]
    push_off = set()
    devices: dict[str, list[tuple[str, str, bool]]] = {}
    for u in ids:
        r = rng.random()
        if r < 0.03:
            devs: list[tuple[str, str]] = []
        elif r < 0.33:
            devs = [(f"{u}-ios", "apns"), (f"{u}-android", "fcm")]
        else:
            devs = [(f"{u}-ios", "apns")] if rng.random() < 0.5 else [(f"{u}-android", "fcm")]
        devices[u] = []
        for dev, provider in devs:
            active = rng.random() >= 0.05
            g.devices.append((u, device(u, dev, provider)))
            if not active:
                g.devices.append((u, device(u, dev, provider, active=False)))
            devices[u].append((dev, provider, active))
        if rng.random() < 0.08:
            push_off.add(u)
            g.prefs.append((u, preferences(u, False)))
        elif rng.random() < 0.2:
            g.prefs.append((u, preferences(u, True)))
    edges: dict[str, list[tuple[str, bool, bool]]] = {"celeb": []}
    authors = ids[:20]
    for u in ids:
        edges["celeb"].append((u, rng.random() >= 0.05, rng.random() < 0.05))
    for a in authors:
        fans = rng.sample(ids, min(users, 100))
        if a == authors[0] and a not in fans:
            fans.append(a)  # a self-follow: never notified
        edges[a] = [(f, rng.random() >= 0.05, rng.random() < 0.05) for f in fans]
    for author, edge_list in edges.items():
        g.follows += [(author, follow(author, f, n, m)) for f, n, m in edge_list]
    posts: list[tuple[str, str, dict[str, Any]]] = [("c-post", "celeb", {})]
    for j, a in enumerate(authors):
        posts.append((f"a{j:02d}-post", a, {"visibility": "followers" if j % 2 else "public"}))
    posts += [
        ("a01-private", authors[1], {"visibility": "private"}),
        ("a02-quiet", authors[2], {"notify_followers": False}),
    ]
    for post_id, author, extra in posts:
        g.posts.append((author, post_created(post_id, author, **extra)))
        if extra.get("visibility") == "private" or extra.get("notify_followers") is False:
            continue
        lane = "bulk" if len(edges[author]) > threshold else "normal"
        for f, notify, muted in edges[author]:
            if not notify or muted or f in push_off or f == author:
                continue
            for dev, provider, active in devices[f]:
                if active:
                    g.expected.add((channel_topic(provider, lane), post_id, f, dev))
    return g


def cluster(stack: ChaosStack, scale: Scale) -> Result:
    """The same scenario through one process and through a two-process cluster.

    Each run has a fresh stack (broker, topics, FANFARE_HOME, Redis prefix) holding the same
    events; the second stack is made like the first.
    """
    threshold = 1_000
    result = Result(
        "cluster",
        f"{scale.cluster_users:,} users: `--processes 2` against `--processes 1`",
        "push.*",
    )
    g = cluster_graph(scale.cluster_users, threshold)
    runs: dict[int, list[tuple[str, str, str, str]]] = {}
    took: dict[int, float] = {}
    for processes, where in ((1, stack), (2, stack.sibling("cluster-2"))):
        for topic, messages in (
            ("follow_changes", g.follows),
            ("preference_changes", g.prefs),
            ("device_changes", g.devices),
            ("post_created", g.posts),
        ):
            where.publish(topic, messages)
        counter = DispatchCounter(where)
        started = time.monotonic()
        run = where.start_flow(
            "fanout", env={"FANFARE_CELEBRITY_THRESHOLD": str(threshold)}, processes=processes
        )

        def enough(run: FlowRun = run, counter: DispatchCounter = counter) -> bool:
            if not run.running():
                raise ChaosError(f"the fan-out exited:\n{run.log_tail()}")
            return counter.poll() >= len(g.expected)

        done = wait_until(enough, scale.wait_s, every_s=0.5)
        took[processes] = round(time.monotonic() - started, 2)
        time.sleep(3)  # anything extra (a repeat) would show up now
        code = run.stop()
        if not done:
            result.problems.append(f"--processes {processes}: the fan-out did not finish")
        if code != 0:
            result.problems.append(f"--processes {processes}: exited {code} on SIGTERM")
        runs[processes] = [
            (i.topic, i.post_id, i.user_id, i.device_id) for i in where.dispatch_items()
        ]
    # A push is (provider, post, user, device); the lane (normal or .bulk topic) is compared
    # apart: it decides priority, not who gets what.
    lanes = {p: {(t.split(".")[1], *rest): t for t, *rest in runs[p]} for p in (1, 2)}
    due = {(t.split(".")[1], *rest): t for t, *rest in g.expected}
    one, two = set(lanes[1]), set(lanes[2])
    result.counts = {
        "expected": len(due),
        "delivered": len(two & set(due)),
        "lost": len(set(due) - two),
        "unexpected": len(two - set(due)),
        "duplicated": _dispatch_repeats(runs[2]),
        "apns_resends": 0,
        "fcm_resends": 0,
    }
    off_lane = {
        p: Counter(
            f"{k[1]}: {due[k]} expected, {topic} got"
            for k, topic in lanes[p].items()
            if k in due and due[k] != topic
        )
        for p in (1, 2)
    }
    result.details = {
        "one_process": {
            "items": len(runs[1]),
            "missing": len(set(due) - one),
            "unexpected": len(one - set(due)),
            "repeats": _dispatch_repeats(runs[1]),
            "seconds": took[1],
            "off_lane": dict(off_lane[1]),
        },
        "two_processes": {
            "items": len(runs[2]),
            "seconds": took[2],
            "off_lane": dict(off_lane[2]),
        },
        "identical": set(runs[1]) == set(runs[2]) and len(runs[1]) == len(runs[2]),
        "same_pushes": one == two,
    }
    if one != two:
        result.problems.append(
            f"the pushes differ: {len(one - two)} only with 1 process, {len(two - one)} only with 2"
        )
    for label, listed, got in (("1 process", runs[1], one), ("2 processes", runs[2], two)):
        if got != set(due):
            result.problems.append(
                f"{label}: {len(set(due) - got)} missing, {len(got - set(due))} not due"
            )
        if _dispatch_repeats(listed):
            result.problems.append(f"{label}: {_dispatch_repeats(listed)} repeated items")
    for p, label in ((1, "1 process"), (2, "2 processes")):
        for what, n in off_lane[p].items():
            result.notes.append(
                f"{label}: {n:,} pushes of {what}: the lane is chosen from the follower "
                "store's count when the shard job starts; another worker had not applied its "
                "follow changes yet"
            )
    return result


# --- provider faults ------------------------------------------------------------------------------


FaultCheck = Callable[[ChaosStack, Result, Tally, Outcomes, CircuitSampler], list[str]]


@dataclass
class Fault:
    """A provider fault: what it does to which providers, started and ended by the scenario."""

    name: str
    description: str
    providers: tuple[str, ...]
    inject: Callable[[ChaosStack], None]
    heal: Callable[[ChaosStack], None]
    fcm_resends_allowed: bool = False
    flow_env: Mapping[str, str] = field(default_factory=dict)
    check: FaultCheck = field(default=lambda *_: [])


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _start_warm_delivery(
    stack: ChaosStack, scale: Scale, name: str, env: Mapping[str, str]
) -> tuple[Outcomes, FlowRun, list[Key]]:
    """Start the delivery flow and wait for one push per provider to get through (`warm`).

    The fault must meet a flow already connected to both providers, not one still starting.
    """
    outcomes = Outcomes(stack)
    delivery = stack.start_flow("delivery", env=env)
    warm: list[Key] = []
    for provider in scale.rates:
        user, dev = f"w-{provider}", f"w-{provider}-d"
        stack.publish_dispatch(provider, "warm", [(user, dev, token_for(provider, user))])
        warm.append((provider, f"warm:{user}", dev))
    if not _wait_outcomes(name, outcomes, warm, 180, [delivery]):
        raise ChaosError(f"the delivery flow did not start:\n{delivery.log_tail()}")
    return outcomes, delivery, warm


def provider_fault(stack: ChaosStack, scale: Scale, fault: Fault) -> Result:
    """Steady traffic on both providers; the fault for `scale.fault_s`; count at the providers."""
    result = Result(fault.name, fault.description, "providers")
    env = {
        **scale.flow_env,
        "FANFARE_SEND_TIMEOUT_MS": str(scale.send_timeout_ms),
        **fault.flow_env,
    }
    outcomes, delivery, warm = _start_warm_delivery(stack, scale, fault.name, env)
    sampler = CircuitSampler(stack, delivery)
    sampler.start()
    traffic = Traffic(stack, scale.rates, name=fault.name)
    traffic.start()
    time.sleep(scale.pre_s)  # steady state before the fault
    fault_start = time.time()
    fault.inject(stack)
    time.sleep(scale.fault_s)  # the fault's length
    fault.heal(stack)
    fault_end = time.time()
    say(f"{fault.name}: the fault ended after {fault_end - fault_start:.1f} s")
    time.sleep(scale.post_s)
    traffic.stop()
    if traffic.error is not None:
        raise ChaosError(f"the traffic publisher failed: {traffic.error!r}")
    published = traffic.snapshot()
    due_at = {**{k: fault_start - scale.pre_s for k in warm}, **published}
    due = list(due_at)
    complete = _wait_outcomes(
        fault.name, outcomes, due, scale.wait_s + 4 * scale.fault_s, [delivery]
    )
    _settle(stack)
    sampler.stop()
    records = stack.accepted()
    fcm_lost = outcomes.answers_lost("fcm")
    t = tally(
        due, records, fcm_resends_allowed=fault.fcm_resends_allowed, fcm_answers_lost=fcm_lost
    )
    result.counts = t.row()
    backlog = [k for k, at in due_at.items() if at < fault_end]
    last = last_delivery(t, backlog)
    result.recover_delivered_s = _rounded(last - fault_end) if last else None
    healthy: list[float] = []
    for provider in fault.providers:
        closed = sampler.closed_after(provider, fault_end)
        accepted = [r.time for r in records if r.provider == provider and r.time >= fault_end]
        if closed is None or not accepted:
            healthy = []
            break
        healthy.append(max(closed, min(accepted)))
    result.recover_healthy_s = _rounded(max(healthy) - fault_end) if healthy else None
    stats = stack.control.stats()
    latency: dict[str, Any] = {}
    for provider in scale.rates:
        during = [
            t.first_accepted[k] - at
            for k, at in published.items()
            if k[0] == provider and fault_start <= at < fault_end and k in t.first_accepted
        ]
        latency[provider] = {
            "published_during_fault": sum(
                1
                for k, at in published.items()
                if k[0] == provider and fault_start <= at < fault_end
            ),
            "p50_s": _rounded(_percentile(during, 0.5)),
            "max_s": _rounded(max(during) if during else None),
        }
    result.details = {
        "fault_s": round(fault_end - fault_start, 2),
        "circuit": {
            p: [(round(at - fault_start, 2), state) for at, state in sampler.transitions(p)]
            for p in scale.rates
        },
        "held_circuit_open": sampler.held,
        "provider_rejected": {p: stats[p].get("rejected", {}) for p in scale.rates},
        "goaways_sent": {p: stats[p].get("goaways_sent", 0) for p in scale.rates},
        "retry_reasons": outcomes.retry_reasons(),
        "fcm_answers_lost": fcm_lost.total(),
        "outcomes": outcomes.summary(),
        "latency_of_pushes_published_during_the_fault": latency,
        "rates_per_s": dict(scale.rates),
    }
    result.problems = _delivery_problems(t, outcomes, due, complete)
    result.problems += fault.check(stack, result, t, outcomes, sampler)
    for provider in fault.providers:
        if result.recover_healthy_s is None:
            result.problems.append(f"{provider}: never healthy again after the fault")
            break
    return result


def _circuit_opened_and_closed(provider: str) -> Callable[..., list[str]]:
    def check(
        _stack: ChaosStack, result: Result, _t: Tally, _o: Outcomes, sampler: CircuitSampler
    ) -> list[str]:
        states = [s for _, s in sampler.transitions(provider)]
        problems = []
        if "open" not in states and not sampler.held.get(provider):
            problems.append(f"the {provider} circuit never opened (states seen: {states})")
        if not states or states[-1] != "closed":
            problems.append(f"the {provider} circuit did not close again (states seen: {states})")
        return problems

    return check


def _outage_check(
    stack: ChaosStack, result: Result, t: Tally, o: Outcomes, sampler: CircuitSampler
) -> list[str]:
    problems = _circuit_opened_and_closed("apns")(stack, result, t, o, sampler)
    rejected = result.details["provider_rejected"]["apns"].get("ServiceUnavailable", 0)
    during = result.details["latency_of_pushes_published_during_the_fault"]["apns"]
    # Without the breaker every push of the fault window meets the outage, most several times.
    if rejected >= during["published_during_fault"]:
        problems.append(
            f"APNs saw {rejected} 503s for {during['published_during_fault']} pushes published "
            "during the outage: the breaker did not hold sends back"
        )
    return problems


def _retry_after_check(
    _stack: ChaosStack, result: Result, _t: Tally, o: Outcomes, _s: CircuitSampler
) -> list[str]:
    problems = []
    rejected = result.details["provider_rejected"]["fcm"].get("QUOTA_EXCEEDED", 0)
    if not rejected:
        problems.append("FCM never answered 429: the fault did not bite")
    early = 0
    quota = [r for r in o.retries if r["provider"] == "fcm" and r["status"] == 429]
    for r in quota:
        ts = datetime.fromisoformat(str(r["ts"]).replace("Z", "+00:00"))
        at = datetime.fromisoformat(str(r["retry_at"]).replace("Z", "+00:00"))
        if (at - ts).total_seconds() < RETRY_AFTER_S - 0.01:
            early += 1
    result.details["retries_after_429"] = len(quota)
    result.details["retries_earlier_than_retry_after"] = early
    if early:
        problems.append(f"{early} retries after a 429 were due before its Retry-After")
    return problems


def _goaway_check(
    _stack: ChaosStack, result: Result, t: Tally, _o: Outcomes, _s: CircuitSampler
) -> list[str]:
    sent = result.details["goaways_sent"]
    problems = [f"{p}: no GOAWAY was sent" for p in ("apns", "fcm") if not sent.get(p)]
    # An FCM GOAWAY fails the streams in flight on that connection: at most one chunk of
    # firebase-admin sends (50) per GOAWAY can be accepted and answered too late.
    bound = 50 * int(sent.get("fcm", 0))
    if t.fcm_resends > bound:
        problems.append(f"{t.fcm_resends} FCM repeats for {sent.get('fcm')} GOAWAYs (> {bound})")
    return problems


def _slow_check(
    stack: ChaosStack, result: Result, t: Tally, o: Outcomes, sampler: CircuitSampler
) -> list[str]:
    problems = _circuit_opened_and_closed("apns")(stack, result, t, o, sampler)
    if not o.retry_reasons().get("timeout"):
        problems.append("no send timed out: the answers were not slow enough")
    return problems


RETRY_AFTER_S = 2


class _GoawayLoop:
    """GOAWAY on every open HTTP/2 connection of both providers, every second."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def inject(self, stack: ChaosStack) -> None:
        for provider in ("apns", "fcm"):
            stack.control.set_latency(provider, 100)  # answers in flight when GOAWAY comes

        def loop() -> None:
            while not self._stop.wait(1.0):
                for provider in ("apns", "fcm"):
                    stack.control.goaway(provider, 0)

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="chaos-goaway", daemon=True)
        self._thread.start()
        stack.on_close(self._stop.set)

    def heal(self, stack: ChaosStack) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        for provider in ("apns", "fcm"):
            stack.control.set_latency(provider, 0)


def provider_faults(scale: Scale) -> list[Fault]:
    """The provider faults, sized for `scale`."""
    goaway = _GoawayLoop()
    fcm_limit = max(1, scale.rates["fcm"] // 4)
    slow_ms = int(scale.send_timeout_ms * 2.5)
    return [
        Fault(
            "apns-outage",
            f"APNs answers 503 ServiceUnavailable for {scale.fault_s:.0f} s",
            ("apns",),
            inject=lambda s: s.control.set_outage("apns", scale.fault_s + 600),
            heal=lambda s: s.control.set_outage("apns", 0),
            check=_outage_check,
        ),
        Fault(
            "fcm-429",
            f"FCM answers 429 QUOTA_EXCEEDED (Retry-After {RETRY_AFTER_S} s) above "
            f"{fcm_limit}/s for {scale.fault_s:.0f} s ({scale.rates['fcm']}/s offered)",
            ("fcm",),
            inject=lambda s: s.control.set_rate_limit("fcm", fcm_limit, RETRY_AFTER_S),
            heal=lambda s: s.control.set_rate_limit("fcm", None),
            check=_retry_after_check,
        ),
        Fault(
            "goaway",
            f"GOAWAY every second on APNs and FCM connections for {scale.fault_s:.0f} s "
            "(answers held 100 ms, so some are in flight)",
            ("apns", "fcm"),
            inject=goaway.inject,
            heal=goaway.heal,
            fcm_resends_allowed=True,
            check=_goaway_check,
        ),
        Fault(
            "slow-responses",
            f"APNs answers after {slow_ms} ms, FANFARE_SEND_TIMEOUT_MS={scale.send_timeout_ms}, "
            f"for {scale.fault_s:.0f} s",
            ("apns",),
            inject=lambda s: s.control.set_latency("apns", slow_ms),
            heal=lambda s: s.control.set_latency("apns", 0),
            check=_slow_check,
        ),
    ]


# --- Redis restarted under delivery --------------------------------------------------------------

LOCAL_SHARE = 4  # the rate limiter's local bucket during an outage: a quarter of the rate


def _sends_per_s(records: Sequence[AcceptedRecord], start: float, stop: float) -> float | None:
    """Acceptances per second in [start, stop) (None for an empty window)."""
    if stop - start < 0.5:
        return None
    return round(sum(1 for r in records if start <= r.time < stop) / (stop - start), 1)


def redis_restart(stack: ChaosStack, scale: Scale) -> Result:
    """Redis killed under steady delivery and started again EMPTY: no repeat, none lost.

    The delivery flow runs on a redis-server of the scenario's own. The rate limits are set
    half again above the traffic, so before the fault nothing waits; during it each worker
    paces itself at a quarter of the limits (below the traffic: a backlog builds) and edge
    claims skip Redis (the store's unique key decides); after it the shared bucket is back and
    the backlog drains. The empty Redis holds none of the old edge claims: the store alone
    refuses repeats then.
    """
    limits = {p: r * 3 // 2 for p, r in scale.rates.items()}
    result = Result(
        "redis-restart",
        f"Redis killed under delivery, started again empty after {scale.fault_s:g} s",
        "providers",
    )
    server = RedisServer(stack.home / "own-redis")
    server.start()
    stack.on_close(server.kill)
    env = {
        **scale.flow_env,
        "FANFARE_REDIS_URL": server.url,
        "FANFARE_APNS_RATE_PER_MIN": str(limits["apns"] * 60),
        "FANFARE_FCM_RATE_PER_MIN": str(limits["fcm"] * 60),
        "FANFARE_RATE_BURST_MS": "1000",
    }
    outcomes, delivery, warm = _start_warm_delivery(stack, scale, "redis-restart", env)
    traffic = Traffic(stack, scale.rates, name="redis-restart")
    traffic.start()
    time.sleep(scale.pre_s)
    fault_start = time.time()
    server.kill()
    time.sleep(scale.fault_s)
    server.start()  # empty
    fault_end = time.time()
    say(f"redis-restart: Redis was down {fault_end - fault_start:.1f} s; started again empty")
    ready = wait_until(delivery.is_ready, 60, every_s=0.1)
    healthy_at = time.time() if ready else None
    time.sleep(scale.post_s)
    traffic.stop()
    if traffic.error is not None:
        raise ChaosError(f"the traffic publisher failed: {traffic.error!r}")
    published = traffic.snapshot()
    due_at = {**{k: fault_start - scale.pre_s for k in warm}, **published}
    due = list(due_at)
    complete = _wait_outcomes(
        "redis-restart", outcomes, due, scale.wait_s + 4 * scale.fault_s, [delivery]
    )
    _settle(stack)
    records = stack.accepted()
    t = tally(due, records, fcm_resends_allowed=False)
    result.counts = t.row()
    last = last_delivery(t, [k for k, at in due_at.items() if at < fault_end])
    result.recover_delivered_s = _rounded(last - fault_end) if last else None
    result.recover_healthy_s = _rounded(healthy_at - fault_end) if healthy_at else None
    # Measured from half a second after the kill: sends Redis granted before it finish first.
    window = (fault_start + 0.5, fault_end)
    pace: dict[str, Any] = {}
    for provider in scale.rates:
        recs = [r for r in records if r.provider == provider]
        during = _sends_per_s(recs, *window)
        pace[provider] = {
            "limit_per_s": limits[provider],
            "local_bucket_per_s": limits[provider] / LOCAL_SHARE,
            "offered_per_s": scale.rates[provider],
            "before": _sends_per_s(recs, fault_start - scale.pre_s + 1.0, fault_start),
            "during": during,
            "after": _sends_per_s(recs, fault_end, fault_end + scale.post_s),
        }
        # The local bucket holds a quarter of a second's burst too; 1 s of slack for timing.
        allowed = limits[provider] / LOCAL_SHARE * (1 + 1.0 / (window[1] - window[0]))
        if during is not None and during > allowed * 1.1:
            result.problems.append(
                f"{provider}: {during}/s during the outage, over the local bucket "
                f"({limits[provider] / LOCAL_SHARE:g}/s)"
            )
        if not during:
            result.problems.append(f"{provider}: nothing was sent during the outage")
    log = delivery.log_path.read_text(errors="replace")
    restarts = delivery.live().get("restarts")
    result.details = {
        "fault_s": round(fault_end - fault_start, 2),
        "sends_per_s": pace,
        "restarts": restarts,
        "outage_logged": "Redis unreachable" in log,
        "outcomes": outcomes.summary(),
    }
    result.problems += _delivery_problems(t, outcomes, due, complete)
    if restarts:
        result.problems.append(
            f"the delivery flow restarted {restarts} times: it should ride it out"
        )
    if healthy_at is None:
        result.problems.append("/ready did not answer 200 within 60 s of Redis' restart")
    return result


# --- the broker restarted under the flows ---------------------------------------------------------


def broker_restart(stack: ChaosStack, scale: Scale) -> Result:
    """The embedded broker stopped under the running fan-out and delivery, started again empty.

    The embedded broker keeps memory only: a restart loses every topic, its messages and the
    offsets, which Kafka keeps on disk. So the scenario first lets the posts published before
    the stop be delivered, then stops the broker for `fault_s`, starts it again on the same
    port, re-creates the topics and at once publishes new posts, as upstream services would.
    The flows must go on in the same processes: their readers' positions lie in the lost logs,
    and the new posts take the old offsets again. Counted at the providers: every follower's
    device gets each post once, before and after.
    """
    authors = [f"author{a}" for a in range(10)]
    per_author = 50 if scale is SMALL else 200
    result = Result(
        "broker-restart",
        f"the embedded broker stopped {scale.fault_s:g} s under both flows, started again empty",
        "providers",
    )
    followers = {a: [f"{a}-f{i:03d}" for i in range(per_author)] for a in authors}

    def provider(i: int) -> str:
        return "fcm" if i % 3 == 0 else "apns"

    stack.load_followers((a, f, edge_flags(True, False)) for a in authors for f in followers[a])
    stack.publish(
        "device_changes",
        (
            (f, device(f, f"{f}-d", provider(i)))
            for a in authors
            for i, f in enumerate(followers[a])
        ),
    )

    def due_for(post_id: str, author: str) -> list[Key]:
        return [(provider(i), f"{post_id}:{f}", f"{f}-d") for i, f in enumerate(followers[author])]

    def publish_posts(tag: str, rounds: int) -> list[Key]:
        posts = [(a, f"{tag}-{a}-{r}") for r in range(rounds) for a in authors]
        stack.publish("post_created", [(a, post_created(pid, a)) for a, pid in posts])
        return [k for a, pid in posts for k in due_for(pid, a)]

    delivery = stack.start_flow("delivery", env=scale.flow_env)
    fanout = stack.start_flow("fanout", env=scale.flow_env)
    before = publish_posts("before", 1)
    outcomes = Outcomes(stack)
    if not _wait_outcomes("broker-restart", outcomes, before, 300, [delivery, fanout]):
        raise ChaosError(f"the posts before the restart were not delivered:\n{fanout.log_tail()}")
    time.sleep(2 * float(stack.env.get("FANFARE_SNAPSHOT_INTERVAL_S", "1")))
    fault_start = time.time()
    devstack.stop_broker(stack.settings)
    time.sleep(scale.fault_s)
    devstack.start_broker(stack.settings)
    create_topics(stack.settings)
    fault_end = time.time()
    say(f"broker-restart: the broker was down {fault_end - fault_start:.1f} s; topics re-created")
    after = publish_posts("after", 2)
    # delivery_events went with the broker: a new tail from the new log's beginning.
    outcomes_after = Outcomes(stack)
    complete = _wait_outcomes(
        "broker-restart", outcomes_after, after, scale.wait_s, [delivery, fanout]
    )
    ready = wait_until(lambda: delivery.is_ready() and fanout.is_ready(), 60, every_s=0.2)
    healthy_at = time.time() if ready else None
    _settle(stack)
    due = before + after
    t = tally(due, stack.accepted(), fcm_resends_allowed=False)
    result.counts = t.row()
    last = last_delivery(t, after)
    result.recover_delivered_s = _rounded(last - fault_end) if last else None
    result.recover_healthy_s = _rounded(healthy_at - fault_end) if healthy_at else None
    logs = delivery.log_path.read_text(errors="replace") + fanout.log_path.read_text(
        errors="replace"
    )
    restarts = {f.flow: f.live().get("restarts") for f in (fanout, delivery)}
    result.details = {
        "fault_s": round(fault_end - fault_start, 2),
        "pushes_before": len(before),
        "pushes_after": len(after),
        "restarts": restarts,
        "readers_rewound": logs.count("is beyond the partition's end")
        + logs.count("the topic was re-created"),
        "outcomes_after": outcomes_after.summary(),
    }
    result.problems = _delivery_problems(t, outcomes_after, after, complete)
    if any(restarts.values()):
        result.problems.append(f"flows restarted {restarts}: they should ride it out")
    if healthy_at is None:
        result.problems.append("the flows were not ready within 60 s of the broker's return")
    result.notes.append(
        "the embedded broker lost every message and offset; Kafka keeps them on disk and the "
        "flows would simply reconnect"
    )
    return result


def _fault_runner(name: str) -> Callable[[ChaosStack, Scale], Result]:
    def run(stack: ChaosStack, scale: Scale) -> Result:
        [fault] = [f for f in provider_faults(scale) if f.name == name]
        return provider_fault(stack, scale, fault)

    run.__name__ = name.replace("-", "_")
    return run


SCENARIOS: dict[str, Callable[[ChaosStack, Scale], Result]] = {
    "crash-fanout": crash_fanout,
    "crash-delivery": crash_delivery,
    "cluster": cluster,
    "apns-outage": _fault_runner("apns-outage"),
    "fcm-429": _fault_runner("fcm-429"),
    "goaway": _fault_runner("goaway"),
    "slow-responses": _fault_runner("slow-responses"),
    "redis-restart": redis_restart,
    "broker-restart": broker_restart,
}


# --- the runner ----------------------------------------------------------------------------------


def run_scenario(name: str, scale: Scale, redis_url: str) -> Result:
    """One scenario on its own fresh stack, stopped and cleaned up whatever happens."""
    started = time.monotonic()
    say(f"{name}: starting ({scale.name} scale)")
    try:
        with ChaosStack.create(redis_url=redis_url, env=scale.stack_env, name=name) as stack:
            try:
                result = SCENARIOS[name](stack, scale)
            except ChaosError as exc:
                result = Result(name, "", "", problems=[f"could not run: {exc}"])
    except Exception as exc:  # one broken scenario must not stop the others
        result = Result(name, "", "", problems=[f"could not run: {type(exc).__name__}: {exc}"])
        result.details["traceback"] = traceback.format_exc()
    result.took_s = round(time.monotonic() - started, 1)
    say(f"{name}: {'ok' if result.ok else 'PROBLEMS: ' + '; '.join(result.problems)}")
    return result


def _n(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} s"


COLUMNS = (
    ("fault", 16),
    ("expected", 9),
    ("delivered", 9),
    ("lost", 4),
    ("dup", 4),
    ("same apns-id", 12),
    ("FCM re-sent", 11),
    ("-> delivered", 12),
    ("-> healthy", 10),
)


def table_rows(results: Sequence[Result]) -> list[list[str]]:
    """The table's cells, a row per scenario."""
    rows = []
    for r in results:
        c = r.counts
        rows.append(
            [
                r.scenario,
                _n(c.get("expected")),
                _n(c.get("delivered")),
                _n(c.get("lost")),
                _n(None if not c else c.get("duplicated", 0) + c.get("unexpected", 0)),
                _n(c.get("apns_resends")),
                _n(c.get("fcm_resends")),
                _s(r.recover_delivered_s),
                _s(r.recover_healthy_s),
            ]
        )
    return rows


def print_report(results: Sequence[Result], scale: Scale, out: Any = sys.stdout) -> None:
    """The table, then what each row was and anything that went wrong."""
    header = "  ".join(
        f"{name:>{w}}" if i else f"{name:<{w}}" for i, (name, w) in enumerate(COLUMNS)
    )
    print(f"\nfanfare chaos, {scale.name} scale", file=out)
    print(header, file=out)
    for cells in table_rows(results):
        print(
            "  ".join(
                f"{cell:>{w}}" if i else f"{cell:<{w}}"
                for i, (cell, (_, w)) in enumerate(zip(cells, COLUMNS, strict=True))
            ),
            file=out,
        )
    print(file=out)
    for r in results:
        where = "at the provider servers" if r.measured_at == "providers" else "on push.*"
        print(f"  {r.scenario}: {r.fault} (counted {where}; {r.took_s:.0f} s)", file=out)
        circuit = r.details.get("circuit")
        if circuit:
            for provider, states in circuit.items():
                if len(states) > 1:
                    steps = " -> ".join(f"{s} @{t:+.1f}s" for t, s in states)
                    print(f"      {provider} circuit: {steps}", file=out)
        for problem in r.problems:
            print(f"      PROBLEM: {problem}", file=out)
        for note in r.notes:
            print(f"      NOTE: {note}", file=out)
    ok = sum(1 for r in results if r.ok)
    print(f"\n{ok} of {len(results)} scenario(s) without problems", file=out)


def machine() -> dict[str, Any]:
    """Where the figures were measured."""
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_end": os.getloadavg(),
    }


def run(names: Sequence[str], scale: Scale, settings: Settings, json_path: str | None) -> int:
    """Run the scenarios in order; 0 when all came back without problems, 1 otherwise."""

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    results: list[Result] = []
    started = datetime.now(UTC)
    interrupted = False
    try:
        for name in names:
            results.append(run_scenario(name, scale, settings.redis_url))
    except KeyboardInterrupt:
        interrupted = True
        print("\nfanfare chaos: interrupted; what it started was stopped", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_report(results, scale)
    if json_path:
        doc = {
            "scale": asdict(scale),
            "started": started.isoformat(),
            "machine": machine(),
            "interrupted": interrupted,
            "results": [asdict(r) for r in results],
        }
        Path(json_path).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"wrote {json_path}")
    if interrupted:
        return 130
    return 0 if all(r.ok for r in results) else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fanfare chaos` and `python -m scripts.harness.chaos`."""
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        metavar="NAME",
        help=f"run this scenario (repeatable; default all: {', '.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--scale",
        choices=list(SCALES),
        default="small",
        help="small: CI sizes and fast retries (~4 min); full: the README's figures (~17 min here)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON here")


def add_parser(sub: Any) -> None:
    """Register `fanfare chaos`."""
    chaos = sub.add_parser(
        "chaos",
        help="inject faults on a throwaway embedded stack; count pushes lost and repeated",
        description="Run fault scenarios (worker crashes, a cluster against one process, "
        "provider outages, 429s, GOAWAY, slow answers), each on its own embedded stack, and "
        "print per fault the pushes expected, delivered, lost and repeated, and the recovery "
        "times. Exit 0 when every scenario came back without problems.",
    )
    add_arguments(chaos)
    chaos.set_defaults(func=command)


def command(args: argparse.Namespace, settings: Settings) -> int:
    """`fanfare chaos`."""
    names = args.scenario or list(SCENARIOS)
    return run(list(dict.fromkeys(names)), SCALES[args.scale], settings, args.json)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m scripts.harness.chaos`."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.harness.chaos",
        description="Inject faults into fanfare on the embedded stack and count, at the "
        "provider servers, what was delivered, lost and repeated.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return command(args, load_settings())


if __name__ == "__main__":
    sys.exit(main())
