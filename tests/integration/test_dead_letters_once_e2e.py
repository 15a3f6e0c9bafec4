"""Each malformed input is on `dead_letters` once, across kill -9, clean restarts and replays.

The three flows run as users run them (`fanfare run fanout|delivery|acks`, the local provider
servers for delivery). Malformed messages go to every input topic in four rounds:

1. round A, then kill -9 of every flow before any snapshot (a 60 s epoch): the restart reads
   everything again and the dead-letter writers, with no snapshot, read back from their start
   marks;
2. round B right after a snapshot was committed (5 s epochs), then kill -9 before the next:
   the restart replays the epoch after the snapshot;
3. round C, then SIGTERM (a clean stop);
4. round D, after a start that replays the preference and device changelogs from offset 0.

At the end every malformed message's source position is on `dead_letters` exactly once, and the
last start's `fanfare_dead_letters_written_total` counts only round D.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from confluent_kafka import KafkaError, Producer

from tests.conftest import Providers, Stack, wait_for
from tests.reliability.test_malformed_input import dead_letters_written, metrics_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLOWS = ("fanout", "delivery", "acks")
TS = "2026-06-01T12:00:00Z"
Position = tuple[str, int, int]

# A few kinds of bad input per input topic (invalid JSON, schema, an unknown time zone).
MALFORMED: dict[str, list[bytes]] = {
    "post_created": [b"{not json", b'{"event_type": "post_created"}'],
    "post_created.backfill": [b"[1, 2"],
    "follow_changes": [b'{"author_id": "a"}'],
    "preference_changes": [
        orjson.dumps({"user_id": "u", "timezone": "Mars/Olympus_Mons", "ts": TS}),
        b"\xff\xfe",
    ],
    "device_changes": [b'{"user_id": "u", "device_id": "d"}'],
    "push.apns": [b"{not a batch"],
    "push.fcm": [b'{"schema": "dispatch_batch/v1"}'],
    "push.apns.bulk": [b"nope"],
    "push.fcm.bulk": [b"[]"],
    "push.retry": [b'{"provider": "apns"}'],
    "notification_acks": [b'{"notification_id": "p:u"}', b"{"],
    "notify.transactional": [b"{not a request", b'{"schema": "notification_cancel/v1"}'],
    "notify.marketing": [b'{"schema": "notification_request/v1", "recipients": []}'],
}


class Publisher:
    """Publishes and remembers where each message landed."""

    def __init__(self, stack: Stack) -> None:
        config = {**stack.settings.kafka_config(), "linger.ms": 5, "acks": "all"}
        self._producer = Producer(cast(dict[str, Any], config))
        self.positions: list[Position] = []
        self._errors: list[str] = []

    def malformed_round(self, tag: str) -> None:
        for topic, values in MALFORMED.items():
            for n, value in enumerate(values):
                self._producer.produce(
                    topic, value=value, key=f"{tag}-{n}".encode(), on_delivery=self._delivered
                )
        assert self._producer.flush(60) == 0
        assert not self._errors, self._errors[:3]

    def _delivered(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._errors.append(err.str())
        else:
            self.positions.append((msg.topic(), msg.partition(), msg.offset()))


def letters(stack: Stack) -> Counter[Position]:
    found: Counter[Position] = Counter()
    for d in stack.dead_letters():
        assert d.get("item") is None, d  # bad input: one letter per message
        found[(d["source_topic"], d["partition"], d["offset"])] += 1
    return found


def committed_epoch(stack: Stack, flow: str) -> int:
    """The newest epoch the flow's recovery directory committed (-1: none yet)."""
    newest = -1
    for path in (Path(stack.env["FANFARE_HOME"]) / "recovery" / flow).glob("part-*.sqlite3"):
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            (epoch,) = db.execute("SELECT MAX(commit_epoch) FROM commits").fetchone()
        except sqlite3.OperationalError:  # being created
            epoch = None
        finally:
            db.close()
        newest = max(newest, -1 if epoch is None else int(epoch))
    return newest


@pytest.mark.timeout(600)
def test_each_malformed_input_is_dead_lettered_once_across_restarts(
    stack: Stack, providers: Providers
) -> None:
    pub = Publisher(stack)

    def start_all(*env: tuple[str, str]) -> list[int]:
        """Start the three flows; the indexes of their logs (for their /metrics ports)."""
        first = len(stack.flows)
        for flow in FLOWS:
            stack.start_flow(*env, flow=flow)
        return list(range(first, first + len(FLOWS)))

    def wait_for_letters(what: str) -> None:
        wanted = set(pub.positions)
        wait_for(lambda: set(letters(stack)) >= wanted, 180, what, stack, every_s=0.3)

    def stop_all(sig: int) -> None:
        for proc in stack.flows:
            if proc.poll() is None:
                stack.kill_flow(proc, sig)

    # 1. Killed before any snapshot.
    pub.malformed_round("a")
    start_all(("FANFARE_SNAPSHOT_INTERVAL_S", "60"))
    wait_for_letters("round A's dead letters")
    stop_all(signal.SIGKILL)

    # 2. Killed after a snapshot, before the next one.
    start_all(("FANFARE_SNAPSHOT_INTERVAL_S", "5"))
    base = committed_epoch(stack, "fanout")
    wait_for(lambda: committed_epoch(stack, "fanout") > base, 120, "a snapshot", stack, 0.1)
    pub.malformed_round("b")
    wait_for_letters("round B's dead letters")
    stop_all(signal.SIGKILL)

    # 3. A clean stop.
    start_all()
    pub.malformed_round("c")
    wait_for_letters("round C's dead letters")
    stop_all(signal.SIGTERM)

    # 4. One more start: the changelogs are replayed from offset 0 once more.
    last = start_all()
    before_d = len(pub.positions)
    pub.malformed_round("d")
    wait_for_letters("round D's dead letters")
    time.sleep(3)  # a repeated letter would show up now

    found = letters(stack)
    repeated = {p: n for p, n in found.items() if n > 1}
    assert not repeated, f"{len(repeated)} dead letters repeated, e.g. {list(repeated)[:5]}"
    assert set(found) == set(pub.positions)
    assert {t for t, _, _ in found} == set(MALFORMED)

    # The last start wrote round D only, whatever it read again.
    round_d = Counter(t for t, _, _ in pub.positions[before_d:])
    written: Counter[str] = Counter()
    for index in last:
        for (topic, _), n in dead_letters_written(metrics_port(stack, index)).items():
            written[topic] += n
    assert written == round_d
