"""The worker's step budget: one window of deferrable work shared by all its shards."""

from __future__ import annotations

import threading

import pytest

from operators.fanout.step_budget import StepBudget, WorkerStepBudgets
from tests.unit.test_circuit_breaker_and_bucket import Clock


def activation(budget: StepBudget, clock: Clock, shards: int, slice_s: float) -> list[int]:
    """One activation of the shard operator: each shard in turn asks for time, once.

    A shard given time works one slice, whole, past the window's close if it must; the
    others take a few microseconds (their other work). Returns the shards given time.
    """
    given = []
    for shard in range(shards):
        if budget.until(shard) > clock.now:
            given.append(shard)
            clock.now += slice_s
        clock.now += 0.00001
    return given


def test_shards_of_one_activation_share_the_window_and_the_next_one_gets_a_new_one() -> None:
    clock = Clock()
    budget = StepBudget(0.1, clock=clock)
    first = budget.until("a")
    assert first == pytest.approx(100.1)
    clock.now = 100.05
    assert budget.until("b") == first  # another shard in the same window: the same deadline
    clock.now = 100.1005  # the window closed: shards called after it in the activation skip
    assert budget.until("c") <= clock.now
    clock.now = 100.103
    assert budget.until("d") <= clock.now  # still the same activation: "d" has not asked
    assert budget.until("a") == pytest.approx(100.203)  # "a" again: a new activation
    assert budget.windows == 2


def test_a_slice_that_overruns_the_window_does_not_open_the_next_one_in_the_same_step() -> None:
    # 32 shards, each slice of a celebrity post 20 ms: the window of 100 ms fits five and the
    # fifth overruns it. With a clock-based rest after the close, each later shard found it
    # over (it came 20 ms after the close) and opened a window: all 32 ran in one activation.
    clock = Clock()
    budget = StepBudget(0.1, clock=clock)
    assert activation(budget, clock, 32, 0.02) == [0, 1, 2, 3, 4]
    assert budget.windows == 1
    clock.now += 0.001  # the inputs that are due are read, then the next activation
    assert activation(budget, clock, 32, 0.02) == [0, 1, 2, 3, 4]
    assert budget.windows == 2


def test_other_work_between_shards_does_not_open_a_window_either() -> None:
    # Normal posts are not deferrable: 5 ms of them per shard made a rest of a few ms pass
    # between two shards of the same activation.
    clock = Clock()
    budget = StepBudget(0.1, clock=clock)
    budget.until(0)
    clock.now += 0.11  # the first shard's slice overran the window
    for shard in range(1, 12):
        assert budget.until(shard) < clock.now
        clock.now += 0.005  # its normal posts
    assert budget.windows == 1


def test_a_first_ask_after_a_rest_as_long_as_a_window_is_not_held() -> None:
    clock = Clock()
    budget = StepBudget(0.1, clock=clock)
    budget.until(0)
    clock.now += 0.1 + 0.1  # idle: the window closed a window's length ago
    assert budget.until(7) > clock.now  # a shard not seen before, yet not held
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
