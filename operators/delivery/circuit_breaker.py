"""A circuit breaker per provider: stop hammering a provider that is down, probe, recover.

Closed: every send goes. After `failure_threshold` consecutive transient failures it opens:
sends are held (the caller schedules them for later, nothing is dropped) until `cooldown_s`
has passed; then it is half-open and lets `probe_sends` through. A probe that succeeds closes
it; one that fails opens it again with a doubled cooldown (up to `max_cooldown_s`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum


class BreakerState(Enum):
    """The breaker's position; the value is its gauge in /metrics."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass
class CircuitBreaker:
    """State of one provider's breaker in one worker; `clock` is seconds."""

    clock: Callable[[], float]
    failure_threshold: int = 20
    cooldown_s: float = 5.0
    max_cooldown_s: float = 60.0
    probe_sends: int = 1
    state: BreakerState = BreakerState.CLOSED
    _failures: int = 0
    _opened_at: float = 0.0
    _cooldown: float = field(default=0.0)
    _probes_out: int = 0

    def __post_init__(self) -> None:
        self._cooldown = self.cooldown_s

    @property
    def retry_at(self) -> float:
        """When held sends should come back (the end of the current cooldown)."""
        return self._opened_at + self._cooldown

    def admit(self, wanted: int) -> int:
        """How many of `wanted` sends may go now (the rest are held)."""
        if self.state is BreakerState.OPEN:
            if self.clock() < self.retry_at:
                return 0
            self.state = BreakerState.HALF_OPEN
            self._probes_out = 0
        if self.state is BreakerState.HALF_OPEN:
            allowed = max(0, min(wanted, self.probe_sends - self._probes_out))
            self._probes_out += allowed
            return allowed
        return wanted

    def record(self, successes: int, failures: int) -> None:
        """Count the outcomes of sends that went out.

        Permanent rejections count as successes: the provider answered.
        """
        if self.state is BreakerState.HALF_OPEN:
            if failures:
                self._open(self._cooldown * 2)
            elif successes:
                self._close()
            return
        if successes and not failures:
            self._failures = 0
            return
        # A mixed batch: the provider answers some; only an unbroken run of failures opens it.
        self._failures = failures if successes else self._failures + failures
        if self.state is BreakerState.CLOSED and self._failures >= self.failure_threshold:
            self._open(self.cooldown_s)

    def _open(self, cooldown: float) -> None:
        self.state = BreakerState.OPEN
        self._opened_at = self.clock()
        self._cooldown = min(self.max_cooldown_s, cooldown)
        self._probes_out = 0

    def _close(self) -> None:
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._cooldown = self.cooldown_s
        self._probes_out = 0
