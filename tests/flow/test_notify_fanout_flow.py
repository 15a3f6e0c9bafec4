"""API notifications through the whole fan-out graph (TestingSource / TestingSink).

The tier topics' requests reach the shards of their recipients; the shards decide each
recipient per channel and write batches to the tier's topics; scheduled sends wait for
`send_at` (across a restart), cancels win, bad input is one dead letter, and a marketing
backlog does not hold a transactional request up.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

from flows.fanout import build_fanout_flow
from operators import metrics
from operators.config import Settings
from operators.events import CaughtUp, RawEvent
from operators.fanout.sharding import shard_of
from operators.notify.campaigns import CampaignSpec, Target, campaign_message
from schemas.codecs import encode_notification_cancel, encode_notification_request
from schemas.records import DeadLetter, DispatchBatch, NotificationCancel, NotificationRequest
from schemas.topics import TIERS
from tests.fakes import InMemoryFollowerStore, InMemoryPostClaims
from tests.flow.test_fanout_flow import PARTS, TS, Events, device, follow, post, prefs

NOON = datetime(2026, 6, 1, 12, tzinfo=UTC)
SHARDS = 4


class Clock:
    """A clock the test moves (the flow reads it through `clock`)."""

    def __init__(self, now: datetime = NOON) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def request(nid: str, recipients: list[str], **extra: Any) -> NotificationRequest:
    fields: dict[str, Any] = {
        "notification_id": nid,
        "tier": "transactional",
        "category": "receipt",
        "template_id": "receipt",
        "recipients": tuple(recipients),
        "data": {"order_id": "7"},
        "channels": ("push", "inbox", "email"),
        "quiet_hours": False,
        "caps": False,
        "api_key_id": "k1",
        "created_at": NOON,
    }
    fields.update(extra)
    return NotificationRequest(**fields)


class Notes:
    """RawEvents on the tier topics, offsets increasing per topic."""

    def __init__(self) -> None:
        self.offsets: dict[str, int] = {}

    def __call__(self, value: NotificationRequest | NotificationCancel | bytes) -> RawEvent:
        if isinstance(value, NotificationRequest):
            topic, raw = f"notify.{value.tier}", encode_notification_request(value)
        elif isinstance(value, NotificationCancel):
            topic, raw = f"notify.{value.tier}", encode_notification_cancel(value)
        else:
            topic, raw = "notify.social", value
        off = self.offsets.get(topic, 0)
        self.offsets[topic] = off + 1
        return RawEvent(topic, 0, off, None, raw, read_at=1.0)

    def on(self, topic: str, raw: bytes) -> RawEvent:
        off = self.offsets.get(topic, 0)
        self.offsets[topic] = off + 1
        return RawEvent(topic, 0, off, None, raw, read_at=1.0)


def email(user: str, address: str) -> dict[str, Any]:
    return {
        "user_id": user,
        "device_id": f"{user}-mail",
        "provider": "email",
        "token": address,
        "active": True,
        "ts": TS,
    }


def switch(user: str, category: str, channel: str | None, enabled: bool) -> dict[str, Any]:
    return {
        "kind": "category_switch",
        "user_id": user,
        "category": category,
        "channel": channel,
        "enabled": enabled,
        "ts": TS,
    }


def world(*extra: dict[str, Any], topics: tuple[str, ...] = ()) -> list[Any]:
    """Six users with a phone and an email address each, plus `extra` changelog events."""
    e = Events()
    changes: list[Any] = []
    for i in range(1, 7):
        changes.append(e("device_changes", device(f"u{i}", f"u{i}-phone")))
        changes.append(e("device_changes", email(f"u{i}", f"u{i}@example.com")))
    for body, topic in zip(extra, topics, strict=True):
        changes.append(e(topic, body))
    return changes + [CaughtUp(p, 1e12) for p in PARTS]


def build(
    changes: list[Any],
    notes: dict[str, list[Any]],
    out: list[Any],
    dead: list[Any],
    clock: Clock,
    *,
    budget: int = 5,
    posts: list[Any] | None = None,
    store: InMemoryFollowerStore | None = None,
    notify_cap: int = 5,
) -> Any:
    settings = Settings(
        shard_count=SHARDS,
        dispatch_batch_size=2,
        follower_page_size=3,
        expand_budget=budget,
        notify_cap=notify_cap,
    )
    store = store or InMemoryFollowerStore(SHARDS)
    claims = InMemoryPostClaims()
    note_claims = InMemoryPostClaims()
    return build_fanout_flow(
        settings,
        post_source=TestingSource(posts or []),
        changelog_source=TestingSource(changes),
        changelog_parts=PARTS,
        channel_sink=TestingSink(out),
        route_batch=lambda b: b.topic,
        dead_letter_sink=TestingSink(dead),
        store=lambda: store,
        claims=lambda: claims,
        clock=clock,
        notify_sources=[(t, TestingSource(notes.get(t, []))) for t in TIERS],
        notification_claims=lambda: note_claims,
    )


def sent(out: list[tuple[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(topic, notification_id, user_id, device_id) of every API item written."""
    got = []
    for key, batch in out:
        assert key == batch.topic
        if isinstance(batch, DispatchBatch) and batch.message is not None:
            assert batch.author_id == "api:k1"
            got += [(key, i["notification_id"], i["user_id"], i["device_id"]) for i in batch.items]
    return got


