"""Replay, dead-letter and recovery-rebuild commands: parsing, selection, grouping, planning."""

from __future__ import annotations

import argparse
import io
from collections.abc import Hashable
from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import orjson
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig
from bytewax.testing import TestingSink, TestingSource, run_main

from flows.runtime.recovery_marker import recovery_lineage
from operators.config import load_settings
from scripts import cli
from scripts.commands import dlq, replay
from scripts.commands import recovery as recovery_cli
from scripts.commands.dlq import Fate, Letter, MemoryRedriveMarks, plan_redrive
from scripts.commands.replay import ReplayStats, select_posts
from scripts.commands.topic_scan import (
    Message,
    Position,
    UsageError,
    Verdict,
    Window,
    WindowCursor,
    parse_position,
    resolve_windows,
)

NOW = 1_780_000_000.0  # a fixed "now" (seconds)
TS = "2026-06-01T12:00:00Z"
TS_MS = 1_780_315_200_000


def post(pid: str, author: str = "alice", **extra: Any) -> bytes:
    body = {
        "event_type": "post_created",
        "post_id": pid,
        "author_id": author,
        "visibility": "public",
        "created_at": TS,
        **extra,
    }
    return orjson.dumps(body)


# -- argument parsing ------------------------------------------------------------------------


def test_positions_parse_every_form() -> None:
    assert parse_position("2026-06-01T12:00:00Z").time_ms == TS_MS
    assert parse_position("2026-06-01T14:00:00+02:00").time_ms == TS_MS
    assert parse_position("2h", now=lambda: NOW).time_ms == int((NOW - 7_200) * 1000)
    assert parse_position("90s", now=lambda: NOW).time_ms == int((NOW - 90) * 1000)
    assert parse_position("1d", now=lambda: NOW).time_ms == int((NOW - 86_400) * 1000)
    assert parse_position("1200").offset == 1200
    assert parse_position("0:1200,3:9").offsets == {0: 1200, 3: 9}


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("yesterday", "is not a position"),
        ("2026-06-01T12:00:00", "no UTC offset"),
        ("2026-13-01T12:00:00Z", "not RFC 3339"),
        ("0:1,0:2", "named twice"),
        ("-5", "is not a position"),
        ("2w", "is not a position"),
    ],
)
def test_bad_positions_say_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_position(text)


def parse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(argv)
    assert caught.value.code == 2
    return capsys.readouterr().err


