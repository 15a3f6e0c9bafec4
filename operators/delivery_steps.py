"""The delivery flow's steps: decode channel and retry messages, hold retries until due, send.

`RetryTimers` is the pure state of held retries (a heap by due time); `RetryTimerLogic` is its
Bytewax adapter, which asks to be woken at the earliest due time. `SendStep` gives each worker
thread its own `DeliveryEngine`, built on first use.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from zlib import crc32

from bytewax.operators import StatefulBatchLogic

from operators.adapters.kafka_io import RawEvent
from operators.delivery_engine import DeliveryEngine, DeliveryOutput
from operators.delivery_model import SendRequest
from operators.fanout_steps import dead_letter
from schemas.codecs import InvalidEvent, decode_dispatch_batch, decode_retry_record, parse_timestamp
from schemas.records import DeadLetter

RETRY_TIMER_KEYS = 16  # retries are spread over this many keyed timer states


def decode_channel_message(event: RawEvent) -> list[SendRequest | DeadLetter]:
    """A dispatch batch from `push.*` as one send request per item (or a dead letter)."""
    lane = "bulk" if event.topic.endswith(".bulk") else "normal"
    try:
        batch = decode_dispatch_batch(event.value, lane)
        created_ts = parse_timestamp(batch.created_at).timestamp()
    except InvalidEvent as exc:
        return [dead_letter(event, exc)]
    source = event.source
    return [
        SendRequest(
            provider=batch.provider,
            lane=lane,  # type: ignore[arg-type]
            post_id=batch.post_id,
            author_id=batch.author_id,
            created_at=batch.created_at,
            created_ts=created_ts,
            item=item,
            source=source,
        )
        for item in batch.items
    ]


def decode_retry_message(event: RawEvent) -> tuple[str, tuple[float, SendRequest]] | DeadLetter:
    """A `push.retry` record as (timer key, (due_at, request)), or a dead letter."""
    try:
        record = decode_retry_record(event.value)
        created_ts = parse_timestamp(record.created_at).timestamp()
    except InvalidEvent as exc:
        return dead_letter(event, exc)
    request = SendRequest(
        provider=record.provider,
        lane="bulk" if record.lane == "bulk" else "normal",
        post_id=record.post_id,
        author_id=record.author_id,
        created_at=record.created_at,
        created_ts=created_ts,
        item=record.item,
        source=event.source,
        attempt=record.attempt,
        seq=record.seq,
    )
    key = str(crc32(record.item["notification_id"].encode()) % RETRY_TIMER_KEYS)
    return key, (record.due_at, request)


class RetryTimers:
    """Retries waiting for their time; released in due order."""

    def __init__(self, pending: Iterable[tuple[float, SendRequest]] = ()) -> None:
        self._heap: list[tuple[float, int, SendRequest]] = []
        self._n = 0
        for due, request in pending:
            self.add(due, request)

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, due_at: float, request: SendRequest) -> None:
        """Hold a request until `due_at` (epoch seconds)."""
        self._n += 1
        heapq.heappush(self._heap, (due_at, self._n, request))

    def release(self, now: float) -> list[SendRequest]:
        """Every request due by `now`."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def next_due(self) -> float | None:
        """The earliest due time, if any."""
        return self._heap[0][0] if self._heap else None

    def snapshot(self) -> list[tuple[float, SendRequest]]:
        """What is held (a retry read from the topic lives only here until released)."""
        return [(due, r) for due, _, r in self._heap]


class RetryTimerLogic(StatefulBatchLogic[tuple[float, SendRequest], SendRequest, Any]):
    """Bytewax adapter of RetryTimers: a timer per key at the earliest due retry."""

    def __init__(self, timers: RetryTimers, clock: Callable[[], float]) -> None:
        self.timers = timers
        self._clock = clock

    def on_batch(self, values: list[tuple[float, SendRequest]]) -> tuple[list[SendRequest], bool]:
        """Hold each; release what is already due."""
        for due, request in values:
            self.timers.add(due, request)
        return self.timers.release(self._clock()), StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[SendRequest], bool]:
        """Release what is due."""
        return self.timers.release(self._clock()), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[SendRequest], bool]:
        """A finite input ended (tests): keep holding; nothing is released early."""
        return [], StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        """The earliest due time."""
        due = self.timers.next_due()
        return None if due is None else datetime.fromtimestamp(due, UTC)

    def snapshot(self) -> Any:
        """The held retries."""
        return self.timers.snapshot()


class SendStep:
    """`flat_map_batch` mapper: each worker thread builds its engine once, on first use."""

    def __init__(self, build_engine: Callable[[], DeliveryEngine]) -> None:
        self._build = build_engine
        self._local = threading.local()

    def __call__(self, requests: list[SendRequest]) -> list[DeliveryOutput]:
        """Deliver everything this worker read (blocks until every send is answered)."""
        engine: DeliveryEngine | None = getattr(self._local, "engine", None)
        if engine is None:
            engine = self._build()
            self._local.engine = engine
        return engine.deliver(requests)