def run(flow: Any, workers: int = 1) -> None:
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_request_reaches_its_recipients_in_every_shard_on_the_tier_topics(workers: int) -> None:
    users = [f"u{i}" for i in range(1, 7)]
    assert len({shard_of(u, SHARDS) for u in users}) > 1  # the recipients span shards
    n = Notes()
    notes = {
        "transactional": [n(request("n1", users))],
        "social": [
            n(request("s1", ["u1"], tier="social", category="new_post", channels=("push",)))
        ],
        "marketing": [
            n(request("m1", ["u2"], tier="marketing", category="campaign", channels=("email",)))
        ],
    }
    out: list[Any] = []
    dead: list[Any] = []
    changes = world(prefs("u1", locale="fr-CA"), topics=("preference_changes",))
    run(build(changes, notes, out, dead, Clock()), workers)
    # u1 told its locale: its items carry it; the others have none.
    assert {i.get("locale") for _, b in out for i in b.items if i["user_id"] == "u1"} == {"fr-CA"}
    assert {i.get("locale") for _, b in out for i in b.items if i["user_id"] == "u2"} == {None}
    expected = {("push.apns.transactional", f"n1:{u}", u, f"{u}-phone") for u in users}
    expected |= {("email.transactional", f"n1:{u}", u, f"{u}-mail") for u in users}
    expected |= {("inapp.transactional", f"n1:{u}", u, "inapp") for u in users}
    expected |= {
        ("push.apns", "s1:u1", "u1", "u1-phone"),
        ("email.marketing", "m1:u2", "u2", "u2-mail"),
    }
    got = sent(out)
    assert sorted(got) == sorted(expected)  # exact, no duplicates
    assert dead == []
    lanes = {b.topic: b.lane for _, b in out}
    assert lanes["push.apns.transactional"] == "transactional" and lanes["push.apns"] == "normal"


def test_category_switch_off_leaves_that_channel_out() -> None:
    changes = world(
        switch("u1", "receipt", "email", False),
        switch("u2", "receipt", None, False),
        switch("u3", "campaign", None, False),  # another category: no effect here
        topics=("preference_changes",) * 3,
    )
    n = Notes()
    out: list[Any] = []
    run(build(changes, {"transactional": [n(request("n1", ["u1", "u2", "u3"]))]}, out, [], Clock()))
    got = {(t, u) for t, _, u, _ in sent(out)}
    assert got == {
        ("push.apns.transactional", "u1"),
        ("inapp.transactional", "u1"),
        ("push.apns.transactional", "u3"),
        ("email.transactional", "u3"),
        ("inapp.transactional", "u3"),
    }


