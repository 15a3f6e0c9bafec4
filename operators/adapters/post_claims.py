"""Post claims: the fast, cross-process dedupe of `post_created` events.

A claim binds a post_id to the identity of the message that first carried it
(`topic/partition@offset`). The same message read again (a replay after a restart) still owns
its claim and fans out again, its output deduped downstream; a different message with the same
post_id (a re-delivered or re-published duplicate) is refused. Claims expire after a TTL.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import redis
from redis.commands.core import Script

_CLAIM_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""


class PerThreadRedis:
    """A Redis client per thread (each Bytewax worker), made on first use, never at import.

    `script` registers a Lua script once per thread and returns it with that thread's client.
    """

    def __init__(self, url: str, **options: Any) -> None:
        self._url = url
        self._options = options
        self._local = threading.local()

    def __call__(self) -> redis.Redis:
        """The calling thread's client."""
        client: redis.Redis | None = getattr(self._local, "client", None)
        if client is None:
            client = redis.Redis.from_url(self._url, **self._options)
            self._local.client = client
            self._local.scripts = {}
        return client

    def script(self, text: str) -> Script:
        """The calling thread's registered copy of a Lua script."""
        client = self()
        scripts: dict[str, Script] = self._local.scripts
        if text not in scripts:
            scripts[text] = client.register_script(text)
        return scripts[text]


class PostClaims(ABC):
    """Port: claim posts for fan-out."""

    @abstractmethod
    def claim(self, claims: Sequence[tuple[str, str]]) -> list[bool]:
        """For each (post_id, message identity): True when this message owns the post."""


class RedisPostClaims(PostClaims):
    """Claims in Redis (SET NX EX, one pipelined script call per batch of posts)."""

    def __init__(self, url: str, prefix: str, ttl_s: int) -> None:
        self._prefix = prefix
        self._ttl = ttl_s
        self._redis = PerThreadRedis(url, socket_timeout=10, health_check_interval=30)

    def claim(self, claims: Sequence[tuple[str, str]]) -> list[bool]:
        """Atomic per post; one round trip per batch."""
        if not claims:
            return []
        script = self._redis.script(_CLAIM_SCRIPT)
        pipe = self._redis().pipeline(transaction=False)
        for post_id, identity in claims:
            script(keys=[f"{self._prefix}post:{post_id}"], args=[identity, self._ttl], client=pipe)
        return [bool(r) for r in pipe.execute()]


class InMemoryPostClaims(PostClaims):
    """Same semantics in a dict, for flow tests and single-process tools."""

    def __init__(self, ttl_s: float = 86_400.0) -> None:
        self._ttl = ttl_s
        self._claims: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def claim(self, claims: Sequence[tuple[str, str]]) -> list[bool]:
        """Claim each post unless another identity holds an unexpired claim."""
        now = time.monotonic()
        out = []
        with self._lock:
            for post_id, identity in claims:
                held = self._claims.get(post_id)
                if held is None or held[1] <= now:
                    self._claims[post_id] = (identity, now + self._ttl)
                    out.append(True)
                else:
                    out.append(held[0] == identity)
        return out


class RedisWriterStartMarks:
    """Channel writers' start offsets until their first snapshot (SET NX with a TTL)."""

    def __init__(self, url: str, prefix: str, ttl_s: int = 86_400) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=10)
        self._prefix = prefix
        self._ttl = ttl_s

    def mark(self, part: str, offset: int) -> int:
        """Keep the earliest start: an existing mark comes from a crashed execution."""
        key = f"{self._prefix}writer-start:{part}"
        self._client.set(key, offset, nx=True, ex=self._ttl)
        held = self._client.get(key)
        return offset if held is None else int(held)

    def clear(self, part: str) -> None:
        """A snapshot now records where this writer's writes began."""
        self._client.delete(f"{self._prefix}writer-start:{part}")
