"""The delivery flow's channel source: each provider's three lanes, sent as read.

Each source partition owns partition `i` of each of a provider's lane topics: transactional,
normal and bulk (`push.apns.transactional`, `push.apns`, `push.apns.bulk`; for the other
channels the tiers, `email.transactional`, `email.social`, `email.marketing`: schemas/topics.py,
TIER_LANES). It reads, decodes, hands the send requests to the worker's engine (the
`DeliveryPump`, which never waits for a provider) and emits each request's outputs (its
delivery event, retry record, device change, dead letter) once the request is judged. So the
source keeps reading while sends are outstanding, up to the engine's in-flight limit
(FANFARE_DELIVERY_IN_FLIGHT), and its snapshot resumes at the first item not judged, skipping
those judged after it (`operators/delivery/pipeline.py`, `LaneProgress`): a restart sends again
only what had no outcome, and emits no outcome twice (docs/design.md).

Transactional first: that lane is handed out before the others, and the engine keeps part of
its in-flight limit for it (a login code never waits for a post's or a campaign's sends). Then
the normal lane; the bulk lane is handed out only when neither has anything waiting,
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
from operators.adapters.kafka.reader import SharedConsumer, TopicPartitionReader, idle_backoff
from operators.adapters.kafka.topic_identity import shared_topic_ids
from operators.delivery.model import SendRequest
from operators.delivery.pipeline import DeliveryPump, LaneProgress, LaneState, Ranges
from operators.delivery.steps import batch_requests, decode_channel_batch
from operators.events import RawEvent
from operators.worker_local import WorkerLocal
from schemas.addresses import CHANNEL_PROVIDERS
from schemas.records import DeadLetter
from schemas.topics import DELIVERY_LANES, PROVIDERS, channel_topic

LaneOffsets = tuple[
    int,
    int,
    int,
    str | None,
    str | None,
    int,
    dict[int, Ranges],
    dict[int, Ranges],
    int,
    int,
    str | None,
    dict[int, Ranges],
]
"""Where a partition's lanes resume: (normal offset, bulk offset, bulk item, normal topic id, bulk
topic id, normal item, items judged after the normal position, items judged after the bulk one,
transactional offset, transactional item, transactional topic id, items judged after the
transactional position); the offsets and items are those of the first item not judged (-2 = the
partition's start).

Recovery stores of earlier versions hold the first two, three, five or eight only."""
_FRESH: LaneOffsets = (
    OFFSET_BEGINNING,
    OFFSET_BEGINNING,
    0,
    None,
    None,
    0,
    {},
    {},
    OFFSET_BEGINNING,
    0,
    None,
    {},
)


def _complete(given: tuple[object, ...]) -> LaneOffsets:
    """A resume state of any earlier version, completed with the fresh state's later fields."""
    return cast(LaneOffsets, given + _FRESH[len(given) :])


IDLE_POLL = timedelta(milliseconds=5)
"""How soon a lane pair that just found nothing looks for new messages again (Bytewax's default
is every millisecond, for each of a worker's partitions)."""
IDLE_POLL_MAX = timedelta(milliseconds=25)
"""The longest wait between two looks of a pair that keeps finding nothing: the wait doubles
from IDLE_POLL with each empty look up to this, so a message arriving on a long-idle lane (a
login code) waits at most this long for its first read, while the idle pairs of a worker, 28 with
every channel's lanes, cost it about 40 looks a second each instead of 200."""
MAX_OPEN_MESSAGES = 2_000
"""Messages a lane keeps read but not wholly judged, at most (bounds memory and snapshots)."""


def idle_wait(empty_looks: int) -> timedelta:
    """The wait before the next look after `empty_looks` empty ones in a row (at least one)."""
    return idle_backoff(empty_looks, IDLE_POLL, IDLE_POLL_MAX)


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

    @property
    def items_per_round(self) -> int:
        """The whole round's budget (what one partition may at most be granted)."""
        return self._per_round

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

    name: str  # "transactional" | "normal" | "bulk"
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
    """Partition `i` of each of a provider's lanes (transactional, normal, bulk): read, judged.

    It began as a pair (normal and bulk), hence its name.
    """

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
        transactional: MessageReader | None = None,
    ) -> None:
        state = _complete(tuple(resume or ()))
        n_at, b_at, b_item, _, _, n_item, n_done, b_done, t_at, t_item, _, t_done = state
        self._part = part
        self._provider = provider
        self._pacer = pacer
        self._budget = budget
        self._pump = pump
        index = partition if partition is not None else int(part.partition("#")[2] or 0)
        self._transactional = (
            _Lane(
                "transactional",
                transactional,
                LaneProgress(_lane_state(t_at, t_item, t_done)),
                normal_batch_size,
            )
            if transactional is not None
            else None
        )
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
            for lane in (self._transactional, self._normal, self._bulk)
            if lane is not None
        }
        self._routes = [f"{topic}/{index}" for topic in self._lanes]
        self._worker, self._outbox = pump.register(self._routes)
        self._busy = True
        self._empty_looks = 0  # looks in a row that found nothing to do
        self._letters: list[tuple[_Lane, int, DeadLetter]] = []

    def next_batch(self) -> list[object]:
        """Hand what was read to the engine (transactional first); emit what has been judged."""
        worker = self._worker
        worker.poll()
        engine = worker.engine
        requests: list[SendRequest] = []
        letters: list[tuple[int, DeadLetter]] = []
        first_waiting = False
        for lane in (self._transactional, self._normal):
            if lane is None:
                continue
            room = engine.room(lane.name, self._provider)
            if room > 0:
                lane.fill(room)
                requests += lane.take(room, letters)
                self._letters += [(lane, o, d) for o, d in letters]
                letters = []
            first_waiting = first_waiting or lane.progress.pending() > 0
        if self._bulk is not None and not first_waiting and self._pacer.ready(self._provider):
            room = engine.room("bulk", self._provider)
            if room > 0:
                # Read up to a round's worth: a campaign's one-push messages would otherwise
                # come one or two per partition per round, however much room there is.
                self._bulk.fill(min(room, self._budget.items_per_round))
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
        self._empty_looks = 0 if self._busy else self._empty_looks + 1
        return out

    def next_awake(self) -> datetime | None:
        """When to poll again: at once while anything waits for an outcome.

        (Bytewax waits 1 ms after an empty batch.) An idle pair looks for new messages after
        IDLE_POLL, then ever less often up to IDLE_POLL_MAX while it keeps finding none.
        """
        if self._busy:
            return None
        return datetime.now(UTC) + idle_wait(self._empty_looks)

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
        t = self._transactional
        t_at, t_item, t_done = (
            t.progress.snapshot(t.reader.offset()) if t is not None else (OFFSET_BEGINNING, 0, {})
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
            t_at,
            t_item,
            t.reader.topic_id if t is not None else None,
            t_done,
        )

    def close(self) -> None:
        """Leave the broker; the worker's last partition closes its engine."""
        for lane in (self._transactional, self._normal, self._bulk):
            if lane is not None:
                lane.reader.close()
        self._pump.release(self._worker, self._routes)


