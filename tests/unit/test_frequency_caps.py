"""Frequency caps and bundles: the window arithmetic, the cap state, and the shard's summaries."""

from __future__ import annotations

import logging
import pickle
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from operators.adapters.catalog_files import load_catalog
from operators.delivery.model import SendRequest
from operators.delivery.payloads import push_collapse_id
from operators.delivery.steps import decode_channel_message
from operators.events import RawEvent
from operators.fanout.caps import (
    MAX_AUTHORS,
    Bundle,
    CapRule,
    FrequencyCap,
    window_start,
)
from operators.fanout.columns import UserTable
from operators.fanout.decide import decide_few, decide_page
from operators.fanout.eligibility import FLAG_NOTIFY_ON_POST, Suppressed
from operators.fanout.shard import (
    POST_CATEGORY,
    FanoutTally,
    FollowerShard,
    ShardJob,
    summary_id,
    summary_message,
)
from operators.notify.templates import render_push
from schemas.codecs import decode_dispatch_batch, encode_dispatch_batch
from schemas.records import DispatchBatch
from tests.fakes import InMemoryFollowerStore
from tests.unit.test_fanout_shard import SOURCES, caught_up, device, follow, prefs

HOUR = 3_600
NOON = datetime(2026, 6, 1, 12, tzinfo=UTC)
RULE = CapRule(POST_CATEGORY, 10, HOUR)


# ---- window arithmetic ------------------------------------------------------------------------


def test_windows_are_fixed_and_aligned_on_the_epoch_in_utc() -> None:
    noon = NOON.timestamp()
    assert window_start(noon, HOUR) == noon
    assert window_start(noon + HOUR - 0.001, HOUR) == noon  # the last instant of the window
    assert window_start(noon + HOUR, HOUR) == noon + HOUR  # the end starts the next one
    assert window_start(noon + 1_799.5, HOUR) == noon
    # Not the user's local hour: 12:30 UTC is in [12:00, 13:00) UTC whatever the time zone.
    assert window_start(noon + 1_800, HOUR) == datetime(2026, 6, 1, 12, tzinfo=UTC).timestamp()
    assert window_start(noon, 86_400) == datetime(2026, 6, 1, tzinfo=UTC).timestamp()
    assert window_start(noon + 61, 900) == noon  # 15-minute windows: 12:00:00-12:15:00
    assert window_start(noon + 901, 900) == noon + 900
    assert window_start(0.0, HOUR) == 0


@pytest.mark.parametrize("limit, window_s", [(0, HOUR), (10, 0)])
def test_zero_disables_the_cap(limit: int, window_s: int) -> None:
    rule = CapRule(POST_CATEGORY, limit, window_s)
    assert not rule.enabled
    assert FollowerShard(SOURCES, caps=rule).caps is None
    with pytest.raises(ValueError, match="disabled"):
        FrequencyCap(rule)


def test_a_rule_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        CapRule(POST_CATEGORY, 70_000, HOUR)
    with pytest.raises(ValueError, match="window"):
        CapRule(POST_CATEGORY, 10, -1)


# ---- the cap state ----------------------------------------------------------------------------


def rows(*r: int) -> np.ndarray:
    return np.array(r, np.int32)


def test_n_pushes_per_user_across_authors_then_the_bundle() -> None:
    cap = FrequencyCap(CapRule(POST_CATEGORY, 2, HOUR))
    t = NOON.timestamp()
    kept, over = cap.admit(rows(0, 1), "ana", t)
    assert kept.tolist() == [0, 1] and over == 0
    kept, over = cap.admit(rows(0), "ben", t + 10)  # another author counts too
    assert kept.tolist() == [0] and over == 0
    kept, over = cap.admit(rows(0, 1), "cat", t + 20)
    assert kept.tolist() == [1] and over == 1
    for author in ["dan", "cat", "eve", "fay"]:
        assert cap.admit(rows(0), author, t + 30)[0].tolist() == []
    assert cap.bundled[0] == 5
    assert cap.authors() == {0: ["cat", "dan", "eve"][:MAX_AUTHORS]}  # the first few, distinct
    assert cap.next_due() == t + HOUR
    assert cap.take_due(t + HOUR - 1) == {}  # the window has not ended
    due = cap.take_due(t + HOUR)
    assert due == {0: Bundle(int(t), 5, ("cat", "dan", "eve"), t + HOUR)}
    assert cap.take_due(t + HOUR) == {} and cap.next_due() is None  # taken once
    # The new window starts from zero.
    assert cap.admit(rows(0, 1), "ana", t + HOUR)[0].tolist() == [0, 1]


