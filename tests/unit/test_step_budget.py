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
