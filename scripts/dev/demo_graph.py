"""A synthetic social graph for the demo and benchmarks: deterministic for a given seed.

Follower counts follow a power law with one celebrity; preferences include opt-outs and quiet
hours in several time zones; devices are spread over APNs and FCM, some users have none or two.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson

from schemas.codecs import format_timestamp

TIMEZONES = (
    "America/New_York",
    "America/Los_Angeles",
    "Europe/London",
    "Europe/Berlin",
    "Asia/Tokyo",
    "Asia/Kolkata",
    "Australia/Sydney",
    "UTC",
)
QUIET_WINDOWS = ((22, 7), (23, 6), (21, 8), (0, 6))

Message = tuple[bytes, bytes]  # (key, value)


def apns_token(rng: random.Random) -> str:
    """64 hex characters, as APNs device tokens are."""
    return f"{rng.getrandbits(256):064x}"


def fcm_token(rng: random.Random) -> str:
    """An FCM registration token's shape: instance id, colon, long base64url body."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    head = "".join(rng.choice(alphabet) for _ in range(22))
    body = "".join(rng.choice(alphabet) for _ in range(140))
    return f"{head}:APA91b{body}"


@dataclass
class SyntheticGraph:
    """The generated world, as the messages to publish on each changelog topic."""

    users: list[str]
    celebrity: str
    follows: list[Message] = field(default_factory=list)
    preferences: list[Message] = field(default_factory=list)
    devices: list[Message] = field(default_factory=list)
    followers_of: dict[str, int] = field(default_factory=dict)


def build_graph(user_count: int, seed: int, now: datetime | None = None) -> SyntheticGraph:
    """Users, follows (power law + a celebrity followed by 60%), preferences and devices."""
    rng = random.Random(seed)
    ts = format_timestamp(now or datetime.now(UTC))
    users = [f"user{i:07d}" for i in range(user_count)]
    celebrity = users[0]
    graph = SyntheticGraph(users, celebrity)

    def follow(author: str, follower: str) -> None:
        notify = rng.random() > 0.05
        muted = rng.random() < 0.03
        body = {
            "author_id": author,
            "follower_id": follower,
            "op": "follow",
            "notify_on_post": notify,
            "muted": muted,
            "ts": ts,
        }
        graph.follows.append((author.encode(), orjson.dumps(body)))
        graph.followers_of[author] = graph.followers_of.get(author, 0) + 1

    for u in users[1:]:
        if rng.random() < 0.6:
            follow(celebrity, u)
    # Power-law tail: author i gets about user_count / (i + 1) ** 1.1 / 4 followers.
    for i, author in enumerate(users[1:200], start=1):
        n = min(user_count - 1, int(user_count / (i + 1) ** 1.1 / 4))
        for follower in rng.sample(users, n):
            if follower != author:
                follow(author, follower)
    follow(users[1], users[1])  # someone follows themself; they must never be notified
    # One author whose follower unfollows again, to show removal.
    follow(users[2], users[3])
    graph.follows.append(
        (
            users[2].encode(),
            orjson.dumps(
                {"author_id": users[2], "follower_id": users[3], "op": "unfollow", "ts": ts}
            ),
        )
    )
    graph.followers_of[users[2]] -= 1

    for u in users:
        r = rng.random()
        if r < 0.3:
            continue  # no preference record: push enabled by default
        push = rng.random() > 0.08
        start, end = rng.choice(QUIET_WINDOWS) if rng.random() < 0.35 else (None, None)
        body = {
            "user_id": u,
            "push_enabled": push,
            "quiet_hours_start": start,
            "quiet_hours_end": end,
            "timezone": rng.choice(TIMEZONES),
            "ts": ts,
        }
        graph.preferences.append((u.encode(), orjson.dumps(body)))
    for u in users:
        r = rng.random()
        count = 0 if r < 0.1 else (1 if r < 0.7 else 2)
        for d in range(count):
            provider = "apns" if rng.random() < 0.45 else "fcm"
            token = apns_token(rng) if provider == "apns" else fcm_token(rng)
            body = {
                "user_id": u,
                "device_id": f"{u}-dev{d}",
                "provider": provider,
                "token": token,
                "active": True,
                "ts": ts,
            }
            graph.devices.append((u.encode(), orjson.dumps(body)))
    return graph


MALFORMED_POSTS = 2
"""Malformed post_created messages `demo_posts` adds: truncated JSON, an unknown visibility."""


def demo_posts(graph: SyntheticGraph, count: int, seed: int, run_id: str) -> Iterator[Message]:
    """`count` posts (one sent twice) by authors weighted by audience, then MALFORMED_POSTS."""
    rng = random.Random(seed + 1)
    ts = format_timestamp(datetime.now(UTC))
    # The celebrity posts once, explicitly; the others are picked by audience.
    authors = [a for a in graph.followers_of if a != graph.celebrity]
    weights = [graph.followers_of[a] for a in authors]

    def post(pid: str, author: str, **extra: object) -> Message:
        body = {
            "event_type": "post_created",
            "post_id": pid,
            "author_id": author,
            "visibility": "public",
            "created_at": ts,
            "text": f"demo post {pid}",
            **extra,
        }
        return author.encode(), orjson.dumps(body)

    yield post(f"{run_id}-celebrity", graph.celebrity)
    for i in range(max(0, count - 5)):
        author = rng.choices(authors, weights)[0]
        yield post(f"{run_id}-post{i:04d}", author, visibility=rng.choice(["public", "followers"]))
    dup = post(f"{run_id}-dup", authors[1])
    yield dup
    yield dup  # the same post_created delivered twice
    yield post(f"{run_id}-private", authors[1], visibility="private")
    yield post(f"{run_id}-silent", authors[1], notify_followers=False)
    yield b"x", b'{"event_type": "post_created", "post_id": '  # truncated JSON
    yield (
        b"x",
        orjson.dumps(
            {
                "event_type": "post_created",
                "post_id": "p",
                "author_id": "a",
                "visibility": "everyone",
                "created_at": ts,
            }
        ),
    )