def test_a_window_without_posts_still_rolls_its_bundles() -> None:
    cap = FrequencyCap(CapRule(POST_CATEGORY, 1, HOUR))
    t = NOON.timestamp()
    cap.admit(rows(3), "ana", t)
    cap.admit(rows(3), "ben", t)
    # Nothing happens for three hours: the bundle is due at its window's end.
    due = cap.take_due(t + 3 * HOUR)
    assert list(due) == [3] and due[3].count == 1 and due[3].not_before == t + HOUR


def test_a_waiting_summary_merges_with_the_next_window_s_bundle() -> None:
    cap = FrequencyCap(CapRule(POST_CATEGORY, 1, HOUR))
    t = NOON.timestamp()
    cap.admit(rows(0), "ana", t)
    cap.admit(rows(0), "ben", t)
    (first,) = cap.take_due(t + HOUR).values()
    # The user is in quiet hours until 15:00: the summary waits, and the next hour adds to it.
    cap.put_back(0, Bundle(first.window, first.count, first.authors, t + 3 * HOUR))
    cap.admit(rows(0), "cat", t + HOUR)
    cap.admit(rows(0), "dan", t + HOUR + 1)
    cap.admit(rows(0), "ben", t + HOUR + 2)
    assert cap.take_due(t + 2 * HOUR) == {}  # merged: one summary, still waiting
    due = cap.take_due(t + 3 * HOUR)
    assert due == {0: Bundle(int(t + HOUR), 3, ("ben", "dan"), t + 3 * HOUR)}


def test_admit_one_and_admit_agree_with_a_plain_count() -> None:
    rng = random.Random(5)
    rule = CapRule(POST_CATEGORY, 3, 600)
    vec, one = FrequencyCap(rule), FrequencyCap(rule)
    sent: dict[tuple[int, int], int] = {}  # (window, row) -> pushes
    named = 0
    t = NOON.timestamp()
    for step in range(300):
        t += rng.uniform(0, 40)
        author = f"a{rng.randrange(8)}"
        page = rng.sample(range(50), rng.randrange(1, 12))
        w = window_start(t, 600)
        want = []
        for r in page:
            if sent.get((w, r), 0) < 3:
                sent[(w, r)] = sent.get((w, r), 0) + 1
                want.append(r)
        kept, over = vec.admit(np.array(page, np.int32), author, t)
        assert kept.tolist() == want and over == len(page) - len(want), step
        assert [r for r in page if one.admit_one(r, author, t)] == want, step
        assert vec.authors() == one.authors(), step
        named += len(vec.authors())
    assert named > 0
    assert vec.take_due(t + 600) == one.take_due(t + 600) != {}


def test_the_state_round_trips_through_its_arrays() -> None:
    cap = FrequencyCap(CapRule(POST_CATEGORY, 1, HOUR))
    t = NOON.timestamp()
    for author in ["ana", "bén", "cat", "dan"]:
        cap.admit(rows(2, 7000), author, t)
    cap.take_due(t + HOUR)  # pending now
    cap.put_back(2, Bundle(int(t), 3, ("bén", "cat", "dan"), t + 5 * HOUR))
    cap.admit(rows(2, 5), "eve", t + HOUR)
    cap.admit(rows(5), "fay", t + HOUR)
    arrays = pickle.loads(pickle.dumps(cap.to_arrays()))
    back = FrequencyCap.from_arrays(cap.rule, arrays)
    assert back.window == cap.window and back.pending == cap.pending
    assert back.authors() == cap.authors()
    for name in ("sent", "bundled"):
        was, now = getattr(cap, name), getattr(back, name)
        assert np.flatnonzero(now).tolist() == np.flatnonzero(was).tolist() != []
        assert now[np.flatnonzero(now)].tolist() == was[np.flatnonzero(was)].tolist()
    # Sparse: the counts of the three users with any, not of 7,001 rows.
    assert len(arrays["rows"]) == 2 and arrays["sent"].nbytes == 4


