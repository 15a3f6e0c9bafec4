"""`fanfare dlq list` and `fanfare dlq redrive`: look at dead letters, send fixed ones back.

A dead letter (`schemas/dead_letters.schema.json`) keeps the source topic, partition, offset,
the error and the original value (`raw`). `list` groups them by reason (the error's leading
word: `schema`, `invalid_json`, `unknown_timezone`, ...). `redrive` sends chosen ones back to
their source topic, on the partition the original was read from, with the topic's key
convention read from the raw JSON, so they are ordered after what that partition already holds.

Only dead letters of fanfare's input topics are redriven (the delivery flow's dead letters carry
a summary, not the original message). Before sending, each is checked again: a raw that still
fails the topic's schema is not sent (it would only come back), and a change a later message on
the same partition superseded (a newer preference record of the same user, device, or follow
edge) is not sent, so a redrive never rolls a user back to an older state.
A raw value over 64 KiB is kept cut, with its original size (a dead letter must fit the
broker's message limit); it fails its schema and is therefore never redriven.

Redriving twice does not send anything twice: each dead letter's source identity
(`topic/partition@offset`) is claimed in a Redis hash under the configured prefix
(`{FANFARE_REDIS_PREFIX}dlq:redriven`) before it is sent, and the claim is then confirmed with
where the new message landed (or released if sending failed). Redis, not a file in
FANFARE_HOME: the command may run on any host (a laptop, a job in the cluster) while FANFARE_HOME
is per machine, and HSETNX makes two concurrent redrives safe.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, TextIO, cast

import fastjsonschema
import orjson
import redis
from confluent_kafka import KafkaError, KafkaException, Producer

from operators.adapters.kafka.admin import BrokerUnavailable
from operators.adapters.kafka.client_log import client_config
from operators.adapters.kafka.probes import end_offset
from operators.config import Settings
from operators.events import MessageOrigin
from schemas.codecs import (
    InvalidEvent,
    decode_device_change,
    decode_follow_change,
    decode_notification_ack,
    decode_post_created,
    decode_preference_change,
    format_timestamp,
    validator,
)
from schemas.topics import (
    DEAD_LETTERS,
    DEVICE_CHANGES,
    FOLLOW_CHANGES,
    NOTIFICATION_ACKS,
    POST_CREATED,
    POST_CREATED_BACKFILL,
    PREFERENCE_CHANGES,
)
from scripts.commands.arguments import non_negative_int
from scripts.commands.topic_scan import (
    Message,
    Position,
    ProgressLine,
    UsageError,
    Window,
    broker_time_lookup,
    partition_bounds,
    read_windows,
    resolve_windows,
    time_arg,
    topic_partition_count,
)

_PREFIX = "fanfare dlq"
_REASON = re.compile(r"^([a-z][a-z0-9_]*):")
MARK_KEY = "dlq:redriven"


@dataclass(frozen=True)
class InputTopic:
    """How to check, key and identify the records of an input topic."""

    decode: Callable[[bytes | str | None], Any]
    key_field: str
    entity: Callable[[Any], Hashable] | None = None
    """What a record is the latest state of (None: records never supersede each other)."""


INPUT_TOPICS: dict[str, InputTopic] = {
    POST_CREATED: InputTopic(decode_post_created, "author_id"),
    POST_CREATED_BACKFILL: InputTopic(decode_post_created, "author_id"),
    FOLLOW_CHANGES: InputTopic(
        decode_follow_change, "author_id", lambda c: (c.author_id, c.follower_id)
    ),
    PREFERENCE_CHANGES: InputTopic(decode_preference_change, "user_id", lambda c: c.user_id),
    DEVICE_CHANGES: InputTopic(decode_device_change, "user_id", lambda c: (c.user_id, c.device_id)),
    NOTIFICATION_ACKS: InputTopic(decode_notification_ack, "notification_id"),
}


def reason_of(error: str) -> str:
    """The error's leading word (`schema: ...` -> `schema`), else `unprocessable`."""
    m = _REASON.match(error)
    return m.group(1) if m else "unprocessable"


