"""Edge claims: the fast path of "one push per (post, user, device)", in Redis.

Before a dispatch item is sent, `SET key=<message identity> NX GET EX ttl` claims it. A new
claim (or our own, when the same message is replayed) goes on to the notification store, which
is the authority; a claim held by a different message is a duplicate and stops here, without a
store round trip. If Redis lost its data, the store's unique key still refuses the duplicate.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

from operators.adapters.post_claims import PerThreadRedis


class EdgeClaims(ABC):
    """Port: claim (notification_id, device_id) sends for a message identity."""

    @abstractmethod
    def claim(self, claims: Sequence[tuple[str, str, str]]) -> list[str | None]:
        """Per (notification_id, device_id, identity): None if claimed now, else the holder.

        The holder is our own identity when the same message is replayed.
        """


class RedisEdgeClaims(EdgeClaims):
    """One pipelined round trip per batch; keys expire after `ttl_s`."""

    def __init__(self, url: str, prefix: str, ttl_s: int) -> None:
        self._prefix = prefix
        self._ttl = ttl_s
        self._redis = PerThreadRedis(url, socket_timeout=10, health_check_interval=30)

    def claim(self, claims: Sequence[tuple[str, str, str]]) -> list[str | None]:
        """SET NX GET per claim (Redis 7)."""
        if not claims:
            return []
        pipe = self._redis().pipeline(transaction=False)
        for nid, device, identity in claims:
            pipe.set(
                f"{self._prefix}edge:{nid}|{device}", identity, nx=True, get=True, ex=self._ttl
            )
        return [None if r is None else r.decode() for r in pipe.execute()]


class InMemoryEdgeClaims(EdgeClaims):
    """Same semantics in a dict (unit and flow tests)."""

    def __init__(self) -> None:
        self.held: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def claim(self, claims: Sequence[tuple[str, str, str]]) -> list[str | None]:
        """Claim each key unless held; answer the holder as Redis' SET NX GET does."""
        with self._lock:
            out: list[str | None] = []
            for nid, device, identity in claims:
                held = self.held.get((nid, device))
                if held is None:
                    self.held[(nid, device)] = identity
                out.append(held)
            return out
