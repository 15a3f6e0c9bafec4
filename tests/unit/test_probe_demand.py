"""A job held at the changelog gate asks the changelog readers for a probe at the time it needs."""

from __future__ import annotations

from datetime import UTC, datetime

from operators.adapters.kafka.end_prober import EndProber
from operators.adapters.kafka.reader import (
    IDLE_POLL_MAX_S,
    IDLE_POLL_S,
    PROBE_ANSWER_S,
    TopicPartitionReader,
)
from operators.events import CaughtUp
from operators.fanout.columns import UserTable
from operators.fanout.logic import ExpandFollowerShardLogic
from operators.fanout.notify import NotifyShard, NotifyTally, RecipientJob
from operators.fanout.shard import FollowerShard
from operators.probe_demand import ProbeDemand
from tests.unit.test_notify_fanout import request
from tests.unit.test_redis_outage import FakeClock, FakeConsumer, FakeMessage, consumers

__all__ = ["consumers"]  # the fixture, used by name

SOURCES = ["follow_changes/0", "preference_changes/0", "device_changes/0"]
INTERVAL = 1.0  # long, so a probe before it can only be the demand's


def test_the_earliest_ask_after_a_probe_is_the_one_due() -> None:
    demand = ProbeDemand()
    assert demand.due_after(0.0) is None
    for at in (10.3, 10.1, 10.2, 10.1):
        demand.ask(at)
    assert demand.due_after(10.0) == 10.1
    assert demand.due_after(10.1) == 10.2  # a probe at 10.1 answered the ask for 10.1
    assert demand.due_after(10.25) == 10.3
    assert demand.due_after(10.3) is None


def test_old_asks_are_forgotten() -> None:
    demand = ProbeDemand(keep_s=5.0)
    demand.ask(1.0)
    demand.ask(5.5)
    assert demand.due_after(0.0) == 1.0
    demand.ask(7.0)  # 1.0 is more than keep_s older than the newest ask
    assert demand.due_after(0.0) == 5.5


def changelog_reader(
    clock: FakeClock,
    demand: ProbeDemand | None,
    prober: EndProber | None = None,
    interval: float = INTERVAL,
) -> TopicPartitionReader:
    """A device_changes reader at offset 3 (its end); asks go to `prober` when given."""
    return TopicPartitionReader(
        {"bootstrap.servers": "x"},
        "device_changes",
        0,
        3,
        100,
        True,
        interval,
        clock=clock,
        demand=demand,
        prober=prober,
    )


def at_end(r: TopicPartitionReader, consumer: FakeConsumer, clock: FakeClock) -> CaughtUp:
    """The partition's end event arrives: the reader reports its last probe's time."""
    consumer.queue.append(FakeMessage(3, eof=True))
    [marker] = r.next_batch()
    assert isinstance(marker, CaughtUp)
    return marker


def test_an_idle_reader_probes_at_the_time_a_shard_asked_for(
    consumers: list[FakeConsumer],
) -> None:
    for demand in (ProbeDemand(), None):
        clock = FakeClock(100.0)
        r = changelog_reader(clock, demand)
        consumer = consumers[-1]
        at_end(r, consumer, clock)  # the start's probe answered at 100.0
        if demand is not None:
            demand.ask(100.3)
        clock.now = 100.2
        r.next_batch()
        assert consumer.seeks == []  # not yet: the ask is for 100.3
        clock.now = 100.3
        r.next_batch()
        if demand is None:
            assert consumer.seeks == []  # the interval (1 s) is not over
            continue
        assert consumer.seeks == [3]
        clock.now = 100.35
        assert at_end(r, consumer, clock).as_of == 100.3  # what the gate needed


def probing_reader(
    consumers: list[FakeConsumer],
) -> tuple[FakeClock, ProbeDemand, TopicPartitionReader, FakeConsumer]:
    """A changelog reader at its end that made the probe its shard asked for at 100.1."""
    clock = FakeClock(100.0)
    demand = ProbeDemand()
    r = changelog_reader(clock, demand)
    [consumer] = consumers
    at_end(r, consumer, clock)
    demand.ask(100.1)
    clock.now = 100.1
    r.next_batch()
    assert consumer.seeks == [3]
    return clock, demand, r, consumer