def test_quiet_hours_defer_marketing_and_transactional_skips_them() -> None:
    quiet = prefs("u1", quiet_hours_start=11, quiet_hours_end=13)  # noon is quiet
    changes = world(quiet, topics=("preference_changes",))
    clock = Clock()
    n = Notes()
    seen_before: list[list[tuple[str, str, str, str]]] = []

    def marketing() -> Iterator[Any]:
        yield n(request("m1", ["u1"], tier="marketing", category="campaign", quiet_hours=True))
        yield TestingSource.PAUSE(timedelta(milliseconds=300))
        seen_before.append(sent(out))
        clock.now = datetime(2026, 6, 1, 13, 0, 1, tzinfo=UTC)  # the window ended
        yield TestingSource.PAUSE(timedelta(milliseconds=300))

    notes = {
        "transactional": [n(request("t1", ["u1"], channels=("push",)))],
        "marketing": marketing(),
    }
    out: list[Any] = []
    run(build(changes, notes, out, [], clock))  # type: ignore[arg-type]
    # Before the window ended: only the transactional push.
    assert seen_before == [[("push.apns.transactional", "t1:u1", "u1", "u1-phone")]]
    later = [s for s in sent(out) if s[1] == "m1:u1"]
    assert sorted(later) == [
        ("email.marketing", "m1:u1", "u1", "u1-mail"),
        ("inapp.marketing", "m1:u1", "u1", "inapp"),
        ("push.apns.bulk", "m1:u1", "u1", "u1-phone"),
    ]


def test_a_scheduled_send_waits_for_send_at_and_goes_once_and_a_cancel_wins() -> None:
    clock = Clock()
    at = NOON + timedelta(minutes=10)
    n = Notes()
    seen_before: list[list[Any]] = []

    def transactional() -> Iterator[Any]:
        yield n(request("n1", ["u1", "u2"], channels=("inbox",), send_at=at))
        yield n(request("n2", ["u3"], channels=("inbox",), send_at=at))
        yield n(request("n3", ["u4"], channels=("inbox",)))  # not scheduled: at once
        yield TestingSource.PAUSE(timedelta(milliseconds=300))
        yield n(NotificationCancel("n2", "transactional", "k1", NOON))
        yield TestingSource.PAUSE(timedelta(milliseconds=300))
        seen_before.append(sent(out))
        clock.now = at - timedelta(seconds=1)
        yield TestingSource.PAUSE(timedelta(milliseconds=300))
        seen_before.append(sent(out))
        clock.now = at
        yield TestingSource.PAUSE(timedelta(milliseconds=300))
        clock.now = at + timedelta(hours=1)
        yield TestingSource.PAUSE(timedelta(milliseconds=300))

    out: list[Any] = []
    run(build(world(), {"transactional": transactional()}, out, [], clock))  # type: ignore[arg-type]
    now_only = [("inapp.transactional", "n3:u4", "u4", "inapp")]
    assert seen_before == [now_only, now_only]  # nothing before send_at
    assert sorted(sent(out)) == sorted(
        [
            *now_only,
            ("inapp.transactional", "n1:u1", "u1", "inapp"),
            ("inapp.transactional", "n1:u2", "u2", "inapp"),
        ]
    )  # once each; n2 was cancelled


def test_bad_tier_events_are_one_dead_letter_each_and_a_republished_request_is_dropped() -> None:
    n = Notes()
    good = request("n1", ["u1"], channels=("inbox",))
    bad_schema = orjson.loads(encode_notification_request(good))
    bad_schema["recipients"] = []
    notes = {
        "transactional": [
            n(good),
            n(good),  # re-published: the claim drops it
            n.on("notify.transactional", b"{not json"),
            n.on("notify.transactional", orjson.dumps(bad_schema)),
            # A marketing request on the transactional topic would skip its budget.
            n.on(
                "notify.transactional",
                encode_notification_request(request("m1", ["u1"], tier="marketing")),
            ),
        ]
    }
    out: list[Any] = []
    keyed_dead: list[tuple[str, DeadLetter]] = []
    run(build(world(), notes, out, keyed_dead, Clock()), 2)
    assert sent(out) == [("inapp.transactional", "n1:u1", "u1", "inapp")]
    dead = [d for _, d in keyed_dead]
    assert sorted((d.offset, d.error.split(":")[0]) for d in dead) == [
        (2, "invalid_json"),
        (3, "schema"),
        (4, "wrong_tier"),
    ]
    assert all(d.source_topic == "notify.transactional" and d.raw for d in dead)


