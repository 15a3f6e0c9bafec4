"""The follower shard's decisions, driven directly with the in-memory follower store."""

import pickle
from datetime import UTC, datetime, timedelta

from operators.events import CaughtUp
from operators.fanout.eligibility import Suppressed
from operators.fanout.shard import FanoutTally, FollowerShard, ShardJob
from schemas.records import DeviceChange, FollowChange, PreferenceChange
from tests.fakes import InMemoryFollowerStore

NOON = datetime(2026, 6, 1, 12, tzinfo=UTC)
TS = NOON
SOURCES = ["follow_changes/0", "preference_changes/0", "device_changes/0"]


def follow(
    author: str, follower: str, notify: bool = True, muted: bool = False, op: str = "follow"
) -> FollowChange:
    return FollowChange(author, follower, op, notify, muted, TS)  # type: ignore[arg-type]


def device(user: str, dev: str, provider: str = "apns", active: bool = True) -> DeviceChange:
    token = "ab" * 32 if provider == "apns" else "f" * 40
    return DeviceChange(user, dev, provider, token, active, TS)  # type: ignore[arg-type]


def prefs(
    user: str, push: bool = True, start: int | None = None, end: int | None = None, tz: str = "UTC"
) -> PreferenceChange:
    return PreferenceChange(user, push, start, end, tz, TS)


def job(
    post: str = "p1", author: str = "a", lane: str = "normal", read_at: float = 0.0
) -> ShardJob:
    return ShardJob(post, author, "2026-06-01T12:00:00Z", lane, read_at, 0)


def caught_up(shard: FollowerShard, as_of: float = 1e12) -> None:
    for s in SOURCES:
        shard.note_caught_up(CaughtUp(s, as_of))


def make(page_size: int = 2_000) -> tuple[FollowerShard, InMemoryFollowerStore]:
    shard = FollowerShard(SOURCES, page_size=page_size, settle_s=0)
    caught_up(shard)
    return shard, InMemoryFollowerStore(shard_count=1)


def expand_all(
    shard: FollowerShard,
    store: InMemoryFollowerStore,
    now: datetime = NOON,
    tally: FanoutTally | None = None,
) -> set[tuple[str, str, str, str]]:
    tally = tally or FanoutTally()
    out = []
    for _ in range(10_000):
        if not shard.jobs:
            break
        out += shard.expand(store, now, 1_000, tally)
    return {
        (b.topic, i["notification_id"], i["user_id"], i["device_id"]) for b in out for i in b.items
    }


def test_the_trust_contract_in_one_shard() -> None:
    shard, store = make()
    store.apply_follow_changes(
        [
            follow("a", "ok"),
            follow("a", "two_devices"),
            follow("a", "no_device"),
            follow("a", "off", notify=False),
            follow("a", "muted", muted=True),
            follow("a", "disabled"),
            follow("a", "a"),  # self-follow
            follow("a", "gone"),
            follow("a", "gone", op="unfollow"),
            follow("b", "other_author_follower"),
        ]
    )
    for u in ["ok", "off", "muted", "disabled", "a", "gone", "other_author_follower"]:
        shard.apply_device(device(u, f"{u}-d"))
    shard.apply_device(device("two_devices", "phone", "apns"))
    shard.apply_device(device("two_devices", "tablet", "fcm"))
    shard.apply_preference(prefs("disabled", push=False))
    shard.add_job(job(), 0, FanoutTally())
    tally = FanoutTally()
    got = expand_all(shard, store, tally=tally)
    assert got == {
        ("push.apns", "p1:ok", "ok", "ok-d"),
        ("push.apns", "p1:two_devices", "two_devices", "phone"),
        ("push.fcm", "p1:two_devices", "two_devices", "tablet"),
    }
    assert tally.candidates == 7
    assert tally.suppressed == {
        Suppressed.NO_DEVICE: 1,
        Suppressed.NOTIFY_OFF: 1,
        Suppressed.MUTED: 1,
        Suppressed.PUSH_DISABLED: 1,
        Suppressed.SELF: 1,
    }
    assert tally.jobs_completed == 1 and not shard.jobs


