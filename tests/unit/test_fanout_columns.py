"""The columnar shard against a plain reference implementation of the trust contract.

For random users, preferences, zones (around DST changes too), devices and follow graphs, the
shard's vectorised decision must give exactly the reference's (post, user, device) pushes, the
same deferrals (user, release time) and the same suppression counts, whether the followers
come as store pages or as a cached column; and a checkpoint taken anywhere in the changelog,
plus the tail, must equal the table rebuilt from the whole changelog.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.events import CaughtUp
from operators.fanout import columns
from operators.fanout.columns import FragmentArena, PackedIds, UserTable, index_key, index_keys
from operators.fanout.eligibility import Suppressed
from operators.fanout.prefetch import ColumnPrefetch
from operators.fanout.quiet_hours import hour_is_quiet, quiet_until
from operators.fanout.shard import ChangelogEvent, FanoutTally, FollowerShard, ShardJob
from schemas.codecs import decode_dispatch_batch, encode_dispatch_batch
from schemas.records import DeviceChange, FollowChange, PreferenceChange
from tests.fakes import InMemoryFollowerStore

TS = datetime(2026, 1, 1, tzinfo=UTC)
SOURCES = ["follow_changes/0", "preference_changes/0", "device_changes/0"]
ZONES = [
    "UTC",
    "America/New_York",
    "Europe/Berlin",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "America/St_Johns",
    "Pacific/Chatham",
]
# Instants next to DST changes in the zones above (and plain ones).
EDGES = [
    datetime(2026, 3, 8, 7, 0, tzinfo=UTC),  # New York springs forward at 07:00 UTC
    datetime(2026, 11, 1, 6, 0, tzinfo=UTC),  # New York falls back
    datetime(2026, 3, 29, 1, 0, tzinfo=UTC),  # Berlin
    datetime(2026, 10, 25, 1, 0, tzinfo=UTC),
    datetime(2026, 4, 4, 15, 0, tzinfo=UTC),  # Lord Howe: a half-hour change
    datetime(2026, 10, 3, 15, 30, tzinfo=UTC),
    datetime(2026, 4, 4, 14, 0, tzinfo=UTC),  # Chatham
    datetime(2026, 3, 8, 5, 30, tzinfo=UTC),  # St John's
]

ids = st.text(alphabet='ab"\\é/ z', min_size=1, max_size=3)


@st.composite
def moments(draw: st.DrawFn) -> datetime:
    base = draw(st.sampled_from([*EDGES, TS]))
    return base + timedelta(minutes=draw(st.integers(-150, 150)))


@st.composite
def changelog(draw: st.DrawFn) -> list[PreferenceChange | DeviceChange]:
    users = draw(st.lists(ids, min_size=1, max_size=12, unique=True))
    out: list[PreferenceChange | DeviceChange] = []
    for _ in range(draw(st.integers(0, 60))):
        user = draw(st.sampled_from(users))
        if draw(st.booleans()):
            quiet = draw(st.integers(0, 3)) > 0
            start = draw(st.integers(0, 23)) if quiet else None
            end = draw(st.integers(0, 23)) if quiet else None
            out.append(
                PreferenceChange(
                    user, draw(st.integers(0, 4)) > 0, start, end, draw(st.sampled_from(ZONES)), TS
                )
            )
        else:
            provider = draw(st.sampled_from(["apns", "fcm"]))
            token = draw(st.sampled_from(["ab" * 32, "AB" * 40, "tok_" + "x" * 30, "f:" * 20]))
            out.append(
                DeviceChange(
                    user,
                    draw(st.sampled_from(["d1", "d2", 'd"3', "d\\"])),
                    provider,  # type: ignore[arg-type]
                    token,
                    draw(st.integers(0, 4)) > 0,
                    TS,
                )
            )
    return out


@st.composite
def follows(draw: st.DrawFn, users: list[str]) -> list[FollowChange]:
    people = [*users, "a", *draw(st.lists(ids, max_size=3))]
    out = []
    for person in people:  # most people follow the author, with random flags
        if draw(st.integers(0, 9)) < 8:
            notify, muted = draw(st.integers(0, 5)) > 0, draw(st.integers(0, 5)) == 0
            out.append(FollowChange("a", person, "follow", notify, muted, TS))
    for _ in range(draw(st.integers(0, 10))):  # then some changes, other authors too
        out.append(
            FollowChange(
                draw(st.sampled_from(["a", "a", people[0]])),
                draw(st.sampled_from(people)),
                draw(st.sampled_from(["follow", "unfollow"])),  # type: ignore[arg-type]
                draw(st.integers(0, 4)) > 0,
                draw(st.integers(0, 4)) == 0,
                TS,
            )
        )
    return out


# ---- the reference: plain dicts, one follower at a time --------------------------------------


@dataclass
class RefUser:
    push: bool = True
    quiet: tuple[int, int, str] | None = None
    devices: dict[str, tuple[str, str]] = field(default_factory=dict)  # in registration order


def reference_users(events: list[PreferenceChange | DeviceChange]) -> dict[str, RefUser]:
    users: dict[str, RefUser] = {}
    for e in events:
        u = users.setdefault(e.user_id, RefUser())
        if isinstance(e, PreferenceChange):
            u.push = e.push_enabled
            s, t = e.quiet_hours_start, e.quiet_hours_end
            u.quiet = None if s is None or t is None or s == t else (s, t, e.timezone)
        else:
            u.devices.pop(e.device_id, None)
            if e.active and e.token:
                u.devices[e.device_id] = (e.provider, e.token)
    return users


def reference_decision(
    users: dict[str, RefUser], edges: dict[str, int], author: str, now: datetime
) -> tuple[set[tuple[str, str, str, str]], set[tuple[str, float]], Counter[str]]:
    pushes: set[tuple[str, str, str, str]] = set()
    deferred: set[tuple[str, float]] = set()
    counts: Counter[str] = Counter()
    for follower, flags in sorted(edges.items()):
        if follower == author:
            counts[Suppressed.SELF] += 1
            continue
        if not flags & 1:
            counts[Suppressed.NOTIFY_OFF] += 1
            continue
        if flags & 2:
            counts[Suppressed.MUTED] += 1
            continue
        u = users.get(follower, RefUser())
        if not u.push:
            counts[Suppressed.PUSH_DISABLED] += 1
            continue
        if u.quiet is not None:
            start, end, tz = u.quiet
            from operators.fanout.quiet_hours import zone

            if hour_is_quiet(now.astimezone(zone(tz)).hour, start, end):
                until = quiet_until(now, start, end, tz)
                assert until is not None
                deferred.add((follower, until.timestamp()))
                continue
        if not u.devices:
            counts[Suppressed.NO_DEVICE] += 1
            continue
        for device, (provider, token) in u.devices.items():
            pushes.add((provider, follower, device, token))
    return pushes, deferred, counts


def reference_edges(changes: list[FollowChange], author: str) -> dict[str, int]:
    edges: dict[str, int] = {}
    for c in changes:
        if c.author_id != author:
            continue
        if c.op == "follow":
            edges[c.follower_id] = (1 if c.notify_on_post else 0) | (2 if c.muted else 0)
        else:
            edges.pop(c.follower_id, None)
    return edges


# ---- the columnar shard ----------------------------------------------------------------------


def run_shard(
    events: list[PreferenceChange | DeviceChange],
    follow_changes: list[FollowChange],
    now: datetime,
    lane: str,
    page_size: int,
    few: int,
    late: int = 0,
    read_ahead: bool = False,
) -> tuple[set[tuple[str, str, str, str]], set[tuple[str, float]], Counter[str], int]:
    """The shard's pushes; the last `late` follow changes arrive after the job (read ahead or not)."""
    store = InMemoryFollowerStore(shard_count=1)
    prefetch = ColumnPrefetch(lambda: store) if read_ahead else None
    try:
        return _run_shard(events, follow_changes, now, lane, page_size, few, late, store, prefetch)
    finally:
        if prefetch is not None:
            prefetch.close()


