"""The outbox relay's decisions, pure: which rows a relay may claim, what it publishes, backoff.

The post service writes its post and an outbox row in one database transaction; relays publish
the rows. Several relays may run at once, so these rules keep each key's rows in order:

- A key's *head* is its oldest pending row. A relay claims a key only by locking its head
  (rows another relay holds are skipped, never waited for), then takes that key's pending rows
  from the head on, in id order, up to the batch size. Heads are looked for among the oldest
  rows only (a window of a few batches), so a claim costs the same whatever the backlog.
  While one relay holds a key's head, no other relay can claim that key: a later row of the
  key is never a head while an older one is pending. So a key's rows are published one run at
  a time, each run in id order, and a run is deleted in the transaction that locked it before
  another relay can see the next head.
- A relay that dies mid-batch (its locks go with its session) leaves the whole run pending;
  the next claim of the key publishes it again, from the head, in order. So a copy of a row
  may appear twice, always in a run whose last copies are in order, never a stale row after a
  newer one that was published and deleted. Consumers drop the copies (the post claim).
- Rows become visible when their transaction commits. Ids are drawn at insert, so a row of a
  key committed after a newer-id row of the same key was published follows it; a post service
  that writes a key's rows from one transaction at a time (as it does when it updates the
  entity the key names) gets commit order, which is id order.

`claimable` states the claim in plain Python (the PostgreSQL adapter runs the same rule in
SQL, and the tests' fake store uses this).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from schemas.records import DeadLetter

OUTBOX_ID_HEADER = "fanfare-outbox-id"
"""The message header that carries the outbox row id (the row a message was published from)."""

OUTBOX_SOURCE = "outbox"
"""`source_topic` of the dead letter of a row the relay cannot publish (it names no topic)."""


_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")
NAME_LIMIT = 63
"""PostgreSQL's identifier length (NAMEDATALEN - 1), also the limit of a NOTIFY channel."""


@dataclass(frozen=True)
class TableName:
    """The outbox table's name, `NAME` or `SCHEMA.NAME` (FANFARE_OUTBOX_TABLE)."""

    schema: str | None
    name: str

    @classmethod
    def parse(cls, text: str) -> TableName:
        """A table name; ValueError says what is wrong with it."""
        parts = text.split(".")
        if len(parts) > 2 or not all(_IDENTIFIER.fullmatch(p) for p in parts):
            raise ValueError(
                f"{text!r} is not a table name: use lower-case letters, digits and _ "
                "(`fanfare_outbox`, or `schema.fanfare_outbox`)"
            )
        # The longest derived name is the trigger's, NAME_notify.
        if len(text) > NAME_LIMIT or len(parts[-1]) + len("_notify") > NAME_LIMIT:
            raise ValueError(f"{text!r} is too long: PostgreSQL names have at most 63 characters")
        return cls(parts[0] if len(parts) == 2 else None, parts[-1])

    @property
    def channel(self) -> str:
        """The NOTIFY channel: the table's name as written."""
        return f"{self.schema}.{self.name}" if self.schema else self.name


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A row of the outbox table: where it goes, its key and value, how long it waited."""

    id: int
    topic: str
    key: str
    payload: bytes
    age_s: float
    """Seconds from the row's insert to its claim, on the database's clock."""


WINDOW_BATCHES = 4
"""A claim looks for heads among the oldest WINDOW_BATCHES x batch size pending rows."""


def claimable(
    pending: Sequence[OutboxRow], locked: Collection[int], limit: int, window: int | None = None
) -> list[OutboxRow]:
    """The rows a relay claims: the runs of keys whose head it can lock, in id order.

    `pending` is every row of the table (pending rows are not deleted yet), `locked` the ids
    other relays hold. Heads are looked for in the window, the oldest `window` rows (default
    WINDOW_BATCHES x limit): it holds every row older than any row in it, so a key's first row
    there is its head, and a claim's cost does not grow with the backlog. Only the heads whose
    runs start within the batch are wanted (the window rows of the keys with earlier heads
    leave room), so each head a claim locks has rows in it and other relays can take the
    rest. At most `limit` rows, from the window; each key's rows taken are a prefix of its run.
    """
    ordered = sorted(pending, key=lambda r: r.id)[: window or WINDOW_BATCHES * limit]
    runs: dict[str, list[int]] = {}
    for row in ordered:
        runs.setdefault(row.key, []).append(row.id)
    before = 0
    taken: set[str] = set()
    for key, ids in sorted(runs.items(), key=lambda kv: kv[1][0]):
        if before >= limit:
            break
        if ids[0] not in locked:
            taken.add(key)
        before += len(ids)
    return [r for r in ordered if r.key in taken][:limit]


def split_publishable(
    rows: Iterable[OutboxRow], known_topics: Collection[str]
) -> tuple[list[OutboxRow], list[OutboxRow]]:
    """(rows to publish, rows naming a topic fanfare does not know), each in claim order."""
    publish: list[OutboxRow] = []
    unknown: list[OutboxRow] = []
    for row in rows:
        (publish if row.topic in known_topics else unknown).append(row)
    return publish, unknown


def unknown_topic_letter(row: OutboxRow, known_topics: Collection[str]) -> DeadLetter:
    """The dead letter of a row whose topic fanfare does not know.

    `fanfare outbox migrate`'s check constraint refuses such rows; a table made another way
    may hold some.
    """
    return DeadLetter(
        OUTBOX_SOURCE,
        None,
        row.id,
        f"unknown_topic: {row.topic[:200]!r} is not a fanfare topic "
        f"(known: {', '.join(sorted(known_topics))})",
        row.payload.decode("utf-8", "backslashreplace"),
    )


def in_key_order(rows: Sequence[OutboxRow]) -> bool:
    """Whether each key's rows come in id order (what a publisher must keep)."""
    last: dict[str, int] = {}
    for row in rows:
        if last.get(row.key, -1) >= row.id:
            return False
        last[row.key] = row.id
    return True


@dataclass(frozen=True)
class Backoff:
    """How long a relay waits after failures in a row: exponential, capped, jittered.

    Every relay that loses the broker or the database retries; the jitter keeps them from
    coming back all at once.
    """

    base_s: float = 0.1
    cap_s: float = 10.0

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after `failures` (1 or more) failures in a row."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** max(0, failures - 1))
        return float(ceiling * (0.5 + rand() / 2))  # never much less than half: no busy retry
