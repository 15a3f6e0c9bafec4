"""Cassandra adapters of the follower store and the notification store (the same ports as SQLite).

A store URL names the cluster and keyspace::

    cassandra://host1,host2[:port]/keyspace[?dc=DC&replication=N&consistency=LEVEL]

`dc` is the local datacenter (requests go to its replicas; `fanfare store migrate` then creates
the keyspace with NetworkTopologyStrategy {dc: N}, else SimpleStrategy N); `replication` is N
(default 1); `consistency` is `local_quorum` (default) or `quorum`, the level of every statement
that decides something (Q below), with the serial level of lightweight transactions following
it (LOCAL_SERIAL, or SERIAL). Use `quorum` only when delivery workers of one topic run in more
than one datacenter. Credentials never go in the URL: `connect` takes a username and the path
of a file holding the password, and logs neither.

Schema: versioned CQL files in ``schemas/cql`` (``001_initial.cql``, then ``002_...``),
applied in order by `migrate` (``fanfare store migrate``), each once. Stores never change the
schema: a worker that opens a keyspace without the tables is told to run the migration.

Consistency per statement. Wherever a read decides something, it and the writes it must see
are both at Q, so R + W > RF within the datacenter.

    statement                             level       why
    ------------------------------------  ----------  ------------------------------------------
    store_meta INSERT IF NOT EXISTS       Q + serial  every worker must agree on the shard count
    followers INSERT / DELETE             Q           an acknowledged unfollow or mute is seen
      (follow changes, bulk load)                     by the next page read at Q
    followers point read before a change  Q           the count delta depends on the edge's
                                                      existence
    follower_page, follow_flags           Q           an unfollow or mute must be honoured:
                                                      never read only a replica that missed it
    author_stats counter UPDATE           Q           acknowledged by a majority, still only an
                                                      estimate (a retried counter write counts
                                                      twice)
    author_stats read (follower_count)    LOCAL_ONE   an estimate that only picks the lane
    delivery_claims INSERT IF NOT EXISTS  Q + serial  Paxos: exactly one claimer owns a
      (claim)                                         (notification, device) send
    delivery_claims UPDATE IF owner =     Q + serial  the same, for a row whose claim expired
      null (re-claim of a remnant)                    while later cells lived on
    delivery_claims SELECT (claim         serial      reads exactly what Paxos committed
      fallback)
    delivery_claims UPDATE IF state,      Q + serial  exactly one retry record takes a send
      schedules (take_over)                           over
    delivery_claims SELECT (rows)         Q           retries and replayed owners decide from
                                                      it: it must show the recorded outcome
    delivery_claims UPDATE (record)       Q           read back at Q by rows(); no condition
                                                      needed (below)
    delivery_claims SELECT + UPDATE ack   Q           read-modify-write: a stale read could
      (apply_acks)                                    move an ack backwards
    delivery_attempts, notifications_by_  Q           an acknowledged write survives the loss
      id, notifications_by_user INSERT                of a node
    notifications_by_id SELECT            LOCAL_ONE   only names an ack's outcome
      (apply_acks)                                    (unknown_device or unknown_notification)
    notification, devices, attempts,      LOCAL_ONE   display only (`fanfare status`, `fanfare
      inbox (and their statuses)                      inbox`): a replica a moment behind is
                                                      fine

Why `record` is a plain UPDATE, not `IF owner = ?` (which it could not say: an update does not
carry the owner): after a claim or a take-over succeeded, its owner is the only writer of the
row's state, attempts, schedules, status, reason and due_at until it hands the send to a retry
record, and every other copy of the send is skipped by `decide` before it could record. A
plain write after a lightweight transaction on the same row is ordered by timestamps, so this
module lets the coordinator stamp writes (``use_client_timestamp`` off): plain writes and Paxos
ballots then come from one clock domain, the Cassandra nodes, which must run NTP anyway.

TTL: every write to the hot tables says ``USING TTL`` (FANFARE_STORE_TTL_S), besides the tables'
``default_time_to_live``. A ledger row exists while its ``owner`` cell (written by claim and
take-over) lives; cells written later can outlive it briefly, so a row without an owner reads as
absent and a claim re-takes it. Acks are written with the owner's remaining TTL.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from cassandra import (  # type: ignore[import-untyped]
    ConsistencyLevel,
    InvalidRequest,
    ProtocolVersion,
)

from operators.adapters.stores.sqlite_followers import FollowerRow, FollowerStore, StoreMismatch
from operators.adapters.stores.sqlite_notifications import (
    NOTIFICATION_TEMPLATE,
    AckOutcome,
    AttemptRecord,
    DeviceDelivery,
    InboxPage,
    LedgerUpdate,
    Notification,
    NotificationStatus,
    NotificationStore,
    aggregate_status,
    decode_cursor,
    encode_cursor,
    stronger_ack,
)
from operators.delivery.model import LedgerRow, SendRequest
from operators.fanout.eligibility import FLAG_MUTED, FLAG_NOTIFY_ON_POST, edge_flags
from operators.fanout.sharding import shard_of
from schemas.records import FollowChange, NotificationAck

DEFAULT_PORT = 9042
DEFAULT_CONCURRENCY = 64  # statements in flight per call (execute_concurrent's cap)
_BULK_CHUNK = 5_000  # edges per concurrent run in bulk_load
_KEYSPACE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")
_DC = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")
_MIGRATION_FILE = re.compile(r"(\d{3,})_([a-z0-9_]+)\.cql")
_LEVELS = {
    "local_quorum": (ConsistencyLevel.LOCAL_QUORUM, ConsistencyLevel.LOCAL_SERIAL),
    "quorum": (ConsistencyLevel.QUORUM, ConsistencyLevel.SERIAL),
}
ONE = ConsistencyLevel.LOCAL_ONE
_EPOCH = datetime(1970, 1, 1)
_URL_FORM = "cassandra://host1,host2[:port]/keyspace[?dc=DC&replication=N&consistency=LEVEL]"

Row = dict[str, Any]


class SchemaMissing(RuntimeError):
    """The keyspace lacks fanfare's tables: `fanfare store migrate` creates them."""