# ---- the cap in the page decision ---------------------------------------------------------------


def table_with(users: dict[str, int]) -> UserTable:
    """Users with that many devices each (0: none)."""
    t = UserTable()
    for u, n in users.items():
        t.ensure_row(u)
        for d in range(n):
            t.apply_device(device(u, f"{u}-{d}"))
    return t


@pytest.mark.parametrize("few", [False, True])
def test_only_users_who_would_get_a_push_use_the_cap(few: bool) -> None:
    table = table_with({"a": 1, "nodev": 0, "b": 2, "quiet": 1})
    table.apply_preference(prefs("quiet", start=11, end=13))
    cap = FrequencyCap(CapRule(POST_CATEGORY, 1, HOUR))
    r = [table.row_of(u) for u in ["a", "nodev", "b", "quiet"]]
    flags = [FLAG_NOTIFY_ON_POST] * 4
    hours = np.array([12], np.int8)
    t = NOON.timestamp()
    for author in ["x", "y"]:
        if few:
            d = decide_few(
                table, r, flags, -1, hours, NOON, lambda row, a=author: cap.admit_one(row, a, t)
            )
        else:
            d = decide_page(
                table,
                np.array(r, np.int32),
                np.array(flags, np.uint8),
                -1,
                hours,
                NOON,
                lambda rows, a=author: cap.admit(rows, a, t),
            )
        if author == "x":
            assert len(d.apns) == 3  # a's device and b's two
            assert d.suppressed == {Suppressed.NO_DEVICE: 1}
        else:
            assert d.apns == [] and d.suppressed == {Suppressed.NO_DEVICE: 1, Suppressed.CAPPED: 2}
        assert d.deferred_rows.tolist() == [r[3]]
    assert cap.sent[r[1]] == 0 and cap.sent[r[3]] == 0  # no device, quiet: nothing counted


# ---- the shard: single pushes, summaries, restarts ---------------------------------------------


def world(
    authors: int = 40, caps: CapRule = RULE
) -> tuple[FollowerShard, InMemoryFollowerStore, list[str]]:
    """`u` follows 40 authors and has an iPhone and an Android tablet; `v` follows the first."""
    shard = FollowerShard(SOURCES, settle_s=0, caps=caps)
    caught_up(shard)
    store = InMemoryFollowerStore(shard_count=1)
    names = [f"author{i:02d}" for i in range(authors)]
    store.apply_follow_changes([follow(a, "u") for a in names] + [follow(names[0], "v")])
    shard.apply_device(device("u", "u-phone", "apns"))
    shard.apply_device(device("u", "u-tablet", "fcm"))
    shard.apply_device(device("v", "v-phone", "apns"))
    return shard, store, names


def post_job(i: int, author: str) -> ShardJob:
    return ShardJob(f"p{i:02d}", author, "2026-06-01T12:00:00Z", "normal", 0.0, 0)


def run_posts(
    shard: FollowerShard,
    store: InMemoryFollowerStore,
    posts: list[tuple[int, str]],
    start: datetime = NOON,
    tally: FanoutTally | None = None,
) -> list[DispatchBatch]:
    """One post a minute from `start`, each expanded at once; releases checked each time."""
    out: list[DispatchBatch] = []
    tally = tally or FanoutTally()
    for i, author in posts:
        now = start + timedelta(minutes=i)
        out += [decode(b) for b in shard.release_due(store, now, tally)]
        shard.add_job(post_job(i, author), now.timestamp(), tally)
        while shard.jobs:
            out += [decode(b) for b in shard.expand(store, now, 1_000, tally)]
    return out


def decode(batch: object) -> DispatchBatch:
    """Any batch a shard emits, as the delivery side reads it from the topic."""
    if isinstance(batch, DispatchBatch):
        return decode_dispatch_batch(encode_dispatch_batch(batch), batch.lane)
    return decode_dispatch_batch(batch.payload, batch.lane)  # type: ignore[attr-defined]


