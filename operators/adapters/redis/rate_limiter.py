"""Rate limits: a token bucket per provider and app/project, in Redis, shared by every worker.

The bucket refills continuously at the configured rate (FCM's default quota is 600,000
messages a minute per project) and holds `burst_s` seconds of it. The bulk lane may not take
the last `bulk_reserve` share, so normal posts keep flowing while a celebrity campaign is paced
by whatever is left. The arithmetic is `operators.delivery.token_bucket.take`, mirrored in Lua
so that one round trip refills and takes atomically, on Redis' clock (workers' clocks may differ).

Redis outages: the limiter falls back to a *local bucket*. While Redis is unreachable each
worker paces itself at `rate / local_share` (a quarter of the rate, a quarter of the burst) and
tries Redis again at most once per `probe_s` (RedisOutage: no connection attempt per send, and
the event loop is never held by one); the first answer puts it back on the shared bucket (one
that Redis lost starts full). The choice, against the two others:

- stopping delivery (fail closed) would turn an outage of a pacing aid into an outage of every
  notification, and the ledger, not Redis, is what keeps pushes single;
- sending unpaced (fail open) would let a fleet burst far past the provider's quota, turning
  into 429s, retries and possibly throttling by the provider.

A quarter keeps a fleet of up to four workers within the quota; a fleet of W > 4 workers may
send up to W/4 times the quota during an outage, and the provider's 429s then go through the
retry path (Retry-After honoured) and the circuit breaker. Tested in tests/reliability.

`AsyncRedisRateLimiter` is the same bucket, script and fallback over redis.asyncio, for the
channel senders' per-destination pacing (`operators/adapters/channels/pacing.py`), which runs
on the worker's event loop where a blocking call would hold every send in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from operators.adapters.channels.ports import DestinationLimiter
from operators.adapters.redis.client import (
    REDIS_DOWN_ERRORS,
    PerThreadRedis,
    RedisOutage,
    fail_fast_options,
)
from operators.delivery.ports import RateLimiter
from operators.delivery.token_bucket import BucketSpec, Grant, take

log = logging.getLogger(__name__)

_TAKE_SCRIPT = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
local reserve = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = tonumber(b[1]) or capacity
local at = tonumber(b[2]) or now
level = math.min(capacity, level + math.max(0, now - at) * rate)
local available = math.max(0, level - reserve)
local granted = math.min(wanted, math.floor(available))
level = level - granted
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
local short = wanted - granted
local wait = 0
if short > 0 then wait = (short - (available - granted)) / rate end
return {granted, tostring(wait)}
"""


class LocalRateLimiter(RateLimiter):
    """A bucket in this process (tests, and the fallback while Redis is unreachable)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, share: float = 1.0) -> None:
        self._clock = clock
        self._share = share
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, spec: BucketSpec, wanted: int, lane: str) -> Grant:
        """Refill and take."""
        rate, capacity = spec.rate / self._share, spec.capacity / self._share
        now = self._clock()
        with self._lock:
            level, at = self._buckets.get(spec.name, (capacity, now))
            grant, level = take(
                level,
                at,
                now,
                rate=rate,
                capacity=capacity,
                wanted=wanted,
                reserve=spec.reserve_for(lane) / self._share,
            )
            self._buckets[spec.name] = (level, now)
        return grant


class _SharedBucket:
    """What the sync and async Redis limiters share.

    The script's key and arguments, and the local bucket they fall back on while Redis is
    unreachable (one `RedisOutage` each).
    """

    def __init__(
        self, prefix: str, local_share: float, probe_s: float, clock: Callable[[], float], what: str
    ) -> None:
        # `what`: how an outage is logged (what it costs while it lasts)
        self._prefix = prefix
        self._fallback = LocalRateLimiter(clock=clock, share=local_share)
        self.outage = RedisOutage(what, probe_s, clock)
        self.fallbacks = 0

    def _keys(self, spec: BucketSpec) -> list[str]:
        """The take script's keys."""
        return [f"{self._prefix}ratelimit:{spec.name}"]

    @staticmethod
    def _args(spec: BucketSpec, wanted: int, lane: str) -> list[float]:
        """The take script's arguments."""
        return [spec.rate, spec.capacity, wanted, spec.reserve_for(lane)]

    def _local(self, spec: BucketSpec, wanted: int, lane: str) -> Grant:
        self.fallbacks += 1
        return self._fallback.take(spec, wanted, lane)


class RedisRateLimiter(_SharedBucket, RateLimiter):
    """The shared bucket; one script call per take."""

    def __init__(
        self,
        url: str,
        prefix: str,
        local_share: float = 4.0,
        probe_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            prefix,
            local_share,
            probe_s,
            clock,
            f"rate limiter (pacing on a local bucket at 1/{local_share:g} of the rate)",
        )
        self._redis = PerThreadRedis(url, **fail_fast_options(socket_timeout=2))

    def take(self, spec: BucketSpec, wanted: int, lane: str) -> Grant:
        """Take from Redis, or from the local bucket while Redis is unreachable."""
        if wanted <= 0:
            return Grant(0, 0.0)
        if self.outage.skip():
            return self._local(spec, wanted, lane)
        started = self.outage.started()
        try:
            granted, wait = self._redis.script(_TAKE_SCRIPT)(
                keys=self._keys(spec), args=self._args(spec, wanted, lane)
            )
        except REDIS_DOWN_ERRORS as exc:
            self.outage.failed(exc, started)
            return self._local(spec, wanted, lane)
        self.outage.answered()
        return Grant(int(granted), float(wait))


class AsyncLocalRateLimiter(DestinationLimiter):
    """A `LocalRateLimiter` behind the async port (tests; it does no I/O)."""

    def __init__(self, local: LocalRateLimiter) -> None:
        self._local = local

    async def take(self, spec: BucketSpec, wanted: int, lane: str) -> Grant:
        """Refill and take."""
        return self._local.take(spec, wanted, lane)


class AsyncRedisRateLimiter(_SharedBucket, DestinationLimiter):
    """The shared bucket over redis.asyncio, one script call per take.

    The same script and local fallback while Redis is unreachable as `RedisRateLimiter`.
    """

    def __init__(
        self,
        client: Any,  # redis.asyncio.Redis, made on the worker's event loop
        prefix: str,
        local_share: float = 4.0,
        probe_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            prefix,
            local_share,
            probe_s,
            clock,
            f"destination pacing (on a local bucket at 1/{local_share:g} of the rate)",
        )
        self._script = client.register_script(_TAKE_SCRIPT)

    async def take(self, spec: BucketSpec, wanted: int, lane: str) -> Grant:
        """Take from Redis, or from the local bucket while Redis is unreachable."""
        if wanted <= 0:
            return Grant(0, 0.0)
        if self.outage.skip():
            return self._local(spec, wanted, lane)
        started = self.outage.started()
        try:
            granted, wait = await self._script(
                keys=self._keys(spec), args=self._args(spec, wanted, lane)
            )
        except REDIS_DOWN_ERRORS as exc:
            self.outage.failed(exc, started)
            return self._local(spec, wanted, lane)
        self.outage.answered()
        return Grant(int(granted), float(wait))