def test_unsupported_topic_is_a_usage_error_listing_what_is_supported(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = parse_error(["replay", "--topic", "follow_changes", "--from", "1h"], capsys)
    assert "replaying 'follow_changes' is not supported" in err
    assert "supported: post_created (into post_created.backfill)" in err


def test_bad_from_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_error(["replay", "--topic", "post_created", "--from", "last tuesday"], capsys)
    assert "argument --from: 'last tuesday' is not a position" in err
    err = parse_error(["replay", "--topic", "post_created"], capsys)
    assert "--from" in err and "required" in err
    err = parse_error(["dlq", "list", "--since", "1200"], capsys)
    assert "'1200' is not a time" in err


def test_documented_commands_parse() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(
        [
            "replay",
            "--topic",
            "post_created",
            "--from",
            "2026-06-01T12:00:00Z",
            "--to",
            "0:10,1:4",
            "--author",
            "alice",
            "--author",
            "bob",
            "--dry-run",
        ]
    )
    assert args.func is replay.command and args.authors == ["alice", "bob"] and args.dry_run
    assert args.start.time_ms == TS_MS and args.stop.offsets == {0: 10, 1: 4}
    args = parser.parse_args(["dlq", "list", "--reason", "schema", "--limit", "5"])
    assert args.func is dlq.command and args.reasons == ["schema"] and args.limit == 5
    args = parser.parse_args(
        ["dlq", "redrive", "--source-topic", "follow_changes", "--since", "2h", "--dry-run"]
    )
    assert args.source_topics == ["follow_changes"] and args.since.time_ms and args.dry_run
    args = parser.parse_args(["recovery", "rebuild", "fanout", "--replay-follow-changes"])
    assert args.func is recovery_cli.command and args.flow == "fanout"


def test_redrive_refuses_a_source_topic_that_is_not_an_input(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = cli.build_parser().parse_args(["dlq", "redrive", "--source-topic", "push.apns"])
    assert dlq.command(args, load_settings({})) == 2
    err = capsys.readouterr().err
    assert "cannot redrive dead letters of push.apns: not a fanfare input topic" in err
    assert "post_created.backfill" in err and "notification_acks" in err


def test_replay_follow_changes_is_for_the_fanout_only(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser().parse_args(
        ["recovery", "rebuild", "delivery", "--replay-follow-changes"]
    )
    assert recovery_cli.command(args, load_settings({})) == 2
    assert "fanout flow only" in capsys.readouterr().err


# -- selection by time, offset and author ----------------------------------------------------

BOUNDS = {0: (0, 10), 1: (2, 6), 2: (0, 0)}


def no_times(ms: int, parts: Any) -> dict[int, int]:
    raise AssertionError("no time lookup expected")


def test_offsets_select_every_partition_and_clamp() -> None:
    w = resolve_windows("t", Position("3", offset=3), None, BOUNDS, no_times)
    assert w == {0: Window(0, 3, 10), 1: Window(1, 3, 6)}  # partition 2 is empty
    w = resolve_windows("t", Position("0", offset=0), Position("8", offset=8), BOUNDS, no_times)
    assert w == {0: Window(0, 0, 8), 1: Window(1, 2, 6)}  # clamped to the low watermark


def test_partition_pairs_read_only_the_partitions_named() -> None:
    start = Position("1:3", offsets={1: 3})
    assert resolve_windows("t", start, None, BOUNDS, no_times) == {1: Window(1, 3, 6)}
    stop = Position("0:5", offsets={0: 5})
    w = resolve_windows("t", Position("0", offset=0), stop, BOUNDS, no_times)
    assert w == {0: Window(0, 0, 5), 1: Window(1, 2, 6)}  # unnamed partitions end at their end
    with pytest.raises(UsageError, match=r"names partition\(s\) \[7\] but t has 3 \(0-2\)"):
        resolve_windows("t", Position("7:1", offsets={7: 1}), None, BOUNDS, no_times)


def test_times_start_at_the_brokers_answer_and_cut_by_timestamps() -> None:
    asked: list[int] = []

    def lookup(ms: int, parts: Any) -> dict[int, int]:
        asked.append(ms)
        return {0: 4, 1: -1, 2: -1}  # partition 1: nothing at or after the time

    start, stop = Position("t0", time_ms=1_000), Position("t1", time_ms=5_000)
    w = resolve_windows("t", start, stop, BOUNDS, lookup)
    assert asked == [1_000]
    assert w == {0: Window(0, 4, 10, from_ms=1_000, to_ms=5_000)}


def test_window_cursor_skips_until_the_start_time_and_stops_at_the_end_time() -> None:
    cursor = WindowCursor(Window(0, 0, 100, from_ms=1_000, to_ms=5_000))
    # The embedded broker answers offsets_for_times with 0: earlier messages are skipped.
    assert [cursor.judge(o, ts) for o, ts in [(0, 10), (1, 999), (2, None)]] == [Verdict.SKIP] * 3
    assert cursor.judge(3, 1_000) is Verdict.TAKE
    assert cursor.judge(4, 900) is Verdict.TAKE  # once started, an older stamp is still taken
    assert cursor.judge(5, 4_999) is Verdict.TAKE
    assert cursor.judge(6, 5_000) is Verdict.STOP  # exclusive end
    offsets_only = WindowCursor(Window(0, 2, 4))
    assert [offsets_only.judge(o, None) for o in (1, 2, 3, 4)] == [
        Verdict.SKIP,
        Verdict.TAKE,
        Verdict.TAKE,
        Verdict.STOP,
    ]


def message(offset: int, value: bytes, partition: int = 0) -> Message:
    return Message("post_created", partition, offset, b"k", value, 1, ())


def test_select_posts_filters_authors_and_skips_malformed() -> None:
    msgs = [
        message(0, post("p1", "alice")),
        message(1, b"\xff not json"),
        message(2, post("p2", "bob")),
        message(3, orjson.dumps({"event_type": "post_created", "post_id": "p3"})),
        message(4, post("p4", "carol")),
        message(5, post("p5", "alice", visibility="private")),
    ]
    stats = ReplayStats()
    chosen = list(select_posts(msgs, frozenset({"alice", "carol"}), stats))
    assert [s.post.post_id for s in chosen] == ["p1", "p4", "p5"]
    assert (stats.taken, stats.selected, stats.malformed, stats.other_authors) == (6, 3, 2, 1)
    stats = ReplayStats()
    assert len(list(select_posts(msgs, frozenset(), stats))) == 4
    assert (stats.selected, stats.malformed, stats.other_authors) == (4, 2, 0)


def test_replayed_messages_keep_their_headers_and_say_where_they_came_from() -> None:
    m = Message("post_created", 1, 7, b"alice", b"{}", 1, (("trace", b"x"),))
    assert replay.replay_headers(m) == [("trace", b"x"), ("fanfare-replay-of", b"post_created/1@7")]


# -- dead letters: grouping ------------------------------------------------------------------


def letter(
    topic: str,
    offset: int | None,
    error: str,
    raw: str,
    partition: int | None = 0,
    at: int = 0,
) -> Letter:
    return Letter(f"dead_letters/0@{at}", 1, topic, partition, offset, error, raw)


def test_reasons_are_the_errors_leading_word() -> None:
    assert dlq.reason_of("schema: data must contain ['op'] properties") == "schema"
    assert dlq.reason_of("invalid_json: unexpected character") == "invalid_json"
    assert dlq.reason_of("unknown_notification: no p1:bob in the store") == "unknown_notification"
    assert dlq.reason_of("unexpected topic 'x' for the changelog input") == "unprocessable"


def test_dead_letters_group_by_reason_with_counts_and_examples() -> None:
    letters = [
        letter("follow_changes", 1, "schema: a", "{}", at=0),
        letter("post_created", 2, "schema: b", "{}", at=1),
        letter("post_created", 3, "invalid_json: c", "x", at=2),
        letter("follow_changes", 4, "schema: d", "{}", at=3),
        letter("preference_changes", 5, "unknown_timezone: e", "{}", at=4),
        letter("push.apns", None, "dead_lettered: f", "{}", partition=None, at=5),
    ]
    groups = dlq.group_by_reason(letters, examples=2, marked={"follow_changes/0@4": "x"})
    assert [(g.reason, g.count) for g in groups] == [
        ("schema", 3),
        ("dead_lettered", 1),
        ("invalid_json", 1),
        ("unknown_timezone", 1),
    ]
    schema = groups[0]
    assert dict(schema.by_topic or {}) == {"follow_changes": 2, "post_created": 1}
    assert [x.at for x in schema.examples or []] == ["dead_letters/0@0", "dead_letters/0@1"]
    assert schema.redriven == 1
    chosen = dlq.choose(letters, frozenset({"schema"}), frozenset({"post_created"}))
    assert [x.offset for x in chosen] == [2]


def test_decode_letter_reads_the_contract_and_counts_the_rest_unreadable() -> None:
    body = {"source_topic": "t", "partition": 1, "offset": 2, "error": "schema: x", "raw": "r"}
    m = Message("dead_letters", 0, 9, b"t", orjson.dumps(body), 5, ())
    x = dlq.decode_letter(m)
    assert x == Letter("dead_letters/0@9", 5, "t", 1, 2, "schema: x", "r")
    assert x.identity == "t/1@2"
    assert dlq.decode_letter(Message("dead_letters", 0, 1, None, b"[1]", 5, ())) is None
    assert dlq.decode_letter(Message("dead_letters", 0, 1, None, b"nope", 5, ())) is None


# -- dead letters: redrive selection and its marker ------------------------------------------


def prefs(user: str, tz: str = "UTC") -> str:
    return orjson.dumps({"user_id": user, "timezone": tz, "ts": TS}).decode()


def follow(author: str, follower: str, **extra: Any) -> str:
    body = {"author_id": author, "follower_id": follower, "op": "follow", "ts": TS, **extra}
    return orjson.dumps(body).decode()


class FakeNewer:
    def __init__(self, latest: dict[tuple[str, int], dict[Hashable, int]]) -> None:
        self.latest = latest
        self.asked: list[tuple[str, int, int]] = []

    def __call__(self, topic: str, partition: int, after: int) -> dict[Hashable, int]:
        self.asked.append((topic, partition, after))
        return self.latest.get((topic, partition), {})


def test_redrive_plan_decides_each_dead_letters_fate() -> None:
    letters = [
        letter("post_created", 3, "schema: was a bug", post("p9", "alice").decode()),
        letter("follow_changes", 4, "schema: data must contain ['op']", '{"author_id": "zed"}'),
        letter("push.apns", None, "dead_lettered: x", "{}", partition=None),
        letter("post_created", None, "schema: y", post("p10").decode(), partition=None),
        letter("preference_changes", 7, "unknown_timezone: old", prefs("bob")),
        letter("preference_changes", 8, "unknown_timezone: old", prefs("carol")),
        letter("post_created", 3, "schema: was a bug", post("p9", "alice").decode()),
        letter("follow_changes", 9, "schema: old", follow("alice", "dan")),
        letter(
            "notification_acks",
            2,
            "unknown_notification: no p1:bob",
            orjson.dumps(
                {"notification_id": "p1:bob", "device_id": "d", "event": "opened", "ts": TS}
            ).decode(),
        ),
        letter("device_changes", 1, "schema: z", "{}"),
    ]
    newer = FakeNewer(
        {
            ("preference_changes", 0): {"bob": 12},  # bob changed his preferences later
            ("follow_changes", 0): {("alice", "erin"): 20},
        }
    )
    marks = {"device_changes/0@1": "device_changes/0@44 at 2026-06-01T12:00:00Z"}
    plans = plan_redrive(letters, marks, newer)
    fates = [(p.letter.source_topic, p.letter.offset, p.fate) for p in plans]
    assert sorted(fates, key=str) == sorted(
        [
            ("post_created", 3, Fate.REDRIVE),
            ("follow_changes", 4, Fate.INVALID),
            ("push.apns", None, Fate.NOT_INPUT),
            ("post_created", None, Fate.NO_POSITION),
            ("preference_changes", 7, Fate.SUPERSEDED),
            ("preference_changes", 8, Fate.REDRIVE),
            ("post_created", 3, Fate.DUPLICATE),
            ("follow_changes", 9, Fate.REDRIVE),
            ("notification_acks", 2, Fate.REDRIVE),
            ("device_changes", 1, Fate.ALREADY),
        ],
        key=str,
    )
    keys = {
        (p.letter.source_topic, p.letter.offset): p.key for p in plans if p.fate is Fate.REDRIVE
    }
    assert keys == {
        ("post_created", 3): b"alice",  # post_created: author_id
        ("preference_changes", 8): b"carol",  # preference_changes: user_id
        ("follow_changes", 9): b"alice",  # follow_changes: author_id
        ("notification_acks", 2): b"p1:bob",  # notification_acks: notification_id
    }
    # One scan per source partition that holds changes which can be superseded, from the first.
    assert sorted(newer.asked) == [("follow_changes", 0, 9), ("preference_changes", 0, 7)]
    superseded = next(p for p in plans if p.fate is Fate.SUPERSEDED)
    assert "preference_changes/0@12 changed the same state later" in superseded.detail


def test_redrive_marker_makes_a_second_run_send_nothing() -> None:
    letters = [
        letter("post_created", 3, "schema: bug", post("p9").decode()),
        letter("follow_changes", 5, "schema: bug", follow("alice", "bob")),
    ]
    marks = MemoryRedriveMarks()
    newer = FakeNewer({})

    def run_once() -> list[str]:
        plans = plan_redrive(letters, marks.held([str(x.identity) for x in letters]), newer)
        ready = [str(p.letter.identity) for p in plans if p.fate is Fate.REDRIVE]
        owned = marks.claim(ready, "sending")
        sent = [i for i, mine in zip(ready, owned, strict=True) if mine]
        for i in sent:
            marks.confirm(i, f"{i}-again")
        return sent

    assert run_once() == ["post_created/0@3", "follow_changes/0@5"]
    assert run_once() == []
    assert marks.marks == {
        "post_created/0@3": "post_created/0@3-again",
        "follow_changes/0@5": "follow_changes/0@5-again",
    }
    # A claim lost to a concurrent run is not sent; a released one can be sent again.
    assert marks.claim(["post_created/0@3", "x/0@1"], "sending") == [False, True]
    marks.release("x/0@1")
    assert marks.claim(["x/0@1"], "sending") == [True]


# -- recovery rebuild ------------------------------------------------------------------------


def test_resume_epoch_follows_bytewax() -> None:
    assert recovery_cli.resume_epoch([], []) == 1
    # Every worker reported a frontier: the least of the last execution's.
    exs = [(0, 2, 1), (1, 2, 10)]
    fronts = [(0, 0, 9), (0, 1, 9), (1, 0, 12), (1, 1, 13)]
    assert recovery_cli.resume_epoch(exs, fronts) == 12
    # A worker without a frontier counts at its execution's resume epoch.
    assert recovery_cli.resume_epoch(exs, [(1, 0, 12)]) == 10


def test_follow_changes_positions_are_dropped_only_when_asked() -> None:
    states = [
        ("fanout.read_changelogs", "follow_changes/0"),
        ("fanout.read_changelogs", "device_changes/0"),
        ("fanout.read_posts", "post_created/0"),
    ]
    assert recovery_cli.dropped_keys("fanout", states, replay_follows=False) == set()
    assert recovery_cli.dropped_keys("fanout", states, replay_follows=True) == {
        ("fanout.read_changelogs", "follow_changes/0")
    }
    assert recovery_cli.dropped_keys("delivery", states, replay_follows=True) == set()


def summing_flow(items: list[int], out: list[Any]) -> Dataflow:
    flow = Dataflow("t")
    keyed = op.key_on("key", op.input("inp", flow, TestingSource(items)), lambda _x: "k")

    def add(total: int | None, x: int) -> tuple[int, int]:
        return (total or 0) + x, (total or 0) + x

    op.output("out", op.stateful_map("sum", keyed, add), TestingSink(out))
    return flow


def run(directory: Path, items: list[int]) -> list[Any]:
    out: list[Any] = []
    run_main(
        summing_flow(items, out),
        epoch_interval=timedelta(0),
        recovery_config=RecoveryConfig(str(directory)),
    )
    return out


def test_a_rebuilt_directory_resumes_with_positions_and_state(tmp_path: Path) -> None:
    from flows.runtime.runner import ensure_recovery_dir

    old = tmp_path / "old"
    ensure_recovery_dir(old, 3)
    assert run(old, [1, 2, 3]) == [("k", 1), ("k", 3), ("k", 6)]
    assert run(old, [1, 2, 3, 4]) == [("k", 10)]
    recovered = recovery_cli.read_recovery(old)
    assert sorted(recovered.states) == [
        ("t.inp", "iterable"),
        ("t.sum.stateful_flat_map.stateful.stateful_batch", "k"),
    ]
    new = tmp_path / "new"
    recovery_cli.write_recovery(new, 2, recovered.states)
    rebuilt = recovery_cli.read_recovery(new)
    assert (rebuilt.partitions, rebuilt.resume_epoch) == (2, 2)
    assert rebuilt.states == recovered.states
    # The input resumes after 4 (not re-read) and the sum goes on from 10.
    assert run(new, [1, 2, 3, 4, 5, 6]) == [("k", 15), ("k", 21)]
    assert run(new, [1, 2, 3, 4, 5, 6, 7]) == [("k", 28)]


def test_rebuild_swaps_directories_and_keeps_the_old_one(tmp_path: Path) -> None:
    from flows.runtime.runner import ensure_recovery_dir

    settings = load_settings(
        {"FANFARE_HOME": str(tmp_path / "home"), "FANFARE_RECOVERY_PARTITIONS": "2"}
    )
    target = settings.recovery_dir("fanout")
    ensure_recovery_dir(target, 3)
    lineage = recovery_lineage(target)
    run(target, [1, 2, 3])
    out = io.StringIO()
    assert (
        recovery_cli.rebuild(
            settings, "fanout", replay_follows=False, dry_run=True, force=False, out=out
        )
        == 0
    )
    assert "dry run: rebuild fanout recovery" in out.getvalue()
    assert sorted(p.name for p in target.parent.iterdir()) == ["fanout"]
    out = io.StringIO()
    assert (
        recovery_cli.rebuild(
            settings, "fanout", replay_follows=False, dry_run=False, force=False, out=out
        )
        == 0
    )
    names = sorted(p.name for p in target.parent.iterdir())
    assert names[0] == "fanout" and names[1].startswith("fanout.replaced-") and len(names) == 2
    assert len(list(target.glob("part-*.sqlite3"))) == 2
    assert "t.inp" in out.getvalue() and "the old directory is" in out.getvalue()
    # The same lineage: writers with no snapshot still find their start marks.
    assert recovery_lineage(target) == lineage != ""
    assert run(target, [1, 2, 3, 4]) == [("k", 10)]


def test_rebuild_without_a_directory_explains(tmp_path: Path) -> None:
    settings = load_settings({"FANFARE_HOME": str(tmp_path)})
    with pytest.raises(recovery_cli.RebuildError, match="nothing to rebuild from"):
        recovery_cli.rebuild(
            settings, "fanout", replay_follows=False, dry_run=False, force=False, out=io.StringIO()
        )


def test_namespace_defaults_are_what_the_commands_read() -> None:
    args = cli.build_parser().parse_args(["dlq", "redrive"])
    assert isinstance(args, argparse.Namespace)
    assert (args.reasons, args.source_topics, args.since, args.dry_run) == ([], [], None, False)


def test_rebuild_summary_shows_reader_positions_of_every_snapshot_version() -> None:
    # Regression: reader snapshots became (offset, topic id); the summary showed their repr.
    import pickle

    states = {
        ("fanout.read_posts", "post_created/0"): pickle.dumps(12),
        ("fanout.read_posts", "post_created/1"): pickle.dumps((34, "AaIDJwLu")),
        ("fanout.read_posts", "post_created/2"): pickle.dumps((-2, None)),
    }
    lines = recovery_cli.summarize(states)
    assert "post_created/0: next offset 12" in lines[1]
    assert "post_created/1: next offset 34 (topic id AaIDJwLu)" in lines[2]
    assert "post_created/2: next offset -2 (topic id not seen yet)" in lines[3]


def test_rebuild_summary_shows_a_shard_s_queued_and_held_notifications() -> None:
    import pickle
    from datetime import UTC, datetime, timedelta

    from operators.fanout.notify import NotifyShard, NotifyTally, RecipientJob
    from operators.fanout.shard import FollowerShard
    from schemas.records import NotificationRequest

    noon = datetime(2026, 6, 1, 12, tzinfo=UTC)
    shard = FollowerShard([])
    request = NotificationRequest(
        "n1",
        "social",
        "new_post",
        "new_post",
        ("u1", "u2"),
        {},
        ("inbox",),
        False,
        False,
        "k",
        noon,
        send_at=noon + timedelta(hours=1),
    )
    shard.notify.add_job(RecipientJob(request, ("u1", "u2"), 0, 0.0))
    shard.notify.work(shard.users, noon, lambda read_at: True, NotifyTally())
    shard.notify.add_job(RecipientJob(request, ("u3",), 0, 0.0))
    assert isinstance(shard.notify, NotifyShard)
    lines = recovery_cli.summarize(
        {("fanout.expand_follower_shards", "shard-00000"): pickle.dumps(shard.snapshot())}
    )
    assert lines[1].endswith(
        "0 job(s) in flight, 0 deferred push(es), 1 notification job(s) queued, "
        "2 recipient(s) held until send_at"
    )


def test_a_private_post_read_before_is_not_called_fanned_out() -> None:
    public = message(0, post("p1", "alice"))
    private = message(1, post("p2", "alice", visibility="private"))
    stats = ReplayStats()
    chosen = list(select_posts([public, private], frozenset(), stats))
    stats.claimed = 2  # both claimed: the flow read them before
    notes = [replay._would_fan_out(s, "post_created/0@9", 0.0, stats) for s in chosen]
    assert notes[0].startswith("already fanned out")
    assert notes[1] == "notifies nobody (private); read before (claimed by post_created/0@9)"
    assert (stats.claimed, stats.suppressed) == (1, 1)  # counted where it belongs