def test_a_marketing_backlog_does_not_delay_a_transactional_request() -> None:
    n = Notes()
    users = [f"u{i}" for i in range(400)]
    campaign = [
        n(request(f"c{i}", users[i * 20 : (i + 1) * 20], tier="marketing", channels=("inbox",)))
        for i in range(20)
    ]
    out: list[Any] = []
    yielded_at: list[int] = []

    def transactional() -> Iterator[Any]:
        # Wait until the backlog reached the shards and started to drain.
        while not any(b.message and b.message["tier"] == "marketing" for _, b in list(out)):
            yield TestingSource.PAUSE(timedelta(milliseconds=1))
        yielded_at.append(len(out))
        yield n(request("t1", ["u1"], channels=("inbox",)))

    notes = {"transactional": transactional(), "marketing": campaign}
    run(build(world(), notes, out, [], Clock(), budget=5))  # type: ignore[arg-type]
    tiers = [b.message["tier"] for _, b in out if isinstance(b, DispatchBatch) and b.message]
    t = tiers.index("transactional")
    assert len([s for s in sent(out) if s[0] == "inapp.marketing"]) == 400  # all of it, once
    # The transactional request went out within a few activations of the shards, while most of
    # the backlog was still waiting (a shard runs at most 5 marketing recipients per activation,
    # at most 3 batches of 2).
    assert t - yielded_at[0] <= 3 * SHARDS
    assert tiers[t + 1 :].count("marketing") > 100


def test_a_scheduled_send_survives_a_restart(tmp_path: Path) -> None:
    init_db_dir(tmp_path, 1)
    clock = Clock()
    at = NOON + timedelta(minutes=10)
    n = Notes()
    notes = [
        n(request("n1", ["u1"], channels=("inbox",), send_at=at)),
        TestingSource.PAUSE(timedelta(milliseconds=300)),
        TestingSource.ABORT(),
        TestingSource.PAUSE(timedelta(milliseconds=300)),
    ]
    # The changelogs keep reporting their end after the restart, as the Kafka source does.
    changes = [*world(), TestingSource.PAUSE(timedelta(milliseconds=600)), *world()[-3:]]

    def once(out: list[Any]) -> None:
        flow = build(changes, {"transactional": notes}, out, [], clock)
        run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(str(tmp_path)))

    first: list[Any] = []
    once(first)  # aborted (a crash) with the send held
    assert sent(first) == []
    clock.now = at + timedelta(seconds=1)
    second: list[Any] = []
    once(second)
    assert sent(second) == [("inapp.transactional", "n1:u1", "u1", "inapp")]


