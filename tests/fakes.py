"""In-memory fakes of fanfare's ports, for unit and flow tests (and the request builders).

Each behaves as the real adapter does (the follower store's fake runs the store contract suite);
they record what happened, so tests assert on it instead of on mocks.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from operators.delivery.model import ProviderAnswer, SendRequest
from operators.delivery.payloads import PayloadTooLarge
from operators.delivery.ports import LoopRunner, PushSender
from operators.delivery.token_bucket import BucketSpec
from operators.events import MessageOrigin
from operators.fanout.eligibility import edge_flags
from operators.fanout.ports import FollowerRow, FollowerStore, PostClaims
from operators.fanout.sharding import shard_of
from operators.outbox.model import OutboxRow, claimable
from operators.outbox.ports import Backlog, Outbox, PublishFailed, RowPublisher
from schemas.records import DeadLetter, FollowChange

T = TypeVar("T")
OK = ProviderAnswer(200, None)


class InlineLoop(LoopRunner):
    """Runs each coroutine on a fresh loop in the calling thread."""

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run(coro)


class ScriptedSender(PushSender):
    """Answers per token from `answers` (default 200), recording every send."""

    def __init__(
        self,
        provider: str = "apns",
        answers: dict[str, ProviderAnswer | list[ProviderAnswer]] | None = None,
        per_minute: int = 6_000_000,
        too_large: set[str] | None = None,
        default: Callable[[SendRequest], ProviderAnswer] = lambda r: OK,
    ) -> None:
        self.provider = provider  # type: ignore[assignment]
        self.bucket = BucketSpec(f"{provider}:test", per_minute)
        self.answers = answers or {}
        self.too_large = too_large or set()
        self.default = default
        self.sent: list[SendRequest] = []

    def render(self, request: SendRequest) -> object:
        if request.item["token"] in self.too_large:
            raise PayloadTooLarge("APNs payload is 5000 bytes (limit 4096)")
        return {"aps": {}}

    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        out = []
        for r in requests:
            self.sent.append(r)
            scripted = self.answers.get(r.item["token"])
            if isinstance(scripted, list):
                out.append(scripted.pop(0) if scripted else OK)
            elif scripted is not None:
                out.append(scripted)
            else:
                out.append(self.default(r))
        return out


def request(
    user: str = "u1",
    device: str = "d1",
    *,
    token: str | None = None,
    post: str = "p1",
    provider: str = "apns",
    lane: str = "normal",
    source: str = "push.apns/0@1",
    created_ts: float | None = None,
    attempt: int = 0,
    seq: int = 0,
) -> SendRequest:
    """A send request with sensible defaults; `source` is where it was read, `topic/p@offset`."""
    topic, _, position = source.rpartition("/")
    partition, _, offset = position.partition("@")
    return SendRequest(
        provider=provider,  # type: ignore[arg-type]
        lane=lane,  # type: ignore[arg-type]
        post_id=post,
        author_id="a1",
        created_at="2026-11-22T10:00:00Z",
        created_ts=time.time() if created_ts is None else created_ts,
        item={
            "notification_id": f"{post}:{user}",
            "user_id": user,
            "device_id": device,
            "token": token or f"tok-{user}-{device}",
        },
        origin=MessageOrigin(topic, int(partition), int(offset)),
        attempt=attempt,
        seq=seq,
    )


class InMemoryFollowerStore(FollowerStore):
    """A fake for unit tests of the fan-out logic: same behaviour, plain dicts."""

    def __init__(self, shard_count: int) -> None:
        self.shard_count = shard_count
        self.edges: dict[tuple[str, int], dict[str, int]] = {}
        self.versions: dict[tuple[str, int], int] = {}
        self.page_reads = 0

    def apply_follow_changes(self, changes: Sequence[FollowChange]) -> None:
        """Apply in order."""
        for c in changes:
            key = (c.author_id, shard_of(c.follower_id, self.shard_count))
            bucket = self.edges.setdefault(key, {})
            self.versions[key] = self.versions.get(key, 0) + 1
            if c.op == "follow":
                bucket[c.follower_id] = edge_flags(c.notify_on_post, c.muted)
            else:
                bucket.pop(c.follower_id, None)

    def follower_page(
        self, author_id: str, shard_id: int, after: str | None, limit: int
    ) -> list[FollowerRow]:
        """Sorted page after the cursor."""
        self.page_reads += 1
        bucket = self.edges.get((author_id, shard_id), {})
        ids = sorted(f for f in bucket if after is None or f > after)[:limit]
        return [(f, bucket[f]) for f in ids]

    def follower_version(self, author_id: str, shard_id: int) -> int | None:
        """Bumped by every write to the author's edges in the shard."""
        return self.versions.get((author_id, shard_id), 0)

    def follow_flags(self, author_id: str, follower_id: str) -> int | None:
        """Point lookup."""
        return self.edges.get((author_id, shard_of(follower_id, self.shard_count)), {}).get(
            follower_id
        )

    def follower_count(self, author_id: str) -> int:
        """Sum over shards."""
        return sum(len(v) for (a, _), v in self.edges.items() if a == author_id)

    def bulk_load(self, edges: Iterable[tuple[str, str, int]]) -> int:
        """Upsert edges."""
        n = 0
        for author_id, follower_id, flags in edges:
            key = (author_id, shard_of(follower_id, self.shard_count))
            self.edges.setdefault(key, {})[follower_id] = flags
            self.versions[key] = self.versions.get(key, 0) + 1
            n += 1
        return n


