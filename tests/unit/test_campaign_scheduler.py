"""The campaign scheduler against the real Redis campaign store and an in-memory topic.

Pacing, the send window, cancel, leases, and the crash that matters: after a chunk was
produced and before it was committed; the next scheduler must send each user exactly once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from zlib import crc32

import orjson
import pytest
import redis

from operators.adapters.redis.api_store import AudienceRecipients, RedisAudienceStore, api_redis
from operators.adapters.redis.campaigns import RedisCampaignStore, spec_from, spec_json
from operators.adapters.stores.campaign_sources import FollowerRecipients
from operators.fanout.eligibility import edge_flags
from operators.notify.campaigns import CampaignSpec, Target, progress_view
from operators.notify.ports import Publisher, RecipientSource
from operators.notify.scheduler import MARKETING_TOPIC, CampaignScheduler
from schemas.codecs import decode_notification_request
from tests.conftest import REDIS_URL
from tests.fakes import InMemoryFollowerStore


class Topic(Publisher):
    """An in-memory topic of `partitions` partitions, keyed as Kafka's default partitioner."""

    def __init__(self, partitions: int = 3) -> None:
        self.parts: list[list[bytes]] = [[] for _ in range(partitions)]
        self.published = 0

    def publish(self, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> list[tuple[int, int]]:
        assert topic == MARKETING_TOPIC
        out = []
        for key, value in messages:
            p = crc32(key) % len(self.parts)
            self.parts[p].append(value)
            out.append((p, len(self.parts[p]) - 1))
        self.published += len(messages)
        return out

    def marks(self, topic: str) -> dict[int, int]:
        return {p: len(values) for p, values in enumerate(self.parts)}

    def read_since(self, topic: str, marks: Mapping[int, int]) -> Iterator[bytes | None]:
        for p, start in marks.items():
            yield from self.parts[p][start:]

    def users(self) -> list[str]:
        return [
            u
            for part in self.parts
            for v in part
            for u in decode_notification_request(v).recipients
        ]


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Crash(Exception):
    pass


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"fanfare-test-{uuid.uuid4().hex[:8]}:"
    yield p
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=p + "*"))
    if keys:
        client.delete(*keys)


def spec(
    campaign_id: str, target: Target, total: int, rate: float, start: float, end: float | None
) -> CampaignSpec:
    return CampaignSpec(
        campaign_id=campaign_id,
        category="campaign",
        template_id="campaign",
        data={"headline": "h", "message": "m", "link": "x://y"},
        channels=("push",),
        quiet_hours=True,
        caps=True,
        target=target,
        window_start=start,
        window_end=end,
        rate_per_s=rate,
        api_key_id="k1",
        created_at=start,
        total=total,
    )


class Setup:
    def __init__(self, prefix: str, clock: Clock) -> None:
        self.redis = api_redis(REDIS_URL)
        self.store = RedisCampaignStore(self.redis, prefix, ttl_s=3600)
        self.audiences = RedisAudienceStore(self.redis, prefix, ttl_s=3600)
        self.followers = InMemoryFollowerStore(4)
        self.topic = Topic()
        self.clock = clock

    def source(self, target: Target) -> RecipientSource:
        if target.kind == "audience":
            return AudienceRecipients(self.redis, self.audiences.key(target.ref))
        return FollowerRecipients(self.followers, target.ref)

    def scheduler(self, owner: str, lease_s: float = 30, **kw: object) -> CampaignScheduler:
        return CampaignScheduler(
            self.store,
            self.topic,
            self.source,
            owner=owner,
            lease_s=lease_s,
            clock=self.clock,
            **kw,  # type: ignore[arg-type]
        )

    def audience_campaign(
        self, n: int, rate: float, *, start: float | None = None, end: float | None = None
    ) -> tuple[str, list[str]]:
        users = [f"u{i:05d}" for i in range(n)]
        aid = f"a_{uuid.uuid4().hex}"
        self.audiences.create(aid, users)
        cid = f"c_{uuid.uuid4().hex}"
        begin = self.clock.now if start is None else start
        self.store.create(spec(cid, Target("audience", aid), n, rate, begin, end))
        return cid, users

    def view(self, cid: str) -> dict[str, object]:
        found = self.store.get(cid)
        assert found is not None
        return progress_view(*found)