def pushes_of(out: list[DispatchBatch], user: str) -> list[tuple[str, str]]:
    return [
        (i["notification_id"], i["device_id"]) for b in out for i in b.items if i["user_id"] == user
    ]


def test_forty_posts_in_an_hour_from_forty_authors_give_ten_pushes_and_one_summary() -> None:
    shard, store, names = world()
    tally = FanoutTally()
    out = run_posts(shard, store, list(enumerate(names)), tally=tally)  # 12:00 to 12:39
    singles = pushes_of(out, "u")
    assert singles == [(f"p{i:02d}:u", d) for i in range(10) for d in ["u-phone", "u-tablet"]]
    assert pushes_of(out, "v") == [("p00:v", "v-phone")]
    assert tally.suppressed[Suppressed.CAPPED] == 30
    assert shard.next_release() == NOON.timestamp() + HOUR
    # 12:59:59: not yet; 13:00: one summary, to each of u's devices.
    assert shard.release_due(store, NOON + timedelta(seconds=HOUR - 1), tally) == []
    summary = [decode(b) for b in shard.release_due(store, NOON + timedelta(hours=1), tally)]
    assert {b.provider for b in summary} == {"apns", "fcm"}
    sid = summary_id(POST_CATEGORY, int(NOON.timestamp()))
    assert pushes_of(summary, "u") == [(f"{sid}:u", "u-phone"), (f"{sid}:u", "u-tablet")]
    for b in summary:
        assert (b.post_id, b.author_id, b.lane, b.topic) == (
            sid,
            "author10",
            "normal",
            f"push.{b.provider}",
        )
        assert b.message == {
            "category": "new_post",
            "template_id": "new_posts_bundle",
            "tier": "social",
            "data": {
                "count": 30,
                "names": "author10, author11",
                "others": 28,
                "author_ids": "author10,author11,author12",
                "window_start": "2026-06-01T12:00:00Z",
            },
            "collapse_key": "bundle:new_post:u",
        }
    assert (tally.summaries, tally.summarised) == (1, 30)
    assert shard.next_release() is None
    assert shard.release_due(store, NOON + timedelta(hours=5), tally) == []  # once


def test_the_summary_renders_from_its_template() -> None:
    catalog = load_catalog()
    template = catalog.templates["new_posts_bundle"]
    assert template.category == POST_CATEGORY and POST_CATEGORY in catalog.categories
    bundle = Bundle(int(NOON.timestamp()), 5, ("ana", "ben", "cat"), 0.0)
    data = summary_message(POST_CATEGORY, "u", bundle)["data"]
    assert render_push(template, "en", data).title == "ana, ben and 3 others posted"
    assert render_push(template, "en", data).body == "5 new posts from people you follow"
    one = summary_message(POST_CATEGORY, "u", Bundle(0, 1, ("ana",), 0.0))["data"]
    assert render_push(template, "en", one).title == "ana posted"
    assert render_push(template, "fr-CA", data).title.startswith("Nouvelles publications de ana")


def test_a_long_user_id_gets_a_collapse_key_within_apns_limit() -> None:
    message = summary_message(POST_CATEGORY, "u" * 120, Bundle(0, 2, ("a",), 0.0))
    key = message.get("collapse_key")
    assert key is not None and len(key.encode()) <= 64 and key.startswith("bundle:")
    again = summary_message(POST_CATEGORY, "u" * 120, Bundle(7200, 9, ("b",), 0.0))
    assert again.get("collapse_key") == key  # per user and category, not per window


def test_quiet_hours_defer_the_summary_and_push_off_drops_it() -> None:
    shard, store, names = world(authors=12)
    shard.apply_device(device("w", "w-phone"))
    store.apply_follow_changes([follow(a, "w") for a in names])
    run_posts(shard, store, list(enumerate(names)))
    # At 13:00 u is in quiet hours until 15:00 UTC; w turned push off.
    shard.apply_preference(prefs("u", start=13, end=15))
    shard.apply_preference(prefs("w", push=False))
    assert shard.release_due(store, NOON + timedelta(hours=1), FanoutTally()) == []
    assert shard.next_release() == NOON.timestamp() + 3 * HOUR
    later = shard.release_due(store, NOON + timedelta(hours=3), FanoutTally())
    assert {(i["user_id"], b.message["data"]["count"]) for b in later for i in b.items} == {  # type: ignore[index]
        ("u", 2)
    }


