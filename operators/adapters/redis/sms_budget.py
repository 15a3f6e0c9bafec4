"""The daily SMS budgets in Redis: one counter per user and one global, per UTC day.

One Lua call checks both counters against their limits and counts the message in both only
when both have room, so concurrent workers never overspend; the counters expire two days after
their day began. Keys: `{prefix}sms:budget:{YYYYMMDD}:user:{user_id}` and
`{prefix}sms:budget:{YYYYMMDD}:all`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from operators.adapters.channels.ports import SmsBudget

_TAKE = """
local user = tonumber(redis.call('GET', KEYS[1]) or '0')
local all = tonumber(redis.call('GET', KEYS[2]) or '0')
if user >= tonumber(ARGV[1]) then return 'user' end
if all >= tonumber(ARGV[2]) then return 'global' end
redis.call('INCR', KEYS[1])
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return ''
"""
_GIVE_BACK = """
for _, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') > 0 then redis.call('DECR', key) end
end
return 1
"""
DAY_TTL_S = 2 * 86_400


class RedisSmsBudget(SmsBudget):
    """Per-user and global daily counters, checked and counted in one round trip."""

    def __init__(
        self,
        client: Any,  # redis.asyncio.Redis, made on the worker's event loop
        prefix: str,
        user_limit: int,
        global_limit: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._user_limit = user_limit
        self._global_limit = global_limit
        self._clock = clock
        self._take = client.register_script(_TAKE)
        self._give_back = client.register_script(_GIVE_BACK)

    def _keys(self, user_id: str) -> list[str]:
        day = datetime.fromtimestamp(self._clock(), UTC).strftime("%Y%m%d")
        base = f"{self._prefix}sms:budget:{day}"
        return [f"{base}:user:{user_id}", f"{base}:all"]

    async def take(self, user_id: str) -> str | None:
        """Count one message; None, or the budget (`user`, `global`) that ran out."""
        answer = await self._take(
            keys=self._keys(user_id), args=[self._user_limit, self._global_limit, DAY_TTL_S]
        )
        spent = answer.decode() if isinstance(answer, bytes) else str(answer or "")
        return spent or None

    async def give_back(self, user_id: str) -> None:
        """Uncount a message the provider did not accept."""
        await self._give_back(keys=self._keys(user_id), args=[])

    async def used(self, user_id: str) -> tuple[int, int]:
        """(the user's count, the global count) today: for tests and operators."""
        values = await self._redis.mget(self._keys(user_id))
        return (int(values[0] or 0), int(values[1] or 0))