@pytest.fixture
def setup(prefix: str) -> Setup:
    return Setup(prefix, Clock())


def run_for(s: Setup, sched: CampaignScheduler, seconds: float, step: float = 0.1) -> None:
    for _ in range(round(seconds / step)):
        s.clock.now += step
        sched.tick()


def test_a_campaign_goes_out_at_its_rate_and_completes(setup: Setup) -> None:
    cid, users = setup.audience_campaign(100, rate=10)
    sched = setup.scheduler("s1")
    sched.tick()
    assert setup.topic.published == 0  # no credit at the very start
    run_for(setup, sched, 5.0)
    assert 48 <= setup.topic.published <= 51
    view = setup.view(cid)
    assert view["state"] == "running" and view["emitted"] == setup.topic.published
    setup.clock.now += 60  # a pause (or a restart) never turns into a burst: one second of rate
    sched.tick()
    assert setup.topic.published - view["emitted"] <= 10  # type: ignore[operator]
    run_for(setup, sched, 8.0)
    assert setup.view(cid)["state"] == "completed"
    assert sorted(setup.topic.users()) == users
    assert setup.store.active() == []
    message = decode_notification_request(setup.topic.parts[0][0])
    assert message.campaign_id == cid and message.tier == "marketing"
    assert message.key == f"{cid}:{message.recipients[0]}"


def test_nothing_goes_before_the_window_and_what_is_left_at_its_end_is_not_sent(
    setup: Setup,
) -> None:
    start = setup.clock.now + 10
    cid, _ = setup.audience_campaign(100, rate=10, start=start, end=start + 3)
    sched = setup.scheduler("s1")
    run_for(setup, sched, 9.5)
    assert setup.topic.published == 0 and setup.view(cid)["state"] == "scheduled"
    run_for(setup, sched, 5.0)
    view = setup.view(cid)
    assert view["state"] == "window_closed"
    assert 28 <= setup.topic.published <= 31
    assert view["emitted"] == setup.topic.published
    assert view["not_sent"] == 100 - setup.topic.published and view["remaining"] == 0


def test_cancel_stops_what_has_not_been_sent(setup: Setup) -> None:
    cid, _ = setup.audience_campaign(100, rate=10)
    sched = setup.scheduler("s1")
    run_for(setup, sched, 2.0)
    sent = setup.topic.published
    assert sent > 0
    progress = setup.store.cancel(cid, setup.clock.now)
    assert progress is not None and progress.state == "cancelled"
    run_for(setup, sched, 3.0)
    view = setup.view(cid)
    assert setup.topic.published == sent == view["emitted"]
    assert view["state"] == "cancelled" and view["not_sent"] == 100 - sent
    assert setup.store.active() == []
    assert setup.store.cancel(cid, setup.clock.now).state == "cancelled"  # type: ignore[union-attr]


def test_one_scheduler_at_a_time_holds_a_campaign(setup: Setup) -> None:
    cid, _ = setup.audience_campaign(50, rate=10)
    first, second = setup.scheduler("s1"), setup.scheduler("s2")
    for _ in range(20):
        setup.clock.now += 0.1
        first.tick()
        second.tick()
    assert cid in first.held and cid not in second.held
    first.release_all()  # a clean stop: the other takes over at once
    run_for(setup, second, 5.0)
    assert setup.view(cid)["state"] == "completed"
    assert sorted(setup.topic.users()) == [f"u{i:05d}" for i in range(50)]