@dataclass(frozen=True)
class Letter:
    """A dead letter as read from the dead_letters topic."""

    at: str
    """Where the dead letter itself is: `dead_letters/partition@offset`."""
    timestamp_ms: int | None
    source_topic: str
    partition: int | None
    offset: int | None
    error: str
    raw: str

    @property
    def reason(self) -> str:
        """The error's leading word."""
        return reason_of(self.error)

    @property
    def identity(self) -> str | None:
        """`topic/partition@offset` of the original message, when the dead letter says."""
        if self.partition is None or self.offset is None:
            return None
        return MessageOrigin(self.source_topic, self.partition, self.offset).key


def decode_letter(m: Message) -> Letter | None:
    """A dead letter, or None when the message is not one."""
    try:
        d = orjson.loads(m.value or b"")
        validator("dead_letters")(d)
    except (orjson.JSONDecodeError, fastjsonschema.JsonSchemaValueException):
        return None
    return Letter(
        m.origin.key,
        m.timestamp_ms,
        d["source_topic"],
        d["partition"],
        d["offset"],
        d["error"],
        d["raw"],
    )


def choose(
    letters: Iterable[Letter], reasons: frozenset[str], source_topics: frozenset[str]
) -> list[Letter]:
    """The dead letters matching the filters (an empty filter matches everything)."""
    return [
        x
        for x in letters
        if (not reasons or x.reason in reasons)
        and (not source_topics or x.source_topic in source_topics)
    ]


@dataclass
class Group:
    """Dead letters of one reason."""

    reason: str
    count: int = 0
    by_topic: Counter[str] | None = None
    examples: list[Letter] | None = None
    redriven: int = 0


def group_by_reason(
    letters: Iterable[Letter], examples: int, marked: Mapping[str, str] | None = None
) -> list[Group]:
    """Groups, largest first, with counts per source topic and the first examples."""
    groups: dict[str, Group] = {}
    for x in letters:
        g = groups.setdefault(x.reason, Group(x.reason, 0, Counter(), []))
        g.count += 1
        assert g.by_topic is not None and g.examples is not None
        g.by_topic[x.source_topic] += 1
        if len(g.examples) < examples:
            g.examples.append(x)
        if marked and x.identity is not None and x.identity in marked:
            g.redriven += 1
    return sorted(groups.values(), key=lambda g: (-g.count, g.reason))


# -- the idempotence marker -------------------------------------------------------------------


class RedriveMarks(Protocol):
    """Which dead letters were redriven (by source identity)."""

    def held(self, identities: Sequence[str]) -> dict[str, str]:
        """The marks held for these identities."""

    def claim(self, identities: Sequence[str], note: str) -> list[bool]:
        """Mark each unless marked; True where this call marked it."""

    def confirm(self, identity: str, note: str) -> None:
        """Replace a claim with where the redriven message landed."""

    def release(self, identity: str) -> None:
        """Forget a claim whose message could not be sent."""


class RedisRedriveMarks:
    """The marks in one Redis hash: `{prefix}dlq:redriven`, identity -> what happened."""

    def __init__(self, url: str, prefix: str) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=10)
        self._key = f"{prefix}{MARK_KEY}"

    def held(self, identities: Sequence[str]) -> dict[str, str]:
        """HMGET in slices."""
        out: dict[str, str] = {}
        ids = list(identities)
        for i in range(0, len(ids), 1_000):
            part = ids[i : i + 1_000]
            for ident, value in zip(part, self._client.hmget(self._key, part), strict=True):
                if value is not None:
                    out[ident] = value.decode() if isinstance(value, bytes) else str(value)
        return out

    def claim(self, identities: Sequence[str], note: str) -> list[bool]:
        """HSETNX each, pipelined."""
        pipe = self._client.pipeline(transaction=False)
        for ident in identities:
            pipe.hsetnx(self._key, ident, note)
        return [bool(r) for r in pipe.execute()]

    def confirm(self, identity: str, note: str) -> None:
        """HSET."""
        self._client.hset(self._key, identity, note)

    def release(self, identity: str) -> None:
        """HDEL."""
        self._client.hdel(self._key, identity)