class ClaimConflict(RuntimeError):
    """A claim could neither win a row nor read who holds it (retry the batch)."""


class CqlSession(Protocol):
    """What the stores use of `cassandra.cluster.Session` (a fake in the unit tests)."""

    cluster: Any

    def prepare(self, query: str) -> Any:
        """A prepared statement."""

    def execute(self, query: Any, parameters: Any = None) -> Any:
        """Run one statement; an iterable of rows."""

    def execute_concurrent_with_args(
        self, statement: Any, parameters: Any, concurrency: int, raise_on_first_error: bool
    ) -> Any:
        """One statement over many parameter tuples; (success, result) per tuple, in order."""

    def execute_concurrent(
        self, statements_and_parameters: Any, concurrency: int, raise_on_first_error: bool
    ) -> Any:
        """Many (statement, parameters); (success, result) per pair, in order."""


# -- the URL ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CassandraUrl:
    """A parsed `cassandra://` store URL."""

    hosts: tuple[str, ...]
    port: int
    keyspace: str
    local_dc: str | None = None
    replication: int = 1
    consistency: str = "local_quorum"

    @property
    def where(self) -> str:
        """`h1,h2:9042/keyspace`, for messages (the URL carries no secret)."""
        return f"{','.join(self.hosts)}:{self.port}/{self.keyspace}"


def _bad_url(url: str, why: str) -> ValueError:
    return ValueError(f"bad Cassandra store URL {url!r}: {why}; the form is {_URL_FORM}")


