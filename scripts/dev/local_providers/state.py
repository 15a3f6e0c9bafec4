"""What a local provider remembers: accepted messages, rejections, faults to inject.

One `ProviderState` per provider, touched only from the servers' event loop.
"""

from __future__ import annotations

import time
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# Record columns, in the order `ProviderState.records` yields them.
RECORD_FIELDS = (
    "token",
    "message_id",
    "notification_id",
    "device_id",
    "collapse_id",
    "size",
    "time",
)
_SEP = b"\x00"


class RateLimit:
    """A token bucket: `per_second` accepted sends per second, bursts up to one second's worth."""

    __slots__ = ("_last", "_tokens", "per_second", "retry_after_s")

    def __init__(self, per_second: float, retry_after_s: int) -> None:
        self.per_second = per_second
        self.retry_after_s = retry_after_s
        self._tokens = per_second
        self._last = time.monotonic()

    def take(self, now: float) -> bool:
        """True if one more send fits now (and counts it)."""
        tokens = min(self.per_second, self._tokens + (now - self._last) * self.per_second)
        self._last = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False


@dataclass
class Faults:
    """Misbehaviour to inject; all off by default."""

    token_errors: dict[str, str] = field(default_factory=dict)
    rate_limit: RateLimit | None = None
    outage_until: float = 0.0  # time.monotonic()
    outage_status: int = 503
    latency_s: float = 0.0

    def outage_left(self, now: float) -> float:
        """Seconds of outage still to go at monotonic `now` (0 when none)."""
        return self.outage_until - now if self.outage_until > now else 0.0

    def describe(self) -> dict[str, Any]:
        """The faults as JSON for the control API."""
        now = time.monotonic()
        rate = self.rate_limit
        return {
            "token_errors": dict(self.token_errors),
            "rate_limit": (
                {"per_second": rate.per_second, "retry_after_s": rate.retry_after_s}
                if rate
                else None
            ),
            "outage": (
                {"seconds_left": round(self.outage_left(now), 3), "status": self.outage_status}
                if self.outage_left(now)
                else None
            ),
            "latency_ms": round(self.latency_s * 1000, 3),
        }


class ProviderState:
    """Faults, accepted messages and rejection counts of one provider.

    A benchmark may push a million messages through, so a record is kept as one bytes object
    (the text fields joined) plus a float and an int in typed arrays: about a quarter of a KB
    per message, half of what a tuple of strings would take.
    """

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.faults = Faults()
        self.rejected: Counter[str] = Counter()
        self.requests = 0
        self._fields: list[bytes | tuple[bytes, ...]] = []
        self._times = array("d")
        self._sizes = array("L")
        self._keys: set[int] = set()

    def reset(self) -> None:
        """Forget records and counters and clear every fault."""
        self.faults = Faults()
        self.rejected.clear()
        self.requests = 0
        self._fields = []
        self._times = array("d")
        self._sizes = array("L")
        self._keys = set()

    def record(
        self,
        token: bytes,
        message_id: bytes,
        notification_id: bytes,
        device_id: bytes,
        collapse_id: bytes,
        size: int,
        dedupe: tuple[bytes, ...],
    ) -> None:
        """Keep an accepted message; `dedupe` is what makes two of them the same delivery."""
        parts = (token, message_id, notification_id, device_id, collapse_id)
        joined = _SEP.join(parts)
        # A NUL inside a field would shift the columns: keep such a (rare) record as a tuple.
        self._fields.append(joined if joined.count(_SEP) == 4 else parts)
        self._times.append(time.time())
        self._sizes.append(size)
        self._keys.add(hash(dedupe))

    def reject(self, reason: str) -> None:
        """Count a rejection by its reason."""
        self.rejected[reason] += 1

    @property
    def accepted(self) -> int:
        """Messages accepted so far."""
        return len(self._fields)

    def stats(self) -> dict[str, Any]:
        """Counters for the control API's /stats."""
        accepted, distinct = len(self._fields), len(self._keys)
        return {
            "requests": self.requests,
            "accepted": accepted,
            "distinct": distinct,
            "duplicates": accepted - distinct,
            "rejected": dict(self.rejected),
            "rejected_total": sum(self.rejected.values()),
        }

    def records(self, start: int, stop: int) -> Iterator[list[Any]]:
        """Records [start, stop) as lists in RECORD_FIELDS order (empty fields as None)."""
        for i in range(max(0, start), min(stop, len(self._fields))):
            raw = self._fields[i]
            parts = raw if isinstance(raw, tuple) else raw.split(_SEP)
            texts = [p.decode("utf-8", "replace") if p else None for p in parts]
            yield [*texts, self._sizes[i], self._times[i]]