class MemoryRedriveMarks:
    """The same semantics in a dict (tests)."""

    def __init__(self) -> None:
        self.marks: dict[str, str] = {}

    def held(self, identities: Sequence[str]) -> dict[str, str]:
        """Marks held for these identities."""
        return {i: self.marks[i] for i in identities if i in self.marks}

    def claim(self, identities: Sequence[str], note: str) -> list[bool]:
        """Set where unset."""
        out = []
        for i in identities:
            out.append(i not in self.marks)
            self.marks.setdefault(i, note)
        return out

    def confirm(self, identity: str, note: str) -> None:
        """Overwrite."""
        self.marks[identity] = note

    def release(self, identity: str) -> None:
        """Drop."""
        self.marks.pop(identity, None)


# -- planning a redrive -----------------------------------------------------------------------


class Fate(StrEnum):
    """What a redrive does with a dead letter."""

    REDRIVE = "redrive"
    ALREADY = "already redriven"
    INVALID = "still invalid"
    SUPERSEDED = "superseded"
    NOT_INPUT = "not an input topic"
    NO_POSITION = "no source position"
    DUPLICATE = "duplicate dead letter"


@dataclass(frozen=True)
class Planned:
    """A dead letter, its fate, why, and (to redrive) the key to send it with."""

    letter: Letter
    fate: Fate
    detail: str = ""
    key: bytes | None = None


NewerChanges = Callable[[str, int, int], Mapping[Hashable, int]]
"""(topic, partition, after offset) -> entity -> the latest offset of a valid change to it."""


def plan_redrive(
    letters: Sequence[Letter], marks: Mapping[str, str], newer: NewerChanges
) -> list[Planned]:
    """Decide each dead letter's fate (pure but for `newer`, which reads the source topics)."""
    plans: list[Planned] = []
    seen: set[str] = set()
    candidates: list[tuple[Letter, Any, InputTopic]] = []
    for x in letters:
        spec = INPUT_TOPICS.get(x.source_topic)
        ident = x.identity
        if spec is None:
            plans.append(Planned(x, Fate.NOT_INPUT, f"{x.source_topic} is not an input topic"))
        elif ident is None:
            plans.append(Planned(x, Fate.NO_POSITION, "no partition/offset to mark it by"))
        elif ident in seen:
            plans.append(Planned(x, Fate.DUPLICATE, f"{ident} is dead-lettered more than once"))
        elif ident in marks:
            seen.add(ident)
            plans.append(Planned(x, Fate.ALREADY, marks[ident]))
        else:
            seen.add(ident)
            try:
                record = spec.decode(x.raw)
            except InvalidEvent as exc:
                plans.append(Planned(x, Fate.INVALID, str(exc)))
                continue
            candidates.append((x, record, spec))
    # Superseded: a valid change to the same entity later on the same partition.
    firsts: dict[tuple[str, int], int] = {}
    for x, _, spec in candidates:
        if spec.entity is not None:
            k = (x.source_topic, cast(int, x.partition))
            firsts[k] = min(firsts.get(k, cast(int, x.offset)), cast(int, x.offset))
    latest = {k: newer(k[0], k[1], off) for k, off in firsts.items()}
    for x, record, spec in candidates:
        if spec.entity is not None:
            later = latest[(x.source_topic, cast(int, x.partition))].get(spec.entity(record))
            if later is not None and later > cast(int, x.offset):
                plans.append(
                    Planned(
                        x,
                        Fate.SUPERSEDED,
                        f"{x.source_topic}/{x.partition}@{later} changed the same "
                        f"{'edge' if x.source_topic == FOLLOW_CHANGES else 'state'} later",
                    )
                )
                continue
        key = getattr(record, spec.key_field)
        plans.append(Planned(x, Fate.REDRIVE, key=str(key).encode()))
    return plans


# -- I/O ---------------------------------------------------------------------------------------


