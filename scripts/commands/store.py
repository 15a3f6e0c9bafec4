"""`fanfare store migrate`: create or upgrade the stores' schema, SQLite or Cassandra.

SQLite stores create and upgrade their schema when opened, so for `sqlite:///` URLs this opens
them and says what that did. For `cassandra://` URLs it connects, creates the keyspace, applies
the CQL files of schemas/cql not applied yet (in version order) and records the follower
store's shard count, so a worker started with another FANFARE_SHARDS is refused.

Arguments (scripts/cli.py): `--replication N` and `--dc NAME`, both optional, override the
URL's `replication` and `dc` options; they only matter when the keyspace is created.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path
from typing import Any

from operators.adapters.stores import cassandra as cassandra_store
from operators.adapters.stores.cassandra_followers import CassandraFollowerStore
from operators.adapters.stores.sqlite_followers import SQLiteFollowerStore
from operators.adapters.stores.sqlite_notifications import SCHEMA_VERSION, SQLiteNotificationStore
from operators.config import Settings
from operators.fanout.ports import StoreMismatch
from scripts.commands.arguments import positive_int

FOLLOWERS = "follower store"
NOTIFICATIONS = "notification store"


def add_parser(sub: Any) -> None:
    """Register `fanfare store migrate`."""
    store = sub.add_parser("store", help="the follower and notification stores")
    store_sub = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    migrate = store_sub.add_parser(
        "migrate",
        help="create or upgrade both stores' schema (SQLite or Cassandra); safe to run twice",
    )
    migrate.add_argument(
        "--replication",
        type=positive_int,
        default=None,
        help="Cassandra replicas per datacenter when the keyspace is created (default: the "
        "URL's replication=, else 1)",
    )
    migrate.add_argument(
        "--dc", default=None, help="Cassandra datacenter for NetworkTopologyStrategy (or ?dc=)"
    )
    store.set_defaults(func=command)


def command(args: argparse.Namespace, settings: Settings) -> int:
    """Migrate both configured stores; 0 when both are ready, 1 when one failed, 2 on a bad URL."""
    stores = {
        FOLLOWERS: settings.resolved_store_url,
        NOTIFICATIONS: settings.resolved_notification_store_url,
    }
    clusters: dict[tuple[tuple[str, ...], int, str], list[str]] = {}
    parsed: dict[str, cassandra_store.CassandraUrl] = {}
    for label, url in stores.items():
        if url.startswith("cassandra://"):
            try:
                parsed[label] = cassandra_store.parse_url(url)
            except ValueError as exc:
                print(f"fanfare: {label}: {exc}", file=sys.stderr)
                return 2
            where = parsed[label]
            clusters.setdefault((where.hosts, where.port, where.keyspace), []).append(label)
        elif not url.startswith("sqlite:///"):
            print(
                f"fanfare: {label}: unsupported URL {url!r}: use sqlite:///PATH or "
                "cassandra://HOSTS/KEYSPACE",
                file=sys.stderr,
            )
            return 2
    code = 0
    if stores[FOLLOWERS].startswith("sqlite:///"):
        code = max(code, _sqlite_followers(stores[FOLLOWERS], settings))
    if stores[NOTIFICATIONS].startswith("sqlite:///"):
        code = max(code, _sqlite_notifications(stores[NOTIFICATIONS], settings))
    for labels in clusters.values():
        code = max(code, _cassandra(labels, parsed[labels[0]], args, settings))
    return code


def _sqlite_followers(url: str, settings: Settings) -> int:
    path = Path(url.removeprefix("sqlite:///"))
    existed = path.exists()
    try:
        SQLiteFollowerStore(path, settings.shard_count).close()
    except StoreMismatch as exc:
        print(f"fanfare: {FOLLOWERS}: {exc}", file=sys.stderr)
        return 1
    except (OSError, sqlite3.Error) as exc:
        print(f"fanfare: {FOLLOWERS}: cannot open {path}: {exc}", file=sys.stderr)
        return 1
    done = "ready" if existed else "created"
    print(f"{FOLLOWERS} {path}: {done} ({settings.shard_count} shards)")
    return 0


def _sqlite_notifications(url: str, settings: Settings) -> int:
    path = Path(url.removeprefix("sqlite:///"))
    try:
        store = SQLiteNotificationStore(path, ttl_s=settings.store_ttl_s)
    except (OSError, sqlite3.Error) as exc:
        print(f"fanfare: {NOTIFICATIONS}: cannot open {path}: {exc}", file=sys.stderr)
        return 1
    applied = list(store.migrated)
    store.close()
    if applied:
        versions = ", ".join(str(v) for v in applied)
        print(f"{NOTIFICATIONS} {path}: applied schema version(s) {versions}")
    else:
        print(f"{NOTIFICATIONS} {path}: up to date (schema version {SCHEMA_VERSION})")
    return 0


def _credentials(settings: Settings) -> tuple[str | None, str | None]:
    """FANFARE_CASSANDRA_USERNAME and FANFARE_CASSANDRA_PASSWORD_FILE, when Settings has them."""
    username = settings.cassandra_username or None
    password_file = settings.cassandra_password_file or None
    return username, password_file


def _connect_failure(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, dict) and errors:  # NoHostAvailable: why each host failed
        return "; ".join(f"{host}: {err}" for host, err in errors.items())
    return str(exc) or type(exc).__name__


def _cassandra(
    labels: list[str],
    url: cassandra_store.CassandraUrl,
    args: argparse.Namespace,
    settings: Settings,
) -> int:
    from cassandra import DriverException  # type: ignore[import-untyped]
    from cassandra.cluster import NoHostAvailable  # type: ignore[import-untyped]

    replication = getattr(args, "replication", None) or url.replication
    dc = getattr(args, "dc", None) or url.local_dc
    username, password_file = _credentials(settings)
    what = f"{' and '.join(labels)} on Cassandra {url.where}"
    try:
        session = cassandra_store.connect(url, username=username, password_file=password_file)
    except ValueError as exc:  # the password file
        print(f"fanfare: {what}: {exc}", file=sys.stderr)
        return 1
    except (NoHostAvailable, DriverException, OSError) as exc:
        print(
            f"fanfare: cannot connect to Cassandra at {url.where}: {_connect_failure(exc)}\n"
            "  Is it running and reachable? With docker compose: `docker compose up -d "
            "cassandra` (a first start takes a minute or two to accept connections).",
            file=sys.stderr,
        )
        return 1
    try:
        applied = cassandra_store.migrate(
            session, url.keyspace, settings.store_ttl_s, replication, dc=dc
        )
        names = {m.version: m.name for m in cassandra_store.migration_files()}
        if applied:
            done = ", ".join(f"{v:03d}_{names[v]}" for v in applied)
            print(f"{what}: applied {done}")
        else:
            print(f"{what}: up to date (schema version {max(names)})")
        if FOLLOWERS in labels:
            followers = CassandraFollowerStore(
                session, url.keyspace, settings.shard_count, consistency=url.consistency
            )
            verb = "recorded" if followers.recorded_shard_count else "matches the keyspace"
            print(f"{FOLLOWERS}: shard count {settings.shard_count} {verb}")
    except StoreMismatch as exc:
        print(f"fanfare: {FOLLOWERS}: {exc}", file=sys.stderr)
        return 1
    except (NoHostAvailable, DriverException) as exc:
        print(f"fanfare: migrating {what} failed: {_connect_failure(exc)}", file=sys.stderr)
        return 1
    finally:
        session.cluster.shutdown()
    return 0
