from datetime import UTC, datetime

import orjson
from bytewax.testing import TestingSink, TestingSource, run_main

from flows.fanout import build_fanout_flow
from operators.adapters.follower_store import InMemoryFollowerStore
from operators.adapters.kafka_io import RawEvent
from operators.adapters.post_claims import InMemoryPostClaims
from operators.config import Settings
from operators.fanout_shard import CaughtUp


def ev(topic, i, d):
    return RawEvent(topic, 0, i, None, orjson.dumps(d) if not isinstance(d, bytes) else d, 0.0)

def test_smoke():
    s = Settings(shard_count=4)
    store = InMemoryFollowerStore(4)
    claims = InMemoryPostClaims()
    ts = "2026-01-01T12:00:00Z"
    changes = [
        ev("follow_changes", 0, {"author_id":"a","follower_id":"u1","op":"follow","ts":ts}),
        ev("follow_changes", 1, {"author_id":"a","follower_id":"u2","op":"follow","ts":ts}),
        ev("device_changes", 0, {"user_id":"u1","device_id":"d1","provider":"apns","token":"ab"*32,"active":True,"ts":ts}),
        ev("device_changes", 1, {"user_id":"u2","device_id":"d2","provider":"fcm","token":"x"*40,"active":True,"ts":ts}),
        ev("device_changes", 2, b"{bad"),
        CaughtUp("follow_changes/0", 1e12), CaughtUp("device_changes/0", 1e12), CaughtUp("preference_changes/0", 1e12),
    ]
    posts = [ev("post_created", 0, {"event_type":"post_created","post_id":"p1","author_id":"a","visibility":"public","created_at":ts}),
             ev("post_created", 1, {"event_type":"post_created","post_id":"p1","author_id":"a","visibility":"public","created_at":ts})]
    out, dead = [], []
    flow = build_fanout_flow(s, post_source=TestingSource(posts), changelog_source=TestingSource(changes),
        changelog_parts=["follow_changes/0","device_changes/0","preference_changes/0"],
        channel_sink=TestingSink(out), route_batch=lambda b: b.topic, dead_letter_sink=TestingSink(dead),
        store=lambda: store, claims=lambda: claims, clock=lambda: datetime(2026,1,1,12,tzinfo=UTC))
    run_main(flow)
    print(out, dead)
    assert len(dead) == 1
    items = {(k, i["user_id"], i["device_id"]) for k, b in out for i in b.items}
    assert items == {("push.apns","u1","d1"), ("push.fcm","u2","d2")}