def read_letters(
    settings: Settings, since: Position | None, err: TextIO
) -> tuple[list[Letter], int, int]:
    """(dead letters, messages read, unreadable ones) from dead_letters, from `since` on."""
    config = settings.kafka_config()
    partitions = topic_partition_count(settings, DEAD_LETTERS)
    bounds = partition_bounds(config, DEAD_LETTERS, partitions)
    start = since or Position("the beginning", offset=0)
    windows = resolve_windows(
        DEAD_LETTERS, start, None, bounds, broker_time_lookup(config, DEAD_LETTERS)
    )
    progress = ProgressLine(
        err, f"{_PREFIX}: {DEAD_LETTERS}", sum(w.size for w in windows.values())
    )
    letters: list[Letter] = []
    unreadable = read = 0
    for m in read_windows(config, DEAD_LETTERS, windows, progress):
        read += 1
        letter = decode_letter(m)
        if letter is None:
            unreadable += 1
        else:
            letters.append(letter)
    progress.clear()
    return letters, read, unreadable


def newer_changes_reader(settings: Settings, skip: frozenset[str]) -> NewerChanges:
    """Reads a source partition after an offset: entity -> latest offset of a valid change.

    Messages in `skip` (dead-lettered ones) never counted as changes: they were not applied.
    """
    config = settings.kafka_config()

    def newer(topic: str, partition: int, after: int) -> dict[Hashable, int]:
        spec = INPUT_TOPICS[topic]
        assert spec.entity is not None
        if partition >= topic_partition_count(settings, topic):
            return {}
        window = Window(partition, after + 1, end_offset(config, topic, partition))
        latest: dict[Hashable, int] = {}
        if window.size == 0:
            return latest
        for m in read_windows(config, topic, {partition: window}):
            if m.origin.key in skip:
                continue
            try:
                record = spec.decode(m.value)
            except InvalidEvent:
                continue
            latest[spec.entity(record)] = m.offset
        return latest

    return newer


def _short(text: str, width: int = 160) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


def _filters_text(args: argparse.Namespace) -> str:
    parts = []
    if args.reasons:
        parts.append(f"reason {', '.join(args.reasons)}")
    if args.source_topics:
        parts.append(f"source topic {', '.join(args.source_topics)}")
    if args.since is not None:
        parts.append(f"since {format_timestamp(cast(int, args.since.time_ms) / 1000, 'seconds')}")
    return f" ({'; '.join(parts)})" if parts else ""


def _marks(settings: Settings) -> RedisRedriveMarks:
    return RedisRedriveMarks(settings.redis_url, settings.redis_prefix)


def list_command(args: argparse.Namespace, settings: Settings, out: TextIO, err: TextIO) -> int:
    """`fanfare dlq list`."""
    letters, read, unreadable = read_letters(settings, args.since, err)
    chosen = choose(letters, frozenset(args.reasons), frozenset(args.source_topics))
    marked: dict[str, str] | None
    try:
        marked = _marks(settings).held([x.identity for x in chosen if x.identity])
    except redis.RedisError as exc:  # the listing still helps without the marks
        print(f"{_PREFIX}: redrive marks unavailable ({exc})", file=err)
        marked = None
    groups = group_by_reason(chosen, args.limit, marked)
    print(
        f"{len(chosen):,} dead letter(s){_filters_text(args)} of {read:,} on {DEAD_LETTERS}"
        + (f"; {unreadable:,} unreadable" if unreadable else ""),
        file=out,
    )
    for g in groups:
        assert g.by_topic is not None and g.examples is not None
        topics = ", ".join(f"{t} {n:,}" for t, n in sorted(g.by_topic.items()))
        redriven = f"; {g.redriven:,} redriven" if g.redriven else ""
        print(f"  {g.reason:<22}{g.count:>8,}  from {topics}{redriven}", file=out)
        for x in g.examples:
            stamped = x.timestamp_ms
            when = "?" if stamped is None else format_timestamp(stamped / 1000, "seconds")
            origin = x.identity or f"{x.source_topic} (no position)"
            mark = f"  [redriven: {marked[x.identity]}]" if marked and x.identity in marked else ""
            print(f"      {x.at}  {when}  {origin}{mark}", file=out)
            print(f"        error: {_short(x.error)}", file=out)
            print(f"        raw:   {_short(x.raw)}", file=out)
    if groups and not any(x.source_topic in INPUT_TOPICS for x in chosen):
        print("none of these can be redriven: they are not from an input topic", file=out)
    return 0


