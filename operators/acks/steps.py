"""The acks flow's steps: decode `notification_acks`, apply them to the notification store.

An ack marks one device of a notification `delivered` or `opened` (never backwards, so a replay
after a restart changes nothing); the notification's status follows (opened when any device
opened it). An ack for a notification or device the store does not know becomes a dead letter
with that reason, as a malformed one does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from operators import metrics
from operators.acks.ports import AckStore
from operators.events import RawEvent, dead_letter
from operators.worker_local import WorkerLocal
from schemas.codecs import InvalidEvent, decode_notification_ack
from schemas.records import DeadLetter, NotificationAck


@dataclass(frozen=True, slots=True)
class ReadAck:
    """A valid ack and the message it came from (for its dead letter, if it matches nothing)."""

    ack: NotificationAck
    event: RawEvent


def decode_ack(event: RawEvent) -> ReadAck | DeadLetter:
    """Decode and validate a notification_acks message."""
    try:
        return ReadAck(decode_notification_ack(event.value), event)
    except InvalidEvent as exc:
        return dead_letter(event, exc)


class ApplyAcks:
    """`flat_map_batch` mapper: apply a worker's acks in one store call; dead letters out.

    Each worker thread opens its store once (a `WorkerLocal`: see operators/worker_local.py).
    """

    def __init__(self, open_store: Callable[[], AckStore]) -> None:
        self._open = open_store
        self._local = WorkerLocal()

    def __call__(self, batch: list[ReadAck]) -> list[DeadLetter]:
        """Apply; return a dead letter per ack that matched no notification or device."""
        store: AckStore | None = getattr(self._local, "store", None)
        if store is None:
            store = self._open()
            self._local.store = store
        outcomes = store.apply_acks([r.ack for r in batch])
        out: list[DeadLetter] = []
        for read, outcome in zip(batch, outcomes, strict=True):
            metrics.ACKS.labels(read.ack.event, outcome).inc()
            if outcome != "applied":
                what = read.ack.notification_id
                if outcome == "unknown_device":
                    what = f"device {read.ack.device_id} of {what}"
                out.append(
                    dead_letter(read.event, f"{outcome}: no {what} in the notification store")
                )
        return out
