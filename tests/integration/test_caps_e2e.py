"""Frequency caps as users run them (`fanfare run fanout`), on the real broker and Redis.

A user follows six authors who all post at the start of a one-minute window, with
FANFARE_POST_CAP=2: two single pushes, then, when the window ends, one summary push of the
other four on each of the user's devices. The flow is killed (-9) in the middle of the window
and started again from its recovery data and checkpoints: the same two pushes and one summary,
each item once on the topics.
"""

from __future__ import annotations

import time
from collections import Counter

import orjson
import pytest

from operators.fanout.shard import summary_id
from schemas.topics import CHANNEL_TOPICS
from tests.conftest import Stack, wait_for
from tests.integration.test_fanout_e2e import device, follow, post, publish

pytestmark = pytest.mark.integration

WINDOW_S = 60
AUTHORS = [f"author{i}" for i in range(6)]
CAPS = ("FANFARE_POST_CAP", "2"), ("FANFARE_CAP_WINDOW_S", str(WINDOW_S))


def summaries(stack: Stack) -> list[dict[str, object]]:
    """Every bundle summary batch on the push topics, with its message."""
    out = []
    for topic in CHANNEL_TOPICS:
        for _, _, value in stack.read_topic(topic):
            batch = orjson.loads(value or b"{}")
            if "message" in batch:
                out.append(batch)
    return out


def test_two_pushes_then_one_summary_across_a_kill_9(stack: Stack) -> None:
    publish(stack, "follow_changes", [(a, follow(a, "u")) for a in AUTHORS])
    publish(stack, "follow_changes", [("warm", follow("warm", "w"))])
    publish(stack, "device_changes", [("u", device("u", "u-phone", "apns"))])
    publish(stack, "device_changes", [("u", device("u", "u-tablet", "fcm"))])
    publish(stack, "device_changes", [("w", device("w", "w-phone", "apns"))])
    first = stack.start_flow(*CAPS)
    # The flow is up and caught up once a post of another author reached its follower.
    publish(stack, "post_created", [("warm", post("warm-1", "warm"))])
    wait_for(lambda: len(stack.dispatch_items()) == 1, 120, "the flow caught up", stack)
    # The six posts at the start of a window, so that they all fall in it.
    time.sleep(WINDOW_S - time.time() % WINDOW_S + 1)
    window = int(time.time() // WINDOW_S * WINDOW_S)
    publish(stack, "post_created", [(a, post(f"p{i}", a)) for i, a in enumerate(AUTHORS)])

    def singles() -> list[tuple[str, str, str, str, str]]:
        return [i for i in stack.dispatch_items() if i[2] == "u" and i[1].startswith("p")]

    wait_for(lambda: len(singles()) >= 4, 30, "the two single pushes", stack)
    time.sleep(7)  # a snapshot with the counts (every 5 s), and the four bundled meanwhile
    assert time.time() < window + WINDOW_S - 5, "too slow: the window ended before the kill"
    stack.kill_flow(first)
    stack.start_flow(*CAPS)
    wait_for(lambda: summaries(stack), WINDOW_S + 90, "the summary", stack)
    time.sleep(5)  # a second summary or a late single would show up now
    items = Counter(i for i in stack.dispatch_items() if i[2] == "u")
    assert all(n == 1 for n in items.values()), items  # each item once on the topics
    sid = summary_id("new_post", window)
    posts = sorted({i[1] for i in items if i[1].startswith("p")})
    assert len(posts) == 2 and set(posts) <= {f"p{i}" for i in range(6)}
    assert {(i[0], i[3], i[4]) for i in items if i[1] == sid} == {
        ("push.apns", "u-phone", f"{sid}:u"),
        ("push.fcm", "u-tablet", f"{sid}:u"),
    }
    assert len(items) == 6  # 2 posts x 2 devices, 1 summary x 2 devices
    for batch in summaries(stack):
        message = batch["message"]
        assert isinstance(message, dict)
        assert message["template_id"] == "new_posts_bundle" and message["tier"] == "social"
        assert message["data"]["count"] == 4 and message["collapse_key"] == "bundle:new_post:u"
