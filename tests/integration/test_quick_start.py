"""The README's quick start as a newcomer runs it: the demo, then every command it prints.

The closest equivalent of a fresh clone: the project's own `fanfare` entry point (the one
`pip install -e '.[devstack]'` put next to this Python), started from the repository root as the
README says, with a FANFARE_HOME of the test's own. Every hint the demo prints must run as
printed (through a shell, from the same folder), and so must the next-page hint those print.
Smaller than the default demo, so it takes about a minute.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def entry_point() -> str:
    """`.venv/bin/fanfare`, as the quick start calls it (relative to the repository root)."""
    program = Path(sys.executable).parent / "fanfare"
    if not program.exists():
        pytest.skip(f"no fanfare entry point next to {sys.executable} (not installed with pip)")
    try:
        return str(program.relative_to(ROOT))
    except ValueError:
        return str(program)


def number(text: str) -> int:
    return int(text.replace(",", ""))


@pytest.mark.timeout(600)
def test_the_quick_start_demo_adds_up_and_every_printed_hint_runs(tmp_path: Path) -> None:
    assert "python3 -m venv .venv && .venv/bin/pip install -e '.[devstack]'" in README
    assert ".venv/bin/fanfare demo" in README
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANFARE_")}
    env.update(
        FANFARE_HOME=str(tmp_path / "home"),
        FANFARE_REDIS_URL=REDIS_URL,
        FANFARE_REDIS_PREFIX=f"fanfare-test-{uuid.uuid4().hex[:8]}:",
    )
    demo = subprocess.run(
        [entry_point(), "demo", "--users", "800", "--posts", "10"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    out = demo.stdout
    assert demo.returncode == 0, out + demo.stderr
    assert "Traceback" not in out + demo.stderr

    # The summary adds up: messages = valid posts + the post dead letters; dead letters by
    # source add up to what the dead_letters topic holds.
    assert "10 posts (one of them sent twice) and 2 malformed post messages" in out
    published = re.search(r"messages published\s+([\d,]+)\s+\((\d+) posts, (\d+) malformed\)", out)
    assert published is not None, out
    assert number(published[1]) == int(published[2]) + int(published[3]) == 12
    read = number(re.search(r"posts read \(valid\)\s+([\d,]+)", out)[1])  # type: ignore[index]
    sources = {m[1]: number(m[2]) for m in re.finditer(r"  from (\S+)\s+([\d,]+)", out)}
    assert read + sources["post_created"] == number(published[1])
    on_topic = number(re.search(r"on the dead_letters topic\s+([\d,]+)", out)[1])  # type: ignore[index]
    assert sum(sources.values()) == on_topic == 6, out

    hints = re.findall(r"^    (FANFARE_HOME=\S+ \S+ (?:inbox|status) .+)$", out, re.M)
    assert len(hints) == 2, out
    for hint in hints:
        ran = subprocess.run(
            ["bash", "-c", hint], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert ran.returncode == 0, f"{hint}\n{ran.stdout}{ran.stderr}"
        assert ran.stdout.startswith(("inbox of ", "notification ")), ran.stdout
        for next_hint in re.findall(r"^next page: (.+)$", ran.stdout, re.M):
            more = subprocess.run(
                ["bash", "-c", next_hint],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert more.returncode == 0, f"{next_hint}\n{more.stdout}{more.stderr}"
            assert more.stdout.startswith("inbox of "), more.stdout
