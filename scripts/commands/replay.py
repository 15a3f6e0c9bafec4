"""`fanfare replay`: re-publish selected `post_created` events into the backfill lane.

The fan-out flow reads `post_created.backfill` beside `post_created` through the same decode and
claim path: the Redis post claim binds a post_id to the message that first carried it, so a
replayed post that was already fanned out is dropped as a duplicate and a post that never was is
fanned out once. Replay never writes to the live topic.

Positions (`--from`, `--to`) are an RFC 3339 time, a duration ago (`2h`), an offset for every
partition (`1200`) or `partition:offset` pairs (`0:1200,1:900`). A time is resolved per partition
with `Consumer.offsets_for_times` and then checked against the messages' own timestamps: reading
starts at the broker's answer and skips messages until the first one stamped at or after the
time (some brokers, the embedded one among them, answer with an earlier offset). The helpers here
(positions, windows, the partition reader, the progress line) are shared with `fanfare dlq`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any, TextIO, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from operators.adapters.kafka.admin import BrokerUnavailable, list_topics
from operators.adapters.kafka.probes import KafkaConfig, end_offset
from operators.config import Settings
from operators.fanout.eligibility import post_suppression
from schemas.codecs import InvalidEvent, decode_post_created, parse_timestamp
from schemas.records import PostCreated
from schemas.topics import POST_CREATED, POST_CREATED_BACKFILL

# What can be replayed, and the lane it is replayed into.
REPLAYABLE = {POST_CREATED: POST_CREATED_BACKFILL}
REPLAY_HEADER = "fanfare-replay-of"
_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400}
_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_PAIRS = re.compile(r"^\d+:\d+(,\d+:\d+)*$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]")
_PREFIX = "fanfare replay"


class UsageError(Exception):
    """The command line cannot work as given (exit code 2); the message says why."""


# -- positions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """A point in a topic: a time (ms since the epoch), one offset, or offsets per partition."""

    text: str
    time_ms: int | None = None
    offset: int | None = None
    offsets: Mapping[int, int] = field(default_factory=dict)


def parse_position(text: str, now: Callable[[], float] = time.time) -> Position:
    """`2026-06-01T12:00:00Z`, `2h` (ago), `1200` or `0:1200,1:900`; ValueError says why not."""
    value = text.strip()
    if value.isdigit():
        return Position(text, offset=int(value))
    if _PAIRS.match(value):
        offsets: dict[int, int] = {}
        for pair in value.split(","):
            part, _, off = pair.partition(":")
            if int(part) in offsets:
                raise ValueError(f"partition {part} is named twice in {text!r}")
            offsets[int(part)] = int(off)
        return Position(text, offsets=offsets)
    rel = _RELATIVE.match(value)
    if rel:
        seconds = int(rel.group(1)) * _UNITS[rel.group(2)]
        return Position(text, time_ms=int((now() - seconds) * 1000))
    if _DATE.match(value):
        try:
            parsed = parse_timestamp(value)
        except InvalidEvent as exc:
            raise ValueError(f"{text!r}: {exc.detail}") from None
        return Position(text, time_ms=int(parsed.timestamp() * 1000))
    raise ValueError(
        f"{text!r} is not a position: use an RFC 3339 time (2026-06-01T12:00:00Z), a duration "
        "ago (90s, 30m, 2h, 1d), an offset for every partition (1200) or partition:offset "
        "pairs (0:1200,1:900)"
    )


def position_arg(text: str) -> Position:
    """Parse `--from` / `--to` (an argparse type)."""
    try:
        return parse_position(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def time_arg(text: str) -> Position:
    """Parse a time only (`--since`): RFC 3339 or a duration ago (an argparse type)."""
    position = position_arg(text)
    if position.time_ms is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use RFC 3339 (2026-06-01T12:00:00Z) or a duration ago (2h)"
        )
    return position


def replay_topic_arg(text: str) -> str:
    """Check `--topic`: only a topic with a backfill lane (an argparse type)."""
    if text not in REPLAYABLE:
        supported = ", ".join(f"{t} (into {lane})" for t, lane in REPLAYABLE.items())
        raise argparse.ArgumentTypeError(
            f"replaying {text!r} is not supported; supported: {supported}"
        )
    return text


# -- windows: what to read from each partition, and which messages to take -------------------


class Verdict(Enum):
    """What to do with a message read from a window."""

    SKIP = "skip"
    TAKE = "take"
    STOP = "stop"


@dataclass(frozen=True)
class Window:
    """One partition's range of offsets `[start, stop)`, maybe cut by times.

    With times, the window starts at the first message stamped at or after `from_ms` and stops
    at the first one stamped at or after `to_ms`.
    """

    partition: int
    start: int
    stop: int
    from_ms: int | None = None
    to_ms: int | None = None

    @property
    def size(self) -> int:
        """Messages in the offset range (an upper bound when a time bound cuts it)."""
        return max(0, self.stop - self.start)


class WindowCursor:
    """Judges the messages of one window in offset order."""

    def __init__(self, window: Window) -> None:
        self.window = window
        self._started = window.from_ms is None

    def judge(self, offset: int, timestamp_ms: int | None) -> Verdict:
        """Take, skip (before the start time) or stop (the end of the window)."""
        w = self.window
        if offset >= w.stop:
            return Verdict.STOP
        if offset < w.start:
            return Verdict.SKIP
        if not self._started:
            if timestamp_ms is None or w.from_ms is None or timestamp_ms < w.from_ms:
                return Verdict.SKIP
            self._started = True
        if w.to_ms is not None and timestamp_ms is not None and timestamp_ms >= w.to_ms:
            return Verdict.STOP
        return Verdict.TAKE


PartitionBounds = Mapping[int, tuple[int, int]]  # partition -> (low watermark, true end)
TimeLookup = Callable[[int, Sequence[int]], Mapping[int, int]]  # (ms, partitions) -> offsets


def resolve_windows(
    topic: str,
    start: Position,
    stop: Position | None,
    bounds: PartitionBounds,
    offsets_for_time: TimeLookup,
) -> dict[int, Window]:
    """A window per partition to read (empty ones left out); UsageError for unknown partitions.

    `start` with partition:offset pairs reads only the partitions named; `stop` pairs bound the
    partitions named and leave the others at their end. Offsets are clamped to what exists.
    """
    parts = sorted(bounds)
    for position in (start, stop):
        if position is None:
            continue
        unknown = sorted(set(position.offsets) - set(parts))
        if unknown:
            raise UsageError(
                f"{position.text!r} names partition(s) {unknown} but {topic} has "
                f"{len(parts)} (0-{len(parts) - 1})"
            )

    def clamp(p: int, off: int) -> int:
        low, end = bounds[p]
        return min(max(off, low), end)

    chosen = sorted(start.offsets) if start.offsets else parts
    starts: dict[int, int]
    if start.time_ms is not None:
        found = offsets_for_time(start.time_ms, chosen)
        # No offset (-1) means no message at or after the time: nothing to read there.
        starts = {p: bounds[p][1] if found.get(p, -1) < 0 else clamp(p, found[p]) for p in chosen}
    elif start.offset is not None:
        starts = {p: clamp(p, start.offset) for p in chosen}
    else:
        starts = {p: clamp(p, start.offsets[p]) for p in chosen}
    windows: dict[int, Window] = {}
    for p in chosen:
        end = bounds[p][1]
        if stop is None or stop.time_ms is not None:
            stop_at = end
        elif stop.offset is not None:
            stop_at = clamp(p, stop.offset)
        else:
            stop_at = clamp(p, stop.offsets[p]) if p in stop.offsets else end
        window = Window(
            p,
            starts[p],
            stop_at,
            from_ms=start.time_ms,
            to_ms=stop.time_ms if stop is not None else None,
        )
        if window.size:
            windows[p] = window
    return windows


# -- reading ----------------------------------------------------------------------------------


Headers = tuple[tuple[str, bytes | None], ...]


@dataclass(frozen=True, slots=True)
class Message:
    """A message as read, with its position, broker timestamp and headers."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None
    headers: Headers = ()

    @property
    def source(self) -> str:
        """`topic/partition@offset`, the identity claims and dead letters use."""
        return f"{self.topic}/{self.partition}@{self.offset}"