def _run_shard(
    events: list[PreferenceChange | DeviceChange],
    follow_changes: list[FollowChange],
    now: datetime,
    lane: str,
    page_size: int,
    few: int,
    late: int,
    store: InMemoryFollowerStore,
    prefetch: ColumnPrefetch | None,
) -> tuple[set[tuple[str, str, str, str]], set[tuple[str, float]], Counter[str], int]:
    shard = FollowerShard(
        SOURCES, page_size=page_size, batch_size=3, settle_s=0, few=few, prefetch=prefetch
    )
    for source in SOURCES:
        shard.note_caught_up(CaughtUp(source, 1e12))
    for i, e in enumerate(events):
        source = "preference_changes/0" if isinstance(e, PreferenceChange) else "device_changes/0"
        assert shard.apply(ChangelogEvent(e, 0, source, i, "log"))
    early = len(follow_changes) - min(late, len(follow_changes))
    store.apply_follow_changes(follow_changes[:early])
    shard.add_job(ShardJob("p", "a", "2026-01-01T00:00:00Z", lane, 0.0, 0), 0, FanoutTally())
    if prefetch is not None:
        prefetch.wait()  # read ahead against the early edges only
    store.apply_follow_changes(follow_changes[early:])
    tally = FanoutTally()
    batches = []
    for _ in range(1_000):
        if not shard.jobs:
            break
        batches += shard.expand(store, now, page_size, tally)
    assert not shard.jobs
    pushes = set()
    for b in batches:
        assert 1 <= b.count <= 3 and b.lane == lane
        decoded = decode_dispatch_batch(b.payload, lane)  # the delivery's decoder accepts it
        assert encode_dispatch_batch(decoded) == b.payload  # byte for byte orjson's document
        for item in decoded.items:
            assert item["notification_id"] == f"p:{item['user_id']}"
            pushes.add((b.provider, item["user_id"], item["device_id"], item["token"]))
        assert len(decoded.items) == b.count
    n_items = sum(b.count for b in batches)
    deferred = {(u, release) for (release, _), us in shard.deferred.items() for u in us}
    assert tally.deferred == sum(len(us) for us in shard.deferred.values())
    counts = Counter({k: v for k, v in tally.suppressed.items() if v})
    return pushes, deferred, counts, n_items


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    events=changelog(),
    now=moments(),
    lane=st.sampled_from(["normal", "bulk"]),
    page_size=st.integers(1, 7),
    few=st.sampled_from([0, 1_000]),  # every page vectorised, or every page one by one
    late=st.integers(0, 3),
    read_ahead=st.booleans(),
)
def test_columnar_decision_equals_the_reference(
    data: st.DataObject,
    events: list[PreferenceChange | DeviceChange],
    now: datetime,
    lane: str,
    page_size: int,
    few: int,
    late: int,
    read_ahead: bool,
) -> None:
    users = sorted({e.user_id for e in events})
    follow_changes = data.draw(follows(users))
    pushes, deferred, counts, n_items = run_shard(
        events, follow_changes, now, lane, page_size, few, late, read_ahead
    )
    ref_users = reference_users(events)
    edges = reference_edges(follow_changes, "a")
    ref_pushes, ref_deferred, ref_counts = reference_decision(ref_users, edges, "a", now)
    assert pushes == ref_pushes
    assert n_items == len(ref_pushes)  # no duplicate
    assert deferred == ref_deferred
    assert counts == ref_counts


