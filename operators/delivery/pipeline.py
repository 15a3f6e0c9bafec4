"""The pipelined delivery sources' bookkeeping: what each read message's items have become.

The delivery flow's sources read `push.*` and `push.retry`, hand the requests to the worker's
engine (`DeliveryPump`, which never waits for a provider) and emit each request's outputs once
it is judged. Their snapshots say where a restart resumes: the first item not judged, plus the
items after it that were (`LaneProgress`), so a restart sends again only what had no outcome
yet and never emits an outcome twice. Why that gives exactly one outcome per item across a
kill -9 is in docs/design.md, "Delivery: pipelined, one outcome per item".

Pure bookkeeping: the Kafka readers and Bytewax's source partitions are the adapters'
(`operators/adapters/kafka/channel_lanes.py`, `retry_source.py`).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from operators.delivery.engine import DeliveryEngine, DeliveryOutput, Judged
from operators.delivery.model import SendRequest
from operators.worker_local import WorkerLocal
from schemas.records import DeadLetter

log = logging.getLogger(__name__)

Ranges = tuple[tuple[int, int], ...]
"""Item ranges [start, stop) of one message."""
LaneState = tuple[int, int, dict[int, Ranges]]
"""Where a lane resumes: the message offset and item of the first item not judged, and the
items judged after it (by message offset), which a restart does not hand out again."""


def _ranges(flags: Iterable[bool], first: int) -> Ranges:
    """Ranges of the positions (counted from `first`) whose flag is set."""
    out: list[tuple[int, int]] = []
    start = -1
    i = first
    for i, flag in enumerate(flags, first):
        if flag and start < 0:
            start = i
        elif not flag and start >= 0:
            out.append((start, i))
            start = -1
    if start >= 0:
        out.append((start, i + 1))
    return tuple(out)


def _expand(ranges: Ranges) -> set[int]:
    return {i for start, stop in ranges for i in range(start, stop)}


class _Message:
    """A message read from a lane: its items handed out in order, each judged in any order."""

    __slots__ = ("batch", "event", "next", "offset", "open", "size", "skip")

    def __init__(self, offset: int, size: int, skip: set[int], event: Any, batch: Any) -> None:
        self.offset = offset
        self.size = size
        self.skip = skip  # judged before a restart: never handed out again
        self.next = 0  # the next item to hand out (or skip)
        self.open: set[int] = set()  # handed out, not judged
        self.event = event
        self.batch = batch

    def done(self) -> bool:
        return self.next >= self.size and not self.open

    def judged(self, i: int) -> bool:
        return i not in self.open if i < self.next else i in self.skip

    def first_unjudged(self) -> int:
        first = min(self.open, default=self.size)
        i = self.next
        while i < first and i in self.skip:
            i += 1
        return min(first, i)

    def judged_ranges(self, after: int) -> Ranges:
        return _ranges((self.judged(i) for i in range(after, self.size)), after)


class LaneProgress:
    """One lane of a source partition: messages read, items handed out, items judged.

    `add` a message as it is read, `take` items to send (oldest message first), mark each
    `judged` once its outputs are emitted, and `snapshot` where to resume. A resumed lane skips
    the items its snapshot says were judged, provided the first message read is the one the
    snapshot resumes at (a topic that was re-created starts over, whole).
    """

    def __init__(self, state: LaneState | None = None) -> None:
        offset, item, done = state if state is not None else (-1, 0, {})
        self._initial: LaneState | None = (offset, item, dict(done)) if state else None
        self._resume_at = offset
        self._resume_item = item
        self._done: dict[int, Ranges] = {
            int(k): tuple((int(a), int(b)) for a, b in v) for k, v in done.items()
        }
        self._messages: deque[_Message] = deque()
        self._by_offset: dict[int, _Message] = {}
        self._first_read = True
        self._last_read = -1

    def add(self, offset: int, size: int, event: Any = None, batch: Any = None) -> None:
        """A message read, with `size` items (1 for one that cannot be read)."""
        if offset <= self._last_read:
            # The reader went back to the start of a new log (the topic was re-created): what
            # is open belongs to the old one. Its answers still come, and may mark items of the
            # new log judged: rare (a broker that lost its data), and the ledger still refuses
            # a second send of any item.
            log.warning("lane went back from offset %d to %d: a new log", self._last_read, offset)
            self._messages.clear()
            self._by_offset.clear()
            self._done.clear()
        self._last_read = offset
        if self._first_read:
            self._first_read = False
            self._initial = None
            if offset != self._resume_at:
                self._done.clear()  # another log (a re-created topic): nothing to skip
            skip = set(range(min(self._resume_item, size))) if offset == self._resume_at else set()
        else:
            skip = set()
        ranges = self._done.pop(offset, None)
        if ranges:
            skip |= _expand(ranges)
        message = _Message(offset, size, skip, event, batch)
        self._messages.append(message)
        self._by_offset[offset] = message

    def pending(self) -> int:
        """Items read and not handed out yet (those judged before a restart not counted)."""
        n = 0
        for m in self._messages:
            if m.next < m.size:
                n += m.size - m.next
                if m.skip:
                    n -= sum(1 for i in m.skip if i >= m.next)
        return n

    @property
    def messages(self) -> int:
        """Messages read whose items are not all judged."""
        return len(self._messages)

    def take(self, budget: int) -> list[tuple[_Message, list[int]]]:
        """Up to `budget` items to send, oldest message first (judged ones skipped)."""
        out: list[tuple[_Message, list[int]]] = []
        for m in self._messages:
            if budget <= 0:
                break
            if m.next >= m.size:
                continue
            items: list[int] = []
            i = m.next
            skip = m.skip
            while i < m.size and budget > 0:
                if not skip or i not in skip:
                    items.append(i)
                    budget -= 1
                i += 1
            m.next = i
            if items:
                m.open.update(items)
                out.append((m, items))
        self._trim()
        return out

    def judged(self, offset: int, item: int) -> None:
        """An item's outputs were emitted."""
        m = self._by_offset.get(offset)
        if m is not None:
            m.open.discard(item)
            if m is self._messages[0]:
                self._trim()

    def _trim(self) -> None:
        messages = self._messages
        while messages and messages[0].done():
            del self._by_offset[messages.popleft().offset]

    def snapshot(self, next_unread: int) -> LaneState:
        """Where a restart resumes; `next_unread` is the reader's next offset."""
        if self._initial is not None:
            return self._initial  # nothing read since the restart
        done: dict[int, Ranges] = dict(self._done)  # not read again yet
        if not self._messages:
            return (next_unread, 0, done)
        head = self._messages[0]
        item = head.first_unjudged()
        for m in self._messages:
            ranges = m.judged_ranges(item if m is head else 0)
            if ranges:
                done[m.offset] = ranges
        return (head.offset, item, done)