def parse_url(url: str) -> CassandraUrl:
    """Parse a store URL; ValueError says what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme != "cassandra":
        raise _bad_url(url, "it must start with cassandra://")
    if "@" in parts.netloc:
        raise _bad_url(url, "credentials do not go in the URL (use a username and a password file)")
    if not parts.netloc:
        raise _bad_url(url, "name at least one host")
    hosts: list[str] = []
    ports: set[int] = set()
    for entry in parts.netloc.split(","):
        host, port = _host_port(url, entry.strip())
        hosts.append(host)
        if port is not None:
            ports.add(port)
    if len(ports) > 1:
        raise _bad_url(url, f"every host must use the same port, got {sorted(ports)}")
    keyspace = parts.path.lstrip("/")
    if not keyspace:
        raise _bad_url(url, "name the keyspace after the hosts (cassandra://HOSTS/KEYSPACE)")
    if not _KEYSPACE.fullmatch(keyspace):
        raise _bad_url(
            url,
            f"keyspace {keyspace!r} must be a letter then up to 47 letters, digits or underscores",
        )
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise _bad_url(url, f"cannot read the options {parts.query!r}") from None
    unknown = sorted(set(query) - {"dc", "replication", "consistency"})
    if unknown:
        raise _bad_url(url, f"unknown option(s) {unknown}: use dc, replication, consistency")
    repeated = sorted(k for k, v in query.items() if len(v) > 1)
    if repeated:
        raise _bad_url(url, f"option(s) {repeated} given more than once")
    opts = {k: v[0] for k, v in query.items()}
    dc = opts.get("dc")
    if dc is not None and not _DC.fullmatch(dc):
        raise _bad_url(url, f"dc {dc!r} is not a datacenter name")
    replication = _whole(url, "replication", opts.get("replication", "1"), 1, 99)
    consistency = opts.get("consistency", "local_quorum").lower()
    if consistency not in _LEVELS:
        raise _bad_url(url, f"consistency {consistency!r}: use local_quorum or quorum")
    return CassandraUrl(
        tuple(hosts), ports.pop() if ports else DEFAULT_PORT, keyspace, dc, replication, consistency
    )


def _host_port(url: str, entry: str) -> tuple[str, int | None]:
    host, port = entry, None
    if entry.startswith("["):  # [IPv6]:port
        end = entry.find("]")
        host, rest = entry[: end + 1], entry[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise _bad_url(url, f"cannot read host {entry!r}")
        if rest:
            port = _whole(url, "port", rest[1:], 1, 65_535)
    elif ":" in entry:
        host, _, raw = entry.partition(":")
        port = _whole(url, "port", raw, 1, 65_535)
    if not host or not _HOST.fullmatch(host):
        raise _bad_url(url, f"cannot read host {entry!r}")
    return host.strip("[]"), port


def _whole(url: str, name: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise _bad_url(url, f"{name} {raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise _bad_url(url, f"{name} {value} is out of range {low} to {high}")
    return value


# -- connecting ------------------------------------------------------------------------------


def read_password(password_file: str | Path) -> str:
    """The password in a file (one line); the message of an error never shows it."""
    path = Path(password_file)
    try:
        password = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(
            f"cannot read the Cassandra password file {path}: {exc.strerror or exc}"
        ) from None
    if not password:
        raise ValueError(f"the Cassandra password file {path} is empty")
    return password


def connect(
    url: CassandraUrl,
    *,
    username: str | None = None,
    password_file: str | Path | None = None,
    connect_timeout_s: float = 10.0,
    request_timeout_s: float = 12.0,
) -> CqlSession:
    """A session on the URL's cluster: token-aware, local-DC routing, protocol v4, dict rows.

    Call it per worker (each builds its own `Cluster`), never at import time; shut it down
    with ``session.cluster.shutdown()``. Authentication is plain-text (username and password),
    only when both a username and a password file are given.
    """
    from cassandra.auth import PlainTextAuthProvider  # type: ignore[import-untyped]
    from cassandra.cluster import (  # type: ignore[import-untyped]
        EXEC_PROFILE_DEFAULT,
        Cluster,
        ExecutionProfile,
    )
    from cassandra.policies import (  # type: ignore[import-untyped]
        DCAwareRoundRobinPolicy,
        TokenAwarePolicy,
    )
    from cassandra.query import dict_factory  # type: ignore[import-untyped]

    if (username is None) != (password_file is None):
        raise ValueError("Cassandra authentication needs both a username and a password file")
    auth = (
        PlainTextAuthProvider(username=username, password=read_password(password_file))
        if username is not None and password_file is not None
        else None
    )
    quorum, serial = _LEVELS[url.consistency]
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(
            DCAwareRoundRobinPolicy(local_dc=url.local_dc or "")
        ),
        consistency_level=quorum,
        serial_consistency_level=serial,
        request_timeout=request_timeout_s,
        row_factory=dict_factory,
    )
    cluster = Cluster(
        contact_points=list(url.hosts),
        port=url.port,
        protocol_version=ProtocolVersion.V4,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        auth_provider=auth,
        connect_timeout=connect_timeout_s,
    )
    try:
        session = cluster.connect()
    except BaseException:
        cluster.shutdown()
        raise
    # Coordinators stamp plain writes, in the clock domain of Paxos ballots (module docstring).
    session.use_client_timestamp = False
    result: CqlSession = session
    return result


# -- schema migrations -----------------------------------------------------------------------

_MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS {keyspace}.schema_migrations "
    "(version int PRIMARY KEY, name text, applied_at timestamp)"
)


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned CQL file."""

    version: int
    name: str
    path: Path


