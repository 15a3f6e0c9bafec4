"""The contracts: schema files are valid JSON Schema, decoders agree with them, bad input is named."""

from datetime import datetime, timedelta, timezone

import orjson
import pytest
from jsonschema import Draft7Validator

from operators.events import MessageOrigin
from schemas.codecs import (
    SCHEMA_NAMES,
    InvalidEvent,
    decode_device_change,
    decode_dispatch_batch,
    decode_follow_change,
    decode_post_created,
    decode_preference_change,
    encode_device_change,
    encode_dispatch_batch,
    encode_follow_change,
    encode_post_created,
    encode_preference_change,
    format_timestamp,
    load_schema,
    parse_timestamp,
    raw_text,
)
from schemas.records import DispatchBatch

TS = "2026-06-01T12:00:00Z"
POST = {
    "event_type": "post_created",
    "post_id": "p1",
    "author_id": "a1",
    "visibility": "public",
    "created_at": TS,
}
FOLLOW = {"author_id": "a1", "follower_id": "u1", "op": "follow", "ts": TS}
PREFS = {
    "user_id": "u1",
    "push_enabled": True,
    "quiet_hours_start": 22,
    "quiet_hours_end": 7,
    "timezone": "Europe/Paris",
    "ts": TS,
}
DEVICE = {
    "user_id": "u1",
    "device_id": "d1",
    "provider": "apns",
    "token": "0f" * 32,
    "active": True,
    "ts": TS,
}


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_files_are_valid_draft7(name: str) -> None:
    Draft7Validator.check_schema(load_schema(name))


def test_defaults_and_round_trips() -> None:
    post = decode_post_created(orjson.dumps(POST))
    assert post.notify_followers is True and post.text is None
    assert decode_post_created(encode_post_created(post)) == post
    follow = decode_follow_change(orjson.dumps(FOLLOW))
    assert (follow.notify_on_post, follow.muted) == (True, False)
    assert decode_follow_change(encode_follow_change(follow)) == follow
    prefs = decode_preference_change(orjson.dumps(PREFS))
    assert decode_preference_change(encode_preference_change(prefs)) == prefs
    dev = decode_device_change(orjson.dumps(DEVICE))
    assert decode_device_change(encode_device_change(dev)) == dev


def test_dispatch_batch_round_trip_matches_schema() -> None:
    batch = DispatchBatch(
        "p1",
        "a1",
        "fcm",
        TS,
        "bulk",
        ({"notification_id": "p1:u1", "user_id": "u1", "device_id": "d1", "token": "t"},),
    )
    raw = encode_dispatch_batch(batch)
    assert not list(Draft7Validator(load_schema("dispatch_batch")).iter_errors(orjson.loads(raw)))
    assert decode_dispatch_batch(raw, "bulk") == batch


def with_(base: dict[str, object], **changes: object) -> bytes:
    d = dict(base)
    for k, v in changes.items():
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    return orjson.dumps(d)


@pytest.mark.parametrize(
    ("decoder", "raw", "kind"),
    [
        (decode_post_created, b"", "invalid_json"),
        (decode_post_created, None, "empty"),
        (decode_post_created, b"{not json", "invalid_json"),
        (decode_post_created, b"\xff\xfe", "invalid_json"),
        (decode_post_created, b"[1,2]", "schema"),
        (decode_post_created, b'"a string"', "schema"),
        (decode_post_created, with_(POST, visibility="secret"), "schema"),
        (decode_post_created, with_(POST, post_id=...), "schema"),
        (decode_post_created, with_(POST, post_id=""), "schema"),
        (decode_post_created, with_(POST, post_id=42), "schema"),
        (decode_post_created, with_(POST, post_id="x" * 129), "schema"),
        (decode_post_created, with_(POST, event_type="post_deleted"), "schema"),
        (decode_post_created, with_(POST, notify_followers="yes"), "schema"),
        (decode_post_created, with_(POST, created_at="yesterday"), "schema"),
        (decode_post_created, with_(POST, created_at="2026-06-01T12:00:00"), "schema"),
        (decode_post_created, with_(POST, author_id="a\nb"), "schema"),
        (decode_follow_change, with_(FOLLOW, op="block"), "schema"),
        (decode_follow_change, with_(FOLLOW, muted=1), "schema"),
        (decode_preference_change, with_(PREFS, quiet_hours_start=24), "schema"),
        (decode_preference_change, with_(PREFS, quiet_hours_end=-1), "schema"),
        (decode_preference_change, with_(PREFS, quiet_hours_start=7.5), "schema"),
        (decode_preference_change, with_(PREFS, quiet_hours_end=None), "schema"),
        (decode_preference_change, with_(PREFS, timezone="Mars/Olympus_Mons"), "unknown_timezone"),
        (decode_preference_change, with_(PREFS, timezone="../../etc/passwd"), "schema"),
        (decode_preference_change, with_(PREFS, timezone=...), "schema"),
        (decode_device_change, with_(DEVICE, provider="webpush"), "schema"),
        (decode_device_change, with_(DEVICE, token="not-hex"), "schema"),
        (decode_device_change, with_(DEVICE, token=...), "schema"),
        (decode_device_change, with_(DEVICE, provider="fcm", token="short"), "schema"),
    ],
)
def test_malformed_events_name_their_problem(decoder, raw, kind) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidEvent) as caught:
        decoder(raw)
    assert caught.value.kind == kind
    assert str(caught.value).startswith(kind + ": ")


def test_inactive_device_needs_no_token_and_fcm_token_shape() -> None:
    assert decode_device_change(with_(DEVICE, active=False, token=...)).token is None
    assert (
        decode_device_change(
            with_(DEVICE, provider="fcm", token="c" * 20 + ":APA91b" + "x" * 120)
        ).provider
        == "fcm"
    )


def test_null_quiet_hours_are_none() -> None:
    prefs = decode_preference_change(with_(PREFS, quiet_hours_start=None, quiet_hours_end=None))
    assert prefs.quiet_hours_start is None and prefs.quiet_hours_end is None


def test_raw_text_keeps_undecodable_bytes() -> None:
    assert raw_text(b"ok \xff") == "ok \\xff"
    assert raw_text(None) == ""


def test_format_timestamp_writes_utc_with_a_z() -> None:
    plus_two = datetime(2026, 6, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert format_timestamp(plus_two) == "2026-06-01T12:00:00.123456Z"
    assert format_timestamp(plus_two, "seconds") == "2026-06-01T12:00:00Z"
    assert format_timestamp(1_780_315_200.5, "milliseconds") == "2026-06-01T12:00:00.500Z"
    assert parse_timestamp(format_timestamp(plus_two)) == plus_two


def test_message_origin_key_is_the_message_whichever_item() -> None:
    origin = MessageOrigin("push.apns", 2, 40)
    assert origin.key == "push.apns/2@40"
    assert origin.of_item(7).key == origin.key and origin.of_item(7).item == 7