def redrive_command(args: argparse.Namespace, settings: Settings, out: TextIO, err: TextIO) -> int:
    """`fanfare dlq redrive`."""
    letters, read, _ = read_letters(settings, args.since, err)
    chosen = choose(letters, frozenset(args.reasons), frozenset(args.source_topics))
    dead_lettered = frozenset(x.identity for x in letters if x.identity)
    try:
        marks: RedriveMarks = _marks(settings)
        held = marks.held([x.identity for x in chosen if x.identity])
    except redis.RedisError as exc:
        if not args.dry_run:
            print(
                f"{_PREFIX}: cannot read the redrive marks in Redis ({exc}); refusing to redrive "
                "without them (a second run could send the same dead letters again)",
                file=err,
            )
            return 1
        held = {}
    plans = plan_redrive(chosen, held, newer_changes_reader(settings, dead_lettered))
    if args.dry_run:
        _print_plan(out, plans, args, read, dry_run=True)
        return 0
    sent, failures = _send(settings, marks, [p for p in plans if p.fate is Fate.REDRIVE])
    _print_plan(out, plans, args, read, dry_run=False, sent=sent, failures=failures)
    return 1 if failures else 0


def _send(
    settings: Settings, marks: RedriveMarks, plans: Sequence[Planned]
) -> tuple[dict[str, str], dict[str, str]]:
    """Claim, send in source order, confirm or release: ({identity: new position}, failures)."""
    if not plans:
        return {}, {}
    ordered = sorted(
        plans, key=lambda p: (p.letter.source_topic, p.letter.partition, p.letter.offset)
    )
    stamp = format_timestamp(time.time(), "seconds")
    idents = [cast(str, p.letter.identity) for p in ordered]
    owned = marks.claim(idents, f"sending since {stamp}")
    partitions = {
        t: topic_partition_count(settings, t) for t in {p.letter.source_topic for p in ordered}
    }
    producer = Producer(
        client_config(
            settings.kafka_config(), **{"enable.idempotence": True, "acks": "all", "linger.ms": 5}
        )
    )
    results: dict[str, tuple[KafkaError | None, int, int]] = {}
    raced: dict[str, str] = {}
    for plan, ident, mine in zip(ordered, idents, owned, strict=True):
        if not mine:
            raced[ident] = "claimed by another redrive meanwhile"
            continue
        x = plan.letter

        def delivered(error: KafkaError | None, msg: Any, ident: str = ident) -> None:
            if error is None:
                results[ident] = (None, cast(int, msg.partition()), cast(int, msg.offset()))
            else:
                results[ident] = (error, -1, -1)

        part = cast(int, x.partition)
        extra: dict[str, Any] = {"partition": part} if part < partitions[x.source_topic] else {}
        while True:
            try:
                producer.produce(
                    x.source_topic,
                    value=x.raw.encode("utf-8"),
                    key=plan.key,
                    headers=[("fanfare-redrive-of", (x.identity or "").encode())],
                    on_delivery=delivered,
                    **extra,
                )
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)
    sent: dict[str, str] = {}
    failures: dict[str, str] = dict(raced)
    for plan, ident, mine in zip(ordered, idents, owned, strict=True):
        if not mine:
            continue
        error, part, off = results.get(ident, (None, -2, -2))
        if error is None and off >= 0:
            where = f"{plan.letter.source_topic}/{part}@{off}"
            marks.confirm(ident, f"{where} at {stamp}")
            sent[ident] = where
        else:
            marks.release(ident)
            failures[ident] = error.str() if error is not None else "not acknowledged in 120 s"
    return sent, failures


