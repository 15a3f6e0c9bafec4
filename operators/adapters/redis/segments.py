"""The segment index in Redis (see `operators/notify/segments.py` for what it is and why).

- `seg:user:USER` a hash: `locale_ts` and `locale_sets` (the sets the user's latest locale put
  them in), and `dev:DEVICE` = `TS|PLATFORM` (empty platform: not an active mobile device);
- `seg:locale:fr-ca`, `seg:lang:fr`, `seg:platform:ios`, `seg:platform:android` sets of users;
- `seg:positions` a hash: `TOPIC:PARTITION` -> the next offset to read.

Each update is one Lua call that applies it only when it is not older than what the user's
hash holds, so the changelogs read again from the start (a new consumer group, a replay after
a crash before the commit) leave the index as it was: later events win, repeats change nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from operators.adapters.redis.client import PerThreadRedis
from operators.notify.ports import SegmentIndex
from operators.notify.segments import DeviceUpdate, IndexUpdate, LocaleUpdate, Segment

_LOCALE = """
local old_ts = tonumber(redis.call('HGET', KEYS[1], 'locale_ts') or '-1')
local ts = tonumber(ARGV[1])
if ts < old_ts then return 0 end
local user, prefix = ARGV[2], ARGV[3]
local old = redis.call('HGET', KEYS[1], 'locale_sets') or ''
for name in string.gmatch(old, '%S+') do redis.call('SREM', prefix .. name, user) end
local names = {}
for i = 4, #ARGV do
  redis.call('SADD', prefix .. ARGV[i], user)
  names[#names + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], 'locale_ts', ARGV[1], 'locale_sets', table.concat(names, ' '))
return 1
"""

_DEVICE = """
local ts = tonumber(ARGV[1])
local user, prefix, field, platform = ARGV[2], ARGV[3], 'dev:' .. ARGV[4], ARGV[5]
local cur = redis.call('HGET', KEYS[1], field)
if cur then
  local cur_ts = tonumber(string.match(cur, '^([^|]*)'))
  if ts < cur_ts then return 0 end
end
redis.call('HSET', KEYS[1], field, ARGV[1] .. '|' .. platform)
local has = {ios = false, android = false}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if string.sub(all[i], 1, 4) == 'dev:' then
    local p = string.match(all[i + 1], '|(.*)$')
    if p ~= nil and has[p] ~= nil then has[p] = true end
  end
end
for p, on in pairs(has) do
  if on then redis.call('SADD', prefix .. 'platform:' .. p, user)
  else redis.call('SREM', prefix .. 'platform:' .. p, user) end
end
return 1
"""


class RedisSegmentIndex(SegmentIndex):
    """Users by locale, language and platform, kept from the changelogs."""

    def __init__(self, redis: PerThreadRedis, prefix: str) -> None:
        self._r = redis
        self._p = f"{prefix}seg:"

    def apply(self, updates: Iterable[IndexUpdate]) -> int:
        """Apply updates in order; how many changed the index (older ones do not)."""
        locale, device = self._r.script(_LOCALE), self._r.script(_DEVICE)
        client = self._r()
        changed = 0
        for u in updates:
            key = f"{self._p}user:{u.user_id}"
            if isinstance(u, LocaleUpdate):
                args: list[str | float] = [repr(u.ts), u.user_id, self._p, *u.sets]
                changed += int(locale(keys=[key], args=args, client=client))
            elif isinstance(u, DeviceUpdate):
                args = [repr(u.ts), u.user_id, self._p, u.device_id, u.platform or ""]
                changed += int(device(keys=[key], args=args, client=client))
        return changed

    def members(self, segment: Segment) -> list[str]:
        """The segment's users now, sorted (one SINTER over its sets)."""
        keys = [f"{self._p}{name}" for name in segment.sets()]
        found = self._r().sinter(keys)
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in found)

    def positions(self) -> dict[tuple[str, int], int]:
        """The saved read positions."""
        raw = self._r().hgetall(f"{self._p}positions")
        out: dict[tuple[str, int], int] = {}
        for k, v in raw.items():
            topic, part = (k.decode() if isinstance(k, bytes) else str(k)).rsplit(":", 1)
            out[(topic, int(part))] = int(v)
        return out

    def save_positions(self, positions: Mapping[tuple[str, int], int]) -> None:
        """HSET the positions."""
        if positions:
            mapping = {f"{t}:{p}": off for (t, p), off in positions.items()}
            self._r().hset(f"{self._p}positions", mapping=mapping)  # type: ignore[arg-type]