def test_push_enabled_defaults_to_true_and_prefs_are_complete_records() -> None:
    shard, store = make()
    store.apply_follow_changes([follow("a", "u")])
    shard.apply_device(device("u", "d"))
    shard.apply_preference(prefs("u", push=False))
    shard.apply_preference(prefs("u", push=True))  # a later record replaces, not merges
    shard.add_job(job(), 0, FanoutTally())
    assert expand_all(shard, store) == {("push.apns", "p1:u", "u", "d")}


def test_deactivated_and_refreshed_devices() -> None:
    shard, store = make()
    store.apply_follow_changes([follow("a", "u")])
    shard.apply_device(device("u", "d1"))
    shard.apply_device(device("u", "d2", "fcm"))
    shard.apply_device(device("u", "d1", active=False))
    shard.apply_device(device("u", "d2", "apns"))  # refreshed: provider changed
    shard.add_job(job(), 0, FanoutTally())
    assert expand_all(shard, store) == {("push.apns", "p1:u", "u", "d2")}
    shard.apply_device(device("u", "d2", active=False))
    assert shard.users.record("u") == ((True, None, None, ""), [])  # nothing left to remember


def test_gate_waits_for_every_changelog_partition_to_catch_up() -> None:
    shard = FollowerShard(SOURCES, settle_s=0.5)
    store = InMemoryFollowerStore(1)
    store.apply_follow_changes([follow("a", "u")])
    shard.apply_device(device("u", "d"))
    shard.add_job(job(read_at=100.0), 0, FanoutTally())
    assert shard.expand(store, NOON, 100, FanoutTally()) == []  # start-up: nothing read yet
    shard.note_caught_up(CaughtUp("follow_changes/0", 200.0))
    shard.note_caught_up(CaughtUp("preference_changes/0", 200.0))
    assert not shard.has_runnable_jobs()  # device_changes/0 not yet at its end
    shard.note_caught_up(CaughtUp("device_changes/0", 100.2))  # caught up, but before read+settle
    assert not shard.has_runnable_jobs()
    shard.note_caught_up(CaughtUp("device_changes/0", 99.0))  # older marker never moves it back
    shard.note_caught_up(CaughtUp("device_changes/0", 100.6))
    assert shard.has_runnable_jobs()
    assert len(shard.expand(store, NOON, 100, FanoutTally())) == 1


def test_duplicate_jobs_are_dropped_while_in_flight_and_recently_done() -> None:
    shard, store = make()
    store.apply_follow_changes([follow("a", "u")])
    shard.apply_device(device("u", "d"))
    tally = FanoutTally()
    t0 = NOON.timestamp()
    assert shard.add_job(job(), t0, tally)
    assert not shard.add_job(job(), t0, tally)
    expand_all(shard, store)  # completes at NOON
    assert not shard.add_job(job(), t0 + 10, tally)
    assert tally.deduped_jobs == 2
    assert shard.add_job(job(), t0 + 10_000, tally)  # past the recent-job window


def test_budget_resumes_mid_shard_across_a_snapshot() -> None:
    shard, store = make(page_size=7)
    users = [f"u{i:04d}" for i in range(1_000)]
    store.apply_follow_changes([follow("celeb", u) for u in users])
    for u in users:
        shard.apply_device(device(u, u + "-d", "fcm" if int(u[1:]) % 2 else "apns"))
    shard.add_job(job(author="celeb", lane="bulk"), 0, FanoutTally())
    first = shard.expand(store, NOON, 300, FanoutTally())
    assert shard.jobs["p1"].cursor == "u0299"
    restored = FollowerShard(SOURCES, page_size=7, settle_s=0)
    restored.restore(pickle.loads(pickle.dumps(shard.snapshot())), now=NOON.timestamp())
    assert restored.expand(store, NOON, 100, FanoutTally()) == []  # users not replayed yet
    for u in users:  # the device changelog is replayed from its beginning on start
        restored.apply_device(device(u, u + "-d", "fcm" if int(u[1:]) % 2 else "apns"))
    caught_up(restored)
    rest = expand_all(restored, store)
    before = {
        (b.topic, i["notification_id"], i["user_id"], i["device_id"])
        for b in first
        for i in b.items
    }
    assert not before & rest
    assert {x[2] for x in before | rest} == set(users)
    assert all(len(b.items) <= 500 for b in first)


