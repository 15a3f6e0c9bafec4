"""The API's small records in Redis, shared by every `fanfare api` process.

Keys, idempotency, request rate limits, accepted notifications and uploaded audiences: no API
process keeps state of its own that matters.

Keys, under FANFARE_REDIS_PREFIX:

- `api:key:ID` the key's record as JSON (the secret's SHA-256, never the key); `api:keys`, a
  sorted set of key ids by creation time, for `fanfare api keys list`;
- `api:idem:KEY_ID:SCOPE:SHA` the first answer to an idempotency key (its SHA-256), with the
  request's fingerprint; FANFARE_API_IDEMPOTENCY_TTL_S (a claim still being handled: 60 s);
- `api:bucket:KEY_ID` a key's token bucket (level and time, on Redis' clock; an hour idle);
- `api:accepted:ID` an accepted notification (topic, offset, recipients), FANFARE_STORE_TTL_S;
- `api:audience:ID` an uploaded list of user ids, FANFARE_API_CAMPAIGN_TTL_S (extended while a
  campaign uses it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, replace
from typing import Any, cast

import orjson

from operators.adapters.redis.client import PerThreadRedis, fail_fast_options
from operators.notify.campaigns import MAX_CHUNK, MAX_WINDOW
from operators.notify.keys import ApiKey
from operators.notify.ports import (
    Accepted,
    AcceptedLog,
    Allowance,
    AudienceStore,
    IdempotencyStore,
    KeyStore,
    RecipientSource,
    RequestLimiter,
    StoredAnswer,
)

PENDING_TTL_MS = 60_000
"""How long a claimed idempotency key waits for its answer before another request may run."""


def api_redis(url: str) -> PerThreadRedis:
    """A per-thread client that fails fast (an API request must not hang on Redis)."""
    return PerThreadRedis(url, **fail_fast_options(socket_timeout=2.0))


def _key_json(key: ApiKey) -> bytes:
    record = asdict(key)
    record["endpoints"] = sorted(key.endpoints)
    record["categories"] = sorted(key.categories)
    return orjson.dumps(record)


def _key_from(raw: bytes) -> ApiKey:
    d: dict[str, Any] = orjson.loads(raw)
    d["endpoints"] = frozenset(d["endpoints"])
    d["categories"] = frozenset(d["categories"])
    return ApiKey(**d)


class RedisKeyStore(KeyStore):
    """API key records."""

    def __init__(self, redis: PerThreadRedis, prefix: str) -> None:
        self._r = redis
        self._p = f"{prefix}api:"

    def add(self, key: ApiKey) -> None:
        """Store (a new id never overwrites another key)."""
        pipe = self._r().pipeline()
        pipe.set(f"{self._p}key:{key.key_id}", _key_json(key), nx=True)
        pipe.zadd(f"{self._p}keys", {key.key_id: key.created_at})
        stored, _ = pipe.execute()
        if not stored:
            raise RuntimeError(f"an API key with id {key.key_id} exists already")

    def get(self, key_id: str) -> ApiKey | None:
        """By id."""
        raw = cast(bytes | None, self._r().get(f"{self._p}key:{key_id}"))
        return None if raw is None else _key_from(raw)

    def all(self) -> list[ApiKey]:
        """Oldest first."""
        ids = [i.decode() for i in cast(list[bytes], self._r().zrange(f"{self._p}keys", 0, -1))]
        found = [self.get(i) for i in ids]
        return [k for k in found if k is not None]

    def revoke(self, key_id: str, at: float) -> ApiKey | None:
        """Set revoked_at (once)."""
        key = self.get(key_id)
        if key is None:
            return None
        if key.revoked_at is None:
            key = replace(key, revoked_at=at)
            self._r().set(f"{self._p}key:{key_id}", _key_json(key))
        return key


class RedisIdempotencyStore(IdempotencyStore):
    """First answers, claimed with SET NX GET (one round trip, atomic)."""

    def __init__(self, redis: PerThreadRedis, prefix: str, ttl_s: int) -> None:
        self._r = redis
        self._p = f"{prefix}api:idem:"
        self._ttl_s = ttl_s

    def _key(self, key_id: str, scope: str, idempotency_key: str) -> str:
        digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
        return f"{self._p}{key_id}:{scope}:{digest}"

    def reserve(
        self, key_id: str, scope: str, idempotency_key: str, fingerprint: str
    ) -> StoredAnswer | None:
        """Claim, or what is there."""
        claim = orjson.dumps({"fingerprint": fingerprint, "status": None, "body": None})
        held = self._r().set(
            self._key(key_id, scope, idempotency_key), claim, nx=True, px=PENDING_TTL_MS, get=True
        )
        if held is None:
            return None
        d = orjson.loads(cast(bytes, held))
        return StoredAnswer(d["fingerprint"], d["status"], d["body"])

    def complete(self, key_id: str, scope: str, idempotency_key: str, answer: StoredAnswer) -> None:
        """The first answer, kept FANFARE_API_IDEMPOTENCY_TTL_S."""
        self._r().set(
            self._key(key_id, scope, idempotency_key),
            orjson.dumps(
                {"fingerprint": answer.fingerprint, "status": answer.status, "body": answer.body}
            ),
            ex=self._ttl_s,
        )

    def release(self, key_id: str, scope: str, idempotency_key: str) -> None:
        """Forget a claim."""
        self._r().delete(self._key(key_id, scope, idempotency_key))


# One round trip refills and takes on Redis' clock (API processes' clocks may differ).
_TAKE_ONE = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = tonumber(b[1]) or capacity
local at = tonumber(b[2]) or now
level = math.min(capacity, level + math.max(0, now - at) * rate)
local wait = 0
if level >= 1 then level = level - 1 else wait = (1 - level) / rate end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
return tostring(wait)
"""