def table_of(events: list[PreferenceChange | DeviceChange]) -> UserTable:
    t = UserTable()
    for e in events:
        if isinstance(e, PreferenceChange):
            t.apply_preference(e)
        else:
            t.apply_device(e)
    return t


@settings(max_examples=200, deadline=None)
@given(events=changelog(), cut=st.integers(0, 40), again=st.integers(0, 40))
def test_checkpoint_anywhere_plus_the_tail_equals_the_whole_changelog(
    events: list[PreferenceChange | DeviceChange], cut: int, again: int
) -> None:
    whole = table_of(events)
    cut = min(cut, len(events))
    shard = FollowerShard(SOURCES)
    for i, e in enumerate(events[:cut]):
        shard.apply(ChangelogEvent(e, 0, "changes/0", i, "log"))
    columns, positions = shard.checkpoint_state()
    restarted = FollowerShard(SOURCES)
    restarted.load_checkpoint(columns, positions)
    # The source starts from an older position (another shard's): the events before this
    # shard's position are skipped, the tail is applied once.
    start = min(again, cut)
    applied = [
        restarted.apply(ChangelogEvent(e, 0, "changes/0", i, "log"))
        for i, e in enumerate(events)
        if i >= start
    ]
    assert applied == [i >= cut for i in range(start, len(events))]
    assert restarted.users.state() == whole.state()
    for uid in {e.user_id for e in events}:
        assert restarted.users.row_of(uid) >= 0


def test_a_new_log_resets_the_position() -> None:
    shard = FollowerShard(SOURCES)
    e = PreferenceChange("u", False, None, None, "UTC", TS)
    assert shard.apply(ChangelogEvent(e, 0, "preference_changes/0", 5, "old"))
    assert not shard.apply(ChangelogEvent(e, 0, "preference_changes/0", 5, "old"))
    again = PreferenceChange("u", True, None, None, "UTC", TS)
    assert shard.apply(ChangelogEvent(again, 0, "preference_changes/0", 0, "new"))
    assert shard.positions["preference_changes/0"] == ("new", 1)
    assert shard.users.record("u")[0][0] is True


