"""The phone number -> SMS addresses index in Redis (operators/adapters/redis/sms_numbers.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from operators.adapters.redis.api_store import api_redis
from operators.adapters.redis.sms_numbers import RedisSmsNumbers
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.integration


@pytest.fixture
def numbers() -> Iterator[RedisSmsNumbers]:
    prefix = f"fanfare-test-{uuid.uuid4().hex[:8]}:"
    yield RedisSmsNumbers(api_redis(REDIS_URL), prefix)
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)


def test_a_number_answers_for_its_current_addresses_only(numbers: RedisSmsNumbers) -> None:
    a, b = "+14155550100", "+14155550199"
    numbers.register("ada", "sms-1", a, 1.0)
    numbers.register("ada", "sms-1", a, 2.0)  # a refresh: still one entry
    numbers.register("bob", "sms-9", a, 3.0)  # a shared number: both answer
    assert numbers.holders(a) == [("ada", "sms-1"), ("bob", "sms-9")]
    numbers.register("ada", "sms-1", b, 4.0)  # the address takes another number
    assert numbers.holders(a) == [("bob", "sms-9")]
    assert numbers.holders(b) == [("ada", "sms-1")]
    numbers.remove("bob", "sms-9")
    numbers.remove("bob", "sms-9")  # twice, and an address never indexed: nothing happens
    numbers.remove("cy", "sms-2")
    assert numbers.holders(a) == []
    assert numbers.holders(b) == [("ada", "sms-1")]
    # User and device ids with separators stay apart.
    numbers.register("u:1", "d", b, 5.0)
    numbers.register("u", "1:d", b, 6.0)
    assert numbers.holders(b) == [("ada", "sms-1"), ("u", "1:d"), ("u:1", "d")]
