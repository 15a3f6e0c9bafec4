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


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """One bucket: its name (`apns:<topic>`, `fcm:<project>`), rate and size."""

    name: str
    per_minute: int
    burst_s: float = 1.0
    bulk_reserve: float = 0.2  # share of the bucket the bulk lane leaves to normal posts
    send_slack_s: float = 0.0
    """Seconds of the rate kept out of the bucket, at most half the burst.

    Tokens taken in any W seconds are at most rate x W + capacity. A send reaches the provider
    some time after its take (event loop, connection, network); when that spread is at most
    `send_slack_s`, the provider receives at most rate x W + rate x burst_s in any W seconds."""

    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self.per_minute / 60.0

    @property
    def capacity(self) -> float:
        """The most tokens the bucket holds (at least one send)."""
        kept_out = min(self.send_slack_s, self.burst_s / 2)
        return max(1.0, self.rate * (self.burst_s - kept_out))

    def reserve_for(self, lane: str) -> float:
        """Tokens the lane must leave in the bucket."""
        return self.capacity * self.bulk_reserve if lane == "bulk" else 0.0