class Outbox:
    """A source partition's judged requests, waiting for its next poll to emit them."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[Judged] = []

    def drain(self) -> list[Judged]:
        """Everything judged since the last call."""
        items, self.items = self.items, []
        return items


def outputs_of(judged: Sequence[Judged]) -> list[DeliveryOutput]:
    """The outputs of judged requests, in order."""
    return [o for j in judged for o in j.outputs]


class WorkerPump:
    """One worker's engine and the outboxes of its source partitions (used on its thread)."""

    def __init__(self, engine: DeliveryEngine) -> None:
        self.engine = engine
        self.routes: dict[str, Outbox] = {}
        self.users = 0

    def submit(self, requests: Sequence[SendRequest]) -> None:
        """Start these requests; what is judged at once goes to the outboxes."""
        if requests:
            self._route(self.engine.submit(requests))

    def poll(self) -> None:
        """Route what the engine judged since the last poll to the partitions' outboxes."""
        judged = self.engine.collect()
        if judged:
            self._route(judged)

    def _route(self, judged: list[Judged]) -> None:
        routes = self.routes
        for j in judged:
            origin = j.request.origin
            box = routes.get(f"{origin.topic}/{origin.partition}")
            if box is None:
                # Not a partition of this worker (cannot happen with fixed partitions): its
                # reader resends it after a restart; its outcome is in the store meanwhile.
                log.warning("no source partition for %s: outputs not emitted", origin.key)
                continue
            box.items.append(j)


class DeliveryPump:
    """Per worker: the engine (built on first use) and each source partition's outbox.

    Every delivery source partition of a worker shares its engine: it hands requests to it
    (`WorkerPump.submit`), and `WorkerPump.poll` collects what was judged and routes each
    request's outputs to the outbox of the partition that read it (by `origin.topic/partition`).
    A partition emits only its own outbox, in its own poll, so what it marks judged is what it
    emitted in its current epoch. State is per worker thread (`WorkerLocal`): a worker's source
    partitions are built and polled on its thread, and keep their `WorkerPump`.
    """

    def __init__(self, build_engine: Callable[[], DeliveryEngine]) -> None:
        self._build = build_engine
        self._local = WorkerLocal()

    def register(self, routes: Iterable[str]) -> tuple[WorkerPump, Outbox]:
        """The calling worker's pump, and an outbox for what these partitions read."""
        pump: WorkerPump | None = getattr(self._local, "pump", None)
        if pump is None:
            pump = WorkerPump(self._build())
            self._local.pump = pump
        box = Outbox()
        for route in routes:
            pump.routes[route] = box
        pump.users += 1
        return pump, box

    def release(self, pump: WorkerPump, routes: Iterable[str]) -> None:
        """A partition closed; the worker's last one closes the engine."""
        for route in routes:
            pump.routes.pop(route, None)
        pump.users -= 1
        if pump.users <= 0:
            if getattr(self._local, "pump", None) is pump:
                del self._local.pump
            pump.engine.close()


def dead_lettered(letter: DeadLetter) -> list[DeliveryOutput]:
    """A message that could not be read: its dead letter is its only output."""
    return [letter]
