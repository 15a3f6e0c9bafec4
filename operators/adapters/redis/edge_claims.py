"""Edge claims: the fast path of "one push per (post, user, device)", in Redis.

Before a dispatch item is sent, `SET key=<message identity> NX GET EX ttl` claims it. A new
claim (or our own, when the same message is replayed) goes on to the notification store, which
is the authority; a claim held by a different message is a duplicate and stops here, without a
store round trip. If Redis lost its data, the store's unique key still refuses the duplicate.

Redis outages. The claim is only a fast path, so a connection error never fails a send: the
batch is answered "claimed now" (None) for every item, which sends each to the store's claim,
exactly as a first claim does; the store decides. After an error, Redis is tried again at most
once per `probe_s` (RedisOutage), so an outage costs no connection attempt per batch. When Redis
comes back empty, old claims are gone and the store alone refuses duplicates (as above); new
claims are written again from then on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from operators.adapters.redis.client import (
    REDIS_DOWN_ERRORS,
    PerThreadRedis,
    RedisOutage,
    fail_fast_options,
)
from operators.delivery.ports import EdgeClaims

_CLAIM_SCRIPT = """
local ttl = ARGV[1]
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('SET', key, ARGV[i + 1], 'NX', 'GET', 'EX', ttl) or ''
end
return out
"""
"""`SET key identity NX GET EX ttl` for every key of a batch: one command to pack and one reply
to parse, where a pipeline costs the client a command each (about 5 times the CPU per claim).
'' stands for "claimed now" (a Lua nil would end the reply's list). Used for a batch whose ids
contain a tab or a newline (`_PACKED_SCRIPT`'s separators)."""

_PACKED_SCRIPT = r"""
local ttl = ARGV[1]
local out = {}
local i = 0
for key, identity in string.gmatch(ARGV[2], '([^\t]*)\t([^\n]*)\n') do
  i = i + 1
  local held = redis.call('SET', key, identity, 'NX', 'GET', 'EX', ttl)
  if held then
    out[#out + 1] = i
    out[#out + 1] = held
  end
end
return out
"""
"""The same claims, packed: the batch's "key TAB identity NEWLINE" lines as one argument, and
in the reply only the claims already held, as (position from 1, holder) pairs. The client packs
two arguments and parses an empty reply instead of a hundred each way (a microbenchmark of
100-claim batches: 2.6 instead of about 8 µs of client CPU per claim). The keys are not declared
in KEYS, so this needs a standalone Redis (as the per-key script does: a batch's keys span
cluster slots)."""


class RedisEdgeClaims(EdgeClaims):
    """One round trip per batch (one script call); keys expire after `ttl_s`.

    While Redis is unreachable every claim answers None (go to the store): see the module
    docstring. `bypassed` counts the claims answered that way.
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        ttl_s: int,
        probe_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._prefix = prefix
        self._ttl = ttl_s
        self._redis = PerThreadRedis(
            url, health_check_interval=30, **fail_fast_options(socket_timeout=5)
        )
        self.outage = RedisOutage("edge claims (skipped: the store decides)", probe_s, clock)
        self.bypassed = 0

    def claim(self, claims: Sequence[tuple[str, str, str]]) -> list[str | None]:
        """SET NX GET per claim (Redis 7); None for all when Redis does not answer."""
        if not claims:
            return []
        if self.outage.skip():
            self.bypassed += len(claims)
            return [None] * len(claims)
        started = self.outage.started()
        prefix = f"{self._prefix}edge:"
        packed = "".join(
            [f"{prefix}{nid}|{device}\t{identity}\n" for nid, device, identity in claims]
        )
        n = len(claims)
        try:
            if packed.count("\n") == n and packed.count("\t") == n:
                pairs = self._redis.script(_PACKED_SCRIPT)(args=[self._ttl, packed])
                holders: list[str | None] = [None] * n
                for at in range(0, len(pairs), 2):
                    holders[pairs[at] - 1] = pairs[at + 1].decode()
            else:  # an id holds a separator
                replies = self._redis.script(_CLAIM_SCRIPT)(
                    keys=[f"{prefix}{nid}|{device}" for nid, device, _ in claims],
                    args=[self._ttl, *(identity for _, _, identity in claims)],
                )
                holders = [r.decode() if r else None for r in replies]
        except REDIS_DOWN_ERRORS as exc:
            self.outage.failed(exc, started)
            self.bypassed += n
            return [None] * n
        self.outage.answered()
        return holders
