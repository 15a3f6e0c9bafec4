"""Open the follower or notification store a URL names: `sqlite:///PATH` or `cassandra://...`.

Cassandra's driver is imported only when a `cassandra://` URL is opened.
"""

from __future__ import annotations

from operators.adapters.stores.sqlite_followers import SQLiteFollowerStore
from operators.adapters.stores.sqlite_notifications import SQLiteNotificationStore
from operators.delivery.ports import NotificationStore
from operators.fanout.ports import FollowerStore


def open_follower_store(
    store_url: str,
    shard_count: int,
    *,
    username: str | None = None,
    password_file: str | None = None,
) -> FollowerStore:
    """Build the adapter FANFARE_STORE_URL names (per worker; never at import time)."""
    if store_url.startswith("sqlite:///"):
        return SQLiteFollowerStore(store_url.removeprefix("sqlite:///"), shard_count)
    if store_url.startswith("cassandra://"):
        from operators.adapters.stores.cassandra_followers import CassandraFollowerStore

        return CassandraFollowerStore.open(
            store_url, shard_count, username=username, password_file=password_file
        )
    raise ValueError(
        f"unsupported FANFARE_STORE_URL {store_url!r}: use sqlite:///PATH or "
        "cassandra://host1,host2/keyspace"
    )


def open_notification_store(
    url: str,
    ttl_s: float = 604_800,
    *,
    username: str | None = None,
    password_file: str | None = None,
) -> NotificationStore:
    """Build the adapter the URL names (per worker; never at import time)."""
    if url.startswith("sqlite:///"):
        return SQLiteNotificationStore(url.removeprefix("sqlite:///"), ttl_s=ttl_s)
    if url.startswith("cassandra://"):
        from operators.adapters.stores.cassandra_notifications import CassandraNotificationStore

        return CassandraNotificationStore.open(
            url, ttl_s, username=username, password_file=password_file
        )
    raise ValueError(
        f"unsupported FANFARE_NOTIFICATION_STORE_URL {url!r}: use sqlite:///PATH or "
        "cassandra://host1,host2/keyspace"
    )