def test_fragments_escape_like_orjson() -> None:
    t = UserTable()
    t.apply_device(DeviceChange('q"\\é', 'd"', "fcm", "tok", True, TS))
    (frag,) = t.record('q"\\é')[1]
    item: dict[str, Any] = orjson.loads(b'{"notification_id":"p:' + frag)
    assert item == {
        "notification_id": 'p:q"\\é',
        "user_id": 'q"\\é',
        "device_id": 'd"',
        "token": "tok",
    }


def test_caught_up_markers_give_positions_in_partitions_with_none_of_the_shards_users() -> None:
    # Users are bucketed into shards and partitions by the same id: a shard may never see an
    # event of some partitions. Their markers' offsets still count as applied, so a checkpoint
    # covers every partition and the source's floor is not the beginning.
    shard = FollowerShard(SOURCES)
    e = PreferenceChange("u", False, None, None, "UTC", TS)
    shard.apply(ChangelogEvent(e, 0, "preference_changes/0", 7, "L"))
    shard.note_caught_up(CaughtUp("preference_changes/0", 1.0, 9, "L"))
    shard.note_caught_up(CaughtUp("preference_changes/1", 1.0, 40, "L"))
    shard.note_caught_up(CaughtUp("device_changes/1", 1.0, 12, "M"))
    shard.note_caught_up(CaughtUp("follow_changes/0", 1.0, 5, "F"))  # not a user changelog
    shard.note_caught_up(CaughtUp("preference_changes/1", 2.0, 30, "L"))  # never backwards
    shard.note_caught_up(CaughtUp("device_changes/1", 2.0, 50, "other"))  # another log: no
    assert shard.positions == {
        "preference_changes/0": ("L", 9),
        "preference_changes/1": ("L", 40),
        "device_changes/1": ("M", 12),
    }


def test_the_largest_inputs_the_schemas_admit_fit_and_come_out_unchanged() -> None:
    # Nothing a valid changelog event holds is refused for size: ids are bytes in an arena,
    # tokens stay in their registered text (APNs tokens are variable length: 64 to 200 hex
    # digits pass the schema, any case), so there is no "does not fit" dead letter to make.
    shard = FollowerShard(SOURCES, settle_s=0)
    for source in SOURCES:
        shard.note_caught_up(CaughtUp(source, 1e12))
    uid = 'é"\\' + "ü" * 125  # 128 characters, 256+ bytes of UTF-8, with JSON escapes
    tokens = {"long": "AbC0" * 50, "fcm": "x:-_" * 1024, "short": "ab" * 32}
    devices = [
        DeviceChange(uid, "long", "apns", tokens["long"], True, TS),
        DeviceChange(uid, "fcm", "fcm", tokens["fcm"], True, TS),
        DeviceChange(uid, "short", "apns", tokens["short"], True, TS),
    ]
    for i, d in enumerate(devices):
        assert shard.apply(ChangelogEvent(d, 0, "device_changes/0", i, "L"))
    store = InMemoryFollowerStore(1)
    store.apply_follow_changes([FollowChange("a", uid, "follow", True, False, TS)])
    shard.add_job(ShardJob("p", "a", "2026-01-01T00:00:00Z", "bulk", 0.0, 0), 0, FanoutTally())
    out = shard.expand(store, TS, 10, FanoutTally())
    got = {(i["device_id"], i["token"], i["user_id"]) for b in out for i in b.items}
    assert got == {(d, t, uid) for d, t in tokens.items()}


@given(
    st.lists(
        st.tuples(st.integers(0, 7), st.binary(min_size=0, max_size=40)), min_size=1, max_size=60
    )
)
@settings(max_examples=60, deadline=None)
def test_fragment_arena_matches_a_list_through_replacements_and_packing(
    writes: list[tuple[int, bytes]],
) -> None:
    arena, reference = FragmentArena(), []
    for slot, frag in writes:
        if slot < len(reference):
            arena[slot] = frag
            reference[slot] = frag
        else:
            arena.append(frag)
            reference.append(frag)
        assert [arena[d] for d in range(len(arena))] == reference
    assert [bytes(f) for f in arena.pick([len(reference) - 1, 0])] == [reference[-1], reference[0]]
    assert all(arena.starts_with(d, f[:3]) for d, f in enumerate(reference))
    assert not arena.starts_with(0, reference[0] + b"x")
    # What a checkpoint keeps, read back: the same slots, no garbage.
    again = FragmentArena(arena.blob(), arena.lens())
    assert [again[d] for d in range(len(again))] == reference and again.garbage == 0
    arena.pack()
    assert [arena[d] for d in range(len(arena))] == reference and arena.garbage == 0