def topic_partition_count(settings: Settings, topic: str) -> int:
    """Partitions of one of fanfare's topics (RuntimeError when it does not exist)."""
    counts = list_topics(settings)
    if topic not in counts:
        raise RuntimeError(
            f"topic {topic!r} does not exist on {settings.kafka_brokers}: "
            "run `fanfare topics create` (or `fanfare dev up`)"
        )
    return counts[topic]


def partition_bounds(
    config: KafkaConfig, topic: str, partitions: int
) -> dict[int, tuple[int, int]]:
    """(low watermark, true end) of each partition; the ends are read through partition EOF."""
    consumer = Consumer(cast(dict[str, Any], {**config, "group.id": "fanfare-bounds"}))
    try:
        lows = {
            p: int(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[0])
            for p in range(partitions)
        }
    finally:
        consumer.close()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, partitions)) as pool:
        ends = dict(
            zip(
                range(partitions),
                pool.map(lambda p: end_offset(config, topic, p), range(partitions)),
                strict=True,
            )
        )
    return {p: (lows[p], max(lows[p], ends[p])) for p in range(partitions)}


def broker_time_lookup(config: KafkaConfig, topic: str) -> TimeLookup:
    """`offsets_for_times` on a partition set: the earliest offset stamped at or after a time."""

    def lookup(ms: int, partitions: Sequence[int]) -> dict[int, int]:
        consumer = Consumer(cast(dict[str, Any], {**config, "group.id": "fanfare-times"}))
        try:
            found = consumer.offsets_for_times(
                [TopicPartition(topic, p, ms) for p in partitions], timeout=10
            )
        finally:
            consumer.close()
        return {tp.partition: int(tp.offset) for tp in found}

    return lookup


