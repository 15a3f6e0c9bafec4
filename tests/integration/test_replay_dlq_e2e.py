"""Replay into the backfill lane, dead-letter redrive and the recovery rebuild, end to end.

The real broker and Redis, the fan-out flow as users run it (`fanfare run fanout`), and the
commands called as `fanfare ...` (in this process, with the stack's environment).
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from flows.runtime.metrics_scrape import fetch_text, parse
from operators.adapters.kafka.writer import produce_all
from schemas.codecs import format_timestamp
from schemas.topics import CHANNEL_TOPICS, POST_CREATED, POST_CREATED_BACKFILL
from scripts import cli
from scripts.commands import recovery as recovery_cli
from tests.conftest import Stack, Watcher, wait_for
from tests.integration.test_fanout_e2e import device, follow, post, prefs, publish

pytestmark = pytest.mark.integration

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def fanfare(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Run]:
    """`fanfare ARGS...` against the test's stack: (exit code, stdout, stderr)."""
    for name, value in stack.env.items():
        monkeypatch.setenv(name, value)

    transcript: list[str] = []

    def call(*argv: str, **env: str) -> tuple[int, str, str]:
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            capsys.readouterr()
            code = cli.main(list(argv))
            captured = capsys.readouterr()
        transcript.append(
            f"$ fanfare {' '.join(argv)}  (exit {code})\n{captured.out}{captured.err}"
        )
        return code, captured.out, captured.err

    yield call
    print("\n".join(transcript))  # the commands' output, shown when a test fails


def count_of(out: str, label: str) -> int:
    """The number after a label at the start of a summary line."""
    m = re.search(rf"^ +{re.escape(label)} +([\d,]+)$", out, re.M)
    assert m, f"no {label!r} line in:\n{out}"
    return int(m.group(1).replace(",", ""))


def iso(ms: float) -> str:
    return format_timestamp(ms / 1000, "milliseconds")


def wait_items(stack: Stack, watcher: Watcher, n: int, what: str) -> None:
    """Until `n` dispatch items are on the channel topics (an incremental consumer: cheap)."""
    wait_for(lambda: watcher.poll() >= n, 90, what, stack, every_s=0.1)


def items_by_post(stack: Stack) -> Counter[tuple[str, str, str]]:
    return Counter((i[1], i[2], i[3]) for i in stack.dispatch_items())


def deduped_claims(stack: Stack) -> float:
    url = f"http://127.0.0.1:{stack.env['FANFARE_METRICS_PORT']}/metrics"
    try:
        samples = parse(fetch_text(url))
    except OSError:
        return 0.0
    return samples.get(("fanfare_deduped_total", (("stage", "post_claim"),)), 0.0)


def seed_alice(stack: Stack) -> None:
    publish(stack, "follow_changes", [("alice", follow("alice", f)) for f in ("bob", "carol")])
    publish(
        stack,
        "device_changes",
        [
            ("bob", device("bob", "bob-phone", "apns")),
            ("carol", device("carol", "carol-phone", "fcm")),
        ],
    )


