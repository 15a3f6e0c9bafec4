"""The Kafka adapters against the real broker: caught-up markers and the idempotent sink."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from operators.adapters.kafka.channel_sink import ChannelTopicsSink
from operators.adapters.kafka.client_log import client_config
from operators.adapters.kafka.dead_letter_sink import DeadLetterSink
from operators.adapters.kafka.delivery_events_sink import DeliveryEventsSink
from operators.adapters.kafka.end_prober import EndAnswer, EndProber
from operators.adapters.kafka.probes import KafkaConfig, end_offset, read_partition_to_end
from operators.adapters.kafka.reader import KafkaTopicsSource
from operators.adapters.kafka.writer import PartitionedTopicsSink, produce_all
from operators.events import CaughtUp, RawEvent
from operators.probe_demand import ProbeDemand
from schemas.records import DeadLetter, DeliveryEvent, DispatchBatch, DispatchItem
from tests.conftest import Stack
from tests.unit.test_eligibility_sharding_batching import shard_batches

pytestmark = pytest.mark.integration


def drain(part, until, timeout_s: float = 10.0):  # type: ignore[no-untyped-def]
    got: list[object] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got += part.next_batch()
        if until(got):
            return got
        time.sleep(0.002)
    raise AssertionError(f"not reached in {timeout_s}s: {got[-5:]}")


def test_reader_reports_caught_up_only_after_reading_to_the_end(stack: Stack) -> None:
    kafka = stack.settings.kafka_config()
    produce_all(kafka, "preference_changes", [(b"k", b"%d" % i) for i in range(2_000)])
    source = KafkaTopicsSource(kafka, ["preference_changes"], report_caught_up=True, batch_size=100)
    parts = source.list_parts()
    assert parts == ["preference_changes/0", "preference_changes/1"]
    built_at = time.time()
    readers = [source.build_part("s", p, None) for p in parts]
    events: list[object] = []
    for r in readers:
        events += drain(r, lambda got: any(isinstance(g, CaughtUp) for g in got))
    data = [e for e in events if isinstance(e, RawEvent)]
    assert sorted(int(e.value or b"0") for e in data) == list(range(2_000))
    markers = [e for e in events if isinstance(e, CaughtUp)]
    for r, part in zip(readers, parts, strict=True):
        first_marker = next(
            i for i, e in enumerate(events) if isinstance(e, CaughtUp) and e.source == part
        )
        # Everything of that partition came before its first marker.
        assert all(
            e.partition != int(part[-1]) or i < first_marker
            for i, e in enumerate(events)
            if isinstance(e, RawEvent)
        )
        assert r.offset() == end_offset(kafka, "preference_changes", int(part[-1]))
    assert all(m.as_of >= built_at - 0.01 for m in markers)
    # While idle, later markers keep coming with later as_of times (probing the end).
    later = drain(
        readers[0],
        lambda got: any(isinstance(g, CaughtUp) and g.as_of > markers[0].as_of + 0.04 for g in got),
    )
    assert not any(isinstance(g, RawEvent) for g in later)
    # A new message is read before the next marker.
    produce_all(kafka, "preference_changes", [(b"k", b"late")] * 20)
    probe_from = time.time()
    after = []
    for r in readers:
        after += drain(
            r, lambda got, t=probe_from: any(isinstance(g, CaughtUp) and g.as_of >= t for g in got)
        )
    assert [e.value for e in after if isinstance(e, RawEvent)] == [b"late"] * 20
    for r in readers:
        r.close()


def test_a_reader_probes_its_end_when_a_shard_asks_not_at_its_interval(stack: Stack) -> None:
    kafka = stack.settings.kafka_config()
    demand = ProbeDemand()
    # An interval far longer than the drains below: only the asks can bring later markers.
    source = KafkaTopicsSource(
        kafka, ["device_changes"], report_caught_up=True, probe_interval_s=60.0, demand=demand
    )
    reader = source.build_part("s", source.list_parts()[0], None)
    drain(reader, lambda got: any(isinstance(g, CaughtUp) for g in got))
    for _ in range(3):  # again at once after each answer
        wanted = time.time() + 0.05
        demand.ask(wanted)
        got = drain(
            reader,
            lambda got, t=wanted: any(isinstance(g, CaughtUp) and g.as_of >= t for g in got),
        )
        assert not any(isinstance(g, RawEvent) for g in got)
    reader.close()


def wait_answer(prober: EndProber, topic: str, partition: int) -> EndAnswer:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        answer = prober.answer(topic, partition)
        if answer is not None:
            return answer
        time.sleep(0.002)
    raise AssertionError("the prober never answered")


def test_the_prober_tells_the_end_of_a_partition_from_a_position_before_it(stack: Stack) -> None:
    kafka = stack.settings.kafka_config()
    produce_all(kafka, "device_changes", [(b"k", b"%d" % i) for i in range(50)])
    ends = {p: end_offset(kafka, "device_changes", p) for p in (0, 1)}
    part = max(ends, key=lambda p: ends[p])  # the one key's partition
    end = ends[part]
    assert end >= 50
    prober = EndProber(kafka)
    try:
        before = time.time()
        prober.ask("device_changes", part, end)
        at_end = wait_answer(prober, "device_changes", part)
        assert at_end.at_end and at_end.offset == end and at_end.as_of >= before
        prober.ask("device_changes", part, end - 1)
        assert not wait_answer(prober, "device_changes", part).at_end
        produce_all(kafka, "device_changes", [(b"k", b"late")] * 3)
        prober.ask("device_changes", part, end)  # no longer the end
        assert not wait_answer(prober, "device_changes", part).at_end
    finally:
        prober.close()


def test_a_shards_ask_is_answered_by_the_prober_without_a_seek(stack: Stack) -> None:
    kafka = stack.settings.kafka_config()
    produce_all(kafka, "device_changes", [(b"k", b"%d" % i) for i in range(30)])
    demand = ProbeDemand()
    prober = EndProber(kafka)
    # An interval far longer than the drains below: only the prober can bring later markers.
    source = KafkaTopicsSource(
        kafka,
        ["device_changes"],
        report_caught_up=True,
        probe_interval_s=60.0,
        demand=demand,
        prober=prober,
    )
    part = max((0, 1), key=lambda p: end_offset(kafka, "device_changes", p))  # the key's
    reader = source.build_part("s", f"device_changes/{part}", None)
    try:
        drain(reader, lambda got: any(isinstance(g, CaughtUp) for g in got))
        for i in range(3):
            wanted = time.time() + 0.05
            demand.ask(wanted)
            got = drain(
                reader,
                lambda got, t=wanted: any(isinstance(g, CaughtUp) and g.as_of >= t for g in got),
            )
            assert not any(isinstance(g, RawEvent) for g in got)
            assert prober.rounds == i + 1
        # A message written after the last marker is read before the next one.
        produce_all(kafka, "device_changes", [(b"k", b"late")])
        wanted = time.time()
        demand.ask(wanted)
        got = drain(
            reader,
            lambda got: any(isinstance(g, CaughtUp) and g.as_of >= wanted for g in got),
        )
        assert [g.value for g in got if isinstance(g, RawEvent)] == [b"late"]
        assert isinstance(got[-1], CaughtUp) and got[-1].offset == reader.offset()
    finally:
        reader.close()
        prober.close()


def batch(post: str, users: range, topic_lane: str = "normal") -> DispatchBatch:
    items = tuple(
        DispatchItem(notification_id=f"{post}:u{u}", user_id=f"u{u}", device_id="d", token="t")
        for u in users
    )
    return DispatchBatch(post, "a", "apns", "2026-01-01T00:00:00Z", topic_lane, items)


def test_channel_sink_drops_items_written_since_the_snapshot_on_resume(stack: Stack) -> None:
    kafka = stack.settings.kafka_config()
    written: list[tuple[int, int]] = []
    sink = ChannelTopicsSink(
        kafka, ["push.apns"], on_written=lambda b, dropped: written.append((len(b.items), dropped))
    )
    part_name = sink.route_key(batch("p1", range(1)))
    part = sink.build_part("out", part_name, None)
    part.write_batch([batch("p1", range(0, 10))])
    state = part.snapshot()  # durable up to here
    part.write_batch([batch("p1", range(10, 20))])  # written after the snapshot, then a crash
    part.snapshot()
    part.close()
    resumed = sink.build_part("out", part_name, state)
    # The replay re-emits 10..20 (and goes on to 20..30): only the new items are written.
    resumed.write_batch([batch("p1", range(10, 30))])
    resumed.snapshot()
    topic, p = part_name.rsplit("/", 1)
    users = [
        i["user_id"]
        for _, v in read_partition_to_end(kafka, topic, int(p), 0)
        for i in orjson.loads(v or b"{}")["items"]
    ]
    assert sorted(users, key=lambda u: int(u[1:])) == [f"u{i}" for i in range(30)]
    assert (20, 10) in written  # ten dropped as replayed
    resumed.close()


def test_channel_sink_joins_a_posts_shard_batches_and_still_drops_replays(stack: Stack) -> None:
    # 32 shards emit a few items each for a normal post: one message, not 32, and a replay of
    # the shards' batches after a crash writes none of their items again.
    kafka = stack.settings.kafka_config()
    written: list[tuple[int, int]] = []
    sink = ChannelTopicsSink(
        kafka, ["push.apns"], on_written=lambda b, dropped: written.append((len(b.items), dropped))
    )
    part_name = sink.route_key(batch("j1", range(1)))
    topic, p = part_name.rsplit("/", 1)
    start = end_offset(kafka, topic, int(p))
    shards = [b for s in range(32) for b in shard_batches("j1", range(s * 5, s * 5 + 5))]
    part = sink.build_part("out", part_name, None)
    state = part.snapshot()
    part.write_batch(shards)
    part.snapshot()
    part.close()
    assert end_offset(kafka, topic, int(p)) - start == 1
    assert written == [(160, 0)]
    resumed = sink.build_part("out", part_name, state)
    later = shard_batches("j1", range(160, 163))
    resumed.write_batch([*shards[:10], *later, *shards[10:]])
    resumed.snapshot()
    resumed.close()
    assert end_offset(kafka, topic, int(p)) - start == 2
    users = [
        i["user_id"]
        for _, v in read_partition_to_end(kafka, topic, int(p), start)
        for i in orjson.loads(v or b"{}")["items"]
    ]
    assert sorted(users, key=lambda u: int(u[1:])) == [f"u{i}" for i in range(163)]
    assert written[1:] == [(163, 160), (3, 0)]


def test_channel_sink_resumes_past_malformed_messages_other_producers_wrote(
    stack: Stack,
) -> None:
    # Regression (found by the 10k malformed-input run): push.* are input topics too, and a
    # writer resuming read back a malformed message there as its own: TypeError on start,
    # and the fan-out crash-looped.
    kafka = stack.settings.kafka_config()
    written: list[tuple[int, int]] = []
    sink = ChannelTopicsSink(
        kafka, ["push.apns"], on_written=lambda b, dropped: written.append((len(b.items), dropped))
    )
    part_name = sink.route_key(batch("m1", range(1)))
    topic, p = part_name.rsplit("/", 1)
    part = sink.build_part("out", part_name, None)
    part.write_batch([batch("m1", range(0, 5))])
    state = part.snapshot()
    part.write_batch([batch("m1", range(5, 10))])  # written after the snapshot
    part.close()
    foreign = [b"not json", b'{"items": [1.5, null]}', b"[]", b'{"items": [{}]}', b""]
    producer = Producer(client_config(kafka, acks="all"))
    for value in foreign:
        producer.produce(topic, value=value, key=b"k", partition=int(p))
    assert producer.flush(30) == 0
    resumed = sink.build_part("out", part_name, state)  # raised TypeError before the fix
    resumed.write_batch([batch("m1", range(5, 12))])
    resumed.snapshot()
    resumed.close()
    assert (7, 5) in written  # the replayed five still dropped, the two new ones written


def test_channel_sink_refuses_a_batch_routed_to_another_topic(stack: Stack) -> None:
    sink = ChannelTopicsSink(stack.settings.kafka_config(), ["push.apns", "push.fcm"])
    part = sink.build_part("out", "push.fcm/0", None)
    with pytest.raises(RuntimeError, match="routed"):
        part.write_batch([batch("p", range(1))])
    part.close()


class DictMarks:
    def __init__(self) -> None:
        self.held: dict[str, int] = {}

    def mark(self, part: str, offset: int) -> int:
        return self.held.setdefault(part, offset)


def users_on(kafka: dict[str, str], part_name: str) -> list[str]:
    topic, p = part_name.rsplit("/", 1)
    return [
        i["user_id"]
        for _, v in read_partition_to_end(kafka, topic, int(p), 0)
        for i in orjson.loads(v or b"{}")["items"]
    ]


def test_channel_sink_crash_before_its_first_snapshot_still_drops_replays(stack: Stack) -> None:
    # Regression: a writer killed in its first epoch had no snapshot, so its restart wrote
    # everything again (32,040 duplicate pushes in the kill -9 test).
    kafka = stack.settings.kafka_config()
    marks = DictMarks()
    sink = ChannelTopicsSink(kafka, ["push.apns"], marks=lambda: marks)
    part_name = sink.route_key(batch("p1", range(1)))
    first = sink.build_part("out", part_name, None)
    first.write_batch([batch("p1", range(0, 10))])
    first.close()  # crash: no snapshot was ever taken
    assert part_name in marks.held
    again = sink.build_part("out", part_name, None)
    again.write_batch([batch("p1", range(0, 15))])
    again.snapshot()
    again.close()
    assert sorted(users_on(kafka, part_name), key=lambda u: int(u[1:])) == [
        f"u{i}" for i in range(15)
    ]


def test_channel_sink_resumed_from_before_a_snapshot_it_took_still_drops_replays(
    stack: Stack,
) -> None:
    # Regression (CI, the kill -9 of one member of a 2-process fan-out): the first snapshot
    # cleared the writer's start mark, but the cluster resumed from the slowest worker's last
    # durable epoch, before that snapshot. The writer came back with no state and no mark,
    # read back nothing, and wrote the replayed pushes a second time.
    kafka = stack.settings.kafka_config()
    marks = DictMarks()
    sink = ChannelTopicsSink(kafka, ["push.apns"], marks=lambda: marks)
    part_name = sink.route_key(batch("p2", range(1)))
    first = sink.build_part("out", part_name, None)
    first.write_batch([batch("p2", range(0, 10))])
    first.snapshot()  # taken, never made durable: another member died first
    first.write_batch([batch("p2", range(10, 20))])
    first.snapshot()
    first.close()
    again = sink.build_part("out", part_name, None)  # resumed from before both snapshots
    again.write_batch([batch("p2", range(0, 25))])
    again.snapshot()
    again.close()
    assert sorted(users_on(kafka, part_name), key=lambda u: int(u[1:])) == [
        f"u{i}" for i in range(25)
    ]


def test_channel_sink_keeps_replayed_items_while_the_replay_is_under_way(stack: Stack) -> None:
    # A replay slower than the original (a loaded machine, a long catch-up before the fan-out
    # goes on) spans more snapshots than the window: the window restarts at each replayed item
    # seen, so items re-emitted late are still dropped.
    kafka = stack.settings.kafka_config()
    sink = ChannelTopicsSink(kafka, ["push.apns"], replay_window_epochs=2)
    part_name = sink.route_key(batch("p3", range(1)))
    first = sink.build_part("out", part_name, None)
    state = first.snapshot()
    first.write_batch([batch("p3", range(0, 10))])
    first.snapshot()
    first.close()
    resumed = sink.build_part("out", part_name, state)
    for i in range(10):  # one replayed item per epoch, with new traffic beside it
        resumed.write_batch([batch("p3", range(i, i + 1)), batch("p3", range(100 + i, 101 + i))])
        resumed.snapshot()
    resumed.close()
    users = users_on(kafka, part_name)
    assert len(users) == len(set(users)) == 20
    # Without replayed items the window does end, and the read-back is forgotten.
    again = sink.build_part("out", part_name, state)  # reads back all 20
    for i in range(3):
        again.write_batch([batch("p3", range(300 + i, 301 + i))])
        again.snapshot()
    again.write_batch([batch("p3", range(0, 1))])  # long after: written again
    again.close()
    assert users_on(kafka, part_name).count("u0") == 2


def dead_letter(n: int) -> DeadLetter:
    return DeadLetter("post_created", 0, n, "bad_input: not json", "x")


def delivery_event(n: int) -> DeliveryEvent:
    return DeliveryEvent(f"n{n}", "p", "u", "d", "apns", "accepted", 200, None, 1, "t")


@pytest.mark.parametrize(
    ("make_sink", "record", "identity_key"),
    [
        (DeadLetterSink, dead_letter, "offset"),
        (DeliveryEventsSink, delivery_event, "notification_id"),
    ],
)
def test_the_dead_letter_and_delivery_event_sinks_write_each_record_once(
    stack: Stack,
    make_sink: Callable[..., PartitionedTopicsSink[Any]],
    record: Callable[[int], Any],
    identity_key: str,
) -> None:
    # Both build their partitions' writers through the shared `build_part`: a resume from a
    # snapshot and a restart before any snapshot (the start marks) each drop the replay.
    kafka = stack.settings.kafka_config()
    marks = DictMarks()
    sink = make_sink(kafka, marks=lambda: marks)
    part_name = sink.route_key(record(0))
    topic, p = part_name.rsplit("/", 1)
    before = end_offset(kafka, topic, int(p))

    def written() -> list[object]:
        got = read_partition_to_end(kafka, topic, int(p), before)
        return [orjson.loads(v or b"{}")[identity_key] for _, v in got]

    first = sink.build_part("out", part_name, None)
    first.write_batch([record(i) for i in range(5)])
    first.close()  # crash before its first snapshot
    again = sink.build_part("out", part_name, None)
    again.write_batch([record(i) for i in range(8)])
    state = again.snapshot()
    again.write_batch([record(i) for i in range(8, 10)])  # after the snapshot, then a crash
    again.close()
    resumed = sink.build_part("out", part_name, state)
    resumed.write_batch([record(i) for i in range(8, 12)])
    resumed.snapshot()
    resumed.close()
    ids = written()
    assert len(ids) == len(set(ids)) == 12


class GatedMarks(DictMarks):
    """Start marks whose `mark` waits until the test opens the gate (a slow Redis or broker)."""

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.error = error

    def mark(self, part: str, offset: int) -> int:
        if not self.gate.wait(20):
            raise TimeoutError("the test never opened the gate")
        if self.error is not None:
            raise self.error
        return super().mark(part, offset)


@dataclass
class GatedPartition:
    """A delivery_events partition whose writers' start marks wait for the test's gate."""

    kafka: KafkaConfig
    marks: GatedMarks
    sink: DeliveryEventsSink
    name: str
    before: int  # the partition's end when the test began

    def parts(self) -> tuple[KafkaConfig, GatedMarks, DeliveryEventsSink, str, str, str, int]:
        topic, p = self.name.rsplit("/", 1)
        return self.kafka, self.marks, self.sink, self.name, topic, p, self.before


def gated_partition(stack: Stack, error: Exception | None = None) -> GatedPartition:
    kafka = stack.settings.kafka_config()
    marks = GatedMarks(error=error)
    sink = DeliveryEventsSink(kafka, marks=lambda: marks)
    name = sink.route_key(delivery_event(0))
    topic, p = name.rsplit("/", 1)
    return GatedPartition(kafka, marks, sink, name, end_offset(kafka, topic, int(p)))


def test_a_writer_is_built_without_waiting_for_its_start_mark(stack: Stack) -> None:
    # Bytewax builds writers on the worker thread: a constructor that waited for the mark
    # stalled every input of the worker (0.6 s per delivery_events partition, one after another).
    gp = gated_partition(stack)
    kafka, marks, sink, part_name, topic, p, before = gp.parts()
    marks.gate.set()
    first = sink.build_part("out", part_name, None)
    first.write_batch([delivery_event(i) for i in range(5)])
    first.close()  # crash before its first snapshot: the five are on the partition
    assert end_offset(kafka, topic, int(p)) == before + 5
    marks.gate.clear()
    again = sink.build_part("out", part_name, None)  # returns while the mark is still held up
    again.write_batch([delivery_event(i) for i in range(8)])  # the replay of 0..4, then 5..7
    assert not marks.gate.is_set()
    assert end_offset(kafka, topic, int(p)) == before + 5  # nothing produced before the mark
    marks.gate.set()
    again.snapshot()
    again.close()
    got = read_partition_to_end(kafka, topic, int(p), before)
    ids = [orjson.loads(v or b"{}")["notification_id"] for _, v in got]
    assert ids == [f"n{i}" for i in range(8)]  # the held replay was checked against the read-back


def test_held_values_are_written_once_the_start_mark_lands_without_another_write(
    stack: Stack,
) -> None:
    # A small post's only batch to a partition must not wait for the epoch's snapshot.
    gp = gated_partition(stack)
    kafka, marks, sink, part_name, topic, p, before = gp.parts()
    part = sink.build_part("out", part_name, None)
    part.write_batch([delivery_event(200), delivery_event(201)])
    assert end_offset(kafka, topic, int(p)) == before
    marks.gate.set()
    deadline = time.monotonic() + 10
    while end_offset(kafka, topic, int(p)) < before + 2:
        assert time.monotonic() < deadline, "the held values were not written"
        time.sleep(0.05)
    part.snapshot()
    part.close()
    got = read_partition_to_end(kafka, topic, int(p), before)
    assert [orjson.loads(v or b"{}")["notification_id"] for _, v in got] == ["n200", "n201"]


def test_a_writer_holding_more_than_its_limit_waits_for_the_start_mark(stack: Stack) -> None:
    # Held values are bounded: past the limit the write waits, as every write did before.
    gp = gated_partition(stack)
    kafka, marks, sink, part_name, topic, p, before = gp.parts()
    part = sink.build_part("out", part_name, None)
    part.held_limit = 2
    part.write_batch([delivery_event(300), delivery_event(301)])  # held: within the limit
    returned = threading.Event()

    def write_past_the_limit() -> None:
        part.write_batch([delivery_event(302)])
        returned.set()

    writer = threading.Thread(target=write_past_the_limit)
    writer.start()
    assert not returned.wait(0.5)  # still waiting: the mark has not landed
    marks.gate.set()
    writer.join(20)
    assert returned.is_set()
    part.snapshot()
    part.close()
    got = read_partition_to_end(kafka, topic, int(p), before)
    assert [orjson.loads(v or b"{}")["notification_id"] for _, v in got] == [
        "n300",
        "n301",
        "n302",
    ]


def test_a_failed_start_mark_raises_at_the_next_snapshot_and_write(stack: Stack) -> None:
    gp = gated_partition(stack, error=RuntimeError("redis down"))
    kafka, marks, sink, part_name, topic, p, before = gp.parts()
    part = sink.build_part("out", part_name, None)
    part.write_batch([delivery_event(100)])  # held: the mark has not been tried yet
    marks.gate.set()
    with pytest.raises(RuntimeError, match="redis down"):
        part.snapshot()
    with pytest.raises(RuntimeError, match="redis down"):
        part.write_batch([delivery_event(101)])
    part.close()
    assert end_offset(kafka, topic, int(p)) == before  # nothing written without a mark
