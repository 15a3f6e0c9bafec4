"""Edge claims in this process's memory: the `EdgeClaims` port without Redis.

For one delivery process on its own (development, benchmarks) and for tests: the same answers
as Redis' `SET NX GET` (`operators/adapters/redis/edge_claims.py`), held in a dict for the
process's lifetime, without a TTL. The claims are only the fast path: the notification store's
unique key stays the authority, so losing them at a restart, or two processes each with their
own, lets no duplicate through, it only costs the store's claim more work.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from operators.delivery.ports import EdgeClaims


class InMemoryEdgeClaims(EdgeClaims):
    """(notification_id, device_id) -> the identity of the message that claimed it."""

    def __init__(self) -> None:
        self.held: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()  # a process's delivery workers share one

    def claim(self, claims: Sequence[tuple[str, str, str]]) -> list[str | None]:
        """Claim each key unless held; answer the holder as Redis' SET NX GET does."""
        out: list[str | None] = []
        with self._lock:
            for nid, device, identity in claims:
                holder = self.held.get((nid, device))
                if holder is None:
                    self.held[(nid, device)] = identity
                out.append(holder)
        return out
