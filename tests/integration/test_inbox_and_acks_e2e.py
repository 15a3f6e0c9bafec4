"""Delivered pushes appear in the inbox; an app's ack turns one to opened (real broker, flows)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from operators.adapters.kafka.writer import produce_all
from schemas.codecs import format_timestamp
from tests.conftest import Providers, Stack, wait_for
from tests.integration.test_delivery_e2e import apns_token, publish, wait_terminal


def fanfare(stack: Stack, *argv: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "scripts.cli", *argv],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr


def status(stack: Stack, nid: str) -> dict[str, Any]:
    code, out, err = fanfare(stack, "status", nid, "--json")
    assert code == 0, err
    parsed: dict[str, Any] = json.loads(out)
    return parsed


def test_delivered_notifications_fill_the_inbox_and_an_ack_opens_one(
    stack: Stack, providers: Providers
) -> None:
    rng = random.Random(9)
    now = datetime.now(UTC)
    # Three posts a minute apart reach u1 (two devices on the last) and u2.
    for k in range(3):
        items = [("u1", "ios", apns_token(rng)), ("u2", "ios", apns_token(rng))]
        if k == 2:
            items.append(("u1", "ipad", apns_token(rng)))
        publish(stack, "apns", f"post{k}", items, created_at=now - timedelta(minutes=3 - k))
    stack.start_flow(flow="delivery")
    outcomes = wait_terminal(stack, 7, 120)
    assert set(map(tuple, outcomes.values())) == {("accepted",)}

    code, out, err = fanfare(stack, "inbox", "u1", "--limit", "2", "--json")
    assert code == 0, err
    first = json.loads(out)
    assert [n["notification_id"] for n in first["notifications"]] == ["post2:u1", "post1:u1"]
    assert {n["status"] for n in first["notifications"]} == {"dispatched"}
    code, out, err = fanfare(stack, "inbox", "u1", "--cursor", first["next_cursor"], "--json")
    second = json.loads(out)
    assert [n["notification_id"] for n in second["notifications"]] == ["post0:u1"]
    assert second["next_cursor"] is None

    ts = format_timestamp(datetime.now(UTC))
    acks = [
        {"notification_id": "post2:u1", "device_id": "ipad", "event": "delivered", "ts": ts},
        {"notification_id": "post2:u1", "device_id": "ipad", "event": "opened", "ts": ts},
        {"notification_id": "post1:u2", "device_id": "ios", "event": "delivered", "ts": ts},
        {"notification_id": "post7:u1", "device_id": "ios", "event": "opened", "ts": ts},
    ]
    messages = [(a["notification_id"].encode(), orjson.dumps(a)) for a in acks]
    messages.append((b"x", b'{"notification_id": "post2:u1", "event": "opened"}'))
    produce_all(stack.settings.kafka_config(), "notification_acks", messages)
    stack.start_flow(flow="acks")

    wait_for(
        lambda: (
            status(stack, "post2:u1")["status"] == "opened"
            and status(stack, "post1:u2")["status"] == "delivered"
        ),
        60,
        "the acks to be applied",
        stack,
    )
    devices = {d["device_id"]: d["ack"] for d in status(stack, "post2:u1")["devices"]}
    assert devices == {"ios": None, "ipad": "opened"}
    assert status(stack, "post0:u1")["status"] == "dispatched"

    def dead_acks() -> list[dict[str, Any]]:
        return [d for d in stack.dead_letters() if d["source_topic"] == "notification_acks"]

    wait_for(lambda: len(dead_acks()) == 2, 30, "two dead-lettered acks", stack)
    errors = sorted(d["error"].split(":")[0] for d in dead_acks())
    assert errors == ["schema", "unknown_notification"]