def test_channel_addresses_and_switches_are_state_and_posts_are_untouched() -> None:
    e = Events()
    subscription = orjson.dumps(
        {"endpoint": "https://push.example.net/x", "keys": {"auth": "A" * 22, "p256dh": "B" * 87}}
    ).decode()
    changes: list[Any] = [
        e("follow_changes", follow("alice", "bob")),
        e("device_changes", device("bob", "bob-phone", "apns")),
        e("device_changes", {**email("bob", "bob@example.com")}),
        e(
            "device_changes",
            {**email("bob", "+14155550123"), "provider": "sms", "device_id": "bob-sms"},
        ),
        e(
            "device_changes",
            {**email("bob", subscription), "provider": "webpush", "device_id": "bob-web"},
        ),
        e("device_changes", {**email("bob", "bob@localhost"), "device_id": "bad"}),
        e("preference_changes", switch("bob", "campaign", None, False)),
        *[CaughtUp(p, 1e12) for p in PARTS],
    ]
    n = Notes()
    store = InMemoryFollowerStore(SHARDS)
    out: list[Any] = []
    keyed_dead: list[tuple[str, DeadLetter]] = []
    notes = {
        "transactional": [n(request("n1", ["bob"], channels=("push", "sms", "email")))],
        "marketing": [n(request("m1", ["bob"], tier="marketing", category="campaign"))],
    }
    posts = [e("post_created", post("p1", "alice"))]
    run(build(changes, notes, out, keyed_dead, Clock(), posts=posts, store=store))
    # The post's push is as before: APNs and FCM devices only, no message.
    post_items = [(b.post_id, i["device_id"]) for _, b in out if b.post_id == "p1" for i in b.items]
    assert post_items == [("p1", "bob-phone")]
    assert sorted((t, d) for t, _, _, d in sent(out)) == [
        ("email.transactional", "bob-mail"),
        ("push.apns.transactional", "bob-phone"),
        ("sms.transactional", "bob-sms"),
        ("webpush.transactional", "bob-web"),
    ]  # and nothing of the campaign: switched off
    dead = [d for _, d in keyed_dead]
    assert [(d.source_topic, d.error.split(":")[0]) for d in dead] == [
        ("device_changes", "invalid_address")
    ]


def sms(user: str, number: str) -> dict[str, Any]:
    return {
        "user_id": user,
        "device_id": f"{user}-sms",
        "provider": "sms",
        "token": number,
        "active": True,
        "ts": TS,
    }


def test_a_login_code_goes_by_push_to_a_user_with_a_device_and_by_sms_to_one_without() -> None:
    # u1 has a phone and a number; u7 only a number; u8's phone was removed.
    changes = world(
        sms("u1", "+14155550101"),
        sms("u7", "+14155550107"),
        device("u8", "u8-phone"),
        sms("u8", "+14155550108"),
        device("u8", "u8-phone", active=False),
        topics=("device_changes",) * 5,
    )
    login = request(
        "l1",
        ["u1", "u7", "u8"],
        category="login_code",
        template_id="login_code",
        data={"code": "482913", "minutes": 10},
        channels=("push", "sms"),
        fallback=("push", "sms"),
    )
    fell_back = metrics.NOTIFICATIONS_FELL_BACK.labels("sms")
    before = fell_back._value.get()
    n = Notes()
    out: list[Any] = []
    dead: list[Any] = []
    run(build(changes, {"transactional": [n(login)]}, out, dead, Clock()))
    assert sorted(sent(out)) == [
        ("push.apns.transactional", "l1:u1", "u1", "u1-phone"),
        ("sms.transactional", "l1:u7", "u7", "u7-sms"),
        ("sms.transactional", "l1:u8", "u8", "u8-sms"),
    ]
    assert dead == []
    assert fell_back._value.get() - before == 2


def capped(nid: str, users: list[str]) -> NotificationRequest:
    return request(
        nid,
        users,
        tier="marketing",
        category="campaign",
        template_id="campaign",
        channels=("push", "inbox"),
        caps=True,
    )


def test_campaigns_over_the_cap_are_dropped_and_transactional_is_never_capped() -> None:
    n = Notes()
    notes = {
        "marketing": [n(capped(f"m{k}", ["u1", "u2"])) for k in range(3)],
        "transactional": [
            n(request(f"t{k}", ["u1"], channels=("inbox",), caps=True)) for k in range(3)
        ],
    }
    capped_total = metrics.SUPPRESSED.labels("capped")
    before = capped_total._value.get()
    out: list[Any] = []
    dead: list[Any] = []
    run(build(world(), notes, out, dead, Clock(), notify_cap=2))
    got = sent(out)
    # Two campaigns per user this window, on every channel; the third is dropped whole.
    assert sorted({(nid.split(":")[0], u) for _, nid, u, _ in got if nid[0] == "m"}) == [
        ("m0", "u1"),
        ("m0", "u2"),
        ("m1", "u1"),
        ("m1", "u2"),
    ]
    assert sum(1 for t, nid, _, _ in got if nid[0] == "m") == 8  # push and inbox each
    assert sorted(nid for _, nid, _, _ in got if nid[0] == "t") == ["t0:u1", "t1:u1", "t2:u1"]
    assert capped_total._value.get() - before == 2
    assert dead == []


