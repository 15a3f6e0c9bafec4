"""Dead letters once: the replay horizon of changelogs, the letters' identity and wire form."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import orjson

from operators.adapters.kafka.dead_letter_sink import DeadLetterSink
from operators.adapters.kafka.reader import ReplayHorizon
from operators.events import RawEvent
from operators.fanout.steps import ChangelogRouter
from schemas.codecs import encode_dead_letter
from schemas.records import DeadLetter

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "schemas/dead_letters.schema.json").read_text()
)
BAD_TZ = orjson.dumps(
    {"user_id": "u1", "timezone": "Mars/Olympus_Mons", "ts": "2026-06-01T12:00:00Z"}
)
GOOD = orjson.dumps({"user_id": "u1", "timezone": "UTC", "ts": "2026-06-01T12:00:00Z"})


def test_below_the_snapshot_offset_of_the_same_log_is_replayed() -> None:
    horizon = ReplayHorizon(5, "id-1")
    assert not horizon.settled
    assert horizon.settle("id-1", 0.0)
    assert [horizon.replayed(o) for o in (0, 4, 5, 6)] == [True, True, False, False]


def test_a_recreated_topic_is_a_new_log_with_nothing_replayed() -> None:
    # The embedded broker restarted empty: offsets start again, so offset 0 is a new message.
    horizon = ReplayHorizon(5, "id-1")
    assert horizon.settle("id-2", 0.0)
    assert not horizon.replayed(0)


def test_the_horizon_waits_for_the_topic_id_then_trusts_the_log() -> None:
    horizon = ReplayHorizon(5, "id-1", wait_s=3.0)
    assert not horizon.settle(None, 1.0)  # the metadata answer may come in a moment
    assert horizon.settle(None, 3.0)  # a broker that gives no ids keeps its logs (Kafka)
    assert horizon.replayed(4)


def test_a_snapshot_without_a_topic_id_counts_in_the_current_log() -> None:
    horizon = ReplayHorizon(5, None)
    assert horizon.settle("id-1", 0.0) and horizon.replayed(4)


def test_no_snapshot_no_horizon_and_a_rewind_forgets_it() -> None:
    assert ReplayHorizon(0, None).settled and not ReplayHorizon(-2, None).replayed(0)
    horizon = ReplayHorizon(5, "id-1")
    horizon.settle("id-1", 0.0)
    horizon.forget()  # the reader found its topic re-created while running
    assert not horizon.replayed(0)


def test_a_replayed_bad_change_is_not_dead_lettered_again_but_good_ones_apply() -> None:
    router = ChangelogRouter(4)
    first = RawEvent("preference_changes", 0, 3, b"u1", BAD_TZ, 0.0)
    again = RawEvent("preference_changes", 0, 3, b"u1", BAD_TZ, 0.0, replayed=True)
    [letter] = router.route(first)
    assert isinstance(letter, DeadLetter) and letter.error.startswith("unknown_timezone")
    assert router.route(again) == []
    good_again = RawEvent("preference_changes", 0, 4, b"u1", GOOD, 0.0, replayed=True)
    [(_shard, change)] = router.route(good_again)  # type: ignore[misc]
    assert change.change.user_id == "u1" and change.offset == 4


def test_wire_form_keeps_the_item_only_when_there_is_one() -> None:
    bad_input = DeadLetter("post_created", 1, 9, "schema: x", "{}")
    send = DeadLetter("push.apns", 0, 4, "dead_lettered: 410", '{"post_id": "p"}', item=3)
    plain, with_item = (
        orjson.loads(encode_dead_letter(bad_input)),
        orjson.loads(encode_dead_letter(send)),
    )
    assert "item" not in plain and with_item["item"] == 3
    for d in (plain, with_item):
        jsonschema.validate(d, SCHEMA)
    assert bad_input.identity == ("post_created", 1, 9, None)
    # Two sends of one dispatch batch given up: two letters, one source position.
    other = DeadLetter("push.apns", 0, 4, "dead_lettered: 410", '{"post_id": "p"}', item=4)
    assert send.identity != other.identity


def test_a_source_topics_letters_go_to_one_partition_as_the_producer_would() -> None:
    from zlib import crc32

    sink = DeadLetterSink({"bootstrap.servers": "unused:9092"})
    sink._parts = [f"dead_letters/{p}" for p in sorted(range(12), key=str)]  # as listed
    sink._counts = {"dead_letters": 12}
    for source in ("post_created", "preference_changes", "push.apns", "notification_acks"):
        index = sink.part_fn(source)
        assert sink.list_parts()[index] == f"dead_letters/{crc32(source.encode()) % 12}"
