"""Bad input never stops a flow: 10,000+ malformed and adversarial messages on every input topic.

The corpus comes from the Hypothesis strategies in tests/unit/test_codecs_properties.py (whose
unit tests check each message's label against the flows' own decode steps), drawn with fixed
seeds so every run publishes the same messages: about 920 per input topic (bad JSON, lone
surrogates, invalid UTF-8, NUL and other control characters, bidi overrides and emoji in enums
and time zones, wrong types, missing fields, unknown enum values, bad timestamps, hours out of
range, half-set quiet hours, unknown time zones, tokens of the wrong shape, oversized strings and
item lists, non-objects, duplicate keys, tombstones, empty values, null and binary keys; acks of
notifications never sent) and one value of about 1 MB per topic.

All three flows run (`fanfare run fanout|delivery|acks`, with the local APNs and FCM servers).
The corpus is published in chunks; between them go valid posts by authors with followers, and
valid posts by authors nobody follows (odd unicode ids, null keys), and, after the pushes were
accepted, valid acks. At the end:

- the dead letters are exactly the malformed messages: the set of (topic, partition, offset) on
  `dead_letters` equals the set the producer was told, each once, each error starting with the
  message's label (`schema:`, `invalid_json:`, `empty:`, `unknown_timezone:`,
  `unknown_notification:`) and keeping the original value (its first 64 KiB for the 1 MB ones);
- a valid post nobody follows is not a dead letter: it notifies no one;
- the valid traffic flowed: the providers accepted exactly the pushes of the valid posts, and the
  acks moved their notifications to delivered / opened;
- no flow restarted: the same Bytewax process ids at the end, no restart on /live, one start in
  each log and no Traceback; and each flow's `fanfare_dead_letters_written_total` adds up to the
  corpus by source topic and reason.
"""

from __future__ import annotations

import os
import random
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError, Producer

from flows.runtime.ports import free_port
from operators.adapters.kafka.client_log import client_config
from operators.adapters.stores.by_url import open_notification_store
from schemas.codecs import RAW_TEXT_LIMIT, format_timestamp, raw_text
from tests.conftest import Providers, Stack, wait_for
from tests.integration.test_delivery_e2e import apns_token, fcm_token
from tests.unit.test_codecs_properties import (
    INPUT_TOPICS,
    Message,
    draw_corpus,
    draw_examples,
    unknown_author_post,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 20_261_122
PER_TOPIC = 920  # x 11 input topics + 11 values of 1 MB = 10,131 malformed messages
HUGE_PER_TOPIC = 1
CHUNKS = 10
FLOWS = ("fanout", "delivery", "acks")
TS = "2026-06-01T12:00:00Z"

# The valid world: two authors with followers, each follower with one or two devices.
FOLLOWERS = {"known-a": ["fan0", "fan1", "fan2"], "known-b": ["fan1", "fan3"]}
DEVICES = {
    "fan0": [("apns", "fan0-ios")],
    "fan1": [("apns", "fan1-ios"), ("fcm", "fan1-android")],
    "fan2": [("fcm", "fan2-android")],
    "fan3": [("apns", "fan3-ios")],
}


def iso_now() -> str:
    return format_timestamp(time.time())


def http_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError, ValueError):
        return 0, None


class Publisher:
    """One producer for everything; remembers where each malformed message landed."""

    def __init__(self, stack: Stack) -> None:
        self._producer = Producer(
            client_config(
                stack.settings.kafka_config(),
                **{"linger.ms": 5, "acks": "all", "message.max.bytes": 16 * 1024 * 1024},
            )
        )
        self.positions: dict[int, tuple[str, int, int]] = {}
        self.valid_positions: set[tuple[str, int, int]] = set()
        self.errors: list[str] = []

    def send(self, topic: str, key: bytes | None, value: bytes | None, index: int | None) -> None:
        def delivered(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                self.errors.append(err.str())
                return
            where = (msg.topic(), msg.partition(), msg.offset())
            if index is None:
                self.valid_positions.add(where)
            else:
                self.positions[index] = where

        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=delivered)
                return
            except BufferError:
                self._producer.poll(0.05)

    def flush(self) -> None:
        assert self._producer.flush(120) == 0
        assert not self.errors, self.errors[:3]


def metrics_port(stack: Stack, index: int) -> int:
    log = (Path(stack.env["FANFARE_HOME"]) / f"flow-{index}.log").read_text(errors="replace")
    found = re.search(r"metrics on port\(s\) (\d+);", log)
    assert found, log[-2000:]
    return int(found.group(1))