def _print_plan(
    out: TextIO,
    plans: Sequence[Planned],
    args: argparse.Namespace,
    read: int,
    *,
    dry_run: bool,
    sent: Mapping[str, str] | None = None,
    failures: Mapping[str, str] | None = None,
) -> None:
    sent = sent or {}
    failures = failures or {}
    head = "dry run: " if dry_run else ""
    print(
        f"{head}{len(plans):,} dead letter(s){_filters_text(args)} of {read:,} on {DEAD_LETTERS}",
        file=out,
    )
    by_fate: dict[Fate, list[Planned]] = defaultdict(list)
    for p in plans:
        by_fate[p.fate].append(p)
    for fate in Fate:
        group = by_fate.get(fate, [])
        if not group:
            continue
        label = "would redrive" if dry_run and fate is Fate.REDRIVE else str(fate)
        print(f"  {label:<24}{len(group):>6,}", file=out)
        shown = group if fate is Fate.REDRIVE else group[: args.limit]
        for p in shown:
            x = p.letter
            origin = x.identity or x.source_topic
            if fate is Fate.REDRIVE and not dry_run:
                ident = cast(str, x.identity)
                note = f"-> {sent[ident]}" if ident in sent else f"FAILED: {failures.get(ident)}"
            elif fate is Fate.REDRIVE:
                key = p.key.decode() if p.key else "(none)"
                note = f"-> {x.source_topic} partition {x.partition}, key {key}"
            else:
                note = p.detail
            print(f"      {origin:<32} {x.reason:<18} {_short(note, 110)}", file=out)
            if dry_run or fate is not Fate.REDRIVE:
                print(f"        raw: {_short(x.raw, 120)}", file=out)
    refused = by_fate.get(Fate.NOT_INPUT, [])
    if refused:
        topics = ", ".join(sorted({p.letter.source_topic for p in refused}))
        print(
            f"refused {len(refused):,} from {topics}: not fanfare input topics "
            f"({', '.join(INPUT_TOPICS)}); their dead letters describe a send, not a message "
            "that can be sent again",
            file=out,
        )
    if not dry_run:
        print(
            f"redriven {len(sent):,}, failed {len(failures):,}, "
            f"already redriven {len(by_fate.get(Fate.ALREADY, [])):,}, "
            f"still invalid {len(by_fate.get(Fate.INVALID, [])):,}, "
            f"superseded {len(by_fate.get(Fate.SUPERSEDED, [])):,}",
            file=out,
        )


# -- the command line ---------------------------------------------------------------------------


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reason",
        dest="reasons",
        action="append",
        default=[],
        metavar="R",
        help="only this reason, the error's first word: schema, invalid_json, ... (repeatable)",
    )
    p.add_argument(
        "--since",
        type=time_arg,
        default=None,
        metavar="T",
        help="only dead letters written since: RFC 3339 time or a duration ago (2h)",
    )
    p.add_argument(
        "--source-topic",
        dest="source_topics",
        action="append",
        default=[],
        metavar="S",
        help="only dead letters of this source topic (repeatable)",
    )


def add_parser(sub: Any) -> None:
    """`fanfare dlq list|redrive` on the top-level subparsers."""
    dlq = sub.add_parser("dlq", help="list dead letters by reason; redrive fixed ones")
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="dead letters grouped by reason, with examples")
    _filters(listing)
    listing.add_argument(
        "--limit",
        type=non_negative_int,
        default=3,
        metavar="N",
        help="examples per reason (default 3)",
    )
    redrive = actions.add_parser(
        "redrive", help="send chosen dead letters back to their source topic (once each)"
    )
    _filters(redrive)
    redrive.add_argument(
        "--dry-run", action="store_true", help="show what would be sent; send nothing"
    )
    redrive.add_argument(
        "--limit",
        type=non_negative_int,
        default=20,
        metavar="N",
        help="dead letters shown per kind that is not sent (default 20)",
    )
    dlq.set_defaults(func=command)


def command(args: argparse.Namespace, settings: Settings) -> int:
    """`fanfare dlq`: exit 0 done, 1 failed, 2 usage."""
    not_input = [t for t in args.source_topics if t not in INPUT_TOPICS]
    if args.dlq_command == "redrive" and not_input:
        print(
            f"{_PREFIX}: cannot redrive dead letters of {', '.join(not_input)}: not a fanfare "
            f"input topic (redrivable: {', '.join(INPUT_TOPICS)})",
            file=sys.stderr,
        )
        return 2
    try:
        if args.dlq_command == "list":
            return list_command(args, settings, sys.stdout, sys.stderr)
        return redrive_command(args, settings, sys.stdout, sys.stderr)
    except UsageError as exc:
        print(f"{_PREFIX}: {exc}", file=sys.stderr)
        return 2
    except (BrokerUnavailable, KafkaException, RuntimeError, TimeoutError) as exc:
        print(f"{_PREFIX}: {exc}", file=sys.stderr)
        return 1
