"""The README's quick start as a newcomer runs it: the demo, then every command it prints.

The closest equivalent of a fresh clone: the project's own `fanfare` entry point (the one
`pip install -e '.[devstack]'` put next to this Python), started from the repository root as the
README says, with a FANFARE_HOME of the test's own. Every hint the demo prints must run as
printed (through a shell, from the same folder), and so must the next-page hint those print.
Smaller than the default demo, so it takes about a minute.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
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
    # --stay: the API stays up after the summary, so its curl lines can run as printed too.
    demo = subprocess.Popen(
        [entry_point(), "demo", "--users", "800", "--posts", "10", "--stay"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert demo.stdout is not None
        lines = []
        deadline = time.monotonic() + 480
        for line in demo.stdout:
            lines.append(line)
            if line.strip() == "(up until Ctrl-C)" or time.monotonic() > deadline:
                break
        up = "".join(lines)
        assert "(up until Ctrl-C)" in up, up
        check_api_hints(up, env)
    finally:
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        rest, err = demo.communicate(timeout=120)
    out = up + rest
    assert demo.returncode == 0, out + err
    assert "Traceback" not in out + err
    assert "The demo's broker, API and local servers are stopped" in rest, rest

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


CHANNEL_ROW = re.compile(r"^  (email|sms|webpush|chat|inapp) +(\d+) +(\d+) +(\d+)  (.+)$", re.M)


def check_api_hints(out: str, env: dict[str, str]) -> None:
    """The API part: every channel's row adds up, and its curl lines and page work as printed."""
    rows = {m[1]: (int(m[2]), int(m[3]), int(m[4]), m[5]) for m in CHANNEL_ROW.finditer(out)}
    assert set(rows) == {"email", "sms", "webpush", "chat", "inapp"}, out
    for channel, (dispatched, settled, received, sample) in rows.items():
        # Each channel's local server received what the fan-out dispatched to it, once.
        assert dispatched == settled == received > 0, (channel, rows[channel])
        assert sample != "-", channel
    assert "482913" in rows["sms"][3] and "1234" in rows["email"][3], rows
    receipt = re.search(r"receipt (n_\w+) \(email, in-app, chat\)", out)
    assert receipt is not None, out
    status = re.search(rf"GET /v1/notifications/{receipt[1]}/status: (\w+), recipients", out)
    assert status is not None and status[1] == "accepted", out
    curls = re.findall(r"^    (curl .+)$", out, re.M)
    assert len(curls) == 3, out
    answers = []
    for line in curls:
        ran = subprocess.run(
            ["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert ran.returncode == 0, f"{line}\n{ran.stdout}{ran.stderr}"
        answer = json.loads(ran.stdout)
        assert "error" not in answer, f"{line}\n{ran.stdout}"
        answers.append(answer)
    status_answer, inbox_answer, sent = answers
    assert status_answer["notification_id"] == receipt[1]
    assert status_answer["recipients"] == 3
    assert "notifications" in inbox_answer, inbox_answer
    assert sent["notification_id"].startswith("n_") and sent["recipients"] == 1, sent
    page = re.search(
        r"the live inbox page: (http://127\.0\.0\.1:\d+/dev/inbox\?user=\w+)$", out, re.M
    )
    assert page is not None, out
    with urllib.request.urlopen(page[1], timeout=30) as response:
        assert response.status == 200
        assert "<html" in response.read().decode().lower()
