"""Campaigns in Redis: their spec and progress, the active list and one lease per campaign.

- `api:campaign:ID` a hash: `spec` (JSON, fixed), `state`, `emitted`, `cursor`, `credit`,
  `credit_at`, `started_at`, `finished_at`, `cancelled_at`, `pending` (the chunk being
  emitted, JSON, or empty); no TTL while active, FANFARE_API_CAMPAIGN_TTL_S once final;
- `api:campaigns:active` the set of campaigns a scheduler has work on;
- `api:campaign:ID:lease` the scheduler that emits it (its owner id), with a TTL of
  FANFARE_API_CAMPAIGN_LEASE_S that the owner renews each step.

Every change a scheduler makes checks, in the same Lua call, that it still holds the lease, so
a scheduler that lost it (paused past its lease) changes nothing.
"""

from __future__ import annotations

from typing import Any, cast

import orjson

from operators.adapters.redis.client import PerThreadRedis
from operators.notify.campaigns import (
    CampaignProgress,
    CampaignSpec,
    PendingChunk,
    Target,
)
from operators.notify.ports import CampaignStore

_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if not held then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
# KEYS: campaign, lease. ARGV: owner, pending JSON.
_BEGIN = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'scheduled' and state ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'pending', ARGV[2])
return 1
"""
# KEYS: campaign, lease. ARGV: owner, emitted, cursor, credit, credit_at, started_at.
_COMMIT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HINCRBY', KEYS[1], 'emitted', ARGV[2])
redis.call('HSET', KEYS[1], 'cursor', ARGV[3], 'credit', ARGV[4], 'credit_at', ARGV[5],
  'pending', '')
if redis.call('HGET', KEYS[1], 'started_at') == '' then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[6])
end
if redis.call('HGET', KEYS[1], 'state') == 'scheduled' then
  redis.call('HSET', KEYS[1], 'state', 'running')
end
return 1
"""
# KEYS: campaign, lease, active. ARGV: owner, state, at, ttl, campaign id.
_FINISH = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'scheduled' or state == 'running' then
  redis.call('HSET', KEYS[1], 'state', ARGV[2], 'finished_at', ARGV[3])
end
redis.call('SREM', KEYS[3], ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('DEL', KEYS[2])
return 1
"""
# KEYS: campaign, lease, active. ARGV: owner, emitted, ttl, campaign id.
_SETTLE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HINCRBY', KEYS[1], 'emitted', ARGV[2])
redis.call('HSET', KEYS[1], 'pending', '')
redis.call('SREM', KEYS[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('DEL', KEYS[2])
return 1
"""
# KEYS: campaign, active. ARGV: at, ttl, campaign id. A chunk in flight keeps the campaign on
# the active list, so that a scheduler counts what it wrote (`settle`).
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state == 'scheduled' or state == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'cancelled_at', ARGV[1],
    'finished_at', ARGV[1])
  if redis.call('HGET', KEYS[1], 'pending') == '' then
    redis.call('SREM', KEYS[2], ARGV[3])
    redis.call('EXPIRE', KEYS[1], ARGV[2])
  end
end
return redis.call('HGET', KEYS[1], 'state')
"""


def spec_json(spec: CampaignSpec) -> bytes:
    """A spec as stored."""
    return orjson.dumps(
        {
            "campaign_id": spec.campaign_id,
            "category": spec.category,
            "template_id": spec.template_id,
            "data": dict(spec.data),
            "channels": list(spec.channels),
            "quiet_hours": spec.quiet_hours,
            "caps": spec.caps,
            "target": {"kind": spec.target.kind, "ref": spec.target.ref},
            "window_start": spec.window_start,
            "window_end": spec.window_end,
            "rate_per_s": spec.rate_per_s,
            "api_key_id": spec.api_key_id,
            "created_at": spec.created_at,
            "total": spec.total,
            "collapse_key": spec.collapse_key,
            "cap_limit": spec.cap_limit,
            "cap_window_s": spec.cap_window_s,
            "fallback": list(spec.fallback),
            "segment": spec.segment,
        }
    )


def spec_from(raw: bytes) -> CampaignSpec:
    """A stored spec."""
    d: dict[str, Any] = orjson.loads(raw)
    d["channels"] = tuple(d["channels"])
    d["fallback"] = tuple(d.get("fallback", ()))  # a spec stored before campaigns had one
    d["target"] = Target(d["target"]["kind"], d["target"]["ref"])
    return CampaignSpec(**d)


def _float(raw: bytes | None) -> float | None:
    return float(raw) if raw else None


def progress_from(h: dict[bytes, bytes]) -> CampaignProgress:
    """A campaign hash's progress fields."""
    pending_raw = h.get(b"pending") or b""
    pending = None
    if pending_raw:
        p = orjson.loads(pending_raw)
        pending = PendingChunk(
            p["cursor_before"], int(p["size"]), {int(k): int(v) for k, v in p["marks"].items()}
        )
    cursor = (h.get(b"cursor") or b"").decode() or None
    return CampaignProgress(
        state=h[b"state"].decode(),  # type: ignore[arg-type]
        emitted=int(h.get(b"emitted") or 0),
        cursor=cursor,
        credit=float(h.get(b"credit") or 0),
        credit_at=_float(h.get(b"credit_at")),
        started_at=_float(h.get(b"started_at")),
        finished_at=_float(h.get(b"finished_at")),
        cancelled_at=_float(h.get(b"cancelled_at")),
        pending=pending,
    )