def test_the_api_cap_counts_survive_a_restart(tmp_path: Path) -> None:
    init_db_dir(tmp_path, 1)
    n = Notes()
    m0 = n(capped("m0", ["u1"]))
    m1 = n(capped("m1", ["u1", "u2"]))
    changes = world()

    def once(notes: list[Any], changes: list[Any], out: list[Any]) -> None:
        flow = build(changes, {"marketing": notes}, out, [], Clock(), notify_cap=1)
        run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(str(tmp_path)))

    first: list[Any] = []
    once([m0], changes, first)  # u1's one campaign of the window; the state is snapshotted
    assert {u for _, _, u, _ in sent(first)} == {"u1"}
    second: list[Any] = []
    # Resumed after m0 (counts from the snapshot); the changelogs report their end again.
    once([m0, m1], [*changes, *changes[-3:]], second)
    assert {(nid, u) for _, nid, u, _ in sent(second)} == {("m1:u2", "u2")}


def test_a_category_s_own_cap_replaces_the_default_and_survives_a_restart(tmp_path: Path) -> None:
    """The categories file's `cap = 1` (on the request) wins over FANFARE_NOTIFY_CAP=5."""
    init_db_dir(tmp_path, 1)
    n = Notes()
    own = {"cap_limit": 1, "cap_window_s": 7 * 86_400}
    m0 = n(replace(capped("m0", ["u1"]), **own))
    m1 = n(replace(capped("m1", ["u1", "u2"]), **own))
    m2 = n(replace(capped("m2", ["u1", "u2", "u3"]), **own))
    changes = world()

    def once(notes: list[Any], changes: list[Any], out: list[Any], clock: Clock) -> None:
        flow = build(changes, {"marketing": notes}, out, [], clock, notify_cap=5)
        run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(str(tmp_path)))

    first: list[Any] = []
    once([m0, m1], changes, first, Clock())
    assert {(nid, u) for _, nid, u, _ in sent(first)} == {("m0:u1", "u1"), ("m1:u2", "u2")}
    second: list[Any] = []
    # A day later, resumed from the snapshot: the default's day rolled, the category's week not.
    later = Clock(NOON + timedelta(days=1))
    once([m0, m1, m2], [*changes, *changes[-3:]], second, later)
    assert {(nid, u) for _, nid, u, _ in sent(second)} == {("m2:u3", "u3")}


def test_a_campaign_s_fallback_gives_each_user_the_first_channel_that_reaches_them() -> None:
    """Campaign messages (one recipient each, batched together) honour their fallback."""
    # u1..u6 have a phone and an email address; u7 only an address; u8 turned push off.
    changes = world(
        email("u7", "u7@example.com"),
        prefs("u8", push_enabled=False),
        email("u8", "u8@example.com"),
        topics=("device_changes", "preference_changes", "device_changes"),
    )
    spec = CampaignSpec(
        campaign_id="c1",
        category="campaign",
        template_id="campaign",
        data={"headline": "h", "message": "m", "link": "x://y"},
        channels=("push", "email"),
        quiet_hours=False,
        caps=False,
        target=Target("audience", "a_1"),
        window_start=NOON.timestamp(),
        window_end=None,
        rate_per_s=10,
        api_key_id="k1",
        created_at=NOON.timestamp(),
        total=3,
        fallback=("push", "email"),
    )
    n = Notes()
    out: list[Any] = []
    dead: list[Any] = []
    notes = [n(campaign_message(spec, u)) for u in ("u1", "u7", "u8")]
    run(build(changes, {"marketing": notes}, out, dead, Clock()))
    assert sorted(sent(out)) == [
        ("email.marketing", "c1:u7", "u7", "u7-mail"),
        ("email.marketing", "c1:u8", "u8", "u8-mail"),
        ("push.apns.bulk", "c1:u1", "u1", "u1-phone"),
    ]
    assert dead == []