def read_windows(
    config: KafkaConfig,
    topic: str,
    windows: Mapping[int, Window],
    on_read: Callable[[int], None] | None = None,
    idle_timeout_s: float = 60.0,
) -> Iterator[Message]:
    """The messages the windows take, partition by partition in offset order.

    `on_read(n)` is told how many messages were read so far (taken or not).
    """
    if not windows:
        return
    consumer = Consumer(
        cast(
            dict[str, Any],
            {
                **config,
                "group.id": "fanfare-replay",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
            },
        )
    )
    cursors = {p: WindowCursor(w) for p, w in windows.items()}
    open_parts = set(cursors)
    read = 0
    last_progress = time.monotonic()

    def close(p: int) -> None:
        open_parts.discard(p)
        consumer.pause([TopicPartition(topic, p)])

    try:
        consumer.assign([TopicPartition(topic, p, w.start) for p, w in windows.items()])
        while open_parts:
            msgs = consumer.consume(1_000, 0.5)
            if not msgs and time.monotonic() - last_progress > idle_timeout_s:
                raise RuntimeError(
                    f"reading {topic}: nothing arrived for {idle_timeout_s:.0f}s "
                    f"(partitions {sorted(open_parts)} not at their end)"
                )
            for m in msgs:
                p = cast(int, m.partition())
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        if p in open_parts:
                            close(p)  # the true end: nothing more to read there
                        continue
                    if err.fatal() or not err.retriable():
                        raise RuntimeError(f"reading {topic}/{p}: {err.str()}")
                    continue
                if p not in open_parts:
                    continue
                last_progress = time.monotonic()
                offset = cast(int, m.offset())
                kind, ts = m.timestamp()
                verdict = cursors[p].judge(offset, ts if kind != 0 and ts >= 0 else None)
                if verdict is Verdict.STOP:
                    close(p)
                    continue
                read += 1
                if on_read is not None:
                    on_read(read)
                if verdict is Verdict.TAKE:
                    yield Message(
                        topic,
                        p,
                        offset,
                        m.key(),
                        m.value(),
                        ts if kind != 0 and ts >= 0 else None,
                        _headers(m.headers()),
                    )
                if offset + 1 >= cursors[p].window.stop:
                    close(p)
    finally:
        consumer.close()


