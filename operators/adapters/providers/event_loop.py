"""A delivery worker's own asyncio event loop, on a thread beside the Bytewax worker.

The provider clients and the engine's send tasks live on it (aioapns and libcurl's socket
callbacks need a running loop); the worker hands it work and never waits for a provider's
answer (`DeliveryEngine.submit`), or waits for a coroutine it runs (`run`: set-up, close).

`answered_within` bounds a send by the provider's time, not by the loop's: see there.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from operators.delivery.ports import LoopRunner

T = TypeVar("T")

ON_TIME_S = 0.05
"""A timer that runs at most this late ran on a loop that was free to read its sockets."""


async def answered_within(aw: Awaitable[T], timeout_s: float, on_time_s: float = ON_TIME_S) -> T:
    """`aw`'s result, or TimeoutError if the provider did not answer within `timeout_s`.

    Unlike `asyncio.wait_for`, an answer that came while the loop was busy elsewhere (the other
    provider's sends share it) is read, not cancelled: when the deadline's timer runs late,
    the loop was not free to read, so it gets as long again to catch up (the answers waiting
    then take it a while to read), up to `timeout_s` more in all. Cancelling a request the
    provider had already answered makes fanfare send it again, and FCM, which has no
    idempotency key, accepts it twice.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(aw)
    deadline = loop.time() + timeout_s
    spare = timeout_s  # what late deadlines may add, in all
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=max(deadline - loop.time(), 0.0))
            if done:
                return task.result()
            now = loop.time()
            late = now - deadline
            if late <= on_time_s or spare <= 0:  # the loop was free, and no answer came
                raise TimeoutError
            extra = min(late, spare)
            spare -= extra
            deadline = now + extra
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class EventLoopThread(LoopRunner):
    """A worker's event loop on a daemon thread; the worker waits on its futures."""

    def __init__(self, name: str = "delivery-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run on the loop; block this (worker) thread until done."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result()

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run `callback` on the loop, from any thread; do not wait."""
        self.loop.call_soon_threadsafe(callback)

    def stop(self) -> None:
        """Stop the loop."""
        self.loop.call_soon_threadsafe(self.loop.stop)
