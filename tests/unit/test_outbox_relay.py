"""The outbox relay's rules, without PostgreSQL or Kafka: claims, order per key, failures."""

from __future__ import annotations

import os
import random
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from operators.config import ConfigError, load_settings
from operators.outbox.model import (
    OUTBOX_SOURCE,
    Backoff,
    OutboxRow,
    TableName,
    claimable,
    in_key_order,
)
from operators.outbox.ports import PublishFailed
from operators.outbox.relay import OutboxRelay, RelaySettings
from scripts import cli
from tests.fakes import InMemoryOutbox, OutboxTable, RecordingPublisher


def row(i: int, key: str) -> OutboxRow:
    return OutboxRow(i, "post_created", key, b"{}", 0.0)


def test_a_claim_takes_runs_of_free_keys_in_id_order_up_to_the_limit() -> None:
    pending = [row(1, "a"), row(2, "b"), row(3, "a"), row(4, "c"), row(5, "b"), row(6, "a")]
    assert [r.id for r in claimable(pending, set(), 10)] == [1, 2, 3, 4, 5, 6]
    # a's run (3 rows) and b's (2) fill a batch of 4: c's head is not locked, another relay
    # may take it; a prefix of each key's run.
    assert [r.id for r in claimable(pending, set(), 4)] == [1, 2, 3, 5]
    # Another relay holds b's head: none of b's rows, not even the later ones.
    assert [r.id for r in claimable(pending, {2}, 10)] == [1, 3, 4, 6]
    # Heads are looked for in the window only (the oldest rows): a claim's cost is bounded.
    hot = [row(i, "hot") for i in range(1, 9)] + [row(9, "cold")]
    assert [r.id for r in claimable(hot, set(), 2)] == [1, 2]
    assert claimable(hot, {1}, 2) == []  # cold's head lies beyond the window of 8


def test_a_later_row_is_never_claimed_while_an_older_row_of_its_key_is_held() -> None:
    table = OutboxTable()
    first = table.insert("post_created", "alice")
    one, two = InMemoryOutbox(table), InMemoryOutbox(table)
    assert [r.id for r in one.claim(10)] == [first]
    later = table.insert("post_created", "alice")  # committed while `one` publishes
    other = table.insert("post_created", "bob")
    assert [r.id for r in two.claim(10)] == [other]
    one.complete([table.rows[first]])
    two.release()
    assert [r.id for r in two.claim(10)] == [later, other]


def test_the_relay_publishes_in_order_and_deletes_what_was_published() -> None:
    table = OutboxTable()
    ids = [table.insert("post_created", f"author-{i % 3}") for i in range(10)]
    publisher = RecordingPublisher()
    relay = OutboxRelay(InMemoryOutbox(table), publisher, RelaySettings(batch_size=4))
    assert [relay.relay_batch() for _ in range(4)] == [4, 4, 2, 0]
    assert sorted(m[2] for m in publisher.messages) == ids
    assert in_key_order([row(i, key) for _, key, i in publisher.messages])
    assert not table.rows and not table.locks


def test_a_failed_batch_stays_pending_and_is_published_again_in_order() -> None:
    table = OutboxTable()
    ids = [table.insert("follow_changes", "alice") for _ in range(4)]
    publisher = RecordingPublisher(fail_batches=1)
    relay = OutboxRelay(InMemoryOutbox(table), publisher, RelaySettings(batch_size=10))
    with pytest.raises(PublishFailed):
        relay.relay_batch()
    assert set(table.rows) == set(ids) and not table.locks  # released, still pending
    assert relay.relay_batch() == 4
    # Half the batch landed before the failure: those rows twice, the last copies in order.
    assert [m[2] for m in publisher.messages] == ids[:2] + ids
    assert in_key_order([row(i, "alice") for i in (ids[:2] + ids)[2:]])


def test_a_row_naming_an_unknown_topic_is_dead_lettered_and_does_not_block_its_key() -> None:
    table = OutboxTable()
    bad = table.insert("posts", "alice", b'{"post_id": "p1"}')
    good = table.insert("post_created", "alice")
    publisher = RecordingPublisher()
    relay = OutboxRelay(InMemoryOutbox(table), publisher, RelaySettings())
    assert relay.relay_batch() == 2
    assert [m[2] for m in publisher.messages] == [good]
    [letter] = publisher.letters
    assert (letter.source_topic, letter.offset) == (OUTBOX_SOURCE, bad)
    assert letter.error.startswith("unknown_topic: 'posts'") and '"p1"' in letter.raw
    assert not table.rows


