"""The transactional tier's channel writers are started once the process's shards loaded."""

from __future__ import annotations

from flows.fanout import TRANSACTIONAL_WRITE_TOPICS, when_loaded
from operators.fanout.loaded import ShardsLoaded
from tests.unit.test_bulk_writers_prepared import SinkOfFakes

TOPICS = ["push.apns", "push.apns.transactional", "push.fcm.transactional", "email.social"]
TOPICS += ["email.transactional", "inapp.transactional", "push.apns.bulk"]


def test_the_load_starts_every_transactional_writer_and_no_other() -> None:
    sink = SinkOfFakes(topics=TOPICS)
    released: list[bool] = []
    loaded = ShardsLoaded(when_loaded(lambda: released.append(True), sink.prepare))
    loaded.shard_built()
    loaded.shard_built()
    loaded.shard_caught_up()
    assert sink.writers == []  # a shard still loading: nothing yet
    loaded.shard_caught_up()
    assert sink.writers == []  # caught up, not yet settled (compacted): still nothing
    loaded.shard_settled()
    loaded.shard_settled()
    assert released == [True]
    assert sorted(f"{w.topic}/{w.partition}" for w in sink.writers) == [
        f"{t}/{p}"
        for t in (
            "email.transactional",
            "inapp.transactional",
            "push.apns.transactional",
            "push.fcm.transactional",
        )
        for p in range(2)
    ]
    # Bytewax then gets them: a login code's first write waits for no writer's start.
    first = sink.writers[0]
    assert sink.build_part("write", f"{first.topic}/{first.partition}", None) is first


def test_every_channel_of_the_tier_is_named() -> None:
    assert {t.rpartition(".")[2] for t in TRANSACTIONAL_WRITE_TOPICS} == {"transactional"}
    assert {"push.apns.transactional", "push.fcm.transactional", "sms.transactional"} <= set(
        TRANSACTIONAL_WRITE_TOPICS
    )
