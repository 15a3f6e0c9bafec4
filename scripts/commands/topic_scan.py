"""Reading a range of a topic, for `fanfare replay` and `fanfare dlq`.

Positions (`--from`, `--to`, `--since`) are an RFC 3339 time, a duration ago (`2h`), an offset
for every partition (`1200`) or `partition:offset` pairs (`0:1200,1:900`). A time is resolved
per partition with `Consumer.offsets_for_times` and then checked against the messages' own
timestamps: reading starts at the broker's answer and skips messages until the first one
stamped at or after the time (some brokers, the embedded one among them, answer with an
earlier offset). Windows say what to read from each partition; the reader reads them to their
true end (partition EOF); the progress line shows how far it got.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TextIO, cast

from confluent_kafka import Consumer, KafkaError, TopicPartition

from operators.adapters.kafka.admin import list_topics
from operators.adapters.kafka.client_log import client_config
from operators.adapters.kafka.probes import KafkaConfig, end_offset
from operators.config import Settings
from operators.events import MessageOrigin
from schemas.codecs import InvalidEvent, parse_timestamp

_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400}


_RELATIVE = re.compile(r"^(\d+)([smhd])$")


_PAIRS = re.compile(r"^\d+:\d+(,\d+:\d+)*$")


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]")


class UsageError(Exception):
    """The command line cannot work as given (exit code 2); the message says why."""


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
    def origin(self) -> MessageOrigin:
        """Where it was read (its `key` is the identity claims and dead letters use)."""
        return MessageOrigin(self.topic, self.partition, self.offset)


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
    consumer = Consumer(client_config(config, **{"group.id": "fanfare-bounds"}))
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
        consumer = Consumer(client_config(config, **{"group.id": "fanfare-times"}))
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
        client_config(
            config,
            **{
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
