"""`fanfare outbox migrate|relay` with the real PostgreSQL and the embedded broker.

- a committed post is published, with its row id in a header; a rolled-back one never is;
- a relay killed -9 before, during and after publishing a batch: the next relay publishes the
  rows again, and the fan-out flow fans each post out exactly once (the post claim drops the
  second copy);
- two relays at once publish each row once, in order per key;
- a lost broker makes the relay wait, and it resumes when the broker is back.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from flows.runtime.metrics_scrape import fetch_text, parse
from operators.adapters.kafka.admin import create_topics
from operators.adapters.kafka.probes import topic_partitions
from operators.adapters.stores.sqlite_followers import SQLiteFollowerStore
from operators.outbox.model import OUTBOX_ID_HEADER
from scripts.dev import devstack
from scripts.harness.spawn import PROJECT_ROOT
from tests.conftest import OutboxDb, Stack, wait_for
from tests.integration.test_fanout_e2e import device, post, publish

pytestmark = pytest.mark.integration


class Message:
    """A message as read back: where, key, value and the outbox row id it carries."""

    def __init__(
        self,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None,
    ) -> None:
        self.partition, self.offset, self.key, self.value = partition, offset, key, value
        found = dict(headers or []).get(OUTBOX_ID_HEADER)
        self.row_id = int(found) if found is not None else None


def read_messages(stack: Stack, topic: str) -> list[Message]:
    """Every message of the topic, in offset order per partition (read to partition EOF)."""
    kafka = stack.settings.kafka_config()
    parts = [int(p.rsplit("/", 1)[1]) for p in topic_partitions(kafka, [topic])]
    consumer = Consumer(
        cast(
            dict[str, Any],
            {
                **kafka,
                "group.id": "outbox-test",
                "enable.partition.eof": True,
                "enable.auto.commit": False,
            },
        )
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    out: list[Message] = []
    at_end: set[int] = set()
    deadline = time.monotonic() + 30
    try:
        while len(at_end) < len(parts) and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.2):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        at_end.add(m.partition())
                    continue
                out.append(Message(m.partition(), m.offset(), m.key(), m.value(), m.headers()))
    finally:
        consumer.close()
    return out


def post_row(post_id: str, author: str) -> tuple[str, str, bytes]:
    return ("post_created", author, post(post_id, author))


def run_fanfare(stack: Stack, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.cli", *argv],
        env={**stack.env, "PATH": "/usr/bin:/bin"},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def migrate(stack: Stack) -> str:
    result = run_fanfare(stack, "outbox", "migrate")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_committed_post_is_published_once_a_rolled_back_one_never(
    stack: Stack, outbox_db: OutboxDb
) -> None:
    before = run_fanfare(stack, "outbox", "relay")  # no table yet: a message, exit 2
    assert before.returncode == 2 and "fanfare outbox migrate" in before.stderr, before
    assert "created" in migrate(stack)
    assert "up to date" in migrate(stack)  # safe to run twice
    relay = stack.start_relay()
    outbox_db.insert([post_row("rolled-back", "alice")], commit=False)
    [row_id] = outbox_db.insert([post_row("committed", "alice")])
    wait_for(lambda: len(read_messages(stack, "post_created")) >= 1, 30, "the post", stack, 0.2)
    time.sleep(1.5)  # a rolled-back row would have been published by now
    [message] = read_messages(stack, "post_created")
    assert orjson.loads(message.value or b"")["post_id"] == "committed"
    assert (message.key, message.row_id) == (b"alice", row_id)
    assert outbox_db.pending() == 0
    # A topic fanfare does not know is refused in the post service's own transaction.
    import psycopg

    with pytest.raises(psycopg.errors.CheckViolation):
        outbox_db.insert([("posts", "alice", b"{}")])
    assert relay.poll() is None
    # Its /metrics: published, and the backlog (sampled every 2 s) back to none.
    port = int(re.findall(r"/metrics on 127\.0\.0\.1:(\d+)", stack.flow_log())[-1])
    url = f"http://127.0.0.1:{port}/metrics"
    table = {"table": outbox_db.table}

    def gauge(name: str) -> float:
        return parse(fetch_text(url)).get((name, tuple(table.items())), -1.0)

    wait_for(lambda: gauge("fanfare_outbox_rows_pending") == 0, 10, "the backlog gauge", stack)
    samples = parse(fetch_text(url))
    assert samples[("fanfare_outbox_published_total", (("topic", "post_created"),))] == 1
    assert gauge("fanfare_outbox_oldest_pending_age_seconds") == 0
    assert samples[("fanfare_outbox_publish_delay_seconds_count", ())] == 1
    status = run_fanfare(stack, "outbox", "status")
    assert status.returncode == 0 and "0 row(s) pending" in status.stdout, status


def test_a_relay_killed_before_during_or_after_publishing_fans_each_post_out_once(
    stack: Stack, outbox_db: OutboxDb, tmp_path: Path
) -> None:
    migrate(stack)
    followers = ["fan1", "fan2", "fan3"]
    store = SQLiteFollowerStore(
        stack.settings.resolved_store_url.removeprefix("sqlite:///"), stack.settings.shard_count
    )
    store.bulk_load(("alice", f, 1) for f in followers)
    store.close()
    publish(stack, "device_changes", [(f, device(f, f + "-phone")) for f in followers])
    stack.start_flow()

    # Each stage: rows committed, a relay stopped at that point and killed -9, then a real
    # relay publishes what is pending. (before: 1 post, during: 4, after: 2)
    stages = {"before": 1, "during": 4, "after": 2}
    copies: dict[str, int] = {}
    for stage, count in stages.items():
        ids = [f"{stage}-{n}" for n in range(count)]
        outbox_db.insert([post_row(p, "alice") for p in ids])
        marker = tmp_path / f"{stage}.marker"
        harness = stack.start_command(
            [stage, str(marker)], module="tests.integration.outbox_stop_at"
        )
        wait_for(marker.exists, 60, f"the relay to stop {stage} publishing", stack, 0.1)
        stack.kill_flow(harness, signal.SIGKILL)
        assert outbox_db.pending() == count  # killed before the delete: all still pending
        published = Counter(
            orjson.loads(m.value or b"")["post_id"] for m in read_messages(stack, "post_created")
        )
        copies.update({p: published[p] for p in ids})
        relay = stack.start_relay()
        wait_for(lambda: outbox_db.pending() == 0, 60, f"the rows of {stage}", stack, 0.2)
        stack.kill_flow(relay, signal.SIGTERM)
        assert relay.returncode == 0
    assert copies == {
        "before-0": 0,
        "during-0": 1,
        "during-1": 1,
        "during-2": 0,
        "during-3": 0,
        "after-0": 1,
        "after-1": 1,
    }

    # On the topic: the copies the killed relays left, then the rows once more.
    messages = read_messages(stack, "post_created")
    by_post = Counter(orjson.loads(m.value or b"")["post_id"] for m in messages)
    assert by_post == {p: n + 1 for p, n in copies.items()}
    assert all(m.row_id is not None for m in messages)
    # The fan-out: every post to every follower's device, exactly once.
    expected = {(p, f, f + "-phone") for p in copies for f in followers}
    wait_for(lambda: len(stack.dispatch_items()) >= len(expected), 90, "the fan-out", stack)
    time.sleep(3)  # a second fan-out of a copy would show up now
    pushes = Counter((p, u, d) for _, p, u, d, _ in stack.dispatch_items())
    assert pushes == Counter(expected)


def test_two_relays_publish_each_row_once_in_order_per_key(
    stack: Stack, outbox_db: OutboxDb
) -> None:
    migrate(stack)
    relays = [stack.start_relay(("FANFARE_OUTBOX_BATCH_SIZE", "20")) for _ in range(2)]
    keys = [f"user-{k}" for k in range(40)]
    written: list[int] = []

    def writer(own_keys: list[str], seed: int) -> None:
        # One writer per key (as a service that updates the user's row in the transaction),
        # so commit order is id order per key; transactions of 1 to 5 rows.
        rng = random.Random(seed)
        for _ in range(150):
            rows = [
                ("follow_changes", k, json.dumps({"n": rng.random()}))
                for k in rng.choices(own_keys, k=rng.randint(1, 5))
            ]
            written.extend(outbox_db.insert(rows))  # type: ignore[arg-type]

    threads = [threading.Thread(target=writer, args=(keys[i::3], i)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_for(lambda: outbox_db.pending() == 0, 120, "every row published", stack, 0.5)
    for relay in relays:
        stack.kill_flow(relay, signal.SIGTERM)

    messages = read_messages(stack, "follow_changes")
    ids = Counter(m.row_id for m in messages)
    assert sorted(ids) == sorted(written) and set(ids.values()) == {1}, "each row once"
    per_key: dict[bytes, list[int]] = defaultdict(list)
    for m in sorted(messages, key=lambda m: (m.partition, m.offset)):
        per_key[m.key or b""].append(cast(int, m.row_id))
    assert all(ids == sorted(ids) for ids in per_key.values()), "in order per key"
    # Both relays did some of it (they took turns through SKIP LOCKED).
    log = stack.flow_log()
    done = [int(n) for n in re.findall(r"stopped after (\d+) row", log)]
    assert len(done) == 2 and sum(done) == len(written) and min(done) > 0, done


def test_a_lost_broker_makes_the_relay_wait_and_resume(stack: Stack, outbox_db: OutboxDb) -> None:
    migrate(stack)
    relay = stack.start_relay()
    outbox_db.insert([post_row("before-the-loss", "alice")])
    wait_for(lambda: outbox_db.pending() == 0, 30, "the first post", stack, 0.2)

    devstack.stop_broker(stack.settings)
    outbox_db.insert([post_row(f"while-away-{n}", f"author-{n}") for n in range(5)])
    time.sleep(4)
    assert relay.poll() is None, stack.flow_log()
    assert outbox_db.pending() == 5  # held, not lost, while the broker is away

    devstack.start_broker(stack.settings)  # empty: the embedded broker keeps memory only
    create_topics(stack.settings)
    wait_for(lambda: outbox_db.pending() == 0, 90, "the rows after the broker's return", stack)
    assert relay.poll() is None  # the same process waited and resumed
    published = {
        orjson.loads(m.value or b"")["post_id"] for m in read_messages(stack, "post_created")
    }
    assert published == {f"while-away-{n}" for n in range(5)}