def test_several_relays_interleaved_publish_each_row_once_in_order_per_key() -> None:
    # Relays take turns at random: claim, then (maybe later) complete, fail or die; keys hot
    # and cold; rows keep arriving. Each key's messages, without repeats, come in id order.
    rng = random.Random(16)
    table = OutboxTable()
    publisher = RecordingPublisher()
    sessions = [InMemoryOutbox(table) for _ in range(3)]
    held: dict[int, list[OutboxRow]] = {}
    inserted = []
    for _step in range(3_000):
        if rng.random() < 0.5 and len(inserted) < 1_500:
            inserted.append(table.insert("post_created", f"k{int(rng.paretovariate(1.2)) % 20}"))
        s = rng.randrange(len(sessions))
        if s not in held:
            held[s] = sessions[s].claim(rng.choice([1, 5, 50]))
            continue
        rows = held.pop(s)
        fate = rng.random()
        if fate < 0.1:  # killed before publishing
            sessions[s].release()
        elif fate < 0.2:  # killed after publishing, before the delete
            publisher.messages += [(r.topic, r.key, r.id) for r in rows]
            sessions[s].release()
        else:
            publisher.messages += [(r.topic, r.key, r.id) for r in rows]
            sessions[s].complete(rows)
    for s in held:
        sessions[s].release()
    relay = OutboxRelay(sessions[0], publisher, RelaySettings(batch_size=100))
    while relay.relay_batch():
        pass
    assert not table.rows
    per_key: dict[str, list[int]] = defaultdict(list)
    for _, key, row_id in publisher.messages:
        per_key[key].append(row_id)
    for key, ids in per_key.items():
        first_copies = list(dict.fromkeys(ids))
        assert first_copies == sorted(first_copies), key
        # A repeat is a run published again from its head, so the last copies are in order
        # too: a consumer that applies each message ends with the newest row.
        last_copies = sorted(set(ids), key=lambda i: len(ids) - 1 - ids[::-1].index(i))
        assert last_copies == sorted(last_copies), key
    assert sorted(set(m[2] for m in publisher.messages)) == inserted


def test_run_waits_when_idle_and_backs_off_after_failures() -> None:
    table = OutboxTable()
    table.insert("post_created", "a")
    backoffs: list[float] = []

    class Stop(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            backoffs.append(timeout or 0.0)
            return self.is_set()

    stop = Stop()

    class Idle(InMemoryOutbox):
        def wait_for_rows(self, timeout_s: float) -> bool:
            stop.set()  # idle once: the row was published
            return super().wait_for_rows(timeout_s)

    outbox = Idle(table)
    publisher = RecordingPublisher(fail_batches=2)
    relay = OutboxRelay(
        outbox,
        publisher,
        RelaySettings(poll_s=0.01, backoff=Backoff(base_s=0.001, cap_s=0.002)),
        rand=lambda: 0.0,
    )
    relay.run(stop)
    assert backoffs == [0.0005, 0.001]  # two failures in a row: backoff, doubling
    assert [m[2] for m in publisher.messages] == [1] and not table.rows
    assert outbox.waits == 1


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    b = Backoff(base_s=0.1, cap_s=2.0)
    assert [b.delay(n, lambda: 1.0) for n in (1, 2, 3, 6, 20)] == [0.1, 0.2, 0.4, 2.0, 2.0]
    assert b.delay(1, lambda: 0.0) == 0.05


def test_table_names() -> None:
    assert TableName.parse("fanfare_outbox").channel == "fanfare_outbox"
    assert TableName.parse("posts.outbox") == TableName("posts", "outbox")
    for bad in ("", "Outbox", "a.b.c", "out-box", "x" * 60, "drop table;"):
        with pytest.raises(ValueError):
            TableName.parse(bad)


def test_outbox_settings_refuse_a_password_and_a_bad_url_or_table() -> None:
    ok = load_settings({"FANFARE_OUTBOX_URL": "postgresql://fanfare@db:5432/posts"})
    assert ok.outbox_url.endswith("/posts") and ok.outbox_table == "fanfare_outbox"
    for env, said in (
        ({"FANFARE_OUTBOX_URL": "postgresql://u:secret@db/posts"}, "FANFARE_OUTBOX_PASSWORD_FILE"),
        ({"FANFARE_OUTBOX_URL": "postgresql://u@db/posts?password=x"}, "password"),
        ({"FANFARE_OUTBOX_URL": "mysql://u@db/posts"}, "postgresql://"),
        ({"FANFARE_OUTBOX_TABLE": "Bad-Name"}, "FANFARE_OUTBOX_TABLE"),
        ({"FANFARE_OUTBOX_BATCH_SIZE": "0"}, "FANFARE_OUTBOX_BATCH_SIZE"),
    ):
        with pytest.raises(ConfigError, match=said):
            load_settings(env)


def test_the_outbox_command_says_what_to_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for name in [n for n in os.environ if n.startswith("FANFARE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FANFARE_HOME", str(tmp_path))
    assert cli.main(["outbox", "relay"]) == 2
    assert "FANFARE_OUTBOX_URL is not set" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli.main(["outbox", "relay", "--batch-size", "0"])
    assert exited.value.code == 2
    assert "out of range: use 1 to 10000" in capsys.readouterr().err
