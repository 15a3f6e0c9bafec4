"""The delivery flow's steps: decode channel and retry messages, send.

Retries are held until due by the retry topic's source (`RetryTopicSource`), using
`retry_due_at`. `SendStep` gives each worker thread its own `DeliveryEngine`, built on first
use.
"""

from __future__ import annotations

from collections.abc import Callable

from operators.delivery.engine import DeliveryEngine, DeliveryOutput
from operators.delivery.model import SendRequest
from operators.events import RawEvent, dead_letter
from operators.worker_local import WorkerLocal
from schemas.codecs import InvalidEvent, decode_dispatch_batch, decode_retry_record, parse_timestamp
from schemas.records import DeadLetter


def decode_channel_message(event: RawEvent) -> list[SendRequest | DeadLetter]:
    """A dispatch batch from `push.*` as one send request per item (or a dead letter)."""
    lane = "bulk" if event.topic.endswith(".bulk") else "normal"
    try:
        batch = decode_dispatch_batch(event.value, lane)
        created_ts = parse_timestamp(batch.created_at).timestamp()
    except InvalidEvent as exc:
        # A batch handed out in slices is dead-lettered once, with its first slice.
        return [dead_letter(event, exc)] if event.window is None or event.window[0] == 0 else []
    origin = event.origin
    first, stop = event.window if event.window is not None else (0, len(batch.items))
    return [
        SendRequest(
            provider=batch.provider,
            lane=lane,  # type: ignore[arg-type]
            post_id=batch.post_id,
            author_id=batch.author_id,
            created_at=batch.created_at,
            created_ts=created_ts,
            item=batch.items[index],
            origin=origin.of_item(index),
        )
        for index in range(first, stop)
    ]


def retry_due_at(raw: bytes | None) -> float:
    """When a `push.retry` record is due; 0 (now) when it is not a valid record.

    Validated first: a malformed record with a due_at in the future would otherwise be held
    (in memory and in snapshots) until then and dead-lettered only then.
    """
    try:
        return decode_retry_record(raw).due_at
    except InvalidEvent:
        return 0.0


def decode_retry_message(event: RawEvent) -> SendRequest | DeadLetter:
    """A due `push.retry` record as a send request, or a dead letter."""
    try:
        record = decode_retry_record(event.value)
        created_ts = parse_timestamp(record.created_at).timestamp()
    except InvalidEvent as exc:
        return dead_letter(event, exc)
    return SendRequest(
        provider=record.provider,
        lane="bulk" if record.lane == "bulk" else "normal",
        post_id=record.post_id,
        author_id=record.author_id,
        created_at=record.created_at,
        created_ts=created_ts,
        item=record.item,
        origin=event.origin,
        attempt=record.attempt,
        seq=record.seq,
    )


class SendStep:
    """`flat_map_batch` mapper: each worker thread builds its engine once, on first use.

    The engine is kept in a `WorkerLocal`, not a `threading.local`: Bytewax's cluster workers
    lose a `threading.local` between activations, and an engine (event loop thread, provider
    connections, a firebase app) was built on every call and never closed (issue 20).
    """

    def __init__(self, build_engine: Callable[[], DeliveryEngine]) -> None:
        self._build = build_engine
        self._local = WorkerLocal()

    def __call__(self, requests: list[SendRequest]) -> list[DeliveryOutput]:
        """Deliver everything this worker read (blocks until every send is answered)."""
        engine: DeliveryEngine | None = getattr(self._local, "engine", None)
        if engine is None:
            engine = self._build()
            self._local.engine = engine
        return engine.deliver(requests)
