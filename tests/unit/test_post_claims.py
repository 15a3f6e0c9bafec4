"""Post claims: the first message carrying a post_id owns it; its own replay still does."""

import time
import uuid

import pytest
import redis

from operators.adapters.redis.post_claims import RedisPostClaims
from operators.fanout.ports import PostClaims
from tests.conftest import REDIS_URL
from tests.fakes import InMemoryPostClaims


@pytest.fixture(params=["memory", "redis"])
def claims(request: pytest.FixtureRequest) -> PostClaims:
    if request.param == "memory":
        return InMemoryPostClaims(ttl_s=60)
    prefix = f"fanfare-test-{uuid.uuid4().hex[:8]}:"
    request.addfinalizer(lambda: _clean(prefix))
    return RedisPostClaims(REDIS_URL, prefix, ttl_s=60)


def _clean(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)


def test_first_message_owns_the_post(claims: PostClaims) -> None:
    assert claims.claim([("p1", "post_created/0@5"), ("p2", "post_created/1@9")]) == [True, True]
    # The same message read again (a replay after a restart) keeps its claim ...
    assert claims.claim([("p1", "post_created/0@5")]) == [True]
    # ... another message with the same post_id is a duplicate.
    assert claims.claim([("p1", "post_created/0@6"), ("p2", "post_created/1@9")]) == [False, True]
    # Duplicates inside one batch: the first wins.
    assert claims.claim([("p3", "post_created/0@7"), ("p3", "post_created/0@8")]) == [True, False]
    assert claims.claim([]) == []


def test_claims_expire() -> None:
    claims = InMemoryPostClaims(ttl_s=0.05)
    assert claims.claim([("p", "a")]) == [True]
    time.sleep(0.06)
    assert claims.claim([("p", "b")]) == [True]


def test_redis_claims_carry_the_ttl() -> None:
    prefix = f"fanfare-test-{uuid.uuid4().hex[:8]}:"
    try:
        RedisPostClaims(REDIS_URL, prefix, ttl_s=123).claim([("p", "a")])
        ttl = redis.Redis.from_url(REDIS_URL).ttl(prefix + "post:p")
        assert 0 < ttl <= 123
    finally:
        _clean(prefix)


def test_notification_claims_have_their_own_key_space() -> None:
    prefix = f"fanfare-test-{uuid.uuid4().hex[:8]}:"
    try:
        posts = RedisPostClaims(REDIS_URL, prefix, ttl_s=60)
        notes = RedisPostClaims(REDIS_URL, prefix, ttl_s=60, kind="notification")
        assert posts.claim([("x1", "post_created/0@1")]) == [True]
        # The same id in the other key space is another claim.
        assert notes.claim([("x1", "notify.social/0@1")]) == [True]
        assert notes.claim([("x1", "notify.social/0@2")]) == [False]  # re-published
        assert redis.Redis.from_url(REDIS_URL).exists(prefix + "notification:x1") == 1
    finally:
        _clean(prefix)