@pytest.mark.parametrize("crashes", [1, 2])
def test_a_crash_between_produce_and_commit_sends_nobody_twice(setup: Setup, crashes: int) -> None:
    cid, users = setup.audience_campaign(60, rate=20)
    left = [crashes]

    def crash(_: str) -> None:
        left[0] -= 1
        raise Crash

    doomed = setup.scheduler("s1", lease_s=0.2, after_produce=crash)
    setup.clock.now += 1.0
    with pytest.raises(Crash):
        doomed.tick()  # 20 users produced, never committed
    assert setup.topic.published == 20
    found = setup.store.get(cid)
    assert found is not None and found[1].pending is not None and found[1].emitted == 0
    time.sleep(0.3)  # the dead scheduler's lease expires (Redis' clock)
    if crashes == 2:
        # The recovery itself dies after producing (nothing left to produce here: it saw all
        # 20 on the topic), and a third scheduler recovers from the first marks.
        again = setup.scheduler("s2", lease_s=0.2, after_produce=crash)
        with pytest.raises(Crash):
            again.tick()
        time.sleep(0.3)
    survivor = setup.scheduler("s3")
    run_for(setup, survivor, 6.0)
    assert setup.view(cid)["state"] == "completed"
    sent = setup.topic.users()
    assert len(sent) == len(set(sent)) == 60
    assert sorted(sent) == users
    assert setup.view(cid)["emitted"] == 60


class SlowTopic(Topic):
    """A topic whose read-back takes `per_partition_s` of real time per partition (a busy broker)."""

    def __init__(self, per_partition_s: float) -> None:
        super().__init__()
        self.per_partition_s = per_partition_s

    def read_since(self, topic: str, marks: Mapping[int, int]) -> Iterator[bytes | None]:
        for p, start in marks.items():
            time.sleep(self.per_partition_s)
            yield from self.parts[p][start:]


def crash_mid_chunk(setup: Setup) -> tuple[str, list[str]]:
    """A campaign whose scheduler (lease 0.2 s) died between a chunk's produce and its commit."""
    cid, users = setup.audience_campaign(60, rate=20)

    def crash(_: str) -> None:
        raise Crash

    doomed = setup.scheduler("s1", lease_s=0.2, after_produce=crash)
    setup.clock.now += 1.0
    with pytest.raises(Crash):
        doomed.tick()
    return cid, users


def survivor_on_slow_topic(
    setup: Setup, read_back_per_partition_s: float
) -> tuple[str, list[str], CampaignScheduler]:
    """After `crash_mid_chunk` on a slow topic, the scheduler (lease 0.2 s) that finds it."""
    setup.topic = SlowTopic(per_partition_s=read_back_per_partition_s)
    cid, users = crash_mid_chunk(setup)
    time.sleep(0.3)  # the dead scheduler's lease expires (Redis' clock)
    return cid, users, setup.scheduler("s2", lease_s=0.2)


def test_a_read_back_longer_than_the_lease_still_recovers_the_chunk(setup: Setup) -> None:
    # The whole read-back (3 partitions) outlasts the survivor's lease in Redis; one
    # partition's does not. Reading it all and then writing the chunk found the lease gone
    # at every step, so the campaign stalled for good (the likely cause of a CI failure of the
    # kill -9 campaign test in tests/integration/test_api_e2e.py).
    cid, users, survivor = survivor_on_slow_topic(setup, read_back_per_partition_s=0.12)
    for _ in range(3):  # the recovery, then the rest at the rate
        setup.clock.now += 0.1
        survivor.tick()
    found = setup.store.get(cid)
    assert found is not None and found[1].pending is None, "the chunk was never recovered"
    assert found[1].emitted >= 20
    run_for(setup, survivor, 4.0)
    sent = setup.topic.users()
    assert len(sent) == len(set(sent)) == 60 and sorted(sent) == users