def test_replay_adds_nothing_after_a_fanout_and_the_backfill_lane_fans_out_once(
    stack: Stack, fanfare: Run
) -> None:
    run = fanfare
    seed_alice(stack)
    since = time.time() * 1000 - 1_000
    publish(
        stack,
        POST_CREATED,
        [
            ("alice", post("p1", "alice")),
            ("alice", post("p2", "alice")),
            ("alice", b"not json"),
            ("zed", post("p3", "zed")),  # zed has no followers
        ],
    )
    watcher = stack.watch(CHANNEL_TOPICS)
    stack.start_flow()
    wait_items(stack, watcher, 4, "the first fan-out")
    wait_for(lambda: len(stack.dead_letters()) >= 1, 30, "the dead letter", stack)
    fanned_out = items_by_post(stack)
    assert fanned_out == {
        ("p1", "bob", "bob-phone"): 1,
        ("p1", "carol", "carol-phone"): 1,
        ("p2", "bob", "bob-phone"): 1,
        ("p2", "carol", "carol-phone"): 1,
    }

    code, out, _ = run("replay", "--topic", POST_CREATED, "--from", iso(since), "--dry-run")
    assert code == 0
    assert "dry run: would replay 3 post(s) from post_created into post_created.backfill" in out
    assert "4 messages read, 3 selected, 1 malformed" in out
    for pid, author, followers in (("p1", "alice", 2), ("p2", "alice", 2), ("p3", "zed", 0)):
        row = next(line for line in out.splitlines() if line.strip().startswith(pid + " "))
        assert author in row and "2026-06-01T12:00:00Z" in row and "public" in row
        assert f" {followers}  post_created/" in row and "already fanned out" in row
    assert "estimated candidates: 0 (followers of the authors of the 0 post(s)" in out
    assert "3 already fanned out: the flow drops them as duplicates" in out
    assert stack.count_messages((POST_CREATED_BACKFILL,)) == 0  # a dry run publishes nothing

    code, out, _ = run("replay", "--topic", POST_CREATED, "--from", iso(since), "--author", "alice")
    assert code == 0
    counts = {
        line[:26].strip(): int(line[26:35].replace(",", ""))
        for line in out.splitlines()[1:]
        if line.startswith("  ")
    }
    assert counts == {
        "messages read": 4,
        "selected": 2,
        "published": 2,
        "skipped, malformed": 1,
        "skipped, other authors": 1,
        "already fanned out": 2,
        "to fan out": 0,
    }
    lane = stack.read_topic(POST_CREATED_BACKFILL)
    assert sorted(v for _, _, v in lane) == sorted([post("p1", "alice"), post("p2", "alice")])
    wait_for(lambda: deduped_claims(stack) >= 2, 30, "the flow to read the backfill lane", stack)
    time.sleep(1)
    assert watcher.poll() == 4
    assert items_by_post(stack) == fanned_out  # the replay added zero dispatched items

    # A post that only the backfill lane carries is fanned out once.
    publish(stack, POST_CREATED_BACKFILL, [("alice", post("p4", "alice"))])
    wait_items(stack, watcher, 6, "the backfilled post")
    time.sleep(1)
    assert items_by_post(stack) == fanned_out + Counter(
        {("p4", "bob", "bob-phone"): 1, ("p4", "carol", "carol-phone"): 1}
    )
    assert stack.dead_letters() and all(
        d["source_topic"] == POST_CREATED for d in stack.dead_letters()
    )
    watcher.close()


def test_recovery_rebuild_keeps_positions_and_rebuilds_a_lost_follower_store(
    stack: Stack, fanfare: Run
) -> None:
    run = fanfare
    seed_alice(stack)
    publish(stack, POST_CREATED, [("alice", post("p1", "alice"))])
    watcher = stack.watch(CHANNEL_TOPICS)
    first = stack.start_flow()
    wait_items(stack, watcher, 2, "the first fan-out")
    time.sleep(3)  # a few snapshots (FANFARE_SNAPSHOT_INTERVAL_S=1)
    stack.kill_flow(first, signal.SIGTERM)
    recovery = stack.settings.recovery_dir("fanout")
    wait_for(lambda: not recovery_cli.flow_processes(recovery), 30, "the flow to exit", stack)

    # The follower store is lost; a post arrives while the flow is down, and it is replayed
    # into the backfill lane too: it must reach alice's followers once, through a store rebuilt
    # from follow_changes, and p1 must not be read again.
    store = Path(stack.settings.resolved_store_url.removeprefix("sqlite:///"))
    for f in store.parent.glob(store.name + "*"):
        f.unlink()
    since = time.time() * 1000 - 500
    publish(stack, POST_CREATED, [("alice", post("p2", "alice"))])
    code, out, _ = run("replay", "--topic", POST_CREATED, "--from", iso(since), "--dry-run")
    assert code == 0
    assert "p2" in out and "fans out" in out and "p1 " not in out
    assert "estimated candidates: unknown (no follower store at sqlite:///" in out
    code, out, _ = run("replay", "--topic", POST_CREATED, "--from", iso(since))
    assert code == 0 and stack.count_messages((POST_CREATED_BACKFILL,)) == 1

    code, out, _ = run("recovery", "rebuild", "fanout", "--dry-run")
    assert code == 0
    assert "fanout.read_posts" in out and "post_created/" in out and "next offset" in out
    assert "job(s) in flight" in out and "nothing written" in out
    code, out, err = run(
        "recovery", "rebuild", "fanout", "--replay-follow-changes", FANFARE_RECOVERY_PARTITIONS="3"
    )
    assert code == 0, err
    assert "left out (2): follow_changes positions" in out  # 2 partitions
    assert len(list(recovery.glob("part-*.sqlite3"))) == 3
    replaced = [p for p in recovery.parent.iterdir() if p.name.startswith("fanout.replaced-")]
    assert len(replaced) == 1 and len(list(replaced[0].glob("part-*.sqlite3"))) == 4

    stack.start_flow()
    wait_items(stack, watcher, 4, "the fan-out after the rebuild")
    time.sleep(2)
    assert items_by_post(stack) == {
        ("p1", "bob", "bob-phone"): 1,
        ("p1", "carol", "carol-phone"): 1,
        ("p2", "bob", "bob-phone"): 1,
        ("p2", "carol", "carol-phone"): 1,
    }
    watcher.close()


