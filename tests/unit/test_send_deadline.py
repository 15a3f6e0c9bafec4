"""A send's deadline counts the provider's time, not the time its event loop was busy elsewhere."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

import pytest

from operators.adapters.providers.event_loop import answered_within


async def answer_read_in_steps(arrived: threading.Event, steps: int = 5) -> str:
    """An answer the provider gave (`arrived`), read over a few loop turns, as HTTP/2 does."""
    while not arrived.is_set():
        await asyncio.sleep(0.005)
    for _ in range(steps):
        await asyncio.sleep(0)
    return "accepted"


def test_an_answer_that_came_while_the_loop_was_busy_is_read_not_cancelled() -> None:
    """asyncio.wait_for cancels it: the push is then sent again (twice at FCM)."""
    arrived = threading.Event()

    async def scenario(bound: Callable[[Awaitable[str], float], Awaitable[str]]) -> str:
        sending = asyncio.ensure_future(bound(answer_read_in_steps(arrived), 0.2))
        await asyncio.sleep(0.01)
        threading.Timer(0.05, arrived.set).start()  # the provider answers in time...
        time.sleep(0.5)  # ...while the loop is busy with other sends, past the deadline
        return await sending

    assert asyncio.run(scenario(answered_within)) == "accepted"
    arrived.clear()
    with pytest.raises(TimeoutError):  # what the sender did before
        asyncio.run(scenario(asyncio.wait_for))


def test_no_answer_on_a_free_loop_times_out_at_the_deadline_and_cancels_the_send() -> None:
    cancelled = asyncio.Event()

    async def never_answered() -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "late"

    async def scenario() -> float:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await answered_within(never_answered(), 0.2)
        assert cancelled.is_set()
        return time.monotonic() - started

    took = asyncio.run(scenario())
    assert 0.2 <= took < 0.2 + 0.2  # the deadline, and at most a settle window or so more


def test_a_loop_that_stays_busy_still_gives_up() -> None:
    """However late the timers run, a send is bounded: at most `timeout_s` more to catch up."""

    async def never_answered() -> None:
        await asyncio.sleep(60)

    async def busy_loop() -> None:  # blocks the loop 0.1 s every turn: each timer runs late
        while True:
            time.sleep(0.1)
            await asyncio.sleep(0)

    async def scenario() -> float:
        hog = asyncio.ensure_future(busy_loop())
        started = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                await answered_within(never_answered(), 0.2, on_time_s=0.05)
        finally:
            hog.cancel()
        return time.monotonic() - started

    # 0.2 s, then at most 0.2 s more, each wait ending a busy 0.1 s turn or two late: about
    # 0.8 s, far from the 60 s the send would otherwise wait.
    assert asyncio.run(scenario()) < 2.0
