"""`fanfare replay`: re-publish selected `post_created` events into the backfill lane.

The fan-out flow reads `post_created.backfill` beside `post_created` through the same decode and
claim path: the Redis post claim binds a post_id to the message that first carried it, so a
replayed post that was already fanned out is dropped as a duplicate and a post that never was is
fanned out once. Replay never writes to the live topic.

Positions (`--from`, `--to`) and how a range is read: `scripts/commands/topic_scan.py`, shared
with `fanfare dlq`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from confluent_kafka import KafkaError, KafkaException, Producer

from operators.adapters.kafka.admin import BrokerUnavailable
from operators.adapters.kafka.client_log import client_config
from operators.config import Settings
from operators.fanout.eligibility import post_suppression
from schemas.codecs import InvalidEvent, decode_post_created, format_timestamp
from schemas.records import PostCreated
from schemas.topics import POST_CREATED, POST_CREATED_BACKFILL
from scripts.commands.topic_scan import (
    Message,
    Position,
    ProgressLine,
    UsageError,
    Window,
    broker_time_lookup,
    partition_bounds,
    position_arg,
    read_windows,
    resolve_windows,
    topic_partition_count,
)

# What can be replayed, and the lane it is replayed into.
REPLAYABLE = {POST_CREATED: POST_CREATED_BACKFILL}
REPLAY_HEADER = "fanfare-replay-of"
_PREFIX = "fanfare replay"


# -- positions -------------------------------------------------------------------------------


def replay_topic_arg(text: str) -> str:
    """Check `--topic`: only a topic with a backfill lane (an argparse type)."""
    if text not in REPLAYABLE:
        supported = ", ".join(f"{t} (into {lane})" for t, lane in REPLAYABLE.items())
        raise argparse.ArgumentTypeError(
            f"replaying {text!r} is not supported; supported: {supported}"
        )
    return text


# -- windows: what to read from each partition, and which messages to take -------------------


# -- reading ----------------------------------------------------------------------------------


# -- output ----------------------------------------------------------------------------------


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
    return [*kept, (REPLAY_HEADER, m.origin.key.encode())]


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
    reason = post_suppression(s.post)
    if holder and holder != _UNKNOWN:
        if reason is None:
            return f"already fanned out (claimed by {holder}): dropped as a duplicate"
        # Read before, but it never fanned out: it notifies nobody, whoever holds the claim.
        stats.claimed -= 1
        stats.suppressed += 1
        return f"notifies nobody ({reason.value}); read before (claimed by {holder})"
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
        client_config(config, **{"enable.idempotence": True, "acks": "all", "linger.ms": 5})
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
    created = format_timestamp(p.created_at)
    shown = "?" if count is None else f"{count:,}"
    return (
        f"  {p.post_id:<20} {p.author_id:<16} {created:<21} {p.visibility:<10} "
        f"{shown:>9}  {s.message.origin.key}  {note}"
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
        to_fan_out = stats.selected - stats.claimed - stats.suppressed
        rows.append(("to fan out", to_fan_out, "not claimed yet"))
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
