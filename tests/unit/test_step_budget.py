"""The worker's step budget: one window of deferrable work shared by all its shards."""

from __future__ import annotations

import threading

import pytest

from operators.fanout.step_budget import StepBudget, WorkerStepBudgets
from tests.unit.test_circuit_breaker_and_bucket import Clock


def test_shards_of_one_step_share_the_window_and_the_next_step_gets_a_new_one() -> None:
    clock = Clock()
    budget = StepBudget(0.1, rest_s=0.002, clock=clock)
    first = budget.until()
    assert first == pytest.approx(100.1)
    clock.now = 100.05
    assert budget.until() == first  # another shard in the same window: the same deadline
    clock.now = 100.1005  # the window closed: shards called right after it in the step skip
    assert budget.until() <= clock.now
    clock.now = 100.103  # later than the rest: a new step, a new window
    assert budget.until() == pytest.approx(100.203)
    assert budget.windows == 2


def test_a_budget_needs_a_window() -> None:
    with pytest.raises(ValueError, match="window_s > 0"):
        StepBudget(0)


def test_each_worker_thread_has_its_own_budget() -> None:
    budgets = WorkerStepBudgets(0.1)
    mine = budgets()
    assert budgets() is mine
    seen: list[StepBudget] = []
    t = threading.Thread(target=lambda: seen.append(budgets()))
    t.start()
    t.join()
    assert seen[0] is not mine


def shards_given_time(budget: StepBudget, clock: Clock, shards: int, slice_s: float) -> int:
    """One Bytewax step: each shard in turn asks for time; one given time works `slice_s`."""
    given = 0
    for _ in range(shards):
        if budget.until() > clock.now:
            given += 1
            clock.now += slice_s  # a slice runs whole, past the window's close if it must
        clock.now += 0.00001  # the shard's other work, and Bytewax's call of the next one
        budget.used()
    return given


def test_a_slice_that_overruns_the_window_does_not_open_the_next_one_in_the_same_step() -> None:
    # 32 shards, each slice of a celebrity post 20 ms: the window of 100 ms fits five and the
    # sixth overruns it. Counting the rest from the close alone, each later shard found it
    # over (it came 20 ms after the close) and opened a window: all 32 ran in one step.
    clock = Clock()
    budget = StepBudget(0.1, rest_s=0.002, clock=clock)
    assert shards_given_time(budget, clock, 32, 0.02) == 5
    assert budget.windows == 1
    clock.now += 0.003  # the sources are read, then the next step
    assert shards_given_time(budget, clock, 32, 0.02) == 5
    assert budget.windows == 2


def test_shards_shut_out_do_not_keep_the_window_shut() -> None:
    clock = Clock()
    budget = StepBudget(0.1, rest_s=0.002, clock=clock)
    budget.until()
    clock.now = 100.101
    budget.used()  # the work given time ended past the close
    clock.now = 100.102
    assert budget.until() < clock.now  # resting: 1 ms since the work ended
    budget.used()  # this shard only looked: the rest still counts from 100.101
    clock.now = 100.1035
    assert budget.until() == pytest.approx(100.2035)  # the rest is over: a new window
    assert budget.windows == 2