def test_normal_lane_before_bulk() -> None:
    shard, store = make()
    store.apply_follow_changes([follow("celeb", f"u{i}") for i in range(50)] + [follow("a", "u1")])
    for i in range(50):
        shard.apply_device(device(f"u{i}", "d"))
    shard.add_job(job("big", "celeb", "bulk"), 0, FanoutTally())
    shard.add_job(job("small", "a", "normal"), 0, FanoutTally())
    out = shard.expand(store, NOON, 10, FanoutTally())
    assert [b.post_id for b in out] == ["small", "big"]
    assert out[0].lane == "normal" and out[1].lane == "bulk"


def test_a_job_takes_its_lane_from_the_follower_count_when_it_starts() -> None:
    # Cold start: the planner saw 0 followers (follow changes not applied yet) and chose the
    # normal lane; by the time the job may start, the changelogs are read and it is a celebrity.
    shard = FollowerShard(SOURCES, settle_s=0, celebrity_threshold=3)
    store = InMemoryFollowerStore(shard_count=1)
    shard.add_job(job("big", "celeb", "normal", read_at=10.0), 0, FanoutTally())
    shard.add_job(job("small", "a", "bulk", read_at=10.0), 0, FanoutTally())
    assert shard.expand(store, NOON, 100, FanoutTally()) == []  # gate closed: nothing decided
    assert shard.jobs["big"].lane == "normal"
    store.apply_follow_changes([follow("celeb", f"u{i}") for i in range(5)] + [follow("a", "u1")])
    for i in range(5):
        shard.apply_device(device(f"u{i}", "d"))
    caught_up(shard)
    out = shard.expand(store, NOON, 100, FanoutTally())
    assert [(b.post_id, b.lane) for b in out] == [("small", "normal"), ("big", "bulk")]


def test_a_started_job_keeps_its_lane() -> None:
    shard = FollowerShard(SOURCES, page_size=2, settle_s=0, celebrity_threshold=3)
    caught_up(shard)
    store = InMemoryFollowerStore(shard_count=1)
    store.apply_follow_changes([follow("celeb", f"u{i}") for i in range(6)])
    for i in range(6):
        shard.apply_device(device(f"u{i}", "d"))
    shard.add_job(job("big", "celeb", "normal"), 0, FanoutTally())
    first = shard.expand(store, NOON, 2, FanoutTally())
    assert [b.lane for b in first] == ["bulk"]
    store.apply_follow_changes([follow("celeb", f"u{i}", op="unfollow") for i in range(4)])
    rest = shard.expand(store, NOON, 100, FanoutTally())
    assert rest and all(b.lane == "bulk" for b in rest)  # two followers left: still bulk


def test_quiet_hours_defer_then_release_with_preferences_checked_again() -> None:
    shard, store = make()
    store.apply_follow_changes([follow("a", u) for u in ["night", "night_off", "night_unf", "day"]])
    for u in ["night", "night_off", "night_unf", "day"]:
        shard.apply_device(device(u, u + "-d"))
    # 12:00 UTC is 21:00 in Tokyo: quiet 20-8 there until 23:00 UTC.
    for u in ["night", "night_off", "night_unf"]:
        shard.apply_preference(prefs(u, start=20, end=8, tz="Asia/Tokyo"))
    shard.add_job(job(), 0, FanoutTally())
    tally = FanoutTally()
    assert {x[2] for x in expand_all(shard, store, tally=tally)} == {"day"}
    assert tally.deferred == 3
    assert shard.next_release() == datetime(2026, 6, 1, 23, tzinfo=UTC).timestamp()
    # While waiting: one turns push off, one unfollows.
    shard.apply_preference(prefs("night_off", push=False, start=20, end=8, tz="Asia/Tokyo"))
    store.apply_follow_changes([follow("a", "night_unf", op="unfollow")])
    assert shard.release_due(store, NOON + timedelta(hours=10), FanoutTally()) == []  # not yet
    tally = FanoutTally()
    out = shard.release_due(store, datetime(2026, 6, 1, 23, tzinfo=UTC), tally)
    assert {(b.topic, i["user_id"]) for b in out for i in b.items} == {("push.apns", "night")}
    assert tally.released == 3  # their wait ended; what happened next is counted apart
    assert tally.suppressed == {Suppressed.PUSH_DISABLED: 1, Suppressed.UNFOLLOWED: 1}
    assert shard.next_release() is None and not shard.deferred_posts


