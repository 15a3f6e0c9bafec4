"""Segments: the pure rules, and the Redis index kept from the changelogs (real Redis)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis

from operators.adapters.redis.client import PerThreadRedis
from operators.adapters.redis.segments import RedisSegmentIndex
from operators.notify.segment_indexer import SegmentIndexer, decode_index_event
from operators.notify.segments import (
    DeviceUpdate,
    LocaleUpdate,
    Segment,
    SegmentError,
    index_update,
    locale_sets,
)
from schemas.codecs import (
    encode_category_switch,
    encode_device_change,
    encode_preference_change,
)
from schemas.records import CategorySwitch, DeviceChange, PreferenceChange
from tests.conftest import REDIS_URL

T0 = datetime(2026, 12, 7, 9, tzinfo=UTC)


def prefs(user: str, locale: str | None, at: datetime = T0) -> PreferenceChange:
    return PreferenceChange(user, True, None, None, "UTC", at, locale)


def device(
    user: str, dev: str, provider: str = "apns", active: bool = True, at: datetime = T0
) -> DeviceChange:
    token = "ab" * 32 if provider == "apns" else f"fcm-token-{dev}-" + "x" * 32
    return DeviceChange(user, dev, provider, token, active, at)  # type: ignore[arg-type]


# ---- the rules ---------------------------------------------------------------------------------


def test_a_language_matches_its_regional_locales_and_a_region_only_itself() -> None:
    assert Segment(locale="fr").sets() == ["lang:fr"]
    assert Segment(locale="fr-CA", platform="ios").sets() == ["locale:fr-ca", "platform:ios"]
    assert Segment(platform="android").sets() == ["platform:android"]
    assert locale_sets("fr-CA") == ("locale:fr-ca", "lang:fr")
    assert locale_sets("fr") == ("lang:fr",)
    assert locale_sets(None) == ()
    assert Segment(locale="pt-BR", platform="ios").describe() == "locale=pt-BR,platform=ios"


@pytest.mark.parametrize(
    ("locale", "platform", "fragment"),
    [(None, None, "needs a locale, a platform or both"), ("french!", None, "is not a locale")],
)
def test_a_segment_that_cannot_be_resolved_says_why(
    locale: str | None, platform: str | None, fragment: str
) -> None:
    with pytest.raises(SegmentError, match=fragment):
        Segment(locale, platform)  # type: ignore[arg-type]


def test_changelog_events_become_index_updates() -> None:
    ts = T0.timestamp()
    assert index_update(prefs("u1", "fr-CA")) == LocaleUpdate("u1", ts, ("locale:fr-ca", "lang:fr"))
    assert index_update(prefs("u1", None)) == LocaleUpdate("u1", ts, ())
    assert index_update(device("u1", "d1")) == DeviceUpdate("u1", "d1", ts, "ios")
    assert index_update(device("u1", "d2", "fcm")) == DeviceUpdate("u1", "d2", ts, "android")
    assert index_update(device("u1", "d1", active=False)) == DeviceUpdate("u1", "d1", ts, None)
    switch = CategorySwitch("u1", "campaign", None, False, T0)
    assert index_update(switch) is None
    # On the wire: a switch, a malformed record and an email address change nothing.
    assert decode_index_event("preference_changes", encode_category_switch(switch)) is None
    assert decode_index_event("preference_changes", b"{nope") is None
    mail = DeviceChange("u1", "m1", "email", "a@example.com", True, T0)
    assert decode_index_event("device_changes", encode_device_change(mail)) is None
    raw = encode_preference_change(prefs("u1", "de"))
    assert decode_index_event("preference_changes", raw) == LocaleUpdate("u1", ts, ("lang:de",))


# ---- the Redis index ---------------------------------------------------------------------------


@pytest.fixture
def index() -> Iterator[RedisSegmentIndex]:
    prefix = f"fanfare-test-{uuid.uuid4().hex[:8]}:"
    yield RedisSegmentIndex(PerThreadRedis(REDIS_URL), prefix)
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*", count=1_000))
    if keys:
        client.delete(*keys)


def updates(*changes: PreferenceChange | DeviceChange) -> list[LocaleUpdate | DeviceUpdate]:
    out = [index_update(c) for c in changes]
    return [u for u in out if u is not None]


def test_the_index_answers_locale_and_platform_and_both(index: RedisSegmentIndex) -> None:
    index.apply(
        updates(
            prefs("ana", "fr-CA"),
            device("ana", "a1"),
            prefs("ben", "fr"),
            device("ben", "b1", "fcm"),
            prefs("cai", "fr-FR"),
            device("cai", "c1"),
            device("cai", "c2", "fcm"),
            prefs("dan", "en"),
            device("dan", "d1"),
            prefs("eve", None),
        )
    )
    assert index.members(Segment(locale="fr")) == ["ana", "ben", "cai"]
    assert index.members(Segment(locale="fr-CA")) == ["ana"]
    assert index.members(Segment(locale="FR-ca")) == ["ana"]  # tags are case-insensitive
    assert index.members(Segment(platform="ios")) == ["ana", "cai", "dan"]
    assert index.members(Segment(locale="fr", platform="android")) == ["ben", "cai"]
    assert index.members(Segment(locale="ja")) == []


def test_later_events_win_and_replays_change_nothing(index: RedisSegmentIndex) -> None:
    later = T0 + timedelta(minutes=5)
    index.apply(updates(prefs("ana", "fr"), device("ana", "a1"), device("ana", "a2")))
    index.apply(updates(prefs("ana", "de", later), device("ana", "a1", active=False, at=later)))
    assert index.members(Segment(locale="fr")) == []
    assert index.members(Segment(locale="de")) == ["ana"]
    assert index.members(Segment(platform="ios")) == ["ana"]  # a2 is still active
    # The changelogs read again from the start: the older events are ignored.
    assert index.apply(updates(prefs("ana", "fr"), device("ana", "a1"))) == 0
    assert index.members(Segment(locale="fr")) == [] and index.members(Segment(locale="de"))
    index.apply(updates(device("ana", "a2", active=False, at=later)))
    assert index.members(Segment(platform="ios")) == []
    # A moved device (same id, now FCM) leaves iOS and joins Android.
    index.apply(updates(device("ben", "b1"), device("ben", "b1", "fcm", at=later)))
    assert index.members(Segment(platform="ios")) == []
    assert index.members(Segment(platform="android")) == ["ben"]


class Feed:
    """The changelogs' records, in batches."""

    def __init__(self, records: list[tuple[str, int, int, bytes | None]]) -> None:
        self.records = records

    def poll(self, max_messages: int, timeout_s: float) -> list[tuple[str, int, int, bytes | None]]:
        batch, self.records = self.records[:max_messages], self.records[max_messages:]
        return batch


def test_the_indexer_applies_the_changelogs_and_saves_where_it_read_to(
    index: RedisSegmentIndex,
) -> None:
    records = [
        ("preference_changes", 0, 7, encode_preference_change(prefs("ana", "fr"))),
        ("device_changes", 1, 3, encode_device_change(device("ana", "a1"))),
        ("preference_changes", 0, 8, b"not json"),
        ("device_changes", 1, 4, encode_device_change(device("ben", "b1", "fcm"))),
    ]
    indexer = SegmentIndexer(Feed(records), index, batch=3)
    assert indexer.step() == 3 and indexer.step() == 1 and indexer.step() == 0
    assert (indexer.applied, indexer.skipped) == (3, 1)
    assert index.members(Segment(locale="fr", platform="ios")) == ["ana"]
    assert index.members(Segment(platform="android")) == ["ben"]
    assert index.positions() == {("preference_changes", 0): 9, ("device_changes", 1): 5}
