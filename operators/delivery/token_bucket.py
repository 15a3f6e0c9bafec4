"""Token-bucket arithmetic shared by the Redis limiter (as Lua) and the in-memory one.

A bucket holds up to `capacity` tokens and refills at `rate` tokens per second. The bulk lane
may not take the bucket below `reserve` tokens, so a celebrity campaign never starves normal
posts of their share: it is paced at what the normal lane leaves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Grant:
    """Tokens granted now, and how long until the rest could be."""

    granted: int
    wait_s: float


def take(
    level: float,
    updated_at: float,
    now: float,
    *,
    rate: float,
    capacity: float,
    wanted: int,
    reserve: float = 0.0,
) -> tuple[Grant, float]:
    """Refill to `now`, take up to `wanted` tokens above `reserve`; returns (grant, new level)."""
    level = min(capacity, level + max(0.0, now - updated_at) * rate)
    available = max(0.0, level - reserve)
    granted = min(wanted, int(available))
    level -= granted
    short = wanted - granted
    wait = 0.0 if short == 0 else (short - (available - granted)) / rate
    return Grant(granted, max(0.0, wait)), level
