"""Fixtures of the reliability suite's fault scenarios.

The broker, topics, Redis prefix, FANFARE_HOME and local provider servers are the `stack` and
`providers` fixtures of tests/conftest.py (pytest finds that conftest for this folder too);
`chaos` wraps them in the `ChaosStack` that `python -m scripts.harness.chaos` drives, so these tests run
the runner's own scenario code at its small scale. `chaos` stops the flows it started before
those fixtures stop the broker and the servers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from scripts.harness.chaos import SMALL, Result, print_report
from scripts.harness.chaos_stack import ChaosStack
from tests.conftest import Providers, Stack


@pytest.fixture
def chaos(stack: Stack, providers: Providers) -> Iterator[ChaosStack]:
    """The test's broker, topics and provider servers, as the chaos runner drives them."""
    adopted = ChaosStack.adopt(stack.env, providers.control.url)
    try:
        yield adopted
    finally:
        adopted.close()


@pytest.fixture
def survived() -> Callable[[Result], Result]:
    """Print a scenario's row and notes (shown with -s), and fail on any problem it found."""

    def check(result: Result) -> Result:
        print_report([result], SMALL)
        assert result.ok, "\n".join(result.problems)
        return result

    return check