class RedisRequestLimiter(RequestLimiter):
    """A token bucket per API key: `rate_per_s`, holding `burst` requests."""

    def __init__(self, redis: PerThreadRedis, prefix: str) -> None:
        self._r = redis
        self._p = f"{prefix}api:bucket:"

    def take(self, key: ApiKey) -> Allowance:
        """One token, or the wait for one."""
        wait = float(
            self._r.script(_TAKE_ONE)(
                keys=[f"{self._p}{key.key_id}"], args=[key.rate_per_s, max(1, key.burst)]
            )
        )
        return Allowance(True) if wait <= 0 else Allowance(False, wait)


class RedisAcceptedLog(AcceptedLog):
    """Accepted notifications, as long as the notification store keeps rows."""

    def __init__(self, redis: PerThreadRedis, prefix: str, ttl_s: int) -> None:
        self._r = redis
        self._p = f"{prefix}api:accepted:"
        self._ttl_s = ttl_s

    def add(self, accepted: Accepted) -> None:
        """Record."""
        self._r().set(
            f"{self._p}{accepted.notification_id}", orjson.dumps(accepted), ex=self._ttl_s
        )

    def get(self, notification_id: str) -> Accepted | None:
        """By id."""
        raw = cast(bytes | None, self._r().get(f"{self._p}{notification_id}"))
        if raw is None:
            return None
        d = orjson.loads(raw)
        d["recipients"] = tuple(d["recipients"])
        d["channels"] = tuple(d.get("channels", ()))
        return Accepted(**d)


class RedisAudienceStore(AudienceStore):
    """Uploaded lists, one Redis list each."""

    def __init__(self, redis: PerThreadRedis, prefix: str, ttl_s: int) -> None:
        self._r = redis
        self._p = f"{prefix}api:audience:"
        self._ttl_s = ttl_s

    def key(self, audience_id: str) -> str:
        """The list's Redis key."""
        return f"{self._p}{audience_id}"

    def create(self, audience_id: str, users: Iterable[str]) -> int:
        """RPUSH in chunks (one pipeline), then the TTL."""
        key = self.key(audience_id)
        pipe = self._r().pipeline(transaction=False)
        chunk: list[str] = []
        count = 0
        for user in users:
            chunk.append(user)
            if len(chunk) == 10_000:
                pipe.rpush(key, *chunk)
                count += len(chunk)
                chunk = []
        if chunk:
            pipe.rpush(key, *chunk)
            count += len(chunk)
        pipe.expire(key, self._ttl_s)
        pipe.execute()
        return count

    def size(self, audience_id: str) -> int | None:
        """LLEN (0 means it expired or never was: None)."""
        n = int(self._r().llen(self.key(audience_id)))
        return n or None

    def keep_until_used(self, audience_id: str) -> None:
        """At least the longest window plus the campaign's record time."""
        ttl = int(MAX_WINDOW.total_seconds()) + self._ttl_s
        self._r().expire(self.key(audience_id), ttl, gt=True)


class AudienceRecipients(RecipientSource):
    """A campaign's recipients from an uploaded list; the cursor is the next index."""

    def __init__(self, redis: PerThreadRedis, key: str) -> None:
        self._r = redis
        self._key = key

    def page(self, cursor: str | None, limit: int) -> tuple[list[str], str | None]:
        """LRANGE from the cursor."""
        start = int(cursor or 0)
        limit = max(1, min(limit, MAX_CHUNK * 4))
        found = cast(list[bytes], self._r().lrange(self._key, start, start + limit - 1))
        users = [u.decode() for u in found]
        end = start + len(users)
        more = len(users) == limit and int(self._r().llen(self._key)) > end
        return users, (str(end) if more else None)
