"""A celebrity post's bulk lanes get their partition writers when the post is planned."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from operators.adapters.kafka.writer import IdempotentPartitionWriter, PartitionedTopicsSink
from operators.events import MessageOrigin
from operators.fanout.steps import ReadPost, ShardJobPlanner
from schemas.records import PostCreated
from schemas.topics import CHANNEL_TOPICS_BULK
from tests.fakes import InMemoryFollowerStore


class FakeWriter:
    """Stands for a partition writer: records how it was built and whether it was closed."""

    def __init__(self, topic: str, partition: int, resume: Any, marks: Any) -> None:
        self.topic, self.partition, self.resume, self.marks = topic, partition, resume, marks
        self.closed_event = threading.Event()

    def close(self) -> None:
        self.closed_event.set()


class Marks:
    def mark(self, part: str, offset: int) -> int:
        return offset


class SinkOfFakes(PartitionedTopicsSink[Any]):
    def __init__(
        self,
        marks: bool = True,
        topics: Sequence[str] = ("push.apns", "push.apns.bulk", "push.fcm.bulk"),
    ) -> None:
        super().__init__(
            {"bootstrap.servers": "unused:1"},
            list(topics),
            replay_window_epochs=3,
            marks=Marks if marks else None,
        )
        # The topics' partitions, as the broker would list them.
        self._parts = sorted(f"{t}/{p}" for t in self._topics for p in range(2))
        self._counts = dict.fromkeys(self._topics, 2)
        self.writers: list[FakeWriter] = []

    def _new_writer(
        self, topic: str, partition: int, resume: Any, marks: Any
    ) -> IdempotentPartitionWriter[Any]:
        writer = FakeWriter(topic, partition, resume, marks)
        self.writers.append(writer)
        return writer  # type: ignore[return-value]


def test_prepared_writers_are_the_ones_bytewax_gets() -> None:
    sink = SinkOfFakes()
    sink.prepare(CHANNEL_TOPICS_BULK)
    prepared = {f"{w.topic}/{w.partition}": w for w in sink.writers}
    assert sorted(prepared) == [
        "push.apns.bulk/0",
        "push.apns.bulk/1",
        "push.fcm.bulk/0",
        "push.fcm.bulk/1",
    ]
    assert all(w.resume is None and isinstance(w.marks, Marks) for w in prepared.values())
    sink.prepare(CHANNEL_TOPICS_BULK)  # the next celebrity post: nothing more to build
    assert len(sink.writers) == 4
    assert sink.build_part("out", "push.apns.bulk/1", None) is prepared["push.apns.bulk/1"]
    normal = sink.build_part("out", "push.apns/0", None)
    assert normal not in prepared.values() and len(sink.writers) == 5


def test_a_partition_bytewax_built_is_not_prepared_again() -> None:
    sink = SinkOfFakes()
    built = sink.build_part("out", "push.fcm.bulk/0", None)
    sink.prepare(CHANNEL_TOPICS_BULK)
    assert [f"{w.topic}/{w.partition}" for w in sink.writers if w is not built] == [
        "push.apns.bulk/0",
        "push.apns.bulk/1",
        "push.fcm.bulk/1",
    ]


def test_a_partition_with_a_snapshot_gets_a_writer_that_resumes_from_it() -> None:
    sink = SinkOfFakes()
    sink.prepare(CHANNEL_TOPICS_BULK)
    (prepared,) = [w for w in sink.writers if (w.topic, w.partition) == ("push.fcm.bulk", 1)]
    resumed = sink.build_part("out", "push.fcm.bulk/1", (7, 5))
    assert resumed is not prepared
    assert prepared.closed_event.wait(10)  # closed, beside the worker
    assert isinstance(resumed, FakeWriter) and resumed.resume == (7, 5)


def test_without_start_marks_nothing_is_prepared() -> None:
    sink = SinkOfFakes(marks=False)
    sink.prepare(CHANNEL_TOPICS_BULK)
    assert sink.writers == []


@pytest.mark.parametrize(("followers", "told"), [(3, 1), (2, 0)])
def test_the_planner_tells_of_bulk_posts_only(followers: int, told: int) -> None:
    store = InMemoryFollowerStore(4)
    store.bulk_load(("star", f"fan{i}", 1) for i in range(followers))
    calls: list[None] = []
    planner = ShardJobPlanner(lambda: store, 4, 2, on_bulk=lambda: calls.append(None))
    post = PostCreated("p1", "star", "public", datetime(2026, 6, 1, tzinfo=UTC))
    jobs = planner.plan(
        ReadPost(post, "2026-06-01T00:00:00Z", MessageOrigin("post_created", 0, 0), 1.0)
    )
    assert len(jobs) == 4 and len(calls) == told