def test_dead_letters_list_and_redrive_once_after_a_fix(stack: Stack, fanfare: Run) -> None:
    run = fanfare
    seed_alice(stack)
    publish(stack, "preference_changes", [("erin", prefs("erin")), ("erin", prefs("erin"))])
    erin = [(p, o) for p, o, _ in stack.read_topic("preference_changes")]
    watcher = stack.watch(CHANNEL_TOPICS)
    stack.start_flow()
    publish(stack, "follow_changes", [("zed", b'{"author_id": "zed"}')])  # malformed
    # Dead letters as older versions wrote them: a post refused by a since-fixed bug, a
    # delivery dead letter (a summary of a send), and erin's preferences that she replaced.
    crafted = [
        {
            "source_topic": POST_CREATED,
            "partition": 0,
            "offset": 999,
            "error": "schema: author_id 'alice' refused (a bug, fixed since)",
            "raw": post("p9", "alice").decode(),
        },
        {
            "source_topic": "push.apns",
            "partition": None,
            "offset": None,
            "error": "dead_lettered: 8 attempts",
            "raw": '{"post_id":"p0","notification_id":"p0:bob"}',
        },
        {
            "source_topic": "preference_changes",
            "partition": erin[0][0],
            "offset": erin[0][1],
            "error": "unknown_timezone: 'Europe/Paris' is not an IANA time zone",
            "raw": prefs("erin", timezone="Europe/Paris").decode(),
        },
    ]
    produce_all(
        stack.settings.kafka_config(),
        "dead_letters",
        [(str(d["source_topic"]).encode(), orjson.dumps(d)) for d in crafted],
    )
    wait_for(lambda: len(stack.dead_letters()) >= 4, 90, "the dead letters", stack)

    code, out, _ = run("dlq", "list")
    assert code == 0
    assert out.startswith("4 dead letter(s) of 4 on dead_letters")
    groups = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line.startswith("  ") and not line.startswith("   ")
    }
    assert groups == {
        "schema": ["2", "from", "follow_changes", "1,", "post_created", "1"],
        "dead_lettered": ["1", "from", "push.apns", "1"],
        "unknown_timezone": ["1", "from", "preference_changes", "1"],
    }
    assert '{"author_id": "zed"}' in out  # an example with its raw value
    code, out, _ = run("dlq", "list", "--reason", "schema", "--source-topic", "follow_changes")
    assert code == 0 and out.startswith("1 dead letter(s) (reason schema; source topic")

    posts_before = stack.count_messages((POST_CREATED,))
    code, out, _ = run("dlq", "redrive", "--dry-run")
    assert code == 0
    assert count_of(out, "would redrive") == 1
    assert count_of(out, "still invalid") == 1 and "follow_changes/" in out
    assert count_of(out, "superseded") == 1
    assert f"preference_changes/{erin[1][0]}@{erin[1][1]} changed the same state later" in out
    assert count_of(out, "not an input topic") == 1 and "refused 1 from push.apns" in out
    assert "-> post_created partition 0, key alice" in out
    assert stack.count_messages((POST_CREATED,)) == posts_before

    code, out, _ = run("dlq", "redrive")
    assert code == 0
    assert "redriven 1, failed 0, already redriven 0, still invalid 1, superseded 1" in out
    redriven = [(p, v) for p, o, v in stack.read_topic(POST_CREATED) if v == post("p9", "alice")]
    assert redriven == [(0, post("p9", "alice"))]
    wait_items(stack, watcher, 2, "the redriven post")

    code, out, _ = run("dlq", "redrive")
    assert code == 0
    assert "redriven 0, failed 0, already redriven 1" in out
    assert stack.count_messages((POST_CREATED,)) == posts_before + 1
    code, out, _ = run("dlq", "list", "--reason", "schema")
    assert "; 1 redriven" in out and "[redriven: post_created/0@" in out
    assert watcher.poll() == 2
    assert items_by_post(stack) == {
        ("p9", "bob", "bob-phone"): 1,
        ("p9", "carol", "carol-phone"): 1,
    }
    watcher.close()