@given(st.lists(st.binary(max_size=30), min_size=1, max_size=20), st.data())
@settings(max_examples=60, deadline=None)
def test_fragment_arena_join_is_the_joined_fragments_and_leaves_the_arena_growable(
    frags: list[bytes], data: st.DataObject
) -> None:
    arena = FragmentArena()
    for f in frags:
        arena.append(f)
    picked = data.draw(st.lists(st.integers(0, len(frags) - 1), max_size=25))
    got = arena.join(picked, b",S", b"H[", b"]T")
    assert got == b"H[" + b",S".join(frags[d] for d in picked) + b"]T"
    assert isinstance(got, bytes)
    # No view of the arena outlives the join: it still grows and is replaced in place.
    arena.append(b"x" * 64)
    arena[0] = b"y" * 64
    assert arena[len(frags)] == b"x" * 64 and arena[0] == b"y" * 64


def test_fragment_arena_packs_itself_once_half_is_garbage() -> None:
    arena = FragmentArena()
    arena.append(b"a" * 1000)
    for i in range(3_000):  # the same slot replaced: 3 MB written, one fragment alive
        arena[0] = bytes([97 + i % 26]) * 1000
    assert arena[0] == bytes([97 + 2_999 % 26]) * 1000
    assert len(arena.blob()) == 1000 and arena.garbage <= 1 << 20


ID_TEXT = st.one_of(
    st.text(max_size=12),
    st.text(alphabet="u0123456789", min_size=1, max_size=8),
    st.text(min_size=60, max_size=200),  # past the vectorised hash's byte loop
)


@given(st.lists(ID_TEXT, max_size=300))
@settings(max_examples=60, deadline=None)
def test_vectorised_index_keys_equal_index_key(ids: list[str]) -> None:
    packed = PackedIds.of(ids, [0] * len(ids))
    data = np.frombuffer(packed.blob, np.uint8)
    keys = index_keys(data, packed.starts(), packed.ends)
    assert keys.tolist() == [index_key(u.encode()) for u in ids]
    assert packed.ids() == ids


def _weak_keys(data: Any, starts: Any, ends: Any) -> Any:
    return ((ends - starts) % 3).astype(np.uint64)


@pytest.mark.parametrize("weak_hash", [False, True])
@given(
    known=st.lists(ID_TEXT, max_size=120, unique=True),
    merged=st.integers(0, 120),
    wanted=st.lists(st.one_of(ID_TEXT, st.integers(0, 119)), max_size=150),
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_packed_rows_equal_rows_of_one_by_one(
    weak_hash: bool,
    known: list[str],
    merged: int,
    wanted: list[str | int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same rows, new users added in the same order, whatever the index holds.

    Users merged into the sorted index and users added since, followers new to the shard, and
    (with a weak hash) many ids under one key.
    """
    if weak_hash:
        monkeypatch.setattr(columns, "index_key", lambda encoded: len(encoded) % 3)
        monkeypatch.setattr(columns, "index_keys", _weak_keys)
    ids = list(
        dict.fromkeys(
            known[w] if isinstance(w, int) else w
            for w in wanted
            if not isinstance(w, int) or w < len(known)
        )
    )
    tables = []
    for _ in range(2):
        t = UserTable()
        for u in known[:merged]:
            t.ensure_row(u)
        t.compact()  # merges the index
        for u in known[merged:]:
            t.ensure_row(u)  # left in the recent additions
        tables.append(t)
    one_by_one = tables[0].rows_of(ids)
    packed = tables[1].rows_of_packed(PackedIds.of(ids, [1] * len(ids)))
    assert packed.tolist() == one_by_one.tolist()
    assert [tables[1].uid(r) for r in packed.tolist()] == ids
    assert tables[1].rows == tables[0].rows
    assert [tables[1].uid(r) for r in range(tables[1].rows)] == [
        tables[0].uid(r) for r in range(tables[0].rows)
    ]