def migration_files(cql_dir: Path | None = None) -> list[Migration]:
    """The CQL files of `cql_dir` (default: schemas/cql), by version."""
    folder = cql_dir if cql_dir is not None else Path(str(resources.files("schemas") / "cql"))
    found: dict[int, Migration] = {}
    for path in sorted(folder.glob("*.cql")):
        match = _MIGRATION_FILE.fullmatch(path.name)
        if match is None:
            raise ValueError(f"{path}: a migration file is named NNN_name.cql (001_initial.cql)")
        version = int(match[1])
        if version in found:
            raise ValueError(f"{path} and {found[version].path} have the same version {version}")
        found[version] = Migration(version, match[2], path)
    return [found[v] for v in sorted(found)]


def split_cql(text: str) -> list[str]:
    """The statements of a CQL script: split at `;` outside strings, comments dropped.

    Knows '...' strings ('' escapes a quote), "..." identifiers, $$...$$ literals, and
    -- and // line comments and /* */ block comments.
    """
    statements: list[str] = []
    current: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        pair = text[i : i + 2]
        if pair in ("--", "//"):
            end = text.find("\n", i)
            i = n if end < 0 else end
            current.append(" ")
        elif pair == "/*":
            end = text.find("*/", i + 2)
            if end < 0:
                raise ValueError("unterminated /* comment in CQL")
            i = end + 2
            current.append(" ")
        elif ch in "'\"" or pair == "$$":
            close = "$$" if pair == "$$" else ch
            j = i + len(close)
            while True:
                j = text.find(close, j)
                if j < 0:
                    raise ValueError(f"unterminated {close} literal in CQL")
                if close != "$$" and text[j + 1 : j + 2] == close:  # '' or "" escape
                    j += 2
                    continue
                break
            current.append(text[i : j + len(close)])
            i = j + len(close)
        elif ch == ";":
            statements.append("".join(current))
            current = []
            i += 1
        else:
            current.append(ch)
            i += 1
    statements.append("".join(current))
    return [s.strip() for s in statements if s.strip()]


def _check_keyspace(keyspace: str) -> str:
    if not _KEYSPACE.fullmatch(keyspace):
        raise ValueError(
            f"keyspace {keyspace!r} must be a letter then up to 47 letters, digits or underscores"
        )
    return keyspace


def _ttl(ttl_s: float) -> int:
    return max(1, math.ceil(ttl_s))


def keyspace_cql(keyspace: str, replication: int, dc: str | None = None) -> str:
    """CREATE KEYSPACE IF NOT EXISTS: SimpleStrategy N, or NetworkTopologyStrategy {dc: N}."""
    _check_keyspace(keyspace)
    if replication < 1:
        raise ValueError(f"replication must be at least 1, got {replication}")
    if dc is None:
        strategy = f"{{'class': 'SimpleStrategy', 'replication_factor': {replication}}}"
    else:
        if not _DC.fullmatch(dc):
            raise ValueError(f"{dc!r} is not a datacenter name")
        strategy = f"{{'class': 'NetworkTopologyStrategy', '{dc}': {replication}}}"
    return f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {strategy}"


def migrate(
    session: CqlSession,
    keyspace: str,
    ttl_s: float,
    replication: int = 1,
    *,
    dc: str | None = None,
    cql_dir: Path | None = None,
    clock: Callable[[], float] = time.time,
) -> list[int]:
    """Create the keyspace, apply the CQL files not yet applied, in order; their versions.

    Safe to run twice (the second run applies nothing). An existing keyspace keeps its
    replication: change that with ALTER KEYSPACE and a repair, by hand. Run it from one place
    (`fanfare store migrate`), not from every worker: concurrent schema changes disagree.
    """
    _check_keyspace(keyspace)
    ttl = _ttl(ttl_s)
    session.execute(keyspace_cql(keyspace, replication, dc))
    session.execute(_MIGRATIONS_TABLE.replace("{keyspace}", keyspace))
    done = {
        int(row["version"])
        for row in session.execute(f"SELECT version FROM {keyspace}.schema_migrations")
    }
    applied: list[int] = []
    for migration in migration_files(cql_dir):
        if migration.version in done:
            continue
        text = migration.path.read_text(encoding="utf-8")
        text = text.replace("{keyspace}", keyspace).replace("{ttl_s}", str(ttl))
        for statement in split_cql(text):
            session.execute(statement)
        session.execute(
            f"INSERT INTO {keyspace}.schema_migrations (version, name, applied_at) "
            "VALUES (%s, %s, %s)",
            (migration.version, migration.name, round(clock() * 1000)),
        )
        applied.append(migration.version)
    return applied


