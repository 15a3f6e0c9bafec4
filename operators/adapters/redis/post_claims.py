"""Post claims: the fast, cross-process dedupe of `post_created` events.

A claim binds a post_id to the identity of the message that first carried it
(`topic/partition@offset`). The same message read again (a replay after a restart) still owns
its claim and fans out again, its output deduped downstream; a different message with the same
post_id (a re-delivered or re-published duplicate) is refused. Claims expire after a TTL.

Redis outages. Post claims are the fan-out's dedupe authority for posts, so a claim is never
skipped: while Redis does not answer, a claim is retried with bounded exponential backoff
(`retry_for_s`, 60 s by default: a failover or a restart rides through in the same process),
then `RedisUnavailable` fails the worker and the supervisor restarts the flow from its last
snapshot (visible in /live; it gives up after --max-restarts). Retrying a claim is idempotent
(the same identity owns its own claim). If Redis comes back EMPTY (no persistence), the claims
are gone: a duplicate `post_created` read after that is fanned out again, and the delivery
ledger (the notification store's unique key) still keeps every device at one push.
"""

from __future__ import annotations

from collections.abc import Sequence

from operators.adapters.redis.client import PerThreadRedis, fail_fast_options, retry_while_down
from operators.fanout.ports import PostClaims

_CLAIM_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""


class RedisPostClaims(PostClaims):
    """Claims in Redis (SET NX EX, one pipelined script call per batch of posts).

    While Redis does not answer, a batch is retried for up to `retry_for_s` seconds (the
    worker waits), then RedisUnavailable fails the worker (see the module docstring).
    """

    def __init__(
        self, url: str, prefix: str, ttl_s: int, retry_for_s: float = 60.0, *, kind: str = "post"
    ) -> None:
        # `kind` is the key space: API notifications claim their ids apart from post ids.
        self._prefix = f"{prefix}{kind}:"
        self._ttl = ttl_s
        self._retry_for_s = retry_for_s
        self._redis = PerThreadRedis(
            url, health_check_interval=30, **fail_fast_options(socket_timeout=10)
        )

    def claim(self, claims: Sequence[tuple[str, str]]) -> list[bool]:
        """Atomic per post; one round trip per batch (retried while Redis is down)."""
        if not claims:
            return []
        return retry_while_down(
            lambda: self._claim_once(claims), what="post claims", retry_for_s=self._retry_for_s
        )

    def _claim_once(self, claims: Sequence[tuple[str, str]]) -> list[bool]:
        script = self._redis.script(_CLAIM_SCRIPT)
        pipe = self._redis().pipeline(transaction=False)
        for post_id, identity in claims:
            script(keys=[f"{self._prefix}{post_id}"], args=[identity, self._ttl], client=pipe)
        return [bool(r) for r in pipe.execute()]