class InMemoryPostClaims(PostClaims):
    """Same semantics in a dict, for flow tests and single-process tools."""

    def __init__(self, ttl_s: float = 86_400.0) -> None:
        self._ttl = ttl_s
        self._claims: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def claim(self, claims: Sequence[tuple[str, str]]) -> list[bool]:
        """Claim each post unless another identity holds an unexpired claim."""
        now = time.monotonic()
        out = []
        with self._lock:
            for post_id, identity in claims:
                held = self._claims.get(post_id)
                if held is None or held[1] <= now:
                    self._claims[post_id] = (identity, now + self._ttl)
                    out.append(True)
                else:
                    out.append(held[0] == identity)
        return out


class OutboxTable:
    """The outbox table in memory, shared by the sessions of several relays (row locks too)."""

    def __init__(self) -> None:
        self.rows: dict[int, OutboxRow] = {}
        self.locks: dict[int, object] = {}  # row id -> the session holding it
        self._next_id = 1

    def insert(self, topic: str, key: str, payload: bytes = b"{}") -> int:
        """A committed row, as the post service's transaction leaves it."""
        row_id, self._next_id = self._next_id, self._next_id + 1
        self.rows[row_id] = OutboxRow(row_id, topic, key, payload, 0.0)
        return row_id


class InMemoryOutbox(Outbox):
    """One relay's session on an `OutboxTable`: claims lock rows until complete or release."""

    def __init__(self, table: OutboxTable) -> None:
        self._table = table
        self.waits = 0

    def _held(self) -> list[int]:
        return [i for i, who in self._table.locks.items() if who is self]

    def claim(self, limit: int) -> list[OutboxRow]:
        others = {i for i, who in self._table.locks.items() if who is not self}
        rows = claimable(list(self._table.rows.values()), others, limit)
        for row in rows:
            self._table.locks[row.id] = self
        return rows

    def complete(self, rows: Sequence[OutboxRow]) -> None:
        for row in rows:
            del self._table.rows[row.id]
        self.release()

    def release(self) -> None:
        for row_id in self._held():
            del self._table.locks[row_id]

    def wait_for_rows(self, timeout_s: float) -> bool:
        self.waits += 1
        return False

    def backlog(self) -> Backlog:
        return Backlog(len(self._table.rows), 0.0)


