"""The demo's own pieces: what it publishes adds up, and a long wait says how far it got."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from scripts.dev import demo
from scripts.dev.demo_graph import MALFORMED_POSTS, build_graph, demo_posts


def test_the_posts_are_the_count_asked_plus_the_malformed_ones() -> None:
    graph = build_graph(300, seed=3)
    messages = list(demo_posts(graph, 12, seed=3, run_id="r"))
    valid, malformed = [], 0
    for _, value in messages:
        try:
            valid.append(orjson.loads(value)["visibility"])
        except (orjson.JSONDecodeError, KeyError):
            malformed += 1
            continue
    # One of the 12 posts is sent twice; the unknown visibility is the second malformed one.
    assert len(messages) == 12 + MALFORMED_POSTS
    assert len(valid) - valid.count("everyone") == 12
    assert malformed + valid.count("everyone") == MALFORMED_POSTS


def test_a_wait_longer_than_two_seconds_says_how_far_it_got(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    flow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        done_at = time.monotonic() + demo.PROGRESS_EVERY_S + 0.6
        demo._wait(
            "the thing",
            lambda: time.monotonic() >= done_at,
            10,
            flow,
            tmp_path / "log",
            lambda: "3 of 5 parts",
        )
    finally:
        flow.kill()
        flow.wait()
    assert "  waiting for the thing: 3 of 5 parts (2 s)" in capsys.readouterr().out
