"""How long one worker's shards spend on work that can wait, per Bytewax step, all together.

A worker runs every shard it owns in one activation of the shard operator: 32 shards each
allowed 40 ms of a celebrity post, or 2,000 recipients of a campaign (about 100 ms), held a
login code or a normal post read in the meantime for 1.3 to 3 s. A per-shard budget cannot
bound that; a window shared by the worker's shards can. Work that can wait (celebrity posts,
social and marketing notifications) runs until the window closes; the shards called after that
in the same step skip it, and the step ends, so the sources are read again and urgent work
(transactional notifications, normal posts) runs in the next step. A new window opens once
`rest_s` has passed since the last one closed and since the last deferrable work ended (`used`):
shards called back to back in one step are a few microseconds apart, so they see the window
closed, while the next step comes later than that. Counting from the close alone was not
enough: a shard's last slice overruns the close by up to a slice (a shard's portion of a
celebrity post at 1M followers, ~20 ms), so the next shard found the rest over and opened a
window, and so on through all 32 shards: a 0.6-0.9 s step in which no post was read. If a
step's other work outlasts `rest_s`, a later shard opens a new window in the same step: the
bound is then two windows, not one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from operators.worker_local import WorkerLocal


class StepBudget:
    """A window of time for deferrable work, shared by the shards of one worker."""

    def __init__(
        self,
        window_s: float,
        *,
        rest_s: float = 0.002,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_s <= 0 or rest_s < 0:
            raise ValueError("a step budget needs window_s > 0 and rest_s >= 0")
        self.window_s = window_s
        self.rest_s = rest_s
        self._clock = clock
        self._end = float("-inf")
        self._used_at = float("-inf")  # when the last deferrable work given time ended
        self._granted = False  # whether the last `until` found the window open
        self.windows = 0  # windows opened (tests, metrics)

    def until(self) -> float:
        """The deadline (`clock()` time) for deferrable work now; already past while resting."""
        now = self._clock()
        if now >= self._end and now >= max(self._end, self._used_at) + self.rest_s:
            self._end = now + self.window_s
            self.windows += 1
        self._granted = now < self._end
        return self._end

    def used(self) -> None:
        """The caller's deferrable work, given time by its last `until`, ended now.

        The rest before the next window counts from here too. A caller the window was shut to
        does not count: otherwise shards that only looked would keep it shut for ever.
        """
        if self._granted:
            self._used_at = self._clock()
            self._granted = False


class WorkerStepBudgets:
    """One `StepBudget` per worker thread: Bytewax workers step independently of each other."""

    def __init__(self, window_s: float, *, rest_s: float = 0.002) -> None:
        self._window_s = window_s
        self._rest_s = rest_s
        self._local = WorkerLocal()

    def __call__(self) -> StepBudget:
        """The calling worker thread's budget (made at its first call)."""
        budget: StepBudget | None = getattr(self._local, "budget", None)
        if budget is None:
            budget = self._local.budget = StepBudget(self._window_s, rest_s=self._rest_s)
        return budget
