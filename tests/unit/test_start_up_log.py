"""Start-up steps are logged with the time since the process started (restart timelines)."""

from __future__ import annotations

import logging
import time

import pytest

from flows.runtime.logs import log_started, process_age_s


def test_the_process_age_counts_from_the_process_start() -> None:
    first = process_age_s()
    assert first is not None and first > 0
    time.sleep(0.05)
    later = process_age_s()
    assert later is not None and later > first


def test_a_start_up_step_says_how_long_after_the_start(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        log_started(logging.getLogger("fanfare.test"), "fanout: flow built")
    (line,) = caplog.messages
    assert line.startswith("fanout: flow built ") and line.endswith(" s after the process started")
