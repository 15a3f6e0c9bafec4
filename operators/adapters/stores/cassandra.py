"""Cassandra for both stores: the URL, the connection, the migrations, the statement runner.

The stores themselves are `cassandra_followers` and `cassandra_notifications` (the same ports as
SQLite); what they share, and why each statement runs at its consistency level, is here.

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
    follower_page, follower_column,       Q           an unfollow or mute must be honoured:
      follow_flags                                    never read only a replica that missed it
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
    record's UPDATEs and attempt INSERTs  Q           as its statements; one unlogged batch per
      (one partition: a notification)                 notification_id (both tables' partition
                                                      key): one request, applied as one
                                                      mutation on the partition's replicas
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
from collections.abc import Callable, Sequence
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
from cassandra.query import BatchStatement, BatchType  # type: ignore[import-untyped]

DEFAULT_PORT = 9042
DEFAULT_CONCURRENCY = 64  # statements in flight per call (execute_concurrent's cap)
WAVE_MAX = 2_048  # statements in flight at once in a wave (a slice's ledger claim)
BATCH_MAX = 16  # statements per unlogged batch: well under Cassandra's 5 KB batch warning
_KEYSPACE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")
_DC = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")
_MIGRATION_FILE = re.compile(r"(\d{3,})_([a-z0-9_]+)\.cql")
LEVELS = {
    "local_quorum": (ConsistencyLevel.LOCAL_QUORUM, ConsistencyLevel.LOCAL_SERIAL),
    "quorum": (ConsistencyLevel.QUORUM, ConsistencyLevel.SERIAL),
}
ONE = ConsistencyLevel.LOCAL_ONE
_EPOCH = datetime(1970, 1, 1)
_URL_FORM = "cassandra://host1,host2[:port]/keyspace[?dc=DC&replication=N&consistency=LEVEL]"

Row = dict[str, Any]


class SchemaMissing(RuntimeError):
    """The keyspace lacks fanfare's tables: `fanfare store migrate` creates them."""


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
    if consistency not in LEVELS:
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
    from cassandra.query import dict_factory

    if (username is None) != (password_file is None):
        raise ValueError("Cassandra authentication needs both a username and a password file")
    auth = (
        PlainTextAuthProvider(username=username, password=read_password(password_file))
        if username is not None and password_file is not None
        else None
    )
    quorum, serial = LEVELS[url.consistency]
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


def check_keyspace(keyspace: str) -> str:
    """The keyspace name, if CQL can take it unquoted; ValueError otherwise."""
    if not _KEYSPACE.fullmatch(keyspace):
        raise ValueError(
            f"keyspace {keyspace!r} must be a letter then up to 47 letters, digits or underscores"
        )
    return keyspace


def ttl_seconds(ttl_s: float) -> int:
    """A TTL as CQL takes it: whole seconds, at least one."""
    return max(1, math.ceil(ttl_s))


def keyspace_cql(keyspace: str, replication: int, dc: str | None = None) -> str:
    """CREATE KEYSPACE IF NOT EXISTS: SimpleStrategy N, or NetworkTopologyStrategy {dc: N}."""
    check_keyspace(keyspace)
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
    check_keyspace(keyspace)
    ttl = ttl_seconds(ttl_s)
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


def prepare(
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


class Statements:
    """Runs prepared statements with bounded concurrency; rows are dicts."""

    def __init__(self, session: CqlSession, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.session = session
        self.concurrency = concurrency

    def one(self, statement: Any, params: Sequence[object]) -> list[Row]:
        """One statement's rows."""
        return list(self.session.execute(statement, params))

    def each(self, statement: Any, params: Sequence[Sequence[object]]) -> list[list[Row]]:
        """One statement per parameter tuple, at most `concurrency` in flight; raises on error."""
        if not params:
            return []
        results = self.session.execute_concurrent_with_args(
            statement, params, concurrency=self.concurrency, raise_on_first_error=True
        )
        return [list(r.result_or_exc) for r in results]

    def wave(self, pairs: Sequence[tuple[Any, Sequence[object] | None]]) -> list[list[Row]]:
        """Several statements all in flight at once (up to WAVE_MAX): one round trip's time.

        Each one's rows, in order; raises on error.
        """
        if not pairs:
            return []
        results = self.session.execute_concurrent(
            list(pairs),
            concurrency=min(WAVE_MAX, max(self.concurrency, len(pairs))),
            raise_on_first_error=True,
        )
        return [list(r.result_or_exc) for r in results]

    def mixed(self, pairs: Sequence[tuple[Any, Sequence[object] | None]]) -> None:
        """Several statements, each with its parameters, bounded the same way."""
        if pairs:
            self.session.execute_concurrent(
                list(pairs), concurrency=self.concurrency, raise_on_first_error=True
            )


def unlogged(
    pairs: Sequence[tuple[Any, Sequence[object]]], level: int
) -> list[tuple[Any, Sequence[object] | None]]:
    """One partition's writes as UNLOGGED batches of up to BATCH_MAX (a lone one as itself).

    The Python driver's CPU is per request, so a partition's writes cost one request, not one
    each; a batch on one partition key (across tables of the keyspace) is one mutation, with no
    batch log and no coordinator fan-out. Never for writes to different partitions.
    """
    if len(pairs) == 1:
        return [pairs[0]]
    out: list[tuple[Any, Sequence[object] | None]] = []
    for start in range(0, len(pairs), BATCH_MAX):
        batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=level)
        for statement, params in pairs[start : start + BATCH_MAX]:
            batch.add(statement, params)
        out.append((batch, None))
    return out


def epoch_ms(value: datetime) -> int:
    """Epoch milliseconds of a driver timestamp (naive UTC) or an aware datetime."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return (value - _EPOCH) // timedelta(milliseconds=1)


# -- the follower store ----------------------------------------------------------------------


# -- the notification store ------------------------------------------------------------------
