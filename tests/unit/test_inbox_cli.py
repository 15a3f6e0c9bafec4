"""`fanfare inbox` and `fanfare status` against a real SQLite notification store."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from operators.adapters.stores.sqlite_notifications import SQLiteNotificationStore
from operators.delivery.ledger import LedgerUpdate
from schemas.records import NotificationAck
from scripts.cli import main
from scripts.commands.inbox import attempt_answer
from tests.fakes import request


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FANFARE_HOME", str(tmp_path))
    monkeypatch.delenv("FANFARE_NOTIFICATION_STORE_URL", raising=False)
    return tmp_path


def seed(home: Path) -> None:
    store = SQLiteNotificationStore(home / "notifications.db")
    now = time.time()
    reqs = [request("u1", "d1", post=f"p{k}", created_ts=now - 60 * (5 - k)) for k in range(5)]
    reqs.append(request("u1", "d2", post="p4", provider="fcm", created_ts=now - 60))
    store.claim(reqs)
    store.record(
        [
            LedgerUpdate(
                reqs[4].key, "retry_scheduled", 1, 1, 503, "ServiceUnavailable", None, True
            ),
            LedgerUpdate(reqs[5].key, "accepted", 1, 0, 200, None, None, True),
        ],
        now,
    )
    store.apply_acks([NotificationAck("p4:u1", "d2", "opened", datetime.now(UTC))])
    store.close()


def test_inbox_pages_newest_first_and_prints_the_next_cursor(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(home)
    assert main(["inbox", "u1", "--limit", "2", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert [n["post_id"] for n in first["notifications"]] == ["p4", "p3"]
    assert first["notifications"][0]["status"] == "opened"
    assert main(["inbox", "u1", "--limit", "2", "--cursor", first["next_cursor"], "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert [n["post_id"] for n in second["notifications"]] == ["p2", "p1"]
    assert main(["inbox", "u1", "--limit", "2", "--cursor", second["next_cursor"]]) == 0
    text = capsys.readouterr().out
    assert "p0:u1" in text and "next page" not in text
    assert main(["inbox", "u1", "--limit", "4"]) == 0
    [hint] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("next")]
    # The hint is a command as typed: this home, how fanfare was started, the same page size.
    assert hint.startswith(f"next page: FANFARE_HOME={home} ")
    assert " inbox u1 --cursor " in hint and hint.endswith(" --limit 4")
    cursor = hint.split(" --cursor ")[1].split()[0]
    assert main(["inbox", "u1", "--limit", "4", "--cursor", cursor]) == 0
    assert "p0:u1" in capsys.readouterr().out


def test_inbox_refuses_a_bad_cursor_and_says_what_to_do(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(home)
    assert main(["inbox", "u1", "--cursor", "garbage"]) == 2
    assert "pass the next_cursor a page printed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["inbox", "u1", "--limit", "0"])
    assert exc.value.code == 2


def test_status_shows_devices_and_attempts(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed(home)
    assert main(["status", "p4:u1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "opened"
    assert [(d["device_id"], d["state"], d["ack"]) for d in out["devices"]] == [
        ("d1", "retry_scheduled", None),
        ("d2", "accepted", "opened"),
    ]
    assert [(a["device_id"], a["state"], a["status"]) for a in out["attempts"]] == [
        ("d1", "retry_scheduled", 503),
        ("d2", "accepted", 200),
    ]
    assert main(["status", "p4:u1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("notification p4:u1: opened")
    assert "ServiceUnavailable" in text


def test_unknown_notification_and_missing_store_are_clear_errors(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "p1:u1"]) == 1
    assert "no notification store at" in capsys.readouterr().err
    assert not (home / "notifications.db").exists()  # reading does not create it
    seed(home)
    assert main(["status", "nope:u1"]) == 1
    assert "no notification 'nope:u1'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("status", "reason", "shown"),
    [
        (503, "ServiceUnavailable", "503 ServiceUnavailable"),
        (503, "503 ServiceUnavailable", "503 ServiceUnavailable"),  # was "503 503 ..."
        (200, None, "200"),
        (None, "timeout", "timeout"),
        (None, None, "-"),
    ],
)
def test_an_attempt_shows_its_status_once(
    status: int | None, reason: str | None, shown: str
) -> None:
    assert attempt_answer(status, reason) == shown