# -- output ----------------------------------------------------------------------------------


def _headers(
    raw: Mapping[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]] | None,
) -> Headers:
    pairs = raw.items() if isinstance(raw, Mapping) else (raw or ())
    return tuple((k, v.encode() if isinstance(v, str) else v) for k, v in pairs)


class ProgressLine:
    """`what: 1,234 / 5,000 messages read (24%)` on stderr, when it is a terminal."""

    def __init__(self, stream: TextIO, what: str, total: int, enabled: bool = True) -> None:
        self.stream = stream
        self.what = what
        self.total = total
        self.tty = enabled and stream.isatty()
        self._shown_at = 0.0
        self._count = 0

    def __call__(self, count: int) -> None:
        """Note progress; redraws at most 5 times a second."""
        self._count = count
        now = time.monotonic()
        if self.tty and now - self._shown_at >= 0.2:
            self._shown_at = now
            total = max(self.total, count)
            pct = f" ({100 * count // total}%)" if total else ""
            self.stream.write(f"\r\x1b[K{self.what}: {count:,} / {total:,} messages read{pct}")
            self.stream.flush()

    def clear(self) -> None:
        """Remove the line (before the summary)."""
        if self.tty and self._shown_at:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def rfc3339(ms: int | float) -> str:
    """A UTC time for humans, to the second."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- replay -----------------------------------------------------------------------------------


class ClaimLookup:
    """Reads post claims (who fanned a post out) in batches; None when Redis does not answer."""

    def __init__(self, settings: Settings) -> None:
        self._prefix = settings.redis_prefix
        self._url = settings.redis_url
        self._client: Any = None
        self.available = True

    def lookup(self, post_ids: Sequence[str]) -> list[str | None] | None:
        """The claim holder (`topic/partition@offset`) of each post, None if unclaimed."""
        if not self.available or not post_ids:
            return None if not self.available else []
        import redis

        try:
            if self._client is None:
                self._client = redis.Redis.from_url(self._url, socket_timeout=5)
            pipe = self._client.pipeline(transaction=False)
            for pid in post_ids:
                pipe.get(f"{self._prefix}post:{pid}")
            raw = pipe.execute()
        except redis.RedisError:
            self.available = False
            return None
        return [r.decode() if isinstance(r, bytes) else r for r in raw]


class FollowerCounts:
    """The follower store's counts per author (dry runs); unavailable: None and a reason."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._cache: dict[str, int] = {}
        self._store: Any = None
        self.problem: str | None = None

    def count(self, author_id: str) -> int | None:
        """How many followers the store holds for the author."""
        if self.problem is not None:
            return None
        if author_id not in self._cache:
            store = self._open()
            if store is None:
                return None
            self._cache[author_id] = store.follower_count(author_id)
        return self._cache[author_id]

    def _open(self) -> Any:
        if self._store is None:
            from pathlib import Path

            from operators.adapters.stores.by_url import open_follower_store
            from operators.fanout.ports import StoreMismatch

            url = self._settings.resolved_store_url
            if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
                self.problem = f"no follower store at {url}"
                return None
            try:
                self._store = open_follower_store(url, self._settings.shard_count)
            except (StoreMismatch, ValueError, OSError) as exc:
                self.problem = str(exc)
                return None
        return self._store

    def close(self) -> None:
        """Release the store."""
        if self._store is not None:
            self._store.close()


