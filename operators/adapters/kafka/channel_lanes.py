"""The delivery flow's channel source: each provider's normal and bulk lanes, sent as read.

Each source partition owns partition `i` of a provider's normal topic and partition `i` of its
bulk topic. It reads, decodes, hands the send requests to the worker's engine (the
`DeliveryPump`, which never waits for a provider) and emits each request's outputs (its
delivery event, retry record, device change, dead letter) once the request is judged. So the
source keeps reading while sends are outstanding, up to the engine's in-flight limit
(FANFARE_DELIVERY_IN_FLIGHT), and its snapshot resumes at the first item not judged, skipping
those judged after it (`operators/delivery/pipeline.py`, `LaneProgress`): a restart sends again
only what had no outcome, and emits no outcome twice (docs/design.md).

Normal lanes first: the bulk lane is handed out only when the normal lane has nothing waiting,
not while the provider's bucket has told the worker to pause the bulk lane, and in slices within
a per-worker budget of items per poll round (FANFARE_BULK_ITEMS_PER_POLL), so a celebrity
backlog never sits in front of a normal post: a normal post read in the next round waits for
at most one round's bulk items to be claimed and rendered, and the bulk lane may fill only part
of the in-flight limit, the rest being kept for normal posts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, cast

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING

from operators.adapters.kafka.probes import KafkaConfig, split_part, topic_partitions
from operators.adapters.kafka.reader import TopicPartitionReader
from operators.adapters.kafka.topic_identity import shared_topic_ids
from operators.delivery.model import SendRequest
from operators.delivery.pipeline import DeliveryPump, LaneProgress, LaneState, Ranges
from operators.delivery.steps import batch_requests, decode_channel_batch
from operators.events import RawEvent
from operators.worker_local import WorkerLocal
from schemas.records import DeadLetter
from schemas.topics import PROVIDERS, channel_topic

LaneOffsets = tuple[
    int, int, int, str | None, str | None, int, dict[int, Ranges], dict[int, Ranges]
]
"""Where a lane pair resumes: (normal offset, bulk offset, bulk item, normal topic id, bulk topic
id, normal item, items judged after the normal position, items judged after the bulk one); the
offsets and items are those of the first item not judged (-2 = the partition's start).

Recovery stores of earlier versions hold the first two, three or five only."""

IDLE_POLL = timedelta(milliseconds=5)
"""How often a lane pair with nothing in flight looks for new messages (Bytewax's default is
every millisecond, for each of a worker's partitions)."""
MAX_OPEN_MESSAGES = 2_000
"""Messages a lane keeps read but not wholly judged, at most (bounds memory and snapshots)."""


class MessageReader(Protocol):
    """What a lane reads with (`TopicPartitionReader`; tests pass lists)."""

    def next_batch(self) -> list[object]:
        """Messages ready now (RawEvent)."""

    def offset(self) -> int:
        """The next offset to read."""

    @property
    def topic_id(self) -> str | None:
        """The id of the topic log the offset counts in."""

    def close(self) -> None:
        """Leave the broker."""


class BulkPacer:
    """Per process: until when each provider's bulk lane should not be read (rate limited)."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def pause(self, provider: str, until: float) -> None:
        """Hold the provider's bulk reads until `until` (time.monotonic)."""
        with self._lock:
            self._until[provider] = max(self._until.get(provider, 0.0), until)

    def ready(self, provider: str) -> bool:
        """Whether the bulk lane may be read now."""
        return time.monotonic() >= self._until.get(provider, 0.0)


class BulkRoundBudget:
    """Per worker: how many bulk items its lane readers may hand out in one poll round, together.

    A round's bulk items are claimed and rendered before the worker polls again, so this bounds
    how long a normal post read in the next round waits behind bulk work. A round ends when a
    partition that already took from the budget asks again (Bytewax polls each partition once
    per step). State is per thread: a worker's partitions share the worker's thread.
    """

    def __init__(self, items_per_round: int) -> None:
        if items_per_round < 1:
            raise ValueError("items_per_round must be at least 1")
        self._per_round = items_per_round
        self._local = WorkerLocal()

    def take(self, part: str, wanted: int) -> int:
        """Up to `wanted` items for `part` in the current round (0: wait for the next one).

        Each partition that asks gets at most an equal share of the round (by how many asked in
        the round before), so the partitions polled first do not starve the others: an APNs
        celebrity and an FCM one drain side by side.
        """
        local = self._local
        seen: set[str] | None = getattr(local, "seen", None)
        if seen is None or part in seen:
            local.askers = max(1, len(seen or ()))
            seen = set()
            local.seen = seen
            local.left = self._per_round
        seen.add(part)
        share = -(-self._per_round // int(local.askers))
        granted = min(wanted, int(local.left), share)
        local.left -= granted
        return granted


@dataclass
class _Lane:
    """One lane of a pair: its reader, and what became of what it read."""

    name: str  # "normal" | "bulk"
    reader: MessageReader
    progress: LaneProgress
    read_size: int

    def fill(self, wanted: int) -> None:
        """Read messages until `wanted` items wait to be handed out (or none are ready)."""
        progress = self.progress
        while progress.pending() < wanted and progress.messages < MAX_OPEN_MESSAGES:
            events = self.reader.next_batch()
            if not events:
                return
            for event in events:
                assert isinstance(event, RawEvent)
                decoded = decode_channel_batch(event)
                if isinstance(decoded, DeadLetter):
                    progress.add(event.offset, 1, event, decoded)
                else:
                    progress.add(event.offset, len(decoded[0].items), event, decoded)

    def take(self, budget: int, letters: list[tuple[int, DeadLetter]]) -> list[SendRequest]:
        """Requests of up to `budget` items; unreadable messages' dead letters into `letters`."""
        requests: list[SendRequest] = []
        for message, items in self.progress.take(budget):
            decoded = message.batch
            if isinstance(decoded, DeadLetter):
                letters.append((message.offset, decoded))
                continue
            batch, created_ts = decoded
            requests.extend(batch_requests(message.event, batch, created_ts, items))
        return requests


def _lane_state(offset: int, item: int, done: dict[int, Ranges] | None) -> LaneState:
    return (offset, item, dict(done or {}))


class _LanePairReader(StatefulSourcePartition[object, LaneOffsets]):
    """Partition `i` of a provider's normal topic, and of its bulk topic: read, sent, judged."""

    def __init__(
        self,
        part: str,
        normal: MessageReader | None,
        bulk: MessageReader | None,
        provider: str,
        pacer: BulkPacer,
        budget: BulkRoundBudget,
        pump: DeliveryPump,
        resume: LaneOffsets | None = None,
        *,
        normal_batch_size: int = 200,
        partition: int | None = None,
    ) -> None:
        state = cast(
            LaneOffsets,
            tuple(resume or ())
            + (OFFSET_BEGINNING, OFFSET_BEGINNING, 0, None, None, 0, {}, {})[len(resume or ()) :],
        )
        n_at, b_at, b_item, _, _, n_item, n_done, b_done = state
        self._part = part
        self._provider = provider
        self._pacer = pacer
        self._budget = budget
        self._pump = pump
        index = partition if partition is not None else int(part.partition("#")[2] or 0)
        self._normal = (
            _Lane(
                "normal", normal, LaneProgress(_lane_state(n_at, n_item, n_done)), normal_batch_size
            )
            if normal is not None
            else None
        )
        self._bulk = (
            _Lane("bulk", bulk, LaneProgress(_lane_state(b_at, b_item, b_done)), 2)
            if bulk is not None
            else None
        )
        self._lanes = {
            channel_topic(provider, lane.name): lane
            for lane in (self._normal, self._bulk)
            if lane is not None
        }
        self._routes = [f"{topic}/{index}" for topic in self._lanes]
        self._worker, self._outbox = pump.register(self._routes)
        self._busy = True
        self._letters: list[tuple[_Lane, int, DeadLetter]] = []

    def next_batch(self) -> list[object]:
        """Hand what was read to the engine (normal first); emit what has been judged."""
        worker = self._worker
        worker.poll()
        engine = worker.engine
        requests: list[SendRequest] = []
        letters: list[tuple[int, DeadLetter]] = []
        normal_waiting = False
        if self._normal is not None:
            room = engine.room("normal", self._provider)
            if room > 0:
                self._normal.fill(room)
                requests += self._normal.take(room, letters)
                self._letters += [(self._normal, o, d) for o, d in letters]
                letters = []
            normal_waiting = self._normal.progress.pending() > 0
        if self._bulk is not None and not normal_waiting and self._pacer.ready(self._provider):
            room = engine.room("bulk", self._provider)
            if room > 0:
                self._bulk.fill(1)
                wanted = min(room, self._bulk.progress.pending())
                granted = self._budget.take(self._part, wanted) if wanted else 0
                if granted:
                    requests += self._bulk.take(granted, letters)
                    self._letters += [(self._bulk, o, d) for o, d in letters]
        if requests:
            worker.submit(requests)
        out: list[object] = []
        for judged in self._outbox.drain():
            origin = judged.request.origin
            self._lanes[origin.topic].progress.judged(origin.offset, origin.item or 0)
            out.extend(judged.outputs)
        if self._letters:
            for lane, offset, letter in self._letters:
                lane.progress.judged(offset, 0)
                out.append(letter)
            self._letters = []
        self._busy = bool(out or requests) or not self.idle()
        return out

    def next_awake(self) -> datetime | None:
        """When to poll again: at once while anything waits for an outcome.

        (Bytewax waits 1 ms after an empty batch.) An idle pair looks for new messages every
        IDLE_POLL.
        """
        if self._busy:
            return None
        return datetime.now(UTC) + IDLE_POLL

    def idle(self) -> bool:
        """Nothing read waits for an outcome, or for its outputs to be emitted."""
        return not any(lane.progress.messages for lane in self._lanes.values()) and not (
            self._outbox.items or self._letters
        )

    def snapshot(self) -> LaneOffsets:
        """Where each lane resumes: its first item not judged, and what was judged after it."""
        n_at, n_item, n_done = (
            self._normal.progress.snapshot(self._normal.reader.offset())
            if self._normal is not None
            else (OFFSET_BEGINNING, 0, {})
        )
        b_at, b_item, b_done = (
            self._bulk.progress.snapshot(self._bulk.reader.offset())
            if self._bulk is not None
            else (OFFSET_BEGINNING, 0, {})
        )
        return (
            n_at,
            b_at,
            b_item,
            self._normal.reader.topic_id if self._normal is not None else None,
            self._bulk.reader.topic_id if self._bulk is not None else None,
            n_item,
            n_done,
            b_done,
        )

    def close(self) -> None:
        """Leave the broker; the worker's last partition closes its engine."""
        for lane in (self._normal, self._bulk):
            if lane is not None:
                lane.reader.close()
        self._pump.release(self._worker, self._routes)


class ChannelLanesSource(FixedPartitionedSource[object, LaneOffsets]):
    """Every `push.<provider>` partition paired with the same `push.<provider>.bulk` one."""

    def __init__(
        self,
        config: KafkaConfig,
        pacer: BulkPacer,
        pump: DeliveryPump,
        *,
        providers: Iterable[str] = PROVIDERS,
        normal_batch_size: int = 200,
        bulk_items_per_poll: int = 100,
    ) -> None:
        self._config = config
        self._pacer = pacer
        self._pump = pump
        self._providers = list(providers)
        self._normal_batch = normal_batch_size
        self._budget = BulkRoundBudget(bulk_items_per_poll)

    def _counts(self) -> dict[str, int]:
        topics = [channel_topic(p, lane) for p in self._providers for lane in ("normal", "bulk")]
        counts: dict[str, int] = {}
        for part in topic_partitions(self._config, topics):
            topic, _ = split_part(part)
            counts[topic] = counts.get(topic, 0) + 1
        return counts

    def list_parts(self) -> list[str]:
        """`apns#0` .. one per index of the larger of the two topics."""
        counts = self._counts()
        parts: list[str] = []
        for p in self._providers:
            n = max(counts[channel_topic(p, "normal")], counts[channel_topic(p, "bulk")])
            parts.extend(f"{p}#{i}" for i in range(n))
        return parts

    def build_part(
        self, step_id: str, for_part: str, resume_state: LaneOffsets | None
    ) -> _LanePairReader:
        """Readers for the pair, resumed from the snapshot."""
        provider, _, index = for_part.partition("#")
        i = int(index)
        counts = self._counts()
        # Recovery stores of earlier versions hold (normal, bulk), (normal, bulk, item), or
        # those and the topic ids.
        given = tuple(resume_state or ())
        state = cast(
            LaneOffsets,
            given + (OFFSET_BEGINNING, OFFSET_BEGINNING, 0, None, None, 0, {}, {})[len(given) :],
        )
        normal_at, bulk_at, _, normal_id, bulk_id = state[:5]
        normal_topic, bulk_topic = (
            channel_topic(provider, "normal"),
            channel_topic(provider, "bulk"),
        )
        normal = (
            TopicPartitionReader(
                self._config,
                normal_topic,
                i,
                normal_at,
                self._normal_batch,
                False,
                1.0,
                topic_ids=shared_topic_ids(self._config),
                start_topic_id=normal_id,
            )
            if i < counts[normal_topic]
            else None
        )
        bulk = (
            TopicPartitionReader(
                self._config,
                bulk_topic,
                i,
                bulk_at,
                2,
                False,
                1.0,
                topic_ids=shared_topic_ids(self._config),
                start_topic_id=bulk_id,
            )
            if i < counts[bulk_topic]
            else None
        )
        return _LanePairReader(
            for_part,
            normal,
            bulk,
            provider,
            self._pacer,
            self._budget,
            self._pump,
            state,
            normal_batch_size=self._normal_batch,
            partition=i,
        )
