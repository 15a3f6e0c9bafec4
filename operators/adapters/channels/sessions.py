"""A pool of sessions handed out by delivery lane, transactional first.

So a login code's email never queues behind a campaign's for one of the relay's few SMTP
sessions. The engine serves the transactional lane first when it takes rate-limit tokens,
but a sender with a handful of sessions (email: FANFARE_SMTP_CONNECTIONS) queues what it was
handed until one is free; a first-come queue there would put a transactional message behind
every marketing one sent before it. Waiters are served by lane (transactional, normal, bulk),
in arrival order within a lane.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")
LANE_ORDER = {"transactional": 0, "normal": 1, "bulk": 2}


class LanePool(Generic[T]):
    """Idle sessions, and waiters by lane priority (use on one event loop)."""

    def __init__(self, sessions: Iterable[T]) -> None:
        self._idle: deque[T] = deque(sessions)
        self._waiters: list[tuple[int, int, asyncio.Future[T]]] = []
        self._order = itertools.count()

    def try_get(self) -> T | None:
        """A free session now, or None (when none is idle, or others wait for one)."""
        if self._idle and not self._waiters:
            return self._idle.popleft()
        return None

    async def get(self, lane: str) -> T:
        """A free session, after every waiter of a more urgent lane (or earlier in this one)."""
        if self._idle and not self._waiters:
            return self._idle.popleft()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (LANE_ORDER.get(lane, 1), next(self._order), future))
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.put(future.result())  # handed over as we were cancelled: not lost
            raise

    def put(self, session: T) -> None:
        """A session is free again: to the first waiter still waiting, else idle."""
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(session)
                return
        self._idle.append(session)

    @property
    def waiting(self) -> int:
        """Waiters not served yet (cancelled ones may still be counted)."""
        return len(self._waiters)
