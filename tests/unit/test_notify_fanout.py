"""API notifications in a follower shard: per-recipient decisions, holds, cancels, tier order."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from operators.fanout.caps import CapRule
from operators.fanout.columns import UserTable
from operators.fanout.notify import (
    ChannelBook,
    NotifyShard,
    NotifyTally,
    Recipient,
    RecipientJob,
    apply_switch,
    decide_recipient,
    notification_batches,
    recipient_of,
    switch_on,
)
from operators.fanout.shard import ChangelogEvent, FollowerShard
from schemas.codecs import (
    InvalidEvent,
    decode_dispatch_batch,
    decode_preference_change,
    decode_tier_event,
    encode_dispatch_batch,
    encode_notification_cancel,
    encode_notification_request,
    encode_preference_change,
)
from schemas.records import (
    CategorySwitch,
    DeviceChange,
    NotificationCancel,
    NotificationRequest,
    PreferenceChange,
)

NOON = datetime(2026, 6, 1, 12, tzinfo=UTC)
SUB = orjson.dumps(
    {"endpoint": "https://push.example.net/x", "keys": {"auth": "A" * 22, "p256dh": "B" * 87}}
).decode()


def request(**extra: Any) -> NotificationRequest:
    fields: dict[str, Any] = {
        "notification_id": "n1",
        "tier": "transactional",
        "category": "receipt",
        "template_id": "receipt",
        "recipients": ("u1",),
        "data": {"order_id": "7"},
        "channels": ("push", "inbox", "email"),
        "quiet_hours": False,
        "caps": False,
        "api_key_id": "k1",
        "created_at": NOON,
    }
    fields.update(extra)
    return NotificationRequest(**fields)


def recipient(**extra: Any) -> Recipient:
    fields: dict[str, Any] = {
        "user_id": "u1",
        "push_enabled": True,
        "quiet": None,
        "devices": (
            ("phone", "apns", "ab" * 32),
            ("mail", "email", "u1@example.com"),
            ("browser", "webpush", SUB),
        ),
        "switches": None,
    }
    fields.update(extra)
    return Recipient(**fields)


def sends(decision: Any) -> list[tuple[str, str]]:
    return sorted((p, d) for _, p, d, _ in decision.sends)


def test_every_requested_channel_gets_its_addresses() -> None:
    d = decide_recipient(request(), recipient(), NOON)
    assert sends(d) == [
        ("apns", "phone"),
        ("email", "mail"),
        ("inapp", "inapp"),
        ("webpush", "browser"),
    ]
    assert d.defer_until is None


def test_a_channel_not_requested_is_not_used() -> None:
    d = decide_recipient(request(channels=("email",)), recipient(), NOON)
    assert sends(d) == [("email", "mail")]


def test_category_switch_off_on_one_channel_and_on_all() -> None:
    off_email = apply_switch(0, "email", False)
    d = decide_recipient(request(), recipient(switches=off_email), NOON)
    assert sends(d) == [("apns", "phone"), ("inapp", "inapp"), ("webpush", "browser")]
    assert d.suppressed == {"category_off": 1}
    all_off = apply_switch(0, None, False)
    assert decide_recipient(request(), recipient(switches=all_off), NOON).sends == []
    # A later switch of one channel back on wins over the earlier "all off".
    back = apply_switch(all_off, "push", True)
    assert switch_on(back, "push") and not switch_on(back, "email")
    assert switch_on(None, "sms")  # never switched: on


def test_push_disabled_keeps_the_other_channels() -> None:
    d = decide_recipient(request(), recipient(push_enabled=False), NOON)
    assert sends(d) == [("email", "mail"), ("inapp", "inapp")]
    assert d.suppressed == {"push_disabled": 1}


def test_missing_addresses_are_counted() -> None:
    d = decide_recipient(request(channels=("sms", "chat", "push")), recipient(devices=()), NOON)
    assert d.sends == []
    assert d.suppressed == {"no_address": 2, "no_device": 1}


LOGIN = {
    "category": "login_code",
    "channels": ("push", "inbox", "sms"),
    "fallback": ("push", "sms"),
}
SMS = ("sms-1", "sms", "+14155550123")


def test_a_fallback_gives_the_first_channel_that_reaches_the_user_and_only_that_one() -> None:
    phone = recipient(devices=(("phone", "apns", "ab" * 32), SMS))
    d = decide_recipient(request(**LOGIN), phone, NOON)
    # Push reaches them: no SMS; inbox is outside the fallback and keeps its own rule.
    assert sends(d) == [("apns", "phone"), ("inapp", "inapp")]
    assert d.fell_back is None and d.suppressed == {}
    no_device = decide_recipient(request(**LOGIN), recipient(devices=(SMS,)), NOON)
    assert sends(no_device) == [("inapp", "inapp"), ("sms", "sms-1")]
    assert no_device.fell_back == "sms" and no_device.suppressed == {"no_device": 1}


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"push_enabled": False}, "push_disabled"),
        ({"switches": apply_switch(0, "push", False)}, "category_off"),
    ],
)
def test_push_that_cannot_reach_the_user_falls_back_to_sms(changes: Any, why: str) -> None:
    r = recipient(devices=(("phone", "apns", "ab" * 32), SMS), **changes)
    d = decide_recipient(request(**{**LOGIN, "channels": ("push", "sms")}), r, NOON)
    assert sends(d) == [("sms", "sms-1")]
    assert d.fell_back == "sms" and d.suppressed == {why: 1}


def test_a_fallback_with_nothing_reachable_sends_nothing_and_counts_each_channel() -> None:
    off_sms = apply_switch(0, "sms", False)
    r = recipient(devices=(SMS,), switches=off_sms)
    d = decide_recipient(request(**{**LOGIN, "channels": ("push", "sms")}), r, NOON)
    assert d.sends == [] and d.fell_back is None
    assert d.suppressed == {"no_device": 1, "category_off": 1}


def test_a_fallback_gives_every_device_of_the_chosen_channel() -> None:
    r = recipient(devices=(("phone", "apns", "ab" * 32), ("browser", "webpush", SUB), SMS))
    d = decide_recipient(request(**{**LOGIN, "channels": ("push", "sms")}), r, NOON)
    assert sends(d) == [("apns", "phone"), ("webpush", "browser")]


def test_quiet_hours_defer_marketing_and_not_transactional() -> None:
    quiet = (11, 13, "UTC")  # noon is quiet
    marketing = request(tier="marketing", category="campaign", quiet_hours=True)
    d = decide_recipient(marketing, recipient(quiet=quiet), NOON)
    assert d.sends == [] and d.defer_until == datetime(2026, 6, 1, 13, tzinfo=UTC).timestamp()
    t = decide_recipient(request(), recipient(quiet=quiet), NOON)
    assert sends(t) and t.defer_until is None


def test_batches_go_to_the_tier_topics_with_their_message() -> None:
    r = request(collapse_key="order-7")
    d = decide_recipient(r, recipient(), NOON)
    batches = notification_batches(r, d.sends)
    assert sorted(b.topic for b in batches) == [
        "email.transactional",
        "inapp.transactional",
        "push.apns.transactional",
        "webpush.transactional",
    ]
    for b in batches:
        assert b.post_id == "n1" and b.author_id == "api:k1"
        assert b.message == {
            "category": "receipt",
            "template_id": "receipt",
            "tier": "transactional",
            "data": {"order_id": "7"},
            "collapse_key": "order-7",
        }
        assert [i["notification_id"] for i in b.items] == ["n1:u1"]
        # The wire form validates against dispatch_batch.schema.json and keeps the message.
        back = decode_dispatch_batch(encode_dispatch_batch(b), b.lane)
        assert back.message == b.message and back.items == b.items
    social = notification_batches(request(tier="social"), d.sends)
    marketing = notification_batches(request(tier="marketing"), d.sends)
    assert {b.topic for b in social if b.provider == "apns"} == {"push.apns"}
    assert {b.topic for b in marketing if b.provider == "apns"} == {"push.apns.bulk"}
    assert {b.topic for b in marketing if b.provider == "email"} == {"email.marketing"}


def test_items_carry_their_user_s_locale_when_known() -> None:
    two = [("u1", "email", "m1", "u1@example.com"), ("u2", "email", "m2", "u2@example.com")]
    [batch] = notification_batches(request(), two, locales={"u1": "pt-BR"})  # type: ignore[arg-type]
    assert [i.get("locale") for i in batch.items] == ["pt-BR", None]
    assert decode_dispatch_batch(encode_dispatch_batch(batch), batch.lane).items == batch.items


def test_preference_records_carry_a_locale_through_their_codec() -> None:
    change = PreferenceChange("u1", True, None, None, "UTC", NOON, locale="fr-CA")
    assert decode_preference_change(encode_preference_change(change)) == change
    bare = PreferenceChange("u1", True, None, None, "UTC", NOON)
    assert b"locale" not in encode_preference_change(bare)
    assert decode_preference_change(encode_preference_change(bare)) == bare
    with pytest.raises(InvalidEvent, match="schema"):
        decode_preference_change(
            orjson.dumps(
                {
                    "user_id": "u1",
                    "timezone": "UTC",
                    "ts": "2026-06-01T12:00:00Z",
                    "locale": "fr CA",
                }
            )
        )


def test_batches_hold_at_most_the_batch_size() -> None:
    many = [(f"u{i}", "email", "mail", f"u{i}@example.com") for i in range(7)]
    batches = notification_batches(request(), many, batch_size=3)  # type: ignore[arg-type]
    assert [len(b.items) for b in batches] == [3, 3, 1]


def test_the_book_keeps_addresses_and_switches_through_a_checkpoint() -> None:
    shard = FollowerShard([])
    events = [
        DeviceChange("u1", "phone", "apns", "ab" * 32, True, NOON),
        DeviceChange("u1", "mail", "email", "u1@example.com", True, NOON),
        DeviceChange("u1", "old", "sms", "+14155550123", True, NOON),
        DeviceChange("u1", "old", "sms", None, False, NOON),
        CategorySwitch("u1", "campaign", "email", False, NOON),
        PreferenceChange("u1", False, 22, 7, "Europe/Paris", NOON, locale="fr-CA"),
    ]
    for i, e in enumerate(events):
        assert shard.apply(ChangelogEvent(e, 0, "x/0", i))
    r = recipient_of(shard.users, shard.notify.book, "u1", "campaign")
    assert r.push_enabled is False and r.quiet == (22, 7, "Europe/Paris")
    assert sorted(r.devices) == [("mail", "email", "u1@example.com"), ("phone", "apns", "ab" * 32)]
    assert r.switches is not None and not switch_on(r.switches, "email")
    columns, positions = shard.checkpoint_state()
    again = FollowerShard([])
    again.load_checkpoint(columns, positions)
    assert recipient_of(again.users, again.notify.book, "u1", "campaign") == r
    assert again.notify.book.locales == {"u1": "fr-CA"}
    # A complete record without a locale removes it.
    again.apply_preference(PreferenceChange("u1", True, None, None, "UTC", NOON))
    assert again.notify.book.locales == {}
    assert ChannelBook.from_columns({}).addresses == {}  # a checkpoint from before the book


def _shard(budgets: dict[str, int | None] | None = None) -> NotifyShard:
    return NotifyShard(budgets or {})  # type: ignore[arg-type]


def _run(shard: NotifyShard, now: datetime) -> list[Any]:
    return shard.work(UserTable(), now, lambda read_at: True, NotifyTally())


def test_scheduled_request_is_held_until_send_at_then_sent_once() -> None:
    at = NOON + timedelta(minutes=10)
    shard = _shard()
    shard.add_job(RecipientJob(request(send_at=at, channels=("inbox",)), ("u1", "u2"), 0, 1.0))
    assert _run(shard, NOON) == []
    assert shard.next_due() == at.timestamp()
    assert _run(shard, at - timedelta(seconds=1)) == []
    out = _run(shard, at)
    assert [i["user_id"] for b in out for i in b.items] == ["u1", "u2"]
    assert _run(shard, at + timedelta(hours=1)) == []
    assert shard.next_due() is None and shard.requests == {}


def test_cancel_wins_before_send_at_and_before_the_request() -> None:
    at = NOON + timedelta(minutes=10)
    shard = _shard()
    shard.add_job(RecipientJob(request(send_at=at, channels=("inbox",)), ("u1",), 0, 1.0))
    _run(shard, NOON)
    tally = NotifyTally()
    shard.cancel("n1", NOON.timestamp(), tally)
    assert tally.cancelled == 1
    assert _run(shard, at) == []
    # A cancel that reaches the shard first drops the request when it comes.
    shard.add_job(RecipientJob(request(channels=("inbox",)), ("u1",), 0, 1.0))
    assert _run(shard, at) == []
    # Another notification is untouched.
    shard.add_job(RecipientJob(request(notification_id="n2", channels=("inbox",)), ("u1",), 0, 1.0))
    assert len(_run(shard, at)) == 1


def test_transactional_runs_first_and_marketing_within_its_budget() -> None:
    shard = _shard({"marketing": 3})
    campaign = request(notification_id="c1", tier="marketing", channels=("inbox",))
    shard.add_job(RecipientJob(campaign, tuple(f"m{i}" for i in range(10)), 0, 1.0))
    shard.add_job(RecipientJob(request(channels=("inbox",)), ("t1",), 0, 1.0))
    first = _run(shard, NOON)
    assert [b.message["tier"] for b in first] == ["transactional", "marketing"]
    assert len(first[1].items) == 3  # the budget
    rest = [i["user_id"] for _ in range(3) for b in _run(shard, NOON) for i in b.items]
    assert rest == [f"m{i}" for i in range(3, 10)]


def test_the_step_budget_stops_marketing_and_never_transactional() -> None:
    shard = _shard({"marketing": 100})
    campaign = request(notification_id="c1", tier="marketing", channels=("inbox",))
    for i in range(5):  # a campaign's one-recipient jobs
        shard.add_job(RecipientJob(campaign, (f"m{i}",), 0, 1.0))
    shard.add_job(RecipientJob(request(channels=("inbox",)), ("t1",), 0, 1.0))
    ticks = iter(range(1000))

    def clock() -> float:  # every look at the clock is a second later
        return float(next(ticks))

    # The window already closed (the worker's other shards used it): only the login code runs.
    first = shard.work(UserTable(), NOON, lambda read_at: True, NotifyTally(), until=-1.0)
    assert [b.message["tier"] for b in first] == ["transactional"]
    # A window open at the first look (t=0) and closed at the next (t=1): one job, no more.
    second = shard.work(
        UserTable(), NOON, lambda read_at: True, NotifyTally(), until=1.0, clock=clock
    )
    assert [i["user_id"] for b in second for i in b.items] == ["m0"]
    # No deadline: the recipient budget alone, as before.
    rest = [i["user_id"] for b in _run(shard, NOON) for i in b.items]
    assert rest == ["m1", "m2", "m3", "m4"]


def test_holds_and_queues_survive_a_snapshot() -> None:
    at = NOON + timedelta(minutes=10)
    shard = _shard({"social": 1})
    shard.add_job(RecipientJob(request(send_at=at, channels=("inbox",)), ("u1",), 0, 1.0))
    shard.add_job(
        RecipientJob(
            request(notification_id="s1", tier="social", channels=("inbox",)), ("a", "b"), 0, 1.0
        )
    )
    _run(shard, NOON)  # holds n1, sends a, queues b
    shard.cancel("gone", NOON.timestamp(), NotifyTally())
    again = _shard({"social": 1})
    again.restore(pickle.loads(pickle.dumps(shard.snapshot())))
    assert "gone" in again.cancelled
    assert [i["user_id"] for b in _run(again, NOON) for i in b.items] == ["b"]
    assert [i["user_id"] for b in _run(again, at) for i in b.items] == ["u1"]


def test_a_campaign_backlog_is_snapshotted_as_one_template_and_restored_exactly() -> None:
    shard = _shard({"marketing": 1000})
    messages = [
        request(
            notification_id="c1",
            tier="marketing",
            campaign_id="c1",
            recipients=(f"m{i}",),
            channels=("inbox",),
        )
        for i in range(50)
    ]
    for m in messages:
        shard.add_job(RecipientJob(m, m.recipients, 0, 1.0))
    snap = pickle.loads(pickle.dumps(shard.snapshot()))
    assert len(snap["templates"]) == 1  # not one wire form per user
    again = _shard({"marketing": 1000})
    again.restore(snap)
    assert [j.request for j in again.queues["marketing"]] == messages
    # The second snapshot reuses the wire forms and still says the same.
    assert shard.snapshot() == snap


def test_a_snapshot_of_the_older_form_still_restores() -> None:
    older = {
        "queues": [("n1", ("u1",), 0, 1.0, 0)],
        "held": [],
        "pending": {},
        "cancelled": {},
        "requests": {"n1": encode_notification_request(request(channels=("inbox",)))},
    }
    shard = _shard()
    shard.restore(older)  # type: ignore[arg-type]
    assert [j.request for j in shard.queues["transactional"]] == [request(channels=("inbox",))]


def test_tier_events_decode_and_bad_ones_say_why() -> None:
    r = request(send_at=NOON + timedelta(days=1))
    assert decode_tier_event(encode_notification_request(r)) == r
    cancel = NotificationCancel("n1", "transactional", "k1", NOON)
    assert decode_tier_event(encode_notification_cancel(cancel)) == cancel
    with pytest.raises(InvalidEvent, match="invalid_json"):
        decode_tier_event(b"{nope")
    with pytest.raises(InvalidEvent, match="schema"):
        decode_tier_event(orjson.dumps({"schema": "notification_cancel/v1", "tier": "social"}))
    with pytest.raises(InvalidEvent, match="schema"):
        decode_tier_event(orjson.dumps({"schema": "notification_request/v1"}))


def test_a_fallback_travels_on_the_wire_and_a_request_without_one_stays_as_before() -> None:
    login = request(**LOGIN)
    raw = encode_notification_request(login)
    assert decode_tier_event(raw) == login and orjson.loads(raw)["fallback"] == ["push", "sms"]
    plain = encode_notification_request(request())
    assert "fallback" not in orjson.loads(plain)  # readers built before it accept it
    assert decode_tier_event(plain) == request()
    stray = {**orjson.loads(plain), "fallback": ["push", "sms"]}  # sms is not in channels
    with pytest.raises(InvalidEvent, match="fallback names channels not in channels"):
        decode_tier_event(orjson.dumps(stray))
    with pytest.raises(InvalidEvent, match="schema"):
        decode_tier_event(orjson.dumps({**orjson.loads(raw), "fallback": ["push"]}))


def test_many_one_recipient_jobs_drain_a_budget_at_a_time_behind_the_gate() -> None:
    shard = _shard({"marketing": 10})
    for i in range(1_000):
        campaign = request(
            notification_id="c1",
            campaign_id="c1",
            tier="marketing",
            channels=("inbox",),
            recipients=(f"m{i}",),
        )
        shard.add_job(RecipientJob(campaign, (f"m{i}",), 0, float(i)))
    # The changelogs were read to their end after the first 5 requests only.
    opened = shard.work(UserTable(), NOON, lambda read_at: read_at < 5, NotifyTally())
    assert [i["user_id"] for b in opened for i in b.items] == [f"m{i}" for i in range(5)]
    assert shard.runnable(lambda read_at: read_at < 5) is False
    first = _run(shard, NOON)
    assert len(first) == 1  # one campaign, one message: the ten sends joined in one batch
    assert [i["user_id"] for b in first for i in b.items] == [f"m{i}" for i in range(5, 15)]
    assert all(i["notification_id"] == f"c1:{i['user_id']}" for b in first for i in b.items)


def test_a_replayed_api_batch_keeps_its_message_when_written_items_are_dropped() -> None:
    from operators.adapters.kafka.channel_sink import _ChannelPartitionWriter

    two = [("u1", "email", "m1", "u1@example.com"), ("u2", "email", "m2", "u2@example.com")]
    [batch] = notification_batches(request(), two)  # type: ignore[arg-type]
    # A writer after a restart: it read back that n1:u1 was written before the crash.
    writer = _ChannelPartitionWriter.__new__(_ChannelPartitionWriter)
    writer._topic = "email.transactional"
    writer._seen = {("n1:u1", "m1")}
    kept, dropped = writer._unseen(batch)
    assert dropped == 1
    assert kept is not None and [i["user_id"] for i in kept.items] == ["u2"]
    assert isinstance(kept, type(batch)) and kept.message == batch.message


# ---- frequency caps of the API's categories -----------------------------------------------------

HOUR = 3_600


def campaign(nid: str, **extra: Any) -> NotificationRequest:
    fields: dict[str, Any] = {
        "notification_id": nid,
        "tier": "marketing",
        "category": "campaign",
        "channels": ("inbox",),
        "caps": True,
        **extra,
    }
    return request(**fields)


def _capped_run(
    shard: NotifyShard, users: UserTable, r: NotificationRequest, now: datetime, *who: str
) -> tuple[list[str], NotifyTally]:
    tally = NotifyTally()
    shard.add_job(RecipientJob(r, who, 0, 1.0))
    out = shard.work(users, now, lambda read_at: True, tally)
    return sorted(i["user_id"] for b in out for i in b.items), tally


def test_a_capped_category_drops_what_is_over_the_cap_per_user_and_category() -> None:
    shard, users = NotifyShard(cap=(2, HOUR)), UserTable()
    for nid in ("m1", "m2"):
        got, tally = _capped_run(shard, users, campaign(nid), NOON, "u1", "u2")
        assert got == ["u1", "u2"] and tally.suppressed == {}
    got, tally = _capped_run(shard, users, campaign("m3"), NOON, "u1", "u2", "u3")
    assert got == ["u3"] and tally.suppressed == {"capped": 2}  # dropped, no bundle kept
    # Another capped category has its own count.
    social = campaign("s1", tier="social", category="new_post")
    assert _capped_run(shard, users, social, NOON, "u1")[0] == ["u1"]
    # The next window starts the counts again.
    assert _capped_run(shard, users, campaign("m4"), NOON + timedelta(hours=1), "u1")[0] == ["u1"]
    assert shard.caps["campaign"].pending == {} and shard.caps["campaign"].author_ids == []


def test_transactional_and_uncapped_requests_are_never_capped() -> None:
    shard, users = NotifyShard(cap=(1, HOUR)), UserTable()
    for nid in ("t1", "t2", "t3"):  # a transactional request saying caps is not capped
        login = request(notification_id=nid, caps=True, channels=("inbox",))
        assert _capped_run(shard, users, login, NOON, "u1")[0] == ["u1"]
    for nid in ("m1", "m2"):
        assert _capped_run(shard, users, campaign(nid, caps=False), NOON, "u1")[0] == ["u1"]
    assert shard.caps == {}
    off = NotifyShard(cap=(0, HOUR))  # FANFARE_NOTIFY_CAP=0: no cap
    for nid in ("m1", "m2", "m3"):
        assert _capped_run(off, users, campaign(nid), NOON, "u1")[0] == ["u1"]


def test_a_recipient_with_nothing_to_send_or_deferred_uses_none_of_the_cap() -> None:
    shard, users = NotifyShard(cap=(1, HOUR)), UserTable()
    quiet = PreferenceChange("u1", True, 11, 13, "UTC", NOON)
    users.apply_preference(quiet)
    got, tally = _capped_run(shard, users, campaign("m1", quiet_hours=True), NOON, "u1")
    assert got == [] and tally.deferred == 1
    # No address for email: nothing sent, nothing counted.
    assert _capped_run(shard, users, campaign("m2", channels=("email",)), NOON, "u1")[0] == []
    # Released at 13:00, it is the one counted; the next one that day is capped.
    one = NOON + timedelta(hours=1)
    assert [i["user_id"] for b in _run_at(shard, users, one) for i in b.items] == ["u1"]
    got, tally = _capped_run(shard, users, campaign("m3"), one + timedelta(minutes=1), "u1")
    assert got == [] and tally.suppressed == {"capped": 1}


def _run_at(shard: NotifyShard, users: UserTable, now: datetime) -> list[Any]:
    return shard.work(users, now, lambda read_at: True, NotifyTally())


def _follower_shard() -> FollowerShard:
    return FollowerShard([], notify=NotifyShard(cap=(1, HOUR)))


def test_the_api_caps_survive_a_snapshot_and_a_checkpoint() -> None:
    shard = _follower_shard()
    shard.users.ensure_row("old")
    columns, positions = shard.checkpoint_state()  # "old" is a row of the checkpoint
    _capped_run(shard.notify, shard.users, campaign("m1"), NOON, "old", "new")
    snap = pickle.loads(pickle.dumps(shard.snapshot()))
    # A restart: the checkpoint, then rows made in another order, then the snapshot's counts.
    again = _follower_shard()
    again.restore(snap, NOON.timestamp())
    again.load_checkpoint(columns, positions)
    again.users.ensure_row("other")
    again.resume_caps()
    got, tally = _capped_run(again.notify, again.users, campaign("m2"), NOON, "old", "new", "x")
    assert got == ["x"] and tally.suppressed == {"capped": 2}
    # Without a snapshot, the checkpoint's counts are used.
    columns, positions = again.checkpoint_state()
    assert any(k.startswith("notify_cap:campaign:") for k in columns)
    third = _follower_shard()
    third.load_checkpoint(columns, positions)
    got, tally = _capped_run(third.notify, third.users, campaign("m3"), NOON, "old", "new", "y")
    assert got == ["y"] and tally.suppressed == {"capped": 2}


def test_a_category_cap_travels_on_the_wire_and_a_request_without_one_stays_as_before() -> None:
    own = campaign("m1", cap_limit=3, cap_window_s=604_800)
    raw = encode_notification_request(own)
    assert orjson.loads(raw)["cap"] == {"limit": 3, "window_s": 604_800}
    assert decode_tier_event(raw) == own
    half = campaign("m2", cap_limit=3)
    assert orjson.loads(encode_notification_request(half))["cap"] == {"limit": 3}
    assert decode_tier_event(encode_notification_request(half)) == half
    plain = encode_notification_request(campaign("m3"))
    assert "cap" not in orjson.loads(plain)  # readers built before it accept it
    for bad in ({"limit": 0}, {}, {"limit": 2, "every": 60}):
        with pytest.raises(InvalidEvent, match="schema"):
            decode_tier_event(orjson.dumps({**orjson.loads(plain), "cap": bad}))


def test_a_category_s_own_cap_and_window_replace_the_default() -> None:
    shard, users = NotifyShard(cap=(5, HOUR)), UserTable()
    # campaign: 1 per day, its own; news: the default window with its own limit of 2.
    for k in range(3):
        got, _ = _capped_run(
            shard, users, campaign(f"p{k}", cap_limit=1, cap_window_s=86_400), NOON, "u1"
        )
        assert got == (["u1"] if k == 0 else [])
    news = [campaign(f"n{k}", category="news", cap_limit=2) for k in range(3)]
    assert [_capped_run(shard, users, r, NOON, "u1")[0] for r in news] == [["u1"], ["u1"], []]
    assert shard.caps["campaign"].rule == CapRule("campaign", 1, 86_400)
    # An hour later the default window would have rolled; promo's day has not.
    later = NOON + timedelta(hours=1)
    p = campaign("p9", cap_limit=1, cap_window_s=86_400)
    assert _capped_run(shard, users, p, later, "u1")[0] == []
    assert _capped_run(shard, users, news[0], later, "u1")[0] == ["u1"]
    # A category without its own cap keeps the default; a cap of its own on a shard whose
    # default is off (FANFARE_NOTIFY_CAP=0) still applies.
    off = NotifyShard(cap=(0, HOUR))
    assert [_capped_run(off, users, campaign(f"d{k}"), NOON, "u1")[0] for k in range(3)] == [
        ["u1"]
    ] * 3
    own = [campaign(f"o{k}", cap_limit=1) for k in range(2)]
    assert [_capped_run(off, users, r, NOON, "u1")[0] for r in own] == [["u1"], []]


def test_a_changed_limit_keeps_the_window_s_counts_and_a_changed_window_starts_afresh() -> None:
    shard, users = NotifyShard(cap=(5, HOUR)), UserTable()
    for k in range(2):
        _capped_run(shard, users, campaign(f"m{k}", cap_limit=3), NOON, "u1")
    # The file now says 2: u1 already had 2 this window.
    assert _capped_run(shard, users, campaign("m2", cap_limit=2), NOON, "u1")[0] == []
    # A new window length: the counts of the old one mean nothing in it.
    r = campaign("m3", cap_limit=2, cap_window_s=2 * HOUR)
    assert _capped_run(shard, users, r, NOON, "u1")[0] == ["u1"]
    assert shard.caps["campaign"].rule == CapRule("campaign", 2, 2 * HOUR)


def test_a_category_s_own_rule_survives_a_snapshot_and_a_checkpoint() -> None:
    shard = _follower_shard()  # default: 1 per hour
    shard.users.ensure_row("old")
    columns, positions = shard.checkpoint_state()
    week = 604_800
    own = [campaign(f"m{k}", cap_limit=2, cap_window_s=week) for k in range(4)]
    _capped_run(shard.notify, shard.users, own[0], NOON, "old", "new")
    snap = pickle.loads(pickle.dumps(shard.snapshot()))
    assert snap["notify_caps"]["campaign"]["rule"] == (2, week)
    again = _follower_shard()
    again.restore(snap, NOON.timestamp())
    again.load_checkpoint(columns, positions)
    again.resume_caps()
    assert again.notify.caps["campaign"].rule == CapRule("campaign", 2, week)
    # Two hours on: the default window would have rolled, the category's week has not.
    later = NOON + timedelta(hours=2)
    got, _ = _capped_run(again.notify, again.users, own[1], later, "old", "new")
    assert got == ["new", "old"]
    got, tally = _capped_run(again.notify, again.users, own[2], later, "old", "new")
    assert got == [] and tally.suppressed == {"capped": 2}
    columns, positions = again.checkpoint_state()
    third = _follower_shard()
    third.load_checkpoint(columns, positions)
    assert third.notify.caps["campaign"].rule == CapRule("campaign", 2, week)
    got, tally = _capped_run(third.notify, third.users, own[3], later, "old", "new", "y")
    assert got == ["y"] and tally.suppressed == {"capped": 2}


def test_a_snapshot_and_a_checkpoint_from_before_category_rules_use_the_default() -> None:
    shard = _follower_shard()  # default: 1 per hour
    _capped_run(shard.notify, shard.users, campaign("m1"), NOON, "u1")
    snap = pickle.loads(pickle.dumps(shard.snapshot()))
    del snap["notify_caps"]["campaign"]["rule"]  # as written before categories had rules
    columns, positions = shard.checkpoint_state()
    del columns["notify_cap:campaign:rule"]
    for restored in (_follower_shard(), _follower_shard()):
        if snap is not None:
            restored.restore(snap, NOON.timestamp())
        restored.load_checkpoint(columns, positions)
        restored.resume_caps()
        assert restored.notify.caps["campaign"].rule == CapRule("campaign", 1, HOUR)
        got, tally = _capped_run(restored.notify, restored.users, campaign("m2"), NOON, "u1")
        assert got == [] and tally.suppressed == {"capped": 1}
        snap = None  # the second: the checkpoint alone