class RedisCampaignStore(CampaignStore):
    """Campaigns shared by every API process and scheduler."""

    def __init__(self, redis: PerThreadRedis, prefix: str, ttl_s: int) -> None:
        self._r = redis
        self._p = f"{prefix}api:"
        self._ttl_s = ttl_s

    def _key(self, campaign_id: str) -> str:
        return f"{self._p}campaign:{campaign_id}"

    def _lease(self, campaign_id: str) -> str:
        return f"{self._p}campaign:{campaign_id}:lease"

    @property
    def _active(self) -> str:
        return f"{self._p}campaigns:active"

    def create(self, spec: CampaignSpec) -> bool:
        """The hash and the active list, in one transaction; False if the id exists."""
        client = self._r()
        if not client.hsetnx(self._key(spec.campaign_id), "spec", spec_json(spec)):
            return False
        pipe = client.pipeline(transaction=True)
        pipe.hset(
            self._key(spec.campaign_id),
            mapping={
                "state": "scheduled",
                "emitted": 0,
                "cursor": "",
                "credit": 0,
                "credit_at": "",
                "started_at": "",
                "finished_at": "",
                "cancelled_at": "",
                "pending": "",
            },
        )
        pipe.sadd(self._active, spec.campaign_id)
        pipe.execute()
        return True

    def get(self, campaign_id: str) -> tuple[CampaignSpec, CampaignProgress] | None:
        """Spec and progress."""
        h = cast(dict[bytes, bytes], self._r().hgetall(self._key(campaign_id)))
        if not h or b"spec" not in h or b"state" not in h:
            return None
        return spec_from(h[b"spec"]), progress_from(h)

    def active(self) -> list[str]:
        """The active set, sorted (a stable order of steps)."""
        return sorted(m.decode() for m in cast(set[bytes], self._r().smembers(self._active)))

    def cancel(self, campaign_id: str, at: float) -> CampaignProgress | None:
        """Cancelled unless already final."""
        state = self._r.script(_CANCEL)(
            keys=[self._key(campaign_id), self._active], args=[at, self._ttl_s, campaign_id]
        )
        if state is None:
            return None
        found = self.get(campaign_id)
        return None if found is None else found[1]

    def acquire(self, campaign_id: str, owner: str, lease_s: float) -> bool:
        """Take or renew."""
        return bool(
            self._r.script(_ACQUIRE)(
                keys=[self._lease(campaign_id)], args=[owner, int(lease_s * 1000)]
            )
        )

    def renew(self, campaign_id: str, owner: str, lease_s: float) -> bool:
        """Extend if still ours (never takes a lapsed lease)."""
        return bool(
            self._r.script(_RENEW)(
                keys=[self._lease(campaign_id)], args=[owner, int(lease_s * 1000)]
            )
        )

    def release(self, campaign_id: str, owner: str) -> None:
        """Give up if ours."""
        self._r.script(_RELEASE)(keys=[self._lease(campaign_id)], args=[owner])

    def begin_chunk(self, campaign_id: str, owner: str, pending: PendingChunk) -> bool:
        """Record the pending chunk (refused when cancelled or not ours)."""
        body = orjson.dumps(
            {
                "cursor_before": pending.cursor_before,
                "size": pending.size,
                "marks": {str(k): v for k, v in pending.marks.items()},
            }
        )
        return bool(
            self._r.script(_BEGIN)(
                keys=[self._key(campaign_id), self._lease(campaign_id)], args=[owner, body]
            )
        )

    def commit_chunk(
        self,
        campaign_id: str,
        owner: str,
        *,
        emitted: int,
        cursor: str | None,
        credit: float,
        credit_at: float,
        started_at: float,
    ) -> bool:
        """Count, move, clear pending."""
        return bool(
            self._r.script(_COMMIT)(
                keys=[self._key(campaign_id), self._lease(campaign_id)],
                args=[
                    owner,
                    emitted,
                    cursor or "",
                    repr(credit),
                    repr(credit_at),
                    repr(started_at),
                ],
            )
        )

    def finish(self, campaign_id: str, owner: str, state: str, at: float) -> bool:
        """Final, off the list, expiring."""
        return bool(
            self._r.script(_FINISH)(
                keys=[self._key(campaign_id), self._lease(campaign_id), self._active],
                args=[owner, state, repr(at), self._ttl_s, campaign_id],
            )
        )

    def settle(self, campaign_id: str, owner: str, emitted: int) -> bool:
        """A cancelled campaign's last chunk counted."""
        return bool(
            self._r.script(_SETTLE)(
                keys=[self._key(campaign_id), self._lease(campaign_id), self._active],
                args=[owner, emitted, self._ttl_s, campaign_id],
            )
        )