def test_a_restore_in_the_middle_gives_the_same_pushes_and_one_summary() -> None:
    posts = list(enumerate(world()[2]))
    shard, store, _ = world()
    whole = run_posts(shard, store, posts)
    whole += [decode(b) for b in shard.release_due(store, NOON + timedelta(hours=1), FanoutTally())]

    shard, store, _ = world()
    first = run_posts(shard, store, posts[:15])
    snap = pickle.loads(pickle.dumps(shard.snapshot()))
    crashed = run_posts(shard, store, posts[15:25])  # lost with the process (kill -9)
    assert not pushes_of(crashed, "u")  # all over the cap already
    # A new process: rows come back in another order (another user's events first).
    again = FollowerShard(SOURCES, settle_s=0, caps=RULE)
    again.restore(snap, now=NOON.timestamp())
    again.apply_device(device("zz", "zz-phone"))
    again.apply_device(device("v", "v-phone", "apns"))
    again.apply_device(device("u", "u-phone", "apns"))
    again.apply_device(device("u", "u-tablet", "fcm"))
    again.resume_caps()
    assert again.users.row_of("u") != shard.users.row_of("u")
    caught_up(again)
    # Bytewax replays the posts after the snapshot's epoch.
    second = run_posts(again, store, posts[15:])
    second += [
        decode(b) for b in again.release_due(store, NOON + timedelta(hours=1), FanoutTally())
    ]
    assert pushes_of(first + second, "u") == pushes_of(whole, "u")
    summaries = [b for b in first + second if b.message is not None]
    assert len(summaries) == 2 and {b.message["data"]["count"] for b in summaries} == {30}  # type: ignore[index]
    assert again.release_due(store, NOON + timedelta(hours=2), FanoutTally()) == []


def test_a_restore_after_the_roll_sends_the_same_summary_id_again() -> None:
    shard, store, names = world(authors=12)
    run_posts(shard, store, list(enumerate(names)))
    snap = pickle.loads(pickle.dumps(shard.snapshot()))
    one = NOON + timedelta(hours=1)
    sent = [decode(b) for b in shard.release_due(store, one, FanoutTally())]
    # The process dies after sending; the restored shard sends it again with the same ids,
    # which the channel sink and the delivery ledger drop as duplicates.
    again = FollowerShard(SOURCES, settle_s=0, caps=RULE)
    again.restore(snap, now=one.timestamp())
    again.apply_device(device("u", "u-phone", "apns"))
    again.apply_device(device("u", "u-tablet", "fcm"))
    again.resume_caps()
    caught_up(again)
    resent = [
        decode(b) for b in again.release_due(store, one + timedelta(seconds=5), FanoutTally())
    ]
    assert pushes_of(resent, "u") == pushes_of(sent, "u") != []


def test_the_checkpoint_carries_the_cap_state_and_a_snapshot_wins_over_it() -> None:
    shard, store, names = world(authors=14)
    run_posts(shard, store, list(enumerate(names[:12])))  # 10 sent, 2 bundled
    snap = pickle.loads(pickle.dumps(shard.snapshot()))
    columns, positions = shard.checkpoint_state()
    run_posts(shard, store, [(12, names[12])])  # after the snapshot: bundled, 3
    later_columns, _ = shard.checkpoint_state()

    # No snapshot (a start without recovery data): the checkpoint's counts.
    plain = FollowerShard(SOURCES, settle_s=0, caps=RULE)
    plain.load_checkpoint(later_columns, positions)
    plain.resume_caps()
    caught_up(plain)
    assert run_posts(plain, store, [(13, names[13])]) == []
    due = plain.release_due(store, NOON + timedelta(hours=1), FanoutTally())
    assert {decode(b).message["data"]["count"] for b in due} == {4}  # type: ignore[index]

    # With a snapshot: its counts, whatever a later checkpoint holds.
    resumed = FollowerShard(SOURCES, settle_s=0, caps=RULE)
    resumed.restore(snap, now=NOON.timestamp())
    resumed.load_checkpoint(columns, positions)
    resumed.resume_caps()
    caught_up(resumed)
    run_posts(resumed, store, [(12, names[12]), (13, names[13])])
    due = resumed.release_due(store, NOON + timedelta(hours=1), FanoutTally())
    assert {decode(b).message["data"]["count"] for b in due} == {4}  # type: ignore[index]


