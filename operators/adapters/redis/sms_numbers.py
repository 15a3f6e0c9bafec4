"""The phone number -> SMS addresses index, in Redis, kept by `fanfare api`.

Two hashes, changed together in one Lua call so a number never points at an address that is
now another number's:
- `{prefix}sms:number:{E164}`: field `[user_id, device_id]` (JSON), value when registered;
- `{prefix}sms:user:{user_id}`: field device_id, value its number (to find the number again
  when the address is removed or re-registered: a removal carries no token).

Why here and not a compacted reading of `device_changes`: the API already asks Redis on every
request, an inbound SMS needs one lookup, and each API process would otherwise have to read
every device change ever made before it could answer. The cost: the index knows what the API
registered; addresses written to `device_changes` by another producer are not in it.
"""

from __future__ import annotations

import orjson

from operators.adapters.channels.ports import SmsNumberIndex
from operators.adapters.redis.client import PerThreadRedis

_REGISTER = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old and old ~= ARGV[2] then redis.call('HDEL', ARGV[5] .. old, ARGV[3]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return 1
"""
_REMOVE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  redis.call('HDEL', ARGV[3] .. old, ARGV[2])
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"""


class RedisSmsNumbers(SmsNumberIndex):
    """The index above over the API's per-thread Redis clients."""

    def __init__(self, redis: PerThreadRedis, prefix: str) -> None:
        self._r = redis
        self._numbers = f"{prefix}sms:number:"
        self._users = f"{prefix}sms:user:"

    def register(self, user_id: str, device_id: str, number: str, at: float) -> None:
        """Point `number` at the address (and its old number, if another, no longer)."""
        member = orjson.dumps([user_id, device_id]).decode()
        self._r.script(_REGISTER)(
            keys=[self._users + user_id, self._numbers + number],
            args=[device_id, number, member, at, self._numbers],
        )

    def remove(self, user_id: str, device_id: str) -> None:
        """Forget the address and its number's entry for it."""
        member = orjson.dumps([user_id, device_id]).decode()
        self._r.script(_REMOVE)(
            keys=[self._users + user_id], args=[device_id, member, self._numbers]
        )

    def holders(self, number: str) -> list[tuple[str, str]]:
        """Every (user_id, device_id) registered with the number, sorted."""
        fields = self._r().hkeys(self._numbers + number)
        return sorted((str(u), str(d)) for u, d in (orjson.loads(f) for f in fields))