def test_release_defers_again_when_quiet_hours_moved() -> None:
    shard, store = make()
    store.apply_follow_changes([follow("a", "u")])
    shard.apply_device(device("u", "d"))
    shard.apply_preference(prefs("u", start=11, end=13))  # UTC, noon is quiet until 13:00
    shard.add_job(job(), 0, FanoutTally())
    assert expand_all(shard, store) == set()
    shard.apply_preference(prefs("u", start=12, end=15))
    tally = FanoutTally()
    assert shard.release_due(store, NOON.replace(hour=13), tally) == []
    assert tally.deferred == 1
    assert shard.next_release() == NOON.replace(hour=15).timestamp()
    out = shard.release_due(store, NOON.replace(hour=15), FanoutTally())
    assert [i["user_id"] for b in out for i in b.items] == ["u"]


def test_start_equal_end_means_no_quiet_hours_and_no_state() -> None:
    shard, store = make()
    store.apply_follow_changes([follow("a", "u")])
    shard.apply_device(device("u", "d"))
    shard.apply_preference(prefs("u", start=12, end=12))
    assert shard.users.record("u")[0] == (True, None, None, "")  # stored as the default
    shard.add_job(job(), 0, FanoutTally())
    assert len(expand_all(shard, store)) == 1


def test_snapshot_keeps_deferred_but_not_users_and_releases_wait_for_the_replay() -> None:
    shard, store = make()
    store.apply_follow_changes([follow("a", "u")])
    shard.apply_device(device("u", "d"))
    shard.apply_preference(prefs("u", start=11, end=13))
    shard.add_job(job(), 0, FanoutTally())
    expand_all(shard, store)
    snap = pickle.loads(pickle.dumps(shard.snapshot()))
    assert "users" not in snap and "caught_up" not in snap  # rebuilt from the changelogs
    restored = FollowerShard(SOURCES, settle_s=0)
    restored.restore(snap, now=NOON.timestamp())
    one_pm = NOON.replace(hour=13)
    # Due, but the user table is empty until the changelogs were read to their end again.
    assert restored.release_due(store, one_pm, FanoutTally()) == []
    restored.apply_device(device("u", "d"))
    restored.apply_preference(prefs("u", start=11, end=13))
    caught_up(restored, as_of=NOON.timestamp() - 1)  # a marker from before the restore
    assert restored.release_due(store, one_pm, FanoutTally()) == []
    caught_up(restored, as_of=NOON.timestamp() + 1)
    out = restored.release_due(store, one_pm, FanoutTally())
    assert [i["device_id"] for b in out for i in b.items] == ["d"]


def test_unknown_snapshot_version_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="version"):
        FollowerShard(SOURCES).restore({"v": 1}, now=0.0)


def test_recent_jobs_expire_in_order_without_scanning_everything() -> None:
    # Regression: pruning scanned every remembered post on each new job (quadratic under a
    # steady stream of posts). Expired entries must go, live ones stay, in completion order.
    shard, _store = make()
    t0 = NOON.timestamp()
    for i in range(1_000):
        shard.recent[f"old{i}"] = t0 + i
    shard.add_job(job("new"), t0 + 500.5, FanoutTally())
    assert len(shard.recent) == 499
    assert next(iter(shard.recent)) == "old501"
