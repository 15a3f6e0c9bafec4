"""A delivery worker's own asyncio event loop, on a thread beside the Bytewax worker.

The provider clients and the engine's send tasks live on it (aioapns and libcurl's socket
callbacks need a running loop); the worker hands it work and never waits for a provider's
answer (`DeliveryEngine.submit`), or waits for a coroutine it runs (`run`: set-up, close).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from operators.delivery.ports import LoopRunner

T = TypeVar("T")


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