@dataclass
class ReplayStats:
    """Counts of one replay (published stays 0 in a dry run)."""

    read: int = 0
    taken: int = 0
    selected: int = 0
    malformed: int = 0
    other_authors: int = 0
    published: int = 0
    failed: int = 0
    claimed: int = 0
    unclaimed: int = 0
    suppressed: int = 0
    too_old: int = 0
    candidates: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Selected:
    """A post chosen for replay, with the message that carried it."""

    message: Message
    post: PostCreated


def select_posts(
    messages: Iterable[Message], authors: frozenset[str], stats: ReplayStats
) -> Iterator[Selected]:
    """Valid posts (by the authors asked, if any); malformed messages are counted, not kept."""
    for m in messages:
        stats.taken += 1
        try:
            post = decode_post_created(m.value)
        except InvalidEvent:
            stats.malformed += 1
            continue
        if authors and post.author_id not in authors:
            stats.other_authors += 1
            continue
        stats.selected += 1
        yield Selected(m, post)


def replay_headers(m: Message) -> list[tuple[str, str | bytes | None]]:
    """The original headers plus where the message was replayed from."""
    kept: list[tuple[str, str | bytes | None]] = [
        (k, v) for k, v in m.headers if k != REPLAY_HEADER
    ]
    return [*kept, (REPLAY_HEADER, m.source.encode())]


def _chunks(items: Iterable[Selected], size: int) -> Iterator[list[Selected]]:
    chunk: list[Selected] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_UNKNOWN = "?"


def _claim_holders(chunk: list[Selected], claims: ClaimLookup, stats: ReplayStats) -> list[str]:
    """Per post: who holds its claim, "" when nobody, "?" when Redis did not answer."""
    holders = claims.lookup([s.post.post_id for s in chunk])
    out = []
    for i in range(len(chunk)):
        if holders is None:
            out.append(_UNKNOWN)
        elif holders[i] is not None:
            stats.claimed += 1
            out.append(str(holders[i]))
        else:
            stats.unclaimed += 1
            out.append("")
    return out


def _would_fan_out(s: Selected, holder: str, oldest_ms: float, stats: ReplayStats) -> str:
    """What the flow will do with a replayed post, for humans; counts suppressed and too old."""
    if holder and holder != _UNKNOWN:
        return f"already fanned out (claimed by {holder}): dropped as a duplicate"
    reason = post_suppression(s.post)
    if reason is not None:
        stats.suppressed += 1
        return f"notifies nobody ({reason.value})"
    note = "fans out" if holder != _UNKNOWN else "fans out unless claimed (Redis did not answer)"
    if s.post.created_at.timestamp() * 1000 < oldest_ms:
        stats.too_old += 1
        note += "; older than FANFARE_NOTIFICATION_MAX_AGE_S: its pushes expire"
    return note


