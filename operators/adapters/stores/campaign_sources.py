"""A campaign's recipients from the follower store: every follower of an author, shard by shard.

The cursor is `[shard, last follower id]` as JSON, so a restarted scheduler resumes where the
last committed chunk ended. Muted edges are skipped (the follower asked to hear nothing from
this author); `notify_on_post` is about posts and is not consulted. Preferences and opt-outs
are the flows' job once they read the marketing tier.
"""

from __future__ import annotations

import orjson

from operators.fanout.eligibility import FLAG_MUTED
from operators.fanout.ports import FollowerStore
from operators.notify.ports import RecipientSource


class FollowerRecipients(RecipientSource):
    """The followers of one author, in (shard, follower id) order."""

    def __init__(self, store: FollowerStore, author_id: str) -> None:
        self._store = store
        self._author = author_id

    def page(self, cursor: str | None, limit: int) -> tuple[list[str], str | None]:
        """Up to `limit` followers after the cursor, crossing shards as they run out."""
        shard, after = (0, None) if cursor is None else orjson.loads(cursor)
        users: list[str] = []
        while shard < self._store.shard_count and len(users) < limit:
            want = limit - len(users)
            rows = self._store.follower_page(self._author, shard, after, want)
            for follower_id, flags in rows:
                if not flags & FLAG_MUTED:
                    users.append(follower_id)
                after = follower_id
            if len(rows) < want:
                shard, after = shard + 1, None
        if shard >= self._store.shard_count:
            return users, None
        return users, orjson.dumps([shard, after]).decode()
