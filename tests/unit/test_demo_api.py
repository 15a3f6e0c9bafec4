"""`fanfare demo`'s API part: the samples it prints, its hints, and how `--stay` ends."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import threading
import time

import pytest

from scripts.dev import demo_api


def shown() -> demo_api.ApiDemo:
    return demo_api.ApiDemo(8123, "ffk_abc_def", ["user0000001", "user0000002", "user0000003"],
                            receipt_id="n_0123")  # fmt: skip


def test_samples_are_one_line_per_channel_from_the_servers_records() -> None:
    assert (
        demo_api._sample("email", {"rcpt_to": ["a@example.com"], "subject": "Receipt for 1"})
        == "to a@example.com: Receipt for 1"
    )
    sms = {"to": "+14155550123", "body": "Your login code\n482913 is your code."}
    assert demo_api._sample("sms", sms) == "to +14155550123: Your login code / 482913 is your code."
    push = {"payload": {"title": "Your login code", "body": "482913"}}
    assert demo_api._sample("webpush", push) == "Your login code | 482913"
    assert demo_api._sample("chat", {"body": {"text": "Receipt\nfor 1"}}) == "Receipt / for 1"


def test_the_curl_hints_parse_in_a_shell_into_the_requests_they_name() -> None:
    status, inbox, send = (shlex.split(line) for line in demo_api.hints(shown()))
    auth = ["-H", "Authorization: Bearer ffk_abc_def"]
    assert status == ["curl", "-s", "127.0.0.1:8123/v1/notifications/n_0123/status", *auth]
    assert inbox == [
        "curl",
        "-s",
        "127.0.0.1:8123/v1/users/user0000001/notifications?unread_only=true",
        *auth,
    ]
    assert send[:5] == ["curl", "-s", "-X", "POST", "127.0.0.1:8123/v1/notifications"]
    body = json.loads(send[send.index("-d") + 1])
    assert body["category"] == "login_code" and body["recipients"] == ["user0000001"]
    assert body["data"] == demo_api.LOGIN_DATA
    assert demo_api.inbox_page(shown()) == "http://127.0.0.1:8123/dev/inbox?user=user0000001"


def test_stay_ends_when_a_process_it_watches_exits(capsys: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.Popen(["sleep", "0.2"])
    started = time.monotonic()
    demo_api.stay([("api", proc)])
    assert time.monotonic() - started < 5
    assert "api exited (code 0); stopping" in capsys.readouterr().out


def test_stay_ends_on_sigterm_and_puts_the_handlers_back() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        before = signal.getsignal(signal.SIGTERM)
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        demo_api.stay([("api", proc)])
        assert proc.poll() is None  # it ended on the signal, not on the process
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        proc.kill()
        proc.wait()
