"""How long one worker's shards spend on work that can wait, per Bytewax step, all together.

A worker runs every shard it owns in one activation of the shard operator: 32 shards each
allowed 40 ms of a celebrity post, or 2,000 recipients of a campaign (about 100 ms), held a
login code or a normal post read in the meantime for 1.3 to 3 s. A per-shard budget cannot
bound that; a window shared by the worker's shards can. Work that can wait (celebrity posts,
social and marketing notifications) runs until the window closes; the shards called after that
in the same activation skip it, and the activation ends, so the inputs that are due are read
and urgent work (transactional notifications, normal posts) runs before the next window.

A new window opens when a shard that already asked since the last one opened asks again:
Bytewax calls each shard once per activation, so a shard asking twice means the operator was
activated again, and the worker went back to its other operators in between. (A clock-based
rest after the close did not hold: one shard's last slice overran the close by ~20 ms, or its
normal posts took a few ms, so the next shard found the rest over and opened a window, and so
on through all 32 shards: activations of 0.4-0.9 s in which no post was read.) If Bytewax calls
a shard twice in one activation (items, then its notification), that is two windows at most.
A window also opens after a rest as long as a window, so a first ask after an idle spell is
not held for an activation, and deferrable work keeps about half the worker when the other
work of an activation is long.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

from operators.worker_local import WorkerLocal


class StepBudget:
    """A window of time for deferrable work, shared by the shards of one worker."""

    def __init__(
        self,
        window_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_s <= 0:
            raise ValueError("a step budget needs window_s > 0")
        self.window_s = window_s
        self._clock = clock
        self._end = float("-inf")
        self._asked: set[Hashable] = set()  # callers that asked since the window opened
        self.windows = 0  # windows opened (tests, metrics)

    def until(self, caller: Hashable) -> float:
        """The deadline (`clock()` time) for `caller`'s deferrable work; past while shut."""
        now = self._clock()
        if now >= self._end and (caller in self._asked or now >= self._end + self.window_s):
            self._end = now + self.window_s
            self.windows += 1
            self._asked.clear()
        self._asked.add(caller)
        return self._end


class WorkerStepBudgets:
    """One `StepBudget` per worker thread: Bytewax workers step independently of each other."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._local = WorkerLocal()

    def __call__(self) -> StepBudget:
        """The calling worker thread's budget (made at its first call)."""
        budget: StepBudget | None = getattr(self._local, "budget", None)
        if budget is None:
            budget = self._local.budget = StepBudget(self._window_s)
        return budget