def test_a_snapshot_against_another_checkpoint_drops_those_counts_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    shard, store, names = world(authors=12)
    shard.checkpoint_state()  # u and v are in the checkpoint's rows now
    run_posts(shard, store, list(enumerate(names)))
    snap = pickle.loads(pickle.dumps(shard.snapshot()))
    again = FollowerShard(SOURCES, settle_s=0, caps=RULE)
    again.restore(snap, now=NOON.timestamp())
    other = FollowerShard(SOURCES, settle_s=0)
    other.apply_device(device("v", "v-phone"))  # another table: v where u was
    other.apply_device(device("u", "u-phone"))
    again.load_checkpoint(*other.checkpoint_state())
    with caplog.at_level(logging.WARNING):
        again.resume_caps()
    assert "frequency-cap counts" in caplog.text
    assert again.caps is not None and not again.caps.authors() and not again.caps.sent.any()


def test_a_snapshot_before_the_restored_state_was_applied_passes_it_on() -> None:
    shard, store, names = world(authors=12)
    run_posts(shard, store, list(enumerate(names)))
    snap = pickle.loads(pickle.dumps(shard.snapshot()))
    restored = FollowerShard(SOURCES, settle_s=0, caps=RULE)
    restored.restore(snap, now=NOON.timestamp())
    # Bytewax snapshots it again before its table was loaded: the counts are not lost.
    again = FollowerShard(SOURCES, settle_s=0, caps=RULE)
    again.restore(pickle.loads(pickle.dumps(restored.snapshot())), now=NOON.timestamp())
    again.apply_device(device("u", "u-phone", "apns"))
    again.resume_caps()
    caught_up(again)
    out = again.release_due(store, NOON + timedelta(hours=1), FanoutTally())
    assert [(decode(b).message or {}).get("data", {}).get("count") for b in out] == [2]


def test_the_fanout_benchmark_counts_pushes_without_capping_its_users(tmp_path: Path) -> None:
    # Its users get far more than 10 normal posts an hour and every item is checked: the cap
    # runs (every push counted) but stays out of reach unless asked for.
    from scripts.bench.fanout import bench_env, build_parser

    args = build_parser().parse_args([])
    assert bench_env(args, tmp_path, 9092, 3030, "b:")["FANFARE_POST_CAP"] == "65535"
    args = build_parser().parse_args(["--post-cap", "0"])
    assert bench_env(args, tmp_path, 9092, 3030, "b:")["FANFARE_POST_CAP"] == "0"


def test_the_delivery_side_reads_a_summary_with_its_message() -> None:
    shard, store, names = world(authors=12)
    run_posts(shard, store, list(enumerate(names)))
    out = shard.release_due(store, NOON + timedelta(hours=1), FanoutTally())
    for offset, batch in enumerate(out):
        assert isinstance(batch, DispatchBatch)
        event = RawEvent(batch.topic, 0, offset, None, encode_dispatch_batch(batch), 1.0)
        [send] = decode_channel_message(event)
        assert isinstance(send, SendRequest) and send.message == batch.message
        assert push_collapse_id(send) == "bundle:new_post:u"
        assert send.key == (f"{batch.post_id}:u", batch.items[0]["device_id"])


def test_count_one_refuses_over_the_cap_and_keeps_no_bundle() -> None:
    cap = FrequencyCap(CapRule("campaign", 2, 3_600))
    assert [cap.count_one(5, 10.0) for _ in range(3)] == [True, True, False]
    assert cap.count_one(6, 10.0)  # another user
    assert cap.author_ids == [] and cap.next_due() is None
    assert cap.count_one(5, 3_600.0)  # the next window
    assert cap.pending == {}