def test_a_lease_that_lapses_during_the_read_back_is_not_written_on(setup: Setup) -> None:
    # One partition's read-back outlasts the lease: another scheduler may have taken the
    # campaign meanwhile, so nothing is written on what was read; the chunk stays pending.
    cid, _, survivor = survivor_on_slow_topic(setup, read_back_per_partition_s=0.3)
    setup.clock.now += 0.1
    assert survivor.tick() == 0
    found = setup.store.get(cid)
    assert found is not None and found[1].pending is not None and found[1].emitted == 0
    assert cid not in survivor.held
    assert setup.topic.published == 20  # nothing produced again


def test_a_cancelled_campaign_with_a_chunk_in_flight_counts_what_it_wrote(setup: Setup) -> None:
    cid, _ = crash_mid_chunk(setup)
    setup.store.cancel(cid, setup.clock.now)
    assert cid in setup.store.active()  # kept until the chunk is counted
    time.sleep(0.3)
    run_for(setup, setup.scheduler("s2"), 2.0)
    view = setup.view(cid)
    assert view["state"] == "cancelled" and view["emitted"] == 20 == setup.topic.published
    assert view["not_sent"] == 40 and setup.store.active() == []


def test_followers_of_an_author_cross_shards_and_skip_muted_edges(setup: Setup) -> None:
    followers = [f"f{i:03d}" for i in range(40)]
    setup.followers.bulk_load(
        ("author", f, edge_flags(True, muted=f.endswith("7"))) for f in followers
    )
    source = FollowerRecipients(setup.followers, "author")
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = source.page(cursor, 7)
        seen += page
        if cursor is None:
            break
        assert page, "a page is empty only at the end"
    assert sorted(seen) == [f for f in followers if not f.endswith("7")]
    cid = f"c_{uuid.uuid4().hex}"
    setup.store.create(spec(cid, Target("followers", "author"), 40, 50.0, setup.clock.now, None))
    run_for(setup, setup.scheduler("s1"), 3.0)
    assert setup.view(cid)["state"] == "completed"
    assert sorted(setup.topic.users()) == sorted(seen)


def test_campaign_records_round_trip_through_redis(setup: Setup) -> None:
    cid, _ = setup.audience_campaign(5, rate=1)
    found = setup.store.get(cid)
    assert found is not None
    stored, progress = found
    assert stored.target.kind == "audience" and stored.rate_per_s == 1
    assert progress.state == "scheduled" and progress.cursor is None
    assert orjson.loads(orjson.dumps(setup.view(cid)))["total"] == 5
    assert setup.store.get("c_missing") is None
    assert setup.store.cancel("c_missing", 0) is None


def test_a_campaign_s_fallback_and_cap_are_kept_and_carried_by_every_message(
    setup: Setup,
) -> None:
    users = ["u1", "u2"]
    aid = f"a_{uuid.uuid4().hex}"
    setup.audiences.create(aid, users)
    base = spec("c_fb", Target("audience", aid), 2, 10, setup.clock.now, None)
    own = replace(
        base,
        channels=("push", "email"),
        fallback=("push", "email"),
        cap_limit=3,
        cap_window_s=604_800,
    )
    setup.store.create(own)
    found = setup.store.get("c_fb")
    assert found is not None and found[0] == own
    view = setup.view("c_fb")
    assert view["channels"] == ["push", "email"] and view["fallback"] == ["push", "email"]
    run_for(setup, setup.scheduler("s1"), 1.0)
    sent = [decode_notification_request(v) for part in setup.topic.parts for v in part]
    assert sorted(r.recipients[0] for r in sent) == users
    assert {(r.fallback, r.cap_limit, r.cap_window_s) for r in sent} == {
        (("push", "email"), 3, 604_800)
    }


def test_a_campaign_stored_before_fallbacks_and_caps_reads_with_none() -> None:
    stored = orjson.loads(spec_json(spec("c_old", Target("followers", "a"), 1, 1, 0.0, None)))
    for field in ("fallback", "cap_limit", "cap_window_s", "segment"):
        del stored[field]
    old = spec_from(orjson.dumps(stored))
    assert (old.fallback, old.cap_limit, old.cap_window_s, old.segment) == ((), None, None, None)