class RecordingPublisher(RowPublisher):
    """Records (topic, key, row id) of every message 'acknowledged'; can fail some batches."""

    def __init__(self, fail_batches: int = 0) -> None:
        self.messages: list[tuple[str, str, int]] = []
        self.letters: list[DeadLetter] = []
        self.fail_batches = fail_batches

    def publish(self, rows: Sequence[OutboxRow]) -> None:
        # Like a broker that took part of a batch before the failure: the first half lands.
        if self.fail_batches:
            self.fail_batches -= 1
            self.messages += [(r.topic, r.key, r.id) for r in rows[: len(rows) // 2]]
            raise PublishFailed("the broker went away")
        self.messages += [(r.topic, r.key, r.id) for r in rows]

    def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        self.letters += letters


class ListReader:
    """A partition reader over a fixed list of messages, `size` per call (a `MessageReader`)."""

    def __init__(self, events: Sequence[Any], size: int = 100) -> None:
        self._events = list(events)
        self._size = size
        self._position = self._events[0].offset if self._events else 0
        self.closed = False

    def next_batch(self) -> list[object]:
        out: list[object] = list(self._events[: self._size])
        del self._events[: self._size]
        if out:
            self._position = out[-1].offset + 1  # type: ignore[attr-defined]
        return out

    @property
    def exhausted(self) -> bool:
        return not self._events

    def offset(self) -> int:
        return self._position

    topic_id = "test-topic-id"

    def close(self) -> None:
        self.closed = True


def list_delivery_sources(
    channel: Sequence[Any],
    retries: Sequence[Any],
    pump: Any,
    *,
    bulk_items_per_poll: int = 100,
    read_size: int = 100,
) -> tuple[Any, Any]:
    """The delivery flow's two sources over fixed message lists, ending once all is judged.

    The real partitions (`_LanePairReader`, `_RetryPartitionReader`) on `ListReader`s, one per
    topic partition the messages name; each ends (EOF) when its messages are read and every
    outcome emitted, so `run_main` returns.
    """
    from bytewax.inputs import FixedPartitionedSource

    from operators.adapters.kafka.channel_lanes import BulkPacer, BulkRoundBudget, _LanePairReader
    from operators.adapters.kafka.retry_source import _RetryPartitionReader
    from operators.delivery.steps import retry_due_at, retry_lane

    class _Ending:
        def next_batch(self) -> list[object]:
            out: list[object] = super().next_batch()  # type: ignore[misc]
            readers = [r for r in self._readers if r is not None]  # type: ignore[attr-defined]
            if not out and all(r.exhausted for r in readers) and self.idle():  # type: ignore[attr-defined]
                raise StopIteration
            return out

    class _Pair(_Ending, _LanePairReader):
        pass

    class _Retry(_Ending, _RetryPartitionReader):
        pass

    budget = BulkRoundBudget(bulk_items_per_poll)
    pacer = BulkPacer()

    from schemas.topics import channel_topic

    def provider_of(topic: str) -> str:
        # push.apns, push.fcm.bulk -> apns, fcm; email.social -> email
        parts = topic.split(".")
        return parts[1] if parts[0] == "push" else parts[0]

    class Channel(FixedPartitionedSource[object, Any]):
        def list_parts(self) -> list[str]:
            return sorted({f"{provider_of(e.topic)}#{e.partition}" for e in channel} or {"apns#0"})

        def build_part(self, step_id: str, for_part: str, resume: Any) -> Any:
            provider, _, index = for_part.partition("#")
            normal, bulk, transactional = (
                ListReader(
                    [
                        e
                        for e in channel
                        if e.topic == channel_topic(provider, lane) and e.partition == int(index)
                    ],
                    read_size,
                )
                for lane in ("normal", "bulk", "transactional")
            )
            part = _Pair(
                for_part,
                normal,
                bulk,
                provider,
                pacer,
                budget,
                pump,
                resume,
                transactional=transactional,
            )
            part._readers = [normal, bulk, transactional]  # type: ignore[attr-defined]
            return part

    class Retry(FixedPartitionedSource[object, Any]):
        def list_parts(self) -> list[str]:
            return sorted({f"push.retry/{e.partition}" for e in retries} or {"push.retry/0"})

        def build_part(self, step_id: str, for_part: str, resume: Any) -> Any:
            partition = int(for_part.rpartition("/")[2])
            reader = ListReader([e for e in retries if e.partition == partition], read_size)
            part = _Retry(
                reader, "push.retry", partition, [], retry_due_at, time.time, pump, retry_lane
            )
            part._readers = [reader]  # type: ignore[attr-defined]
            return part

    return Channel(), Retry()