def run_replay(
    settings: Settings,
    topic: str,
    start: Position,
    stop: Position | None,
    authors: frozenset[str],
    dry_run: bool,
    out: TextIO,
    err: TextIO,
    now: Callable[[], float] = time.time,
) -> int:
    """The command's work; returns the exit code."""
    lane = REPLAYABLE[topic]
    config = settings.kafka_config()
    partitions = topic_partition_count(settings, topic)
    topic_partition_count(settings, lane)  # the lane must exist before anything is published
    bounds = partition_bounds(config, topic, partitions)
    windows = resolve_windows(topic, start, stop, bounds, broker_time_lookup(config, topic))
    total = sum(w.size for w in windows.values())
    stats = ReplayStats()
    progress = ProgressLine(err, f"{_PREFIX} {topic}", total)

    def on_read(n: int) -> None:
        stats.read = n
        progress(n)

    began = time.monotonic()
    chosen = select_posts(read_windows(config, topic, windows, on_read), authors, stats)
    claims = ClaimLookup(settings)
    max_age_ms = settings.notification_max_age_s * 1000
    if dry_run:
        followers = FollowerCounts(settings)
        rows: list[str] = []
        try:
            for chunk in _chunks(chosen, 1_000):
                holders = _claim_holders(chunk, claims, stats)
                oldest_ms = now() * 1000 - max_age_ms
                for s, holder in zip(chunk, holders, strict=True):
                    note = _would_fan_out(s, holder, oldest_ms, stats)
                    rows.append(_dry_run_row(s, note, followers, stats))
        finally:
            followers.close()
        progress.clear()
        _print_dry_run(out, topic, lane, windows, rows, stats, followers.problem, settings)
        return 0
    producer = Producer(
        cast(
            dict[str, Any],
            {**config, "enable.idempotence": True, "acks": "all", "linger.ms": 5},
        )
    )

    def delivered(error: KafkaError | None, _msg: Any) -> None:
        if error is None:
            stats.published += 1
        else:
            stats.failed += 1
            if len(stats.errors) < 5:
                stats.errors.append(error.str())

    for chunk in _chunks(chosen, 1_000):
        holders = _claim_holders(chunk, claims, stats)
        oldest_ms = now() * 1000 - max_age_ms
        for s, holder in zip(chunk, holders, strict=True):
            _would_fan_out(s, holder, oldest_ms, stats)
            _produce(producer, lane, s.message, delivered)
        producer.poll(0)
    remaining = producer.flush(120)
    if remaining:
        stats.failed += remaining
        stats.errors.append(f"{remaining} not acknowledged within 120 s")
    progress.clear()
    _print_summary(out, topic, lane, stats, authors, time.monotonic() - began, settings)
    return 1 if stats.failed else 0


def _produce(
    producer: Producer,
    lane: str,
    m: Message,
    delivered: Callable[[KafkaError | None, Any], None],
) -> None:
    while True:
        try:
            producer.produce(
                lane, value=m.value, key=m.key, headers=replay_headers(m), on_delivery=delivered
            )
            return
        except BufferError:
            producer.poll(0.05)


def _dry_run_row(s: Selected, note: str, followers: FollowerCounts, stats: ReplayStats) -> str:
    p = s.post
    count = followers.count(p.author_id)
    if note.startswith("fans out"):
        stats.candidates += count or 0
    created = p.created_at.isoformat().replace("+00:00", "Z")
    shown = "?" if count is None else f"{count:,}"
    return (
        f"  {p.post_id:<20} {p.author_id:<16} {created:<21} {p.visibility:<10} "
        f"{shown:>9}  {s.message.source}  {note}"
    )


def _describe_windows(windows: Mapping[int, Window]) -> str:
    if not windows:
        return "nothing in range"
    return ", ".join(f"{p}: {w.start}-{w.stop - 1}" for p, w in sorted(windows.items()))


def _print_dry_run(
    out: TextIO,
    topic: str,
    lane: str,
    windows: Mapping[int, Window],
    rows: list[str],
    stats: ReplayStats,
    store_problem: str | None,
    settings: Settings,
) -> None:
    print(
        f"dry run: would replay {stats.selected:,} post(s) from {topic} into {lane} "
        f"(nothing published)",
        file=out,
    )
    print(f"  offsets read per partition: {_describe_windows(windows)}", file=out)
    if rows:
        print(
            f"  {'post_id':<20} {'author':<16} {'created_at':<21} {'visibility':<10} "
            f"{'followers':>9}  message",
            file=out,
        )
        for row in rows:
            print(row, file=out)
    print(
        f"{stats.read:,} messages read, {stats.selected:,} selected, "
        f"{stats.malformed:,} malformed (not replayed: dead-lettered when the flow read them), "
        f"{stats.other_authors:,} by other authors",
        file=out,
    )
    fans_out = stats.selected - stats.claimed - stats.suppressed
    if store_problem:
        print(f"estimated candidates: unknown ({store_problem})", file=out)
    else:
        print(
            f"estimated candidates: {stats.candidates:,} (followers of the authors of the "
            f"{fans_out:,} post(s) that would fan out; eligibility is decided at fan-out)",
            file=out,
        )
    if stats.claimed:
        print(
            f"{stats.claimed:,} already fanned out: the flow drops them as duplicates",
            file=out,
        )
    if stats.too_old:
        print(
            f"{stats.too_old:,} post(s) older than FANFARE_NOTIFICATION_MAX_AGE_S "
            f"({settings.notification_max_age_s} s): delivery marks their pushes expired",
            file=out,
        )