# -- shared helpers --------------------------------------------------------------------------


def _prepare(
    session: CqlSession, keyspace: str, cql: str, level: int, serial: int | None = None
) -> Any:
    """Prepare once; the statement carries its consistency (and serial) level."""
    try:
        statement = session.prepare(cql)
    except InvalidRequest as exc:
        raise SchemaMissing(
            f"keyspace {keyspace} lacks fanfare's tables ({exc}): run `fanfare store migrate` "
            "with this store URL first"
        ) from exc
    statement.consistency_level = level
    if serial is not None:
        statement.serial_consistency_level = serial
    return statement


class _Statements:
    """Runs prepared statements with bounded concurrency; rows are dicts."""

    def __init__(self, session: CqlSession, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.session = session
        self.concurrency = concurrency

    def one(self, statement: Any, params: Sequence[object]) -> list[Row]:
        return list(self.session.execute(statement, params))

    def each(self, statement: Any, params: Sequence[Sequence[object]]) -> list[list[Row]]:
        """One statement per parameter tuple, at most `concurrency` in flight; raises on error."""
        if not params:
            return []
        results = self.session.execute_concurrent_with_args(
            statement, params, concurrency=self.concurrency, raise_on_first_error=True
        )
        return [list(r.result_or_exc) for r in results]

    def mixed(self, pairs: Sequence[tuple[Any, Sequence[object]]]) -> None:
        """Several statements, each with its parameters, bounded the same way."""
        if pairs:
            self.session.execute_concurrent(
                list(pairs), concurrency=self.concurrency, raise_on_first_error=True
            )


def _ms(value: datetime) -> int:
    """Epoch milliseconds of a driver timestamp (naive UTC) or an aware datetime."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return (value - _EPOCH) // timedelta(milliseconds=1)


def month_bucket(created_ms: int) -> str:
    """The inbox partition of a time: 'YYYY-MM' (UTC)."""
    return _month_name(_month_index(created_ms))


def _month_index(ms: int) -> int:
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.year * 12 + moment.month - 1


def _month_name(index: int) -> str:
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def _flags(row: Row) -> int:
    return edge_flags(bool(row.get("notify_on_post")), bool(row.get("muted")))


# -- the follower store ----------------------------------------------------------------------


class CassandraFollowerStore(FollowerStore):
    """Follow edges in `followers`, counts in `author_stats` (counters), shard count checked."""

    def __init__(
        self,
        session: CqlSession,
        keyspace: str,
        shard_count: int,
        *,
        consistency: str = "local_quorum",
        concurrency: int = DEFAULT_CONCURRENCY,
        owns_cluster: bool = False,
    ) -> None:
        self.shard_count = shard_count
        self.keyspace = _check_keyspace(keyspace)
        self._session = session
        self._owns_cluster = owns_cluster
        self._run = _Statements(session, concurrency)
        q, serial = _LEVELS[consistency]
        ks = keyspace

        def prep(cql: str, level: int, serial_level: int | None = None) -> Any:
            return _prepare(session, ks, cql, level, serial_level)

        self._meta_claim = prep(
            f"INSERT INTO {ks}.store_meta (key, value) VALUES ('shard_count', ?) IF NOT EXISTS",
            q,
            serial,
        )
        self._edge_get = prep(
            f"SELECT notify_on_post, muted FROM {ks}.followers "
            "WHERE author_id = ? AND shard_id = ? AND follower_id = ?",
            q,
        )
        self._edge_put = prep(
            f"INSERT INTO {ks}.followers (author_id, shard_id, follower_id, notify_on_post, muted) "
            "VALUES (?, ?, ?, ?, ?)",
            q,
        )
        self._edge_delete = prep(
            f"DELETE FROM {ks}.followers WHERE author_id = ? AND shard_id = ? AND follower_id = ?",
            q,
        )
        self._page = prep(
            f"SELECT follower_id, notify_on_post, muted FROM {ks}.followers "
            "WHERE author_id = ? AND shard_id = ? AND follower_id > ? LIMIT ?",
            q,
        )
        self._count_add = prep(
            f"UPDATE {ks}.author_stats SET followers = followers + ? WHERE author_id = ?", q
        )
        self._count_get = prep(f"SELECT followers FROM {ks}.author_stats WHERE author_id = ?", ONE)
        self._check_shard_count()

    @classmethod
    def open(
        cls,
        url: str,
        shard_count: int,
        *,
        username: str | None = None,
        password_file: str | Path | None = None,
    ) -> CassandraFollowerStore:
        """Connect (per worker) and open the store of a `cassandra://` URL."""
        parsed = parse_url(url)
        session = connect(parsed, username=username, password_file=password_file)
        try:
            return cls(
                session,
                parsed.keyspace,
                shard_count,
                consistency=parsed.consistency,
                owns_cluster=True,
            )
        except BaseException:
            session.cluster.shutdown()
            raise

    def _check_shard_count(self) -> None:
        row = self._run.one(self._meta_claim, (str(self.shard_count),))[0]
        self.recorded_shard_count = bool(row.get("[applied]"))  # this open wrote it
        if self.recorded_shard_count:
            return
        stored = row.get("value")
        if stored != str(self.shard_count):
            raise StoreMismatch(
                f"keyspace {self.keyspace} was built with {stored} shards but "
                f"FANFARE_SHARDS={self.shard_count}; use the original shard count or re-import "
                "the follower graph into a new keyspace"
            )

    def apply_follow_changes(self, changes: Sequence[FollowChange]) -> None:
        """Apply in order: read the touched edges, fold the changes, write each edge once.

        One write per edge keeps the order right however the concurrent writes land; the
        counts move by the edges that appeared or disappeared, so they stay exact unless two
        writers change the same edge at once (follow_changes are keyed by author: they don't).
        """
        if not changes:
            return
        keys = list(dict.fromkeys((c.author_id, c.follower_id) for c in changes))
        found = self._run.each(
            self._edge_get, [(a, shard_of(f, self.shard_count), f) for a, f in keys]
        )
        before: dict[tuple[str, str], int | None] = {
            key: _flags(rows[0]) if rows else None for key, rows in zip(keys, found, strict=True)
        }
        after = dict(before)
        delta: Counter[str] = Counter()
        for c in changes:
            key = (c.author_id, c.follower_id)
            if c.op == "follow":
                if after[key] is None:
                    delta[c.author_id] += 1
                after[key] = edge_flags(c.notify_on_post, c.muted)
            else:
                if after[key] is not None:
                    delta[c.author_id] -= 1
                after[key] = None
        writes: list[tuple[Any, Sequence[object]]] = []
        for author_id, follower_id in keys:
            flags = after[(author_id, follower_id)]
            if flags == before[(author_id, follower_id)]:
                continue
            shard = shard_of(follower_id, self.shard_count)
            if flags is None:
                writes.append((self._edge_delete, (author_id, shard, follower_id)))
            else:
                writes.append(
                    (
                        self._edge_put,
                        (
                            author_id,
                            shard,
                            follower_id,
                            bool(flags & FLAG_NOTIFY_ON_POST),
                            bool(flags & FLAG_MUTED),
                        ),
                    )
                )
        self._run.mixed(writes)
        self._run.each(self._count_add, [(n, a) for a, n in delta.items() if n])

    def follower_page(
        self, author_id: str, shard_id: int, after: str | None, limit: int
    ) -> list[FollowerRow]:
        """`follower_id > after` in clustering order, `limit` rows."""
        rows = self._run.one(self._page, (author_id, shard_id, after or "", limit))
        return [(r["follower_id"], _flags(r)) for r in rows]

    def follow_flags(self, author_id: str, follower_id: str) -> int | None:
        """Point read of one edge."""
        rows = self._run.one(
            self._edge_get, (author_id, shard_of(follower_id, self.shard_count), follower_id)
        )
        return _flags(rows[0]) if rows else None

    def follower_count(self, author_id: str) -> int:
        """The counter: an estimate (a retried counter write may count twice), for the lane."""
        rows = self._run.one(self._count_get, (author_id,))
        return max(0, int(rows[0]["followers"] or 0)) if rows else 0

    def bulk_load(self, edges: Iterable[tuple[str, str, int]]) -> int:
        """Upsert edges in concurrent chunks; counters move once per author, at the end.

        Counted as new edges: the counts are right for a load into an empty graph (`fanfare
        followers import`) and over-count edges loaded twice: an estimate, as documented.
        """
        written = 0
        counts: Counter[str] = Counter()
        chunk: dict[tuple[str, str], int] = {}
        for author_id, follower_id, flags in edges:
            written += 1
            chunk[(author_id, follower_id)] = flags
            if len(chunk) >= _BULK_CHUNK:
                self._write_edges(chunk, counts)
        self._write_edges(chunk, counts)
        self._run.each(self._count_add, [(n, a) for a, n in counts.items() if n])
        return written

    def _write_edges(self, chunk: dict[tuple[str, str], int], counts: Counter[str]) -> None:
        params = []
        for (author_id, follower_id), flags in chunk.items():
            params.append(
                (
                    author_id,
                    shard_of(follower_id, self.shard_count),
                    follower_id,
                    bool(flags & FLAG_NOTIFY_ON_POST),
                    bool(flags & FLAG_MUTED),
                )
            )
            counts[author_id] += 1
        self._run.each(self._edge_put, params)
        chunk.clear()

    def close(self) -> None:
        """Shut the cluster connection down when this store opened it."""
        if self._owns_cluster:
            self._owns_cluster = False
            self._session.cluster.shutdown()


# -- the notification store ------------------------------------------------------------------

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
        self.keyspace = _check_keyspace(keyspace)
        self._session = session
        self._owns_cluster = owns_cluster
        self._ttl_s = ttl_s
        self._ttl = _ttl(ttl_s)
        self._clock = clock
        self._run = _Statements(session, concurrency)
        q, serial = _LEVELS[consistency]
        ks = keyspace

        def prep(cql: str, level: int, serial_level: int | None = None) -> Any:
            return _prepare(session, ks, cql, level, serial_level)

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

        The same key twice in one call: the first copy claims, the second is answered as a
        duplicate (not its owner), as the SQLite adapter does. Each notification the call owns
        is written to notifications_by_id and notifications_by_user (idempotent upserts, also
        on a replay by the owner, so a crash between claim and notification loses nothing).
        """
        if not requests:
            return []
        now_ms = self._now_ms()
        answers: list[LedgerRow | None] = [None] * len(requests)
        first: list[int] = []
        seen: set[tuple[str, str]] = set()
        for i, r in enumerate(requests):
            if r.key in seen:
                answers[i] = LedgerRow(r.source + "#dup", "sending", 0, 0)
            else:
                seen.add(r.key)
                first.append(i)
        results = self._run.each(
            self._claim,
            [
                (*requests[i].key, requests[i].provider, requests[i].source, now_ms, self._ttl)
                for i in first
            ],
        )
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
        owned = [
            requests[i]
            for i in first
            if answers[i] is None or answers[i].owner == requests[i].source  # type: ignore[union-attr]
        ]
        self._write_notifications(owned)
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
            [(self._ttl, r.provider, r.source, now_ms, *r.key) for r in requests],
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

    def _write_notifications(self, owned: Sequence[SendRequest]) -> None:
        by_id: list[tuple[object, ...]] = []
        by_user: list[tuple[object, ...]] = []
        done: set[str] = set()
        for r in owned:
            nid = r.item["notification_id"]
            if nid in done:
                continue
            done.add(nid)
            created_ms = round(r.created_ts * 1000)
            month = month_bucket(created_ms)
            user = r.item["user_id"]
            template = NOTIFICATION_TEMPLATE
            by_id.append(
                (nid, user, r.post_id, r.author_id, template, created_ms, month, self._ttl)
            )
            by_user.append(
                (user, month, created_ms, nid, r.post_id, r.author_id, template, self._ttl)
            )
        self._run.mixed(
            [(self._note_by_id, p) for p in by_id] + [(self._note_by_user, p) for p in by_user]
        )

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
                    requests[i].source,
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
        concurrent writes to one row have no order between them.
        """
        if not updates:
            return
        at_ms = round(at * 1000)
        last = {u.key: u for u in updates}
        pairs: list[tuple[Any, Sequence[object]]] = [
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
            for u in last.values()
        ]
        pairs += [
            (
                self._attempt,
                (u.key[0], at_ms, u.key[1], u.attempts, u.state, u.status, u.reason, self._ttl),
            )
            for u in updates
            if u.attempted
        ]
        self._run.mixed(pairs)

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
            _ms(r["created_at"]),
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
                _ms(r["updated_at"]) / 1000 if r.get("updated_at") is not None else 0.0,
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
                _ms(r["attempted_at"]) / 1000,
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
                _ms(r["created_at"]),
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