class ChannelLanesSource(FixedPartitionedSource[object, LaneOffsets]):
    """Every provider's lane topics, partition `i` of each read by one source partition.

    Push providers read `push.<p>.transactional`, `push.<p>` and `push.<p>.bulk`; the other
    channels `<p>.transactional`, `<p>.social` and `<p>.marketing`. A provider the worker has
    no sender for still has its topics read: its sends end `failed`
    (`provider_not_configured`), never silently left on the topic.
    """

    def __init__(
        self,
        config: KafkaConfig,
        pacer: BulkPacer,
        pump: DeliveryPump,
        *,
        providers: Iterable[str] = (*PROVIDERS, *CHANNEL_PROVIDERS),
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
        topics = [channel_topic(p, lane) for p in self._providers for lane in DELIVERY_LANES]
        counts: dict[str, int] = {}
        for part in topic_partitions(self._config, topics):
            topic, _ = split_part(part)
            counts[topic] = counts.get(topic, 0) + 1
        return counts

    def list_parts(self) -> list[str]:
        """`apns#0`, `email#0` .. one per index of the provider's largest lane topic."""
        counts = self._counts()
        parts: list[str] = []
        for p in self._providers:
            n = max(counts[channel_topic(p, lane)] for lane in DELIVERY_LANES)
            parts.extend(f"{p}#{i}" for i in range(n))
        return parts

    def build_part(
        self, step_id: str, for_part: str, resume_state: LaneOffsets | None
    ) -> _LanePairReader:
        """Readers for the partition's lanes, resumed from the snapshot."""
        provider, _, index = for_part.partition("#")
        i = int(index)
        counts = self._counts()
        # Recovery stores of earlier versions hold (normal, bulk), (normal, bulk, item), those
        # and the topic ids, or no transactional lane.
        state = _complete(tuple(resume_state or ()))
        starts = {
            "normal": (state[0], state[3], self._normal_batch),
            "bulk": (state[1], state[4], 2),
            "transactional": (state[8], state[10], self._normal_batch),
        }
        # One consumer for the partition's lanes: a consumer per lane partition cost the
        # process and the broker a fetch loop each, idle or not (SharedConsumer).
        shared = SharedConsumer.connect(self._config, f"fanfare-lanes-{provider}")
        readers: dict[str, TopicPartitionReader | None] = {}
        for lane, (at, topic_id, size) in starts.items():
            topic = channel_topic(provider, lane)
            readers[lane] = (
                TopicPartitionReader(
                    self._config,
                    topic,
                    i,
                    at,
                    size,
                    False,
                    1.0,
                    topic_ids=shared_topic_ids(self._config),
                    start_topic_id=topic_id,
                    consumer=shared.partition(topic, i),
                )
                if i < counts[topic]
                else None
            )
        return _LanePairReader(
            for_part,
            readers["normal"],
            readers["bulk"],
            provider,
            self._pacer,
            self._budget,
            self._pump,
            state,
            normal_batch_size=self._normal_batch,
            partition=i,
            transactional=readers["transactional"],
        )