def _print_summary(
    out: TextIO,
    topic: str,
    lane: str,
    stats: ReplayStats,
    authors: frozenset[str],
    elapsed_s: float,
    settings: Settings,
) -> None:
    print(f"replayed {topic} into {lane} in {elapsed_s:.1f} s", file=out)
    rows = [
        ("messages read", stats.read, ""),
        (
            "selected",
            stats.selected,
            f"by {', '.join(sorted(authors))}" if authors else "",
        ),
        ("published", stats.published, "original key and value"),
        (
            "skipped, malformed",
            stats.malformed,
            "not re-published: the flow dead-lettered them when it read them",
        ),
    ]
    if authors:
        rows.append(("skipped, other authors", stats.other_authors, ""))
    if stats.claimed:
        rows.append(
            ("already fanned out", stats.claimed, "claimed: the flow drops them as duplicates")
        )
    if stats.claimed or stats.unclaimed:
        rows.append(("to fan out", stats.unclaimed - stats.suppressed, "not claimed yet"))
    if stats.suppressed:
        rows.append(("notify nobody", stats.suppressed, "private or notify_followers off"))
    if stats.too_old:
        rows.append(
            (
                "older than max age",
                stats.too_old,
                f"FANFARE_NOTIFICATION_MAX_AGE_S={settings.notification_max_age_s}: pushes expire",
            )
        )
    if stats.failed:
        rows.append(("failed", stats.failed, "; ".join(stats.errors)))
    for label, n, note in rows:
        print(f"  {label:<24}{n:>9,}  {note}".rstrip(), file=out)


def add_parser(sub: Any) -> None:
    """`fanfare replay` on the top-level subparsers."""
    p = sub.add_parser(
        "replay",
        help="re-publish selected posts into the backfill lane the fan-out reads",
        description="Re-publish post_created events from a time or offset range into "
        "post_created.backfill. Posts already fanned out are dropped by the flow's post claim; "
        "posts never fanned out are fanned out once. Malformed events are not re-published.",
    )
    p.add_argument(
        "--topic",
        required=True,
        type=replay_topic_arg,
        help=f"the topic to replay (supported: {', '.join(REPLAYABLE)})",
    )
    p.add_argument(
        "--from",
        dest="start",
        required=True,
        type=position_arg,
        metavar="TIME|OFFSET",
        help="first message: RFC 3339 time, duration ago (2h), offset, or P:O,P:O",
    )
    p.add_argument(
        "--to",
        dest="stop",
        default=None,
        type=position_arg,
        metavar="TIME|OFFSET",
        help="exclusive end (default: the end of each partition when the command starts)",
    )
    p.add_argument(
        "--author",
        dest="authors",
        action="append",
        default=[],
        metavar="A",
        help="only posts by this author (repeatable)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the posts that would be replayed and the estimated candidates",
    )
    p.set_defaults(func=command)


def command(args: argparse.Namespace, settings: Settings) -> int:
    """`fanfare replay`: exit 0 done, 1 failed, 2 usage."""
    try:
        return run_replay(
            settings,
            args.topic,
            args.start,
            args.stop,
            frozenset(args.authors),
            args.dry_run,
            sys.stdout,
            sys.stderr,
        )
    except UsageError as exc:
        print(f"{_PREFIX}: {exc}", file=sys.stderr)
        return 2
    except (BrokerUnavailable, KafkaException, RuntimeError, TimeoutError) as exc:
        print(f"{_PREFIX}: {exc}", file=sys.stderr)
        return 1