def dead_letters_written(port: int) -> Counter[tuple[str, str]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    counts: Counter[tuple[str, str]] = Counter()
    for line in text.splitlines():
        if line.startswith("fanfare_dead_letters_written_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            counts[(labels["source_topic"], labels["reason"])] += int(float(line.rsplit(" ", 1)[1]))
    return counts


def corpus_table(corpus: dict[str, list[Message]]) -> str:
    """Counts per topic and reason, and per family (printed: the run's record)."""
    lines = ["malformed messages per topic and reason:"]
    for topic, messages in corpus.items():
        by_reason = Counter(m.reason for m in messages)
        lines.append(
            f"  {topic:22} {len(messages):5}  "
            + ", ".join(f"{r} {n}" for r, n in sorted(by_reason.items()))
        )
    families = Counter(m.family for ms in corpus.values() for m in ms)
    lines.append("per family: " + ", ".join(f"{f} {n}" for f, n in sorted(families.items())))
    reasons = Counter(m.reason for ms in corpus.values() for m in ms)
    lines.append("per reason: " + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())))
    return "\n".join(lines)


@pytest.mark.timeout(900)
def test_ten_thousand_malformed_messages_are_dead_lettered_and_nothing_else_stops(
    stack: Stack, providers: Providers
) -> None:
    started = time.monotonic()
    corpus = draw_corpus(PER_TOPIC, HUGE_PER_TOPIC, SEED)
    odd_posts = draw_examples(unknown_author_post(), 40, SEED + 77)
    messages = [m for topic in INPUT_TOPICS for m in corpus[topic]]
    random.Random(SEED).shuffle(messages)  # topics and families interleaved, the same every run
    assert len(messages) >= 10_000 and all(m.reason is not None for m in messages)
    assert all(m.reason is None for m in odd_posts)
    generated_s = time.monotonic() - started
    print(corpus_table(corpus))

    # The valid world, then the flows.
    pub = Publisher(stack)
    for author, fans in FOLLOWERS.items():
        for fan in fans:
            follow = {"author_id": author, "follower_id": fan, "op": "follow", "ts": TS}
            pub.send("follow_changes", author.encode(), orjson.dumps(follow), None)
    rng = random.Random(SEED)
    for fan, devices in DEVICES.items():
        prefs = {"user_id": fan, "timezone": "UTC", "ts": TS}
        pub.send("preference_changes", fan.encode(), orjson.dumps(prefs), None)
        for provider, device in devices:
            token = apns_token(rng) if provider == "apns" else fcm_token(rng)
            change = {
                "user_id": fan,
                "device_id": device,
                "provider": provider,
                "token": token,
                "active": True,
                "ts": TS,
            }
            pub.send("device_changes", fan.encode(), orjson.dumps(change), None)
    pub.flush()
    ready_ports = [free_port() for _ in FLOWS]
    for flow, port in zip(FLOWS, ready_ports, strict=True):
        stack.start_flow(("FANFARE_READY_PORT", str(port)), flow=flow)
    for flow, port in zip(FLOWS, ready_ports, strict=True):
        wait_for(
            lambda port=port: http_json(f"http://127.0.0.1:{port}/ready")[0] == 200,
            180,
            f"{flow} ready",
            stack,
        )
    pids_before = [http_json(f"http://127.0.0.1:{port}/live")[1]["pids"] for port in ready_ports]
    assert all(len(p) == 1 for p in pids_before), pids_before

    # The corpus in chunks, valid traffic between them.
    control = providers.control
    expected: set[tuple[str, str, str]] = set()
    valid_posts: list[str] = []

    def valid_post(n: int) -> None:
        author = sorted(FOLLOWERS)[n % 2]
        post_id = f"valid-post-{n}"
        body = {
            "event_type": "post_created",
            "post_id": post_id,
            "author_id": author,
            "visibility": "public",
            "created_at": iso_now(),
        }
        topic = "post_created" if n % 3 else "post_created.backfill"
        pub.send(topic, author.encode(), orjson.dumps(body), None)
        valid_posts.append(post_id)
        for fan in FOLLOWERS[author]:
            expected.update((p, f"{post_id}:{fan}", d) for p, d in DEVICES[fan])

    def accepted() -> set[tuple[str, str, str]]:
        return {
            (p, r.notification_id or "", r.device_id or "")
            for p in ("apns", "fcm")
            for r in control.accepted(p)
        }

    publish_started = time.monotonic()
    size = -(-len(messages) // CHUNKS)
    acks: list[dict[str, Any]] = []
    for c in range(CHUNKS):
        if c == CHUNKS - 1:
            # Valid acks go in with the last chunk, once their pushes were accepted.
            wait_for(
                lambda: accepted() >= expected,
                300,
                "the pushes of the valid posts",
                stack,
                every_s=1.0,
            )
            for i, (_, nid, device) in enumerate(sorted(expected)[:6]):
                ack = {
                    "notification_id": nid,
                    "device_id": device,
                    "event": "opened" if i % 2 else "delivered",
                    "ts": iso_now(),
                }
                acks.append(ack)
                pub.send("notification_acks", nid.encode(), orjson.dumps(ack), None)
        for index in range(c * size, min(len(messages), (c + 1) * size)):
            m = messages[index]
            pub.send(m.topic, m.key, m.value, index)
        valid_post(c)
        for p in odd_posts[c * 4 : c * 4 + 4]:
            pub.send("post_created" if c % 2 else "post_created.backfill", p.key, p.value, None)
        pub.flush()
    published_s = time.monotonic() - publish_started
    assert len(pub.positions) == len(messages)

    # Everything arrives: the dead letters, the pushes, the acks.
    samples: list[tuple[float, int]] = []

    def all_dead_letters() -> bool:
        samples.append((time.monotonic(), stack.count_messages(("dead_letters",))))
        return samples[-1][1] >= len(messages)

    wait_for(all_dead_letters, 600, f"{len(messages)} dead letters", stack, every_s=1.0)
    dead_lettered_s = time.monotonic() - publish_started
    wait_for(lambda: accepted() >= expected, 300, "every valid push", stack, every_s=1.0)
    store = open_notification_store(stack.settings.resolved_notification_store_url)
    # A notification is opened when any device opened it, else delivered when any acked that.
    want: dict[str, set[str]] = {}
    for a in acks:
        want[a["notification_id"]] = (
            {"opened"}
            if a["event"] == "opened"
            else want.get(a["notification_id"], {"delivered", "opened"})
        )

    def acked() -> bool:
        return all(store.notification_status(nid) in states for nid, states in want.items())

    wait_for(acked, 120, "the valid acks", stack, every_s=1.0)
    time.sleep(3)  # anything extra (a duplicate dead letter, a stray push) would show up now

    # The dead letters are exactly the malformed messages.
    letters = [(p, o, orjson.loads(v or b"{}")) for p, o, v in stack.read_topic("dead_letters")]
    got = Counter((d["source_topic"], d["partition"], d["offset"]) for _, _, d in letters)
    duplicates = [k for k, n in got.items() if n > 1]
    assert not duplicates, duplicates[:5]
    wanted = {pub.positions[i]: messages[i] for i in range(len(messages))}
    missing = sorted(set(wanted) - set(got))
    extra = sorted(set(got) - set(wanted))
    assert not missing, [(k, wanted[k].family, (wanted[k].value or b"")[:80]) for k in missing[:10]]
    assert not extra, extra[:10]
    wrong = []
    for _, _, d in letters:
        m = wanted[(d["source_topic"], d["partition"], d["offset"])]
        if not d["error"].startswith(f"{m.reason}: ") or len(d["error"]) <= len(m.reason or "") + 2:
            wrong.append((m.family, m.reason, d["error"][:120]))
        elif d["raw"] != raw_text(m.value, RAW_TEXT_LIMIT):  # 1 MB values kept cut at 64 KiB
            wrong.append((m.family, "raw differs", d["raw"][:80]))
    assert not wrong, wrong[:10]
    # A valid post nobody follows is not a dead letter, and notifies no one.
    assert not (pub.valid_positions & set(got))
    odd_ids = {orjson.loads(p.value or b"")["post_id"] for p in odd_posts}
    assert not {nid.split(":")[0] for _, nid, _ in accepted()} & odd_ids
    # The valid traffic: exactly the pushes of the valid posts, each once.
    records = [
        (p, r.notification_id, r.device_id) for p in ("apns", "fcm") for r in control.accepted(p)
    ]
    assert len(records) == len(set(records)) and set(records) == expected
    assert acked()

    # No flow restarted, nothing raised.
    for flow, port, before in zip(FLOWS, ready_ports, pids_before, strict=True):
        status, live = http_json(f"http://127.0.0.1:{port}/live")
        assert status == 200 and live["restarts"] == 0 and live["pids"] == before, (flow, live)
        assert all(_alive(pid) for pid in before), flow
    home = Path(stack.env["FANFARE_HOME"])
    for i, flow in enumerate(FLOWS):
        log = (home / f"flow-{i}.log").read_text(errors="replace")
        assert "Traceback" not in log, (flow, log[log.index("Traceback") - 200 :][:3000])
        assert len(re.findall(r"started 1 process\(es\)", log)) == 1, flow
    # Every dead letter was counted by the flow that wrote it, by source topic and reason.
    written: Counter[tuple[str, str]] = Counter()
    for i in range(len(FLOWS)):
        written.update(dead_letters_written(metrics_port(stack, i)))
    assert written == Counter((m.topic, m.reason or "") for m in messages)

    rate = len(messages) / max(dead_lettered_s, 1e-9)
    print(
        f"generated {len(messages)} malformed messages in {generated_s:.1f} s; published them "
        f"(with {len(valid_posts)} valid posts, {len(odd_posts)} posts nobody follows and "
        f"{len(acks)} acks) in {published_s:.1f} s; all dead-lettered {dead_lettered_s:.1f} s "
        f"after publishing began ({rate:.0f}/s end to end); test {time.monotonic() - started:.1f} s"
    )
    print(
        "dead letters on the topic over time (s since publishing began, count): "
        + ", ".join(
            f"{t - publish_started:.0f}:{n}" for t, n in samples[:: max(1, len(samples) // 12)]
        )
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
