"""Channel addresses and category switches reach today's fan-out: each is one dead letter.

Until the fan-out reads channel addresses and per-category switches (the lead wires them), its
changelog decoders read push devices and complete preference records only; the new events must
be dead letters with their reason, once each, and never stop or confuse the flow.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from bytewax.testing import cluster_main, run_main

from operators.events import CaughtUp
from schemas.records import DeadLetter
from tests.flow.test_fanout_flow import PARTS, TS, Events, build, device, follow, items, post


@pytest.mark.parametrize("workers", [1, 2])
def test_channel_addresses_and_switches_are_dead_letters_for_the_push_fanout(workers: int) -> None:
    e = Events()
    subscription = orjson.dumps(
        {"endpoint": "https://push.example.net/x", "keys": {"auth": "A" * 22, "p256dh": "B" * 87}}
    ).decode()
    channel_events = [
        {"provider": "email", "token": "bob@example.com"},
        {"provider": "sms", "token": "+14155550123"},
        {"provider": "chat", "token": "https://hooks.slack.com/services/T/B/X"},
        {"provider": "webpush", "token": subscription},
    ]
    changes: list[Any] = [
        e("follow_changes", follow("alice", "bob")),
        e("device_changes", device("bob", "bob-phone", "apns")),
        *(
            e(
                "device_changes",
                {
                    "user_id": "bob",
                    "device_id": f"bob-{c['provider']}",
                    "active": True,
                    "ts": TS,
                    **c,
                },
            )
            for c in channel_events
        ),
        e(
            "preference_changes",
            {
                "kind": "category_switch",
                "user_id": "bob",
                "category": "campaign",
                "channel": None,
                "enabled": False,
                "ts": TS,
            },
        ),
    ]
    changes += [CaughtUp(p, 1e12) for p in PARTS]
    posts = [e("post_created", post("p1", "alice"))]
    out: list[Any] = []
    keyed_dead: list[tuple[str, DeadLetter]] = []
    flow = build(changes, posts, out, keyed_dead)
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=2)
    assert items(out) == [("p1", "bob", "bob-phone")]  # push goes on, untouched
    dead = [d for _, d in keyed_dead]
    reasons = sorted(d.error.split(":")[0] for d in dead)
    assert reasons == ["unsupported_kind"] + ["unsupported_provider"] * 4
    assert sorted(d.source_topic for d in dead) == ["device_changes"] * 4 + ["preference_changes"]
