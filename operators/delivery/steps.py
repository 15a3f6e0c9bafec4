"""The delivery flow's decoders: channel messages and retry records as send requests.

The delivery sources (`operators/adapters/kafka/channel_lanes.py`, `retry_source.py`) decode
what they read with these and hand the requests to the worker's engine; retries are held until
due by the retry source, using `retry_due_at`.
"""

from __future__ import annotations

from collections.abc import Iterable

from operators.delivery.model import Lane, SendRequest
from operators.events import RawEvent, dead_letter
from schemas.codecs import InvalidEvent, decode_dispatch_batch, decode_retry_record, parse_timestamp
from schemas.records import DeadLetter, DispatchBatch
from schemas.topics import lane_of_topic


def decode_channel_batch(event: RawEvent) -> tuple[DispatchBatch, float] | DeadLetter:
    """A channel topic's dispatch batch and its created_at (epoch seconds), or its dead letter.

    Its lane is its topic's (`push.apns.transactional`, `email.marketing` -> bulk).
    """
    lane = lane_of_topic(event.topic)
    try:
        batch = decode_dispatch_batch(event.value, lane)
        return batch, parse_timestamp(batch.created_at).timestamp()
    except InvalidEvent as exc:
        return dead_letter(event, exc)


def batch_requests(
    event: RawEvent, batch: DispatchBatch, created_ts: float, items: Iterable[int]
) -> list[SendRequest]:
    """One send request per chosen item of a decoded dispatch batch."""
    origin = event.origin
    lane = batch.lane
    message = batch.message
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
            message=message,
        )
        for index in items
    ]


def decode_channel_message(event: RawEvent) -> list[SendRequest | DeadLetter]:
    """A dispatch batch from `push.*` as one send request per item (or a dead letter)."""
    decoded = decode_channel_batch(event)
    if isinstance(decoded, DeadLetter):
        # A batch handed out in slices is dead-lettered once, with its first slice.
        return [decoded] if event.window is None or event.window[0] == 0 else []
    batch, created_ts = decoded
    first, stop = event.window if event.window is not None else (0, len(batch.items))
    return list(batch_requests(event, batch, created_ts, range(first, stop)))


def _schedule(raw: bytes | None) -> tuple[float, str]:
    """(due_at, lane) of a `push.retry` record; (0, normal) when it is not a valid record.

    The retry source asks for both of the same record one after the other: the last answer is
    kept (one tuple, replaced whole, so worker threads never see half of another's).
    """
    global _last_schedule
    last = _last_schedule
    if last is not None and last[0] is raw:
        return last[1]
    try:
        record = decode_retry_record(raw)
        answer = (record.due_at, record.lane)
    except InvalidEvent:
        answer = (0.0, "normal")
    _last_schedule = (raw, answer)
    return answer


_last_schedule: tuple[bytes | None, tuple[float, str]] | None = None


def retry_due_at(raw: bytes | None) -> float:
    """When a `push.retry` record is due; 0 (now) when it is not a valid record.

    Validated first: a malformed record with a due_at in the future would otherwise be held
    (in memory and in snapshots) until then and dead-lettered only then.
    """
    return _schedule(raw)[0]


def retry_lane(raw: bytes | None) -> str:
    """The lane of a `push.retry` record (normal when it is not a valid record)."""
    return _schedule(raw)[1]


_LANES: dict[str, Lane] = {"transactional": "transactional", "bulk": "bulk"}


def decode_retry_message(event: RawEvent) -> SendRequest | DeadLetter:
    """A due `push.retry` record as a send request, or a dead letter."""
    try:
        record = decode_retry_record(event.value)
        created_ts = parse_timestamp(record.created_at).timestamp()
    except InvalidEvent as exc:
        return dead_letter(event, exc)
    return SendRequest(
        provider=record.provider,
        lane=_LANES.get(record.lane, "normal"),
        post_id=record.post_id,
        author_id=record.author_id,
        created_at=record.created_at,
        created_ts=created_ts,
        item=record.item,
        origin=event.origin,
        attempt=record.attempt,
        seq=record.seq,
        message=record.message,
    )
