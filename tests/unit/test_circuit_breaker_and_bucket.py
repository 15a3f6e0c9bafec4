from __future__ import annotations

import pytest

from operators.adapters.redis.rate_limiter import LocalRateLimiter
from operators.delivery.circuit_breaker import BreakerState, CircuitBreaker
from operators.delivery.token_bucket import BucketSpec, take


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_holds_probes_and_closes() -> None:
    clock = Clock()
    b = CircuitBreaker(clock=clock, failure_threshold=5, cooldown_s=2.0)
    assert b.admit(10) == 10
    b.record(0, 3)
    b.record(0, 1)
    assert b.state is BreakerState.CLOSED
    b.record(0, 1)  # five in a row
    assert b.state is BreakerState.OPEN
    assert b.admit(10) == 0
    assert b.retry_at == 102.0
    clock.now = 102.0
    assert b.admit(10) == 1  # one probe
    assert b.state is BreakerState.HALF_OPEN
    assert b.admit(10) == 0  # the probe is out
    b.record(0, 1)  # the probe failed: open again, longer
    assert b.state is BreakerState.OPEN
    assert b.retry_at == 106.0
    clock.now = 106.0
    assert b.admit(5) == 1
    b.record(1, 0)
    assert b.state is BreakerState.CLOSED
    assert b.admit(7) == 7
    clock.now = 200.0
    b.record(0, 5)  # closing reset the cooldown to its base
    assert b.state is BreakerState.OPEN
    assert b.retry_at == 202.0


def test_breaker_success_resets_the_run() -> None:
    b = CircuitBreaker(clock=Clock(), failure_threshold=5)
    b.record(0, 4)
    b.record(1, 0)
    b.record(0, 4)
    assert b.state is BreakerState.CLOSED
    b.record(3, 2)  # mixed: the provider answers; only the trailing failures count
    b.record(0, 2)
    assert b.state is BreakerState.CLOSED
    b.record(0, 1)
    assert b.state is BreakerState.OPEN


def test_bucket_refills_takes_and_says_how_long_to_wait() -> None:
    grant, level = take(10.0, 0.0, 0.0, rate=10, capacity=10, wanted=4)
    assert (grant.granted, grant.wait_s, level) == (4, 0.0, 6.0)
    grant, level = take(level, 0.0, 0.0, rate=10, capacity=10, wanted=10)
    assert grant.granted == 6 and grant.wait_s == pytest.approx(0.4)
    grant, level = take(0.0, 0.0, 0.5, rate=10, capacity=10, wanted=3)  # refilled 5
    assert grant.granted == 3 and level == pytest.approx(2.0)
    grant, _ = take(0.0, 0.0, 100.0, rate=10, capacity=10, wanted=50)  # capped at capacity
    assert grant.granted == 10


def test_bulk_lane_leaves_the_reserve_to_normal_posts() -> None:
    grant, level = take(10.0, 0.0, 0.0, rate=10, capacity=10, wanted=10, reserve=2.0)
    assert grant.granted == 8 and level == 2.0
    grant, _ = take(level, 0.0, 0.0, rate=10, capacity=10, wanted=5, reserve=2.0)
    assert grant.granted == 0 and grant.wait_s == pytest.approx(0.5)
    grant, _ = take(level, 0.0, 0.0, rate=10, capacity=10, wanted=5)
    assert grant.granted == 2


def test_local_limiter_paces_at_the_rate() -> None:
    clock = Clock()
    limiter = LocalRateLimiter(clock=clock)
    spec = BucketSpec("fcm:test", per_minute=600, burst_s=1.0, bulk_reserve=0.2)  # 10/s
    assert spec.capacity == 10
    assert limiter.take(spec, 25, "normal").granted == 10
    clock.now += 1.0
    assert limiter.take(spec, 25, "bulk").granted == 8  # 2 kept for normal posts
    assert limiter.take(spec, 25, "normal").granted == 2
    clock.now += 0.5
    assert limiter.take(spec, 25, "normal").granted == 5


def test_the_send_slack_is_kept_out_of_the_bucket_up_to_half_the_burst() -> None:
    """Sends reaching the provider up to the slack late still fit rate x W + burst."""
    spec = BucketSpec("apns:t", per_minute=600, burst_s=1.0, send_slack_s=0.1)  # 10/s
    assert spec.capacity == pytest.approx(9.0)
    assert BucketSpec("apns:t", 600, 1.0, send_slack_s=0.8).capacity == pytest.approx(5.0)
    assert BucketSpec("apns:t", 60, 1.0, send_slack_s=0.5).capacity == 1.0  # at least one send
    assert BucketSpec("apns:t", 600, 1.0).capacity == 10.0  # no slack: the whole burst