def test_a_reader_never_probes_again_before_its_probe_is_answered(
    consumers: list[FakeConsumer],
) -> None:
    clock, demand, r, consumer = probing_reader(consumers)
    demand.ask(100.15)  # asked while the probe at 100.1 is unanswered
    clock.now = 100.2
    r.next_batch()
    assert consumer.seeks == [3]  # a seek now would restart the fetch that answers
    clock.now = 100.25
    assert at_end(r, consumer, clock).as_of == 100.1
    r.next_batch()
    assert consumer.seeks == [3, 3]  # answered: the later ask is probed for at once
    clock.now = 101.3
    at_end(r, consumer, clock)
    demand.ask(101.3 + INTERVAL + PROBE_ANSWER_S / 2)
    clock.now = 101.3 + INTERVAL + 0.01  # the interval is over, the ask comes in 0.04 s
    r.next_batch()
    assert consumer.seeks == [3, 3]  # an interval probe now would be unanswered at the ask
    clock.now = 101.3 + INTERVAL + PROBE_ANSWER_S / 2
    r.next_batch()
    assert consumer.seeks == [3, 3, 3]
    clock.now += 0.05
    at_end(r, consumer, clock)
    demand.ask(clock.now + INTERVAL + 1.0)  # far after the next interval probe's answer
    clock.now += INTERVAL + 0.01
    r.next_batch()
    assert consumer.seeks == [3, 3, 3, 3]  # the interval probe is not held back for it


def test_the_shard_asks_for_a_probe_only_when_its_gate_holds_a_job() -> None:
    shard = FollowerShard(SOURCES, settle_s=0.1)
    assert shard.probe_wanted(50.0) == 50.1  # nothing read yet
    for s in SOURCES:
        shard.note_caught_up(CaughtUp(s, 100.0))
    assert shard.probe_wanted(99.9) is None  # read to the end 0.1 s after it: open
    assert shard.probe_wanted(99.95) == 99.95 + 0.1


def test_a_request_held_at_the_gate_asks_the_demand_for_its_read_time_plus_settle() -> None:
    demand = ProbeDemand()
    shard = FollowerShard(SOURCES, settle_s=0.1)
    logic = ExpandFollowerShardLogic(
        shard,
        lambda: None,  # type: ignore[arg-type,return-value]
        100,
        lambda: datetime.fromtimestamp(200.0, UTC),
        demand=demand,
    )
    logic.on_batch([CaughtUp(s, 100.0) for s in SOURCES])
    logic.on_batch([RecipientJob(request(), ("u1",), 0, 99.5)])
    assert demand.due_after(0.0) is None  # its gate was open: nothing asked
    logic.on_batch(
        [RecipientJob(request(), ("u1",), 0, 150.0), RecipientJob(request(), ("u1",), 0, 150.2)]
    )
    assert demand.due_after(0.0) == 150.2 + 0.1  # one ask, for the newest
    assert demand.due_after(150.3) is None


def test_a_jobs_first_run_counts_its_wait_since_its_read() -> None:
    shard = NotifyShard()
    shard.add_job(RecipientJob(request(), ("u1",), 0, 100.0))
    tally = NotifyTally()
    shard.work(UserTable(), datetime.fromtimestamp(100.4, UTC), lambda read_at: True, tally)
    assert [(t, round(s, 3)) for t, s in tally.read_to_run] == [("transactional", 0.4)]


def wait_s(r: TopicPartitionReader) -> float:
    """Seconds from now until the reader asks to be polled again."""
    awake = r.next_awake()
    assert awake is not None
    return (awake - datetime.now(UTC)).total_seconds()


def test_an_idle_reader_wakes_at_the_time_a_shard_asked_for(
    consumers: list[FakeConsumer],
) -> None:
    clock = FakeClock(100.0)
    demand = ProbeDemand()
    r = changelog_reader(clock, demand)
    [consumer] = consumers
    at_end(r, consumer, clock)
    for _ in range(8):  # long idle: the backoff is at its longest
        clock.now += 0.04
        r.next_batch()
    assert wait_s(r) > IDLE_POLL_MAX_S * 0.9
    demand.ask(clock.now + 0.005)
    assert wait_s(r) <= 0.006  # not a backoff later: the gate waits on this partition
    clock.now += 0.005
    r.next_batch()
    assert consumer.seeks == [3]


def test_a_reader_looks_often_for_the_answer_to_an_asked_for_probe(
    consumers: list[FakeConsumer],
) -> None:
    clock, _demand, r, consumer = probing_reader(consumers)
    for _ in range(6):  # the answer is not in yet
        clock.now += 0.01
        r.next_batch()
        assert wait_s(r) <= IDLE_POLL_S + 0.001
    clock.now = 100.1 + 3 * PROBE_ANSWER_S + 0.01  # never answered: back to the backoff
    r.next_batch()
    assert wait_s(r) > IDLE_POLL_MAX_S * 0.9
    clock.now += 0.01
    at_end(r, consumer, clock)


def test_an_interval_probe_keeps_the_backoff(consumers: list[FakeConsumer]) -> None:
    clock = FakeClock(100.0)
    r = changelog_reader(clock, ProbeDemand())
    [consumer] = consumers
    at_end(r, consumer, clock)
    clock.now += INTERVAL + 0.01
    for _ in range(7):
        r.next_batch()
        clock.now += 0.01
    assert consumer.seeks == [3]  # no shard asked: only its interval probe
    assert wait_s(r) > IDLE_POLL_MAX_S * 0.9
