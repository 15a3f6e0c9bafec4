"""Channel writers' start marks in Redis: where a recovery lineage's writer first wrote."""

from __future__ import annotations

import redis

from operators.adapters.redis.client import fail_fast_options, retry_while_down


class RedisWriterStartMarks:
    """Where each channel writer of a recovery lineage first began writing (SET NX, a TTL).

    A writer that Bytewax builds with no snapshot reads back from its mark, so that what it
    (or an earlier execution of the same lineage) wrote is not written again. A mark is never
    cleared by a snapshot: the resume epoch is the slowest worker's last durable one, so a
    cluster can resume from before a writer's first snapshot well after that snapshot was
    taken (a kill -9 of one member while another member's writer had snapshotted: every push
    written so far was written again). A writer with a snapshot never reads its mark, so a
    held mark costs nothing; it expires `ttl_s` after the last writer that needed it was built.
    Marks are keyed by the recovery directory's lineage (`recovery_marker`): a new directory
    starts over. `mark` is retried like a post claim while Redis is down (then
    RedisUnavailable): without it a crash could repeat every write.
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        lineage: str = "",
        ttl_s: int = 86_400,
        retry_for_s: float = 60.0,
    ) -> None:
        self._client = redis.Redis.from_url(url, **fail_fast_options(socket_timeout=10))
        self._prefix = f"{prefix}writer-start:{lineage + ':' if lineage else ''}"
        self._ttl = ttl_s
        self._retry_for_s = retry_for_s

    def mark(self, part: str, offset: int) -> int:
        """Record `offset` unless the lineage holds an earlier mark; return the held one."""
        key = f"{self._prefix}{part}"

        def once() -> int:
            pipe = self._client.pipeline(transaction=True)
            pipe.set(key, offset, nx=True, ex=self._ttl)
            pipe.get(key)
            pipe.expire(key, self._ttl)
            _, held, _ = pipe.execute()
            return offset if held is None else int(held)

        return retry_while_down(
            once, what=f"writer start mark {part}", retry_for_s=self._retry_for_s
        )
