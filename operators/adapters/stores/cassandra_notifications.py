"""The notification store on Cassandra: the send ledger (LWT claims), notifications, the inbox.

Tables and consistency levels: `operators.adapters.stores.cassandra` (connection, URL,
migrations, and why each statement runs at its level) and `schemas/cql/`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from operators.adapters.stores.cassandra import (
    DEFAULT_CONCURRENCY,
    LEVELS,
    ONE,
    CqlSession,
    Row,
    Statements,
    check_keyspace,
    connect,
    epoch_ms,
    parse_url,
    prepare,
    ttl_seconds,
    unlogged,
)
from operators.delivery.ledger import (
    NOTIFICATION_TEMPLATE,
    AttemptRecord,
    DeviceDelivery,
    InboxPage,
    LedgerUpdate,
    Notification,
    NotificationStatus,
    aggregate_status,
    decode_cursor,
    encode_cursor,
    stronger_ack,
)
from operators.delivery.model import EARLIER_COPY_IN_CALL, LedgerRow, SendRequest
from operators.delivery.ports import NotificationStore
from schemas.records import AckOutcome, NotificationAck


class ClaimConflict(RuntimeError):
    """A claim could neither win a row nor read who holds it (retry the batch)."""


def month_bucket(created_ms: int) -> str:
    """The inbox partition of a time: 'YYYY-MM' (UTC)."""
    return _month_name(_month_index(created_ms))


def _month_index(ms: int) -> int:
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.year * 12 + moment.month - 1


def _month_name(index: int) -> str:
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


_CLAIM_COLUMNS = "owner, state, attempts, schedules, status, reason, due_at"


def _ledger_row(row: Row) -> LedgerRow:
    return LedgerRow(
        row["owner"],
        row["state"],
        int(row.get("attempts") or 0),
        int(row.get("schedules") or 0),
        row.get("status"),
        row.get("reason"),
        row.get("due_at"),
    )


def _applied(rows: list[Row]) -> bool:
    return bool(rows and rows[0].get("[applied]"))


class CassandraNotificationStore(NotificationStore):
    """The ledger (`delivery_claims`, LWT claims), attempts, notifications and the inbox."""

    def __init__(
        self,
        session: CqlSession,
        keyspace: str,
        *,
        ttl_s: float = 604_800,
        consistency: str = "local_quorum",
        concurrency: int = DEFAULT_CONCURRENCY,
        clock: Callable[[], float] = time.time,
        owns_cluster: bool = False,
    ) -> None:
        self.keyspace = check_keyspace(keyspace)
        self._session = session
        self._owns_cluster = owns_cluster
        self._ttl_s = ttl_s
        self._ttl = ttl_seconds(ttl_s)
        self._clock = clock
        self._run = Statements(session, concurrency)
        q, serial = LEVELS[consistency]
        self._q = q
        ks = keyspace

        def prep(cql: str, level: int, serial_level: int | None = None) -> Any:
            return prepare(session, ks, cql, level, serial_level)

        key = "WHERE notification_id = ? AND device_id = ?"
        self._claim = prep(
            f"INSERT INTO {ks}.delivery_claims (notification_id, device_id, provider, owner, "
            "state, attempts, schedules, updated_at) VALUES (?, ?, ?, ?, 'sending', 0, 0, ?) "
            "IF NOT EXISTS USING TTL ?",
            q,
            serial,
        )
        self._reclaim = prep(
            f"UPDATE {ks}.delivery_claims USING TTL ? SET provider = ?, owner = ?, "
            "state = 'sending', attempts = 0, schedules = 0, status = null, reason = null, "
            f"due_at = null, ack = null, updated_at = ? {key} IF owner = null",
            q,
            serial,
        )
        # Its own text (each text is prepared once): this read runs at the serial level.
        self._serial_row = prep(
            f"SELECT notification_id, device_id, {_CLAIM_COLUMNS} FROM {ks}.delivery_claims {key}",
            serial,
        )
        self._row = prep(f"SELECT {_CLAIM_COLUMNS} FROM {ks}.delivery_claims {key}", q)
        self._take_over = prep(
            f"UPDATE {ks}.delivery_claims USING TTL ? SET owner = ?, provider = ?, "
            f"state = 'sending', updated_at = ? {key} "
            "IF state = 'retry_scheduled' AND schedules = ?",
            q,
            serial,
        )
        self._record = prep(
            f"UPDATE {ks}.delivery_claims USING TTL ? SET state = ?, attempts = ?, "
            f"schedules = ?, status = ?, reason = ?, due_at = ?, updated_at = ? {key}",
            q,
        )
        self._attempt = prep(
            f"INSERT INTO {ks}.delivery_attempts (notification_id, attempted_at, device_id, "
            "attempt, state, status, reason) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?",
            q,
        )
        self._note_by_id = prep(
            f"INSERT INTO {ks}.notifications_by_id (notification_id, user_id, post_id, "
            "author_id, template, created_at, month) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?",
            q,
        )
        self._note_by_user = prep(
            f"INSERT INTO {ks}.notifications_by_user (user_id, month, created_at, "
            "notification_id, post_id, author_id, template) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "USING TTL ?",
            q,
        )
        self._ack_get = prep(
            f"SELECT owner, ack, TTL(owner) AS owner_ttl FROM {ks}.delivery_claims {key}", q
        )
        self._ack_put = prep(
            f"UPDATE {ks}.delivery_claims USING TTL ? SET ack = ?, updated_at = ? {key}", q
        )
        self._note_exists = prep(
            f"SELECT notification_id FROM {ks}.notifications_by_id WHERE notification_id = ?",
            ONE,
        )
        self._note_get = prep(
            f"SELECT user_id, post_id, author_id, template, created_at "
            f"FROM {ks}.notifications_by_id WHERE notification_id = ?",
            ONE,
        )
        self._devices = prep(
            f"SELECT device_id, provider, owner, state, attempts, ack, updated_at "
            f"FROM {ks}.delivery_claims WHERE notification_id = ?",
            ONE,
        )
        self._attempts = prep(
            f"SELECT attempted_at, device_id, attempt, state, status, reason "
            f"FROM {ks}.delivery_attempts WHERE notification_id = ?",
            ONE,
        )
        inbox = (
            f"SELECT notification_id, post_id, author_id, template, created_at "
            f"FROM {ks}.notifications_by_user WHERE user_id = ? AND month = ?"
        )
        self._inbox_first = prep(f"{inbox} LIMIT ?", ONE)
        self._inbox_after = prep(f"{inbox} AND (created_at, notification_id) < (?, ?) LIMIT ?", ONE)

    @classmethod
    def open(
        cls,
        url: str,
        ttl_s: float = 604_800,
        *,
        username: str | None = None,
        password_file: str | Path | None = None,
    ) -> CassandraNotificationStore:
        """Connect (per worker) and open the store of a `cassandra://` URL."""
        parsed = parse_url(url)
        session = connect(parsed, username=username, password_file=password_file)
        try:
            return cls(
                session,
                parsed.keyspace,
                ttl_s=ttl_s,
                consistency=parsed.consistency,
                owns_cluster=True,
            )
        except BaseException:
            session.cluster.shutdown()
            raise

    def _now_ms(self) -> int:
        return round(self._clock() * 1000)

    # -- the ledger --------------------------------------------------------------------------

    def claim(self, requests: Sequence[SendRequest]) -> list[LedgerRow | None]:
        """INSERT ... IF NOT EXISTS per request: None where it won, else the holder's row.

        One round trip for the whole call (a slice of a dispatch batch): every claim and every
        notification upsert goes out at once (`Statements.wave`). A lightweight transaction
        cannot span partitions, and each (notification, device) is its own, so the claims are
        separate statements, in flight together. The notifications (notifications_by_id and
        notifications_by_user) are written beside the claims, not after: the rows are the same
        whoever owns the send (idempotent upserts), and a crash between claim and
        notification loses nothing. The same key twice in one call: the first copy claims, the
        second is answered as a duplicate (not its owner), as the SQLite adapter does. Only
        the rare claim over an expired claim's remnant needs more round trips.
        """
        if not requests:
            return []
        now_ms = self._now_ms()
        answers: list[LedgerRow | None] = [None] * len(requests)
        first: list[int] = []
        seen: set[tuple[str, str]] = set()
        for i, r in enumerate(requests):
            if r.key in seen:
                answers[i] = LedgerRow(EARLIER_COPY_IN_CALL, "sending", 0, 0)
            else:
                seen.add(r.key)
                first.append(i)
        claims: list[tuple[Any, tuple[object, ...]]] = [
            (
                self._claim,
                (*requests[i].key, requests[i].provider, requests[i].origin.key, now_ms, self._ttl),
            )
            for i in first
        ]
        notes = self._notification_writes([requests[i] for i in first])
        results = self._run.wave(claims + notes)[: len(claims)]
        remnants: list[int] = []
        for i, rows in zip(first, results, strict=True):
            if _applied(rows):
                continue
            if rows[0].get("owner") is None:  # only cells that outlived an expired claim
                remnants.append(i)
            else:
                answers[i] = _ledger_row(rows[0])
        if remnants:
            self._take_remnants([requests[i] for i in remnants], remnants, answers, now_ms)
        return answers

    def _take_remnants(
        self,
        requests: list[SendRequest],
        positions: list[int],
        answers: list[LedgerRow | None],
        now_ms: int,
    ) -> None:
        """Re-claim rows left by an expired claim (IF owner = null); read the winner if lost."""
        results = self._run.each(
            self._reclaim,
            [(self._ttl, r.provider, r.origin.key, now_ms, *r.key) for r in requests],
        )
        lost = [
            (r, i)
            for r, i, rows in zip(requests, positions, results, strict=True)
            if not _applied(rows)
        ]
        held = self._run.each(self._serial_row, [r.key for r, _ in lost])
        for (r, i), rows in zip(lost, held, strict=True):
            if not rows or rows[0].get("owner") is None:
                raise ClaimConflict(f"{r.key}: neither claimed nor held; retry the batch")
            answers[i] = _ledger_row(rows[0])

    def _notification_writes(
        self, requests: Sequence[SendRequest]
    ) -> list[tuple[Any, tuple[object, ...]]]:
        """The notifications_by_id and notifications_by_user upserts of these requests."""
        by_id: list[tuple[Any, tuple[object, ...]]] = []
        by_user: list[tuple[Any, tuple[object, ...]]] = []
        done: set[str] = set()
        for r in requests:
            nid = r.item["notification_id"]
            if nid in done:
                continue
            done.add(nid)
            created_ms = round(r.created_ts * 1000)
            month = month_bucket(created_ms)
            user = r.item["user_id"]
            template = NOTIFICATION_TEMPLATE
            by_id.append(
                (
                    self._note_by_id,
                    (nid, user, r.post_id, r.author_id, template, created_ms, month, self._ttl),
                )
            )
            by_user.append(
                (
                    self._note_by_user,
                    (user, month, created_ms, nid, r.post_id, r.author_id, template, self._ttl),
                )
            )
        return by_id + by_user

    def rows(self, keys: Sequence[tuple[str, str]]) -> list[LedgerRow | None]:
        """Point reads at Q; a row without an owner is an expired claim's remnant: absent."""
        distinct = list(dict.fromkeys(keys))
        found: dict[tuple[str, str], LedgerRow] = {}
        for key, rows in zip(distinct, self._run.each(self._row, distinct), strict=True):
            if rows and rows[0].get("owner") is not None:
                found[key] = _ledger_row(rows[0])
        return [found.get(k) for k in keys]

    def take_over(self, requests: Sequence[SendRequest]) -> list[bool]:
        """UPDATE ... IF state = 'retry_scheduled' AND schedules = seq, per request.

        The same key twice in one call: only the first copy can take it (the row is `sending`
        once it did).
        """
        out = [False] * len(requests)
        now_ms = self._now_ms()
        first: list[int] = []
        seen: set[tuple[str, str]] = set()
        for i, r in enumerate(requests):
            if r.key not in seen:
                seen.add(r.key)
                first.append(i)
        results = self._run.each(
            self._take_over,
            [
                (
                    self._ttl,
                    requests[i].origin.key,
                    requests[i].provider,
                    now_ms,
                    *requests[i].key,
                    requests[i].seq,
                )
                for i in first
            ],
        )
        for i, rows in zip(first, results, strict=True):
            out[i] = _applied(rows)
        return out

    def record(self, updates: Sequence[LedgerUpdate], at: float) -> None:
        """Plain UPDATEs (module docstring: why that is safe) and the attempt log.

        One write per row (the last update of a key wins, as applied in order would), since
        concurrent writes to one row have no order between them. A notification's writes (its
        devices' rows and attempts: one partition key in both tables) go as one unlogged batch,
        so a push sent once costs one request, not two.
        """
        if not updates:
            return
        at_ms = round(at * 1000)
        last = {u.key: u for u in updates}
        by_partition: dict[str, list[tuple[Any, Sequence[object]]]] = {}
        for u in last.values():
            by_partition.setdefault(u.key[0], []).append(
                (
                    self._record,
                    (
                        self._ttl,
                        u.state,
                        u.attempts,
                        u.schedules,
                        u.status,
                        u.reason,
                        u.due_at,
                        at_ms,
                        *u.key,
                    ),
                )
            )
        for u in updates:
            if u.attempted:
                by_partition[u.key[0]].append(
                    (
                        self._attempt,
                        (
                            u.key[0],
                            at_ms,
                            u.key[1],
                            u.attempts,
                            u.state,
                            u.status,
                            u.reason,
                            self._ttl,
                        ),
                    )
                )
        self._run.mixed(
            [pair for writes in by_partition.values() for pair in unlogged(writes, self._q)]
        )

    def apply_acks(self, acks: Sequence[NotificationAck]) -> list[AckOutcome]:
        """Read each device row at Q, fold its acks forward only, write it once.

        The ack is written with the owner cell's remaining TTL, so the row still expires with
        its claim.
        """
        if not acks:
            return []
        keys = list(dict.fromkeys((a.notification_id, a.device_id) for a in acks))
        current: dict[tuple[str, str], Row] = {}
        for key, rows in zip(keys, self._run.each(self._ack_get, keys), strict=True):
            if rows and rows[0].get("owner") is not None:
                current[key] = rows[0]
        missing = list(dict.fromkeys(k[0] for k in keys if k not in current))
        known = {
            nid
            for nid, rows in zip(
                missing, self._run.each(self._note_exists, [(n,) for n in missing]), strict=True
            )
            if rows
        }
        out: list[AckOutcome] = []
        acked: dict[tuple[str, str], str | None] = {k: r.get("ack") for k, r in current.items()}
        for a in acks:
            key = (a.notification_id, a.device_id)
            if key not in current:
                out.append(
                    "unknown_device" if a.notification_id in known else "unknown_notification"
                )
                continue
            acked[key] = stronger_ack(acked[key], a.event)
            out.append("applied")
        now_ms = self._now_ms()
        self._run.each(
            self._ack_put,
            [
                (max(1, int(current[k].get("owner_ttl") or self._ttl)), acked[k], now_ms, *k)
                for k in current
            ],
        )
        return out

    # -- reads for people (LOCAL_ONE) --------------------------------------------------------

    def _statuses(self, nids: Sequence[str]) -> dict[str, NotificationStatus]:
        out: dict[str, NotificationStatus] = {}
        for nid, rows in zip(
            nids, self._run.each(self._devices, [(n,) for n in nids]), strict=True
        ):
            live = [r for r in rows if r.get("owner") is not None]
            out[nid] = aggregate_status([r["state"] for r in live], [r.get("ack") for r in live])
        return out

    def notification(self, notification_id: str) -> Notification | None:
        """notifications_by_id with its devices' aggregated status."""
        rows = self._run.one(self._note_get, (notification_id,))
        if not rows:
            return None
        r = rows[0]
        status = self._statuses([notification_id])[notification_id]
        return Notification(
            notification_id,
            r["user_id"],
            r["post_id"],
            r["author_id"],
            r["template"],
            epoch_ms(r["created_at"]),
            status,
        )

    def devices(self, notification_id: str) -> list[DeviceDelivery]:
        """The notification's partition of delivery_claims, by device_id (clustering order)."""
        return [
            DeviceDelivery(
                r["device_id"],
                r["provider"],
                r["state"],
                int(r.get("attempts") or 0),
                r.get("ack"),
                epoch_ms(r["updated_at"]) / 1000 if r.get("updated_at") is not None else 0.0,
            )
            for r in self._run.one(self._devices, (notification_id,))
            if r.get("owner") is not None
        ]

    def attempts(self, notification_id: str) -> list[AttemptRecord]:
        """Attempts by time; a replayed record of the same attempt keeps only its last write."""
        latest: dict[tuple[str, int], AttemptRecord] = {}
        for r in self._run.one(self._attempts, (notification_id,)):
            record = AttemptRecord(
                r["device_id"],
                int(r["attempt"]),
                epoch_ms(r["attempted_at"]) / 1000,
                r["state"],
                r.get("status"),
                r.get("reason"),
            )
            latest[(record.device_id, record.attempt)] = record
        return sorted(latest.values(), key=lambda a: (a.at, a.device_id, a.attempt))

    def inbox(self, user_id: str, cursor: str | None, limit: int) -> InboxPage:
        """Newest first, walking month partitions back from the cursor's month (or now).

        Without a cursor the walk starts at the month of now + 1 day (a post stamped a little
        ahead of this clock still shows) and never goes past the month of now - ttl: older
        partitions can hold only expired rows.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        after = decode_cursor(user_id, cursor) if cursor else None
        now_ms = self._now_ms()
        oldest = _month_index(now_ms - round(self._ttl_s * 1000))
        month = _month_index(after[0] if after else now_ms + 86_400_000)
        rows: list[Row] = []
        while month >= oldest and len(rows) <= limit:
            want = limit + 1 - len(rows)
            if after is not None and month == _month_index(after[0]):
                found = self._run.one(
                    self._inbox_after, (user_id, _month_name(month), after[0], after[1], want)
                )
            else:
                found = self._run.one(self._inbox_first, (user_id, _month_name(month), want))
            rows += found
            month -= 1
        page, more = rows[:limit], len(rows) > limit
        statuses = self._statuses([r["notification_id"] for r in page])
        notes = [
            Notification(
                r["notification_id"],
                user_id,
                r["post_id"],
                r["author_id"],
                r["template"],
                epoch_ms(r["created_at"]),
                statuses[r["notification_id"]],
            )
            for r in page
        ]
        last = notes[-1] if notes else None
        next_cursor = (
            encode_cursor(user_id, last.created_ms, last.notification_id)
            if more and last is not None
            else None
        )
        return InboxPage(notes, next_cursor)

    def close(self) -> None:
        """Shut the cluster connection down when this store opened it."""
        if self._owns_cluster:
            self._owns_cluster = False
            self._session.cluster.shutdown()
