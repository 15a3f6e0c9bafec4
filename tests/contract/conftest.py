"""The stores every adapter must pass: SQLite always, Cassandra when FANFARE_CASSANDRA_HOSTS is set.

No Cassandra server can be had on the machines that build fanfare, so there the Cassandra
parameter is skipped with that reason. docker-compose.yml runs one: see docs/operations.md,
"Cassandra", for the command that runs this suite against it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from operators.adapters.stores.sqlite_followers import SQLiteFollowerStore
from operators.adapters.stores.sqlite_notifications import SQLiteNotificationStore
from operators.delivery.ports import NotificationStore
from operators.fanout.ports import FollowerStore

CASSANDRA_HOSTS = os.environ.get("FANFARE_CASSANDRA_HOSTS", "")
NO_CASSANDRA = (
    "FANFARE_CASSANDRA_HOSTS is not set: no Cassandra server on this machine "
    "(docker compose up -d cassandra, then FANFARE_CASSANDRA_HOSTS=127.0.0.1)"
)
ADAPTERS = [
    "sqlite",
    pytest.param("cassandra", marks=pytest.mark.skipif(not CASSANDRA_HOSTS, reason=NO_CASSANDRA)),
]

NotificationStoreFactory = Callable[..., NotificationStore]


@pytest.fixture(scope="session")
def cassandra_keyspace() -> Iterator[str]:
    """A fresh keyspace for this run, migrated, dropped at the end."""
    from operators.adapters.stores import cassandra as cassandra_store

    keyspace = f"fanfare_contract_{uuid.uuid4().hex[:10]}"
    url = f"cassandra://{CASSANDRA_HOSTS}/{keyspace}"
    session = cassandra_store.connect(cassandra_store.parse_url(url))
    cassandra_store.migrate(session, keyspace, ttl_s=604_800, replication=1)
    try:
        yield url
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        session.cluster.shutdown()


@pytest.fixture(params=ADAPTERS)
def notification_store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[NotificationStoreFactory]:
    """Build a store (ttl_s as asked); every one built is closed at the end."""
    built: list[NotificationStore] = []

    def make(ttl_s: float = 604_800) -> NotificationStore:
        store: NotificationStore
        if request.param == "sqlite":
            store = SQLiteNotificationStore(tmp_path / "notifications.db", ttl_s=ttl_s)
        else:
            from operators.adapters.stores.cassandra_notifications import (
                CassandraNotificationStore,
            )

            url = request.getfixturevalue("cassandra_keyspace")
            store = CassandraNotificationStore.open(url, ttl_s=ttl_s)
        built.append(store)
        return store

    yield make
    for store in built:
        store.close()


def follower_store(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, shards: int
) -> FollowerStore:
    """A follower store of an adapter kind (tests use ids of their own: stores are shared)."""
    if kind == "sqlite":
        return SQLiteFollowerStore(tmp_path / "followers.db", shards)
    from operators.adapters.stores.cassandra_followers import CassandraFollowerStore

    url = request.getfixturevalue("cassandra_keyspace")
    return CassandraFollowerStore.open(url, shards)
