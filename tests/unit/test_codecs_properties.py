"""Property-based tests of the codecs and the flows' decode steps, and the malformed-input corpus.

The strategies here describe every input topic's messages: valid ones, and malformed or
adversarial ones, each labelled with the reason its dead letter must start with (`schema`,
`invalid_json`, `empty`, `unknown_timezone`, `unknown_notification`) and a family naming what
is wrong with it. The unit tests check that

- no decoder raises anything but InvalidEvent, for arbitrary bytes, arbitrary JSON and
  byte-level mutations of valid messages;
- every labelled message is refused by the flow's own decode step (the function the dataflow
  maps over the topic) with a dead letter whose error starts with its label, and every valid
  one is accepted: so the labels are an oracle the integration run can trust;

and tests/reliability/test_malformed_input.py publishes a seeded corpus drawn from the same
strategies (`draw_corpus`) through the real flows.
"""

from __future__ import annotations

import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from operators.acks.steps import decode_ack
from operators.delivery.steps import decode_channel_message, decode_retry_message, retry_due_at
from operators.events import RawEvent, dead_letter
from operators.fanout.quiet_hours import quiet_until
from operators.fanout.steps import ChangelogRouter, decode_post
from schemas.codecs import (
    InvalidEvent,
    decode_delivery_event,
    decode_device_change,
    decode_dispatch_batch,
    decode_follow_change,
    decode_notification_ack,
    decode_post_created,
    decode_preference_change,
    decode_retry_record,
    encode_dead_letter,
)
from schemas.records import DeadLetter

# --- the topics ----------------------------------------------------------------------------------

POST_TOPICS = ("post_created", "post_created.backfill")
CHANGELOGS = ("follow_changes", "preference_changes", "device_changes")
CHANNELS = ("push.apns", "push.fcm", "push.apns.bulk", "push.fcm.bulk")
INPUT_TOPICS = (*POST_TOPICS, *CHANGELOGS, *CHANNELS, "push.retry", "notification_acks")
SCHEMA_OF = {
    **dict.fromkeys(POST_TOPICS, "post"),
    "follow_changes": "follow",
    "preference_changes": "prefs",
    "device_changes": "device",
    **dict.fromkeys(CHANNELS, "dispatch"),
    "push.retry": "retry",
    "notification_acks": "ack",
}
ONE_MB = 1 << 20


@dataclass(frozen=True)
class Message:
    """A message for a topic: what is wrong with it (`family`) and the reason it must get.

    `reason` is the first word of the dead letter's error, or None for a valid message.
    """

    topic: str
    family: str
    reason: str | None
    key: bytes | None
    value: bytes | None


# --- building blocks -----------------------------------------------------------------------------

CONTROL = "".join(map(chr, range(0x20))) + "\x7f"
# Bidi overrides and isolates, zero-width and BOM, emoji with modifiers and ZWJ, a C1 control,
# characters outside the BMP: legal in ids (the schemas refuse only C0 controls and DEL).
ODD = (
    "\u202e",
    "\u202d",
    "\u200f",
    "\u2066",
    "\u2069",
    "\ufeff",
    "\u200b",
    "\U0001f44d\U0001f3fd",
    "\U0001f3f3\ufe0f\u200d\U0001f308",
    "\u0085",
    "\ufdfa",
    "\U0001d518",
    "\u0301",
)
HEX = "0123456789abcdefABCDEF"
FCM_CHARS = string.ascii_letters + string.digits + "_:-"
ZONES = (
    "UTC",
    "Europe/Paris",
    "America/New_York",
    "Asia/Kolkata",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "America/St_Johns",
    "Etc/GMT+12",
    "Asia/Kathmandu",
)

plain_chars = st.characters(codec="utf-8", exclude_characters=CONTROL)
any_chars = st.characters(codec="utf-8")  # controls too: fine where no pattern applies
ids = st.one_of(
    st.text(plain_chars, min_size=1, max_size=24),
    st.builds(
        lambda a, odd, b: a + odd + b,
        st.text(plain_chars, max_size=10),
        st.sampled_from(ODD),
        st.text(plain_chars, max_size=10),
    ),
)
offsets = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8)), timezone.min]
)
timestamps = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31), timezones=offsets
).map(lambda d: d.isoformat().replace("+00:00", "Z"))
recent_due = st.one_of(st.just(0), st.integers(0, 10**9), st.floats(0, 1e9))
apns_tokens = st.binary(min_size=32, max_size=100).map(bytes.hex)
fcm_tokens = st.text(st.sampled_from(FCM_CHARS), min_size=32, max_size=200)
i64 = st.integers(-(2**63), 2**63 - 1)  # orjson writes 64-bit integers only
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    i64,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(any_chars, max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(any_chars, max_size=8), inner, max_size=4),
    ),
    max_leaves=12,
)
keys = st.one_of(
    st.none(),  # a null key: legal, and never a reason to refuse a message
    st.just(b""),
    ids.map(str.encode),
    st.binary(max_size=16),
)


_ABSENT = object()


def _present(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not _ABSENT}


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(_ABSENT), strategy)


# --- valid messages per schema -------------------------------------------------------------------


def _items(max_size: int = 3) -> st.SearchStrategy[list[dict[str, Any]]]:
    return st.lists(
        st.fixed_dictionaries(
            {
                "notification_id": st.text(any_chars, min_size=1, max_size=40),
                "user_id": ids,
                "device_id": ids,
                "token": st.one_of(apns_tokens, fcm_tokens),
            }
        ),
        min_size=1,
        max_size=max_size,
    )


@st.composite
def _prefs(draw: st.DrawFn) -> dict[str, Any]:
    d: dict[str, Any] = {"user_id": draw(ids), "timezone": draw(st.sampled_from(ZONES))}
    d["ts"] = draw(timestamps)
    if draw(st.booleans()):
        d["push_enabled"] = draw(st.booleans())
    hours = draw(st.sampled_from(["absent", "null", "set"]))
    if hours == "null":
        d["quiet_hours_start"] = d["quiet_hours_end"] = None
    elif hours == "set":
        d["quiet_hours_start"] = draw(st.integers(0, 23))
        d["quiet_hours_end"] = draw(st.integers(0, 23))
    return d


@st.composite
def _device(draw: st.DrawFn) -> dict[str, Any]:
    provider = draw(st.sampled_from(["apns", "fcm"]))
    active = draw(st.booleans())
    d: dict[str, Any] = {
        "user_id": draw(ids),
        "device_id": draw(ids),
        "provider": provider,
        "active": active,
        "ts": draw(timestamps),
    }
    if active or draw(st.booleans()):
        d["token"] = draw(apns_tokens if provider == "apns" else fcm_tokens)
    return d


VALID: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "post": st.builds(
        lambda base, nf, text: _present({**base, "notify_followers": nf, "text": text}),
        st.fixed_dictionaries(
            {
                "event_type": st.just("post_created"),
                "post_id": ids,
                "author_id": ids,
                "visibility": st.sampled_from(["public", "followers", "private"]),
                "created_at": timestamps,
            }
        ),
        _maybe(st.booleans()),
        _maybe(st.text(any_chars, max_size=40)),
    ),
    "follow": st.builds(
        lambda base, n, m: _present({**base, "notify_on_post": n, "muted": m}),
        st.fixed_dictionaries(
            {
                "author_id": ids,
                "follower_id": ids,
                "op": st.sampled_from(["follow", "unfollow"]),
                "ts": timestamps,
            }
        ),
        _maybe(st.booleans()),
        _maybe(st.booleans()),
    ),
    "prefs": _prefs(),
    "device": _device(),
    "dispatch": st.fixed_dictionaries(
        {
            "schema": st.just("dispatch_batch/v1"),
            "post_id": ids,
            "author_id": ids,
            "provider": st.sampled_from(["apns", "fcm"]),
            "created_at": timestamps,
            "items": _items(),
        }
    ),
    "retry": st.fixed_dictionaries(
        {
            "provider": st.sampled_from(["apns", "fcm"]),
            "lane": st.sampled_from(["normal", "bulk"]),
            "post_id": ids,
            "author_id": ids,
            "created_at": timestamps,
            "item": _items(1).map(lambda items: items[0]),
            "attempt": st.integers(0, 1000),
            "seq": st.integers(1, 100_000),
            # At most 1e9 (2001): due now, so a malformed record is not held for later.
            "due_at": recent_due,
            "reason": st.text(any_chars, max_size=30),
        }
    ),
    "ack": st.fixed_dictionaries(
        {
            "notification_id": st.text(plain_chars, min_size=1, max_size=60),
            "device_id": ids,
            "event": st.sampled_from(["delivered", "opened"]),
            "ts": timestamps,
        }
    ),
}

# What each field of each schema is, for the mutations: the kind of value it takes.
FIELDS: dict[str, dict[str, str]] = {
    "post": {
        "event_type": "const",
        "post_id": "id",
        "author_id": "id",
        "visibility": "enum",
        "created_at": "time",
        "notify_followers": "bool",
        "text": "text",
    },
    "follow": {
        "author_id": "id",
        "follower_id": "id",
        "op": "enum",
        "notify_on_post": "bool",
        "muted": "bool",
        "ts": "time",
    },
    "prefs": {
        "user_id": "id",
        "push_enabled": "bool",
        "quiet_hours_start": "hour",
        "quiet_hours_end": "hour",
        "timezone": "tz",
        "ts": "time",
    },
    "device": {
        "user_id": "id",
        "device_id": "id",
        "provider": "enum",
        "token": "token",
        "active": "bool",
        "ts": "time",
    },
    "dispatch": {
        "schema": "const",
        "post_id": "id",
        "author_id": "id",
        "provider": "enum",
        "created_at": "time",
        "items": "items",
    },
    "retry": {
        "provider": "enum",
        "lane": "enum",
        "post_id": "id",
        "author_id": "id",
        "created_at": "time",
        "item": "item",
        "attempt": "count",
        "seq": "count",
        "due_at": "number",
        "reason": "text",
    },
    "ack": {"notification_id": "nid", "device_id": "id", "event": "enum", "ts": "time"},
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "post": ("event_type", "post_id", "author_id", "visibility", "created_at"),
    "follow": ("author_id", "follower_id", "op", "ts"),
    "prefs": ("user_id", "timezone", "ts"),
    "device": ("user_id", "device_id", "provider", "active", "ts"),
    "dispatch": ("schema", "post_id", "author_id", "provider", "created_at", "items"),
    "retry": tuple(FIELDS["retry"]),
    "ack": ("notification_id", "device_id", "event", "ts"),
}
ENUMS = {
    "visibility": ("public", "followers", "private"),
    "op": ("follow", "unfollow"),
    "provider": ("apns", "fcm"),
    "lane": ("normal", "bulk"),
    "event": ("delivered", "opened"),
}
MAX_LENGTH = {"id": 128, "nid": 300, "text": 1024, "tz": 64, "time": 64}

# Values of the wrong JSON type for each kind of field. Never an integral float where an
# integer goes: JSON Schema counts 7.0 as an integer (see the quiet hours regression test below).
_not_string = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**31), 2**31),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(json_scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), json_scalars, max_size=3),
)
_not_integer = st.one_of(
    st.booleans(),
    st.text(max_size=5),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
    st.lists(i64, max_size=3),
    st.dictionaries(st.text(max_size=5), i64, max_size=2),
)
WRONG_TYPE: dict[str, st.SearchStrategy[Any]] = {
    "id": _not_string,
    "nid": _not_string,
    "text": _not_string,
    "tz": _not_string,
    "time": _not_string,
    "token": _not_string,
    "enum": _not_string,
    "const": _not_string,
    "bool": st.one_of(
        st.none(),
        st.integers(0, 1),
        st.sampled_from(["true", "false", "yes", ""]),
        st.lists(st.booleans(), max_size=2),
    ),
    "hour": _not_integer,  # null is allowed
    "count": st.one_of(st.none(), _not_integer),
    "number": st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.lists(i64, max_size=2)),
    "items": st.one_of(
        st.none(),
        st.booleans(),
        i64,
        st.text(max_size=5),
        st.dictionaries(st.text(max_size=3), i64, max_size=2),
    ),
    "item": st.one_of(
        st.none(),
        st.booleans(),
        i64,
        st.text(max_size=5),
        st.lists(i64, max_size=2),
    ),
}

unknown_enum_values = st.one_of(
    st.sampled_from(
        [
            "",
            "PUBLIC",
            "Apns",
            " follow",
            "opened ",
            "everyone",
            "web_push",  # (webpush is a provider since channel addresses)
            "express",
            "clicked",
            "block",
            "dispatch_batch/v2",
            "post_updated",
        ]
    ),
    st.builds(
        lambda v, odd: v + odd, st.sampled_from(sum(ENUMS.values(), ())), st.sampled_from(ODD)
    ),
    st.text(plain_chars, min_size=1, max_size=12),
)

bad_timestamps = st.one_of(
    st.sampled_from(
        [
            "",
            "yesterday",
            "2026-06-01",
            "2026-06-01T12:00:00",
            "2026-06-01 12:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-02-30T12:00:00Z",
            "2026-06-01T25:00:00Z",
            "2026-06-01T12:00:00+24:00",
            "2026-06-30T23:59:60Z",
            "2026-06-01T12:00:00Z\n",
            "\u202e2026-06-01T12:00:00Z",
            "2026-06-01T12:00:00Z\U0001f44d",
            "0000-01-01T00:00:00Z",
            "1780315200",
            "\uff12\uff10\uff12\uff16-\uff10\uff16-\uff10\uff11T\uff11\uff12:\uff10\uff10:\uff10\uff10Z",
            "\u0662\u0660\u0662\u0666-\u0660\u0666-\u0660\u0661T\u0661\u0662:\u0660\u0660:\u0660\u0660Z",
        ]
    ),
    st.text(plain_chars, max_size=30).filter(lambda s: not s[:1].isdigit()),
)

bad_pattern_zones = st.one_of(
    st.sampled_from(
        [
            "Europe/Paris ",
            "Europe.Paris",
            "UTC+05:30",
            "America/New York",
            "Europe/Paris\u202e",
            "\u0391\u03c3\u03af\u03b1/\u0391\u03b8\u03ae\u03bd\u03b1",
            "Etc/GMT+5\x00",
            "../../etc/passwd",
            "Europe\\Paris",
        ]
    ),
    st.builds(
        lambda z, c: z + c,
        st.sampled_from(ZONES),
        st.sampled_from([" ", ".", ":", "\t", "\u00e9", "\U0001f30d"]),
    ),
)


def _zone_exists(name: str) -> bool:
    try:
        ZoneInfo(name)
    except Exception:  # ZoneInfoNotFoundError, ValueError, IsADirectoryError, ...
        return False
    return True


unknown_zones = st.one_of(
    st.sampled_from(
        [
            "Atlantis/Capital",
            "Mars/Olympus_Mons",
            "Europe/Pariss",
            "/etc/passwd",
            "America",
            "Europe/",
            "UTC/UTC",
            "Europe/Paris/Extra",
            "Etc/GMT+13",
            "-",
            "+0530",
        ]
    ),
    st.from_regex(r"[A-Z][a-z]{2,9}/[A-Z][a-z_]{2,12}", fullmatch=True),
).filter(lambda z: not _zone_exists(z))


# --- malformed messages --------------------------------------------------------------------------


def _dumps(d: Any) -> bytes:
    return orjson.dumps(d)


MARK = "\u00a7MARK\u00a7".encode()


def _with_marker(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> bytes:
    """The base serialized with one string field's value replaced by MARK."""
    kinds = ("id", "nid", "text", "tz", "time", "token", "enum")
    field = draw(
        st.sampled_from(sorted(f for f, k in FIELDS[schema].items() if k in kinds and f in base))
    )
    return _dumps({**base, field: MARK.decode()})


@st.composite
def malformed(draw: st.DrawFn, topic: str) -> Message:
    """One malformed or adversarial message for `topic`, labelled with its reason."""
    schema = SCHEMA_OF[topic]
    # The richer families twice as often as a tombstone or a non-object.
    families = [f for f in _FAMILIES for _ in range(1 if f in ("tombstone", "non_object") else 2)]
    if schema == "prefs":
        families += ["hour_out_of_range", "half_quiet_hours", "bad_tz_pattern"]
        families += ["unknown_timezone"] * 3
    if schema == "device":
        families += ["bad_token_shape"] * 3 + ["active_without_token"]
    if schema == "dispatch":
        families += ["bad_items"] * 2
    if schema == "retry":
        families += ["out_of_range_count"]
    if schema == "ack":
        families += ["unknown_notification"] * 3
    if not any(k in ("enum", "const") for k in FIELDS[schema].values()):
        families = [f for f in families if f not in ("unknown_enum", "duplicate_key")]
    family = draw(st.sampled_from(families))
    base = draw(VALID[schema])
    key = draw(keys)
    if family in _FAMILIES:
        reason, value = _FAMILIES[family](draw, schema, base)
    else:
        reason, value = _SPECIFIC[family](draw, schema, base)
    return Message(topic, family, reason, key, value)


def _missing_field(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    field = draw(st.sampled_from(REQUIRED[schema]))
    return "schema", _dumps({k: v for k, v in base.items() if k != field})


def _wrong_type(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    field = draw(st.sampled_from(sorted(FIELDS[schema])))
    value = draw(WRONG_TYPE[FIELDS[schema][field]])
    return "schema", _dumps({**base, field: value})


def _unknown_enum(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    fields = sorted(f for f, k in FIELDS[schema].items() if k in ("enum", "const"))
    field = draw(st.sampled_from(fields))
    allowed = ENUMS.get(field, ("post_created", "dispatch_batch/v1"))
    value = draw(unknown_enum_values.filter(lambda v: v not in allowed))
    return "schema", _dumps({**base, field: value})


def _bad_string(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    """Empty, too long, or a control character (NUL, ESC, DEL ...) where a pattern forbids it."""
    fields = sorted(
        f
        for f, k in FIELDS[schema].items()
        if k in ("id", "nid") or (k == "text" and schema == "retry")
    )
    field = draw(st.sampled_from(fields))
    kind = FIELDS[schema][field]
    how = draw(
        st.sampled_from(["empty", "too_long", "control"] if kind != "text" else ["too_long"])
    )
    if how == "empty":
        value = ""
    elif how == "too_long":
        value = draw(st.sampled_from(["x", "\U0001f44d", "\u202e"])) * (
            MAX_LENGTH[kind] + draw(st.integers(1, 50))
        )
    else:
        ch = draw(st.sampled_from(CONTROL))
        value = draw(st.text(plain_chars, max_size=5)) + ch + draw(st.text(plain_chars, max_size=5))
    return "schema", _dumps({**base, field: value})


def _bad_timestamp(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    field = next(f for f, k in FIELDS[schema].items() if k == "time")
    return "schema", _dumps({**base, field: draw(bad_timestamps)})


def _non_object(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    value = draw(
        st.one_of(
            json_scalars,
            st.lists(json_values, max_size=4),
            st.just([base]),  # the right object, inside an array
        )
    )
    return "schema", _dumps(value)


def _duplicate_key(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    """The same key twice, the last one wrong (the last one wins in JSON parsers)."""
    fields = sorted(f for f, k in FIELDS[schema].items() if k in ("enum", "const"))
    field = draw(st.sampled_from(fields))
    raw = _dumps(base)
    return "schema", raw[:-1] + b"," + _dumps(field) + b':"bogus"}'


def _invalid_json(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    raw = _dumps(base)
    how = draw(
        st.sampled_from(
            [
                "garbage",
                "truncated",
                "lone_surrogate",
                "invalid_utf8",
                "raw_control",
                "bom",
                "nan",
                "trailing",
                "deep",
                "empty_bytes",
                "whitespace",
                "single_quotes",
                "two_documents",
            ]
        )
    )
    if how == "garbage":
        return "invalid_json", b"\xfe" + draw(st.binary(max_size=60))
    if how == "truncated":
        return "invalid_json", raw[: draw(st.integers(0, len(raw) - 1))]
    if how in ("lone_surrogate", "invalid_utf8", "raw_control"):
        marked = _with_marker(draw, schema, base)
        bad = {
            "lone_surrogate": draw(
                st.sampled_from([b"\\ud800", b"\\udfff", b"\\udbff\\u0041", b"a\\ud83d"])
            ),
            "invalid_utf8": draw(
                st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
            ),
            "raw_control": draw(st.sampled_from([b"\x00", b"\x01", b"\n", b"\x1b[31m"])),
        }[how]
        return "invalid_json", marked.replace(MARK, bad)
    if how == "bom":
        return "invalid_json", b"\xef\xbb\xbf" + raw
    if how == "nan":
        field = draw(st.sampled_from(sorted(base)))
        token = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"undefined"]))
        marked = _dumps({**base, field: MARK.decode()})
        return "invalid_json", marked.replace(b'"' + MARK + b'"', token)
    if how == "trailing":
        return "invalid_json", raw + draw(st.sampled_from([b",", b" x", b"}", b"\x00"]))
    if how == "deep":
        depth = draw(st.integers(1025, 3000))
        return "invalid_json", b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    if how == "empty_bytes":
        return "invalid_json", b""
    if how == "whitespace":
        return "invalid_json", draw(st.sampled_from([b" ", b"\n\t ", b"\r\n"]))
    if how == "single_quotes":
        return "invalid_json", repr(base).encode()
    return "invalid_json", raw + raw


def _tombstone(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, None]:
    return "empty", None


_FAMILIES: dict[str, Callable[..., tuple[str, bytes | None]]] = {
    "missing_field": _missing_field,
    "wrong_type": _wrong_type,
    "unknown_enum": _unknown_enum,
    "bad_string": _bad_string,
    "bad_timestamp": _bad_timestamp,
    "non_object": _non_object,
    "duplicate_key": _duplicate_key,
    "invalid_json": _invalid_json,
    "tombstone": _tombstone,
}


def _hour_out_of_range(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    bad = draw(
        st.one_of(st.integers(24, 2**40), st.integers(-(2**40), -1), st.sampled_from([24.0, -1.0]))
    )
    other = draw(st.integers(0, 23))
    pair = [bad, other] if draw(st.booleans()) else [other, bad]
    return "schema", _dumps({**base, "quiet_hours_start": pair[0], "quiet_hours_end": pair[1]})


def _half_quiet_hours(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    d = {k: v for k, v in base.items() if not k.startswith("quiet_hours")}
    field = draw(st.sampled_from(["quiet_hours_start", "quiet_hours_end"]))
    d[field] = draw(st.integers(0, 23))
    other = "quiet_hours_end" if field == "quiet_hours_start" else "quiet_hours_start"
    if draw(st.booleans()):
        d[other] = None
    return "schema", _dumps(d)


def _bad_tz_pattern(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    return "schema", _dumps({**base, "timezone": draw(bad_pattern_zones)})


def _unknown_timezone(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    return "unknown_timezone", _dumps({**base, "timezone": draw(unknown_zones)})


def _bad_token_shape(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    provider = base["provider"]
    if provider == "apns":
        token = draw(
            st.one_of(
                st.integers(1, 31).map(lambda n: "ab" * n),  # too short
                st.integers(101, 300).map(lambda n: "0f" * n),  # too long
                st.text(st.sampled_from("ghijklmnopqrstuvwxyz:_-+/= "), min_size=64, max_size=80),
                fcm_tokens.filter(lambda t: any(c not in HEX for c in t)),  # the other provider's
            )
        )
    else:
        token = draw(
            st.one_of(
                st.text(st.sampled_from(FCM_CHARS), min_size=1, max_size=31),  # too short
                st.builds(
                    lambda t, c: t[:20] + c + t[20:],
                    fcm_tokens,
                    st.sampled_from([" ", "/", "+", "=", ".", "\U0001f44d", "\u202e", "\x00"]),
                ),
                st.just("x" * 4097),
            )
        )
    return "schema", _dumps({**base, "token": token})


def _active_without_token(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    return "schema", _dumps({k: v for k, v in {**base, "active": True}.items() if k != "token"})


def _bad_items(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    how = draw(
        st.sampled_from(["empty", "too_many", "item_missing", "item_wrong_type", "not_objects"])
    )
    item = base["items"][0]
    if how == "empty":
        items: Any = []
    elif how == "too_many":
        items = [item] * draw(st.integers(501, 700))
    elif how == "item_missing":
        field = draw(st.sampled_from(sorted(item)))
        items = [*base["items"], {k: v for k, v in item.items() if k != field}]
    elif how == "item_wrong_type":
        field = draw(st.sampled_from(sorted(item)))
        items = [{**item, field: draw(_not_string)}, *base["items"]]
    else:
        items = draw(st.lists(json_scalars, min_size=1, max_size=5))
    return "schema", _dumps({**base, "items": items})


def _out_of_range_count(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    field, value = draw(
        st.one_of(
            st.tuples(
                st.just("attempt"), st.one_of(st.integers(1001, 2**40), st.integers(-(2**40), -1))
            ),
            st.tuples(
                st.just("seq"), st.one_of(st.integers(100_001, 2**40), st.integers(-(2**40), 0))
            ),
            st.tuples(
                st.just("due_at"),
                st.one_of(
                    st.integers(-(2**40), -1), st.floats(max_value=-1e-9, allow_infinity=False)
                ),
            ),
        )
    )
    return "schema", _dumps({**base, field: value})


def _unknown_notification(draw: st.DrawFn, schema: str, base: dict[str, Any]) -> tuple[str, bytes]:
    """Well formed, but no such notification was ever sent: the acks flow refuses it too."""
    return "unknown_notification", _dumps(
        {**base, "notification_id": "never-sent:" + base["notification_id"][:200]}
    )


_SPECIFIC: dict[str, Callable[..., tuple[str, bytes]]] = {
    "hour_out_of_range": _hour_out_of_range,
    "half_quiet_hours": _half_quiet_hours,
    "bad_tz_pattern": _bad_tz_pattern,
    "unknown_timezone": _unknown_timezone,
    "bad_token_shape": _bad_token_shape,
    "active_without_token": _active_without_token,
    "bad_items": _bad_items,
    "out_of_range_count": _out_of_range_count,
    "unknown_notification": _unknown_notification,
}


# 1 MB values: one field (or the whole value) of about a megabyte. Built from a small drawn
# description, so the strategies stay cheap.
HUGE_KINDS = ("field", "garbage", "nul_bytes", "invalid_utf8", "many_items")
# The 1 MB kind each topic gets in the integration corpus. Not many_items on a bulk lane: see
# test_a_malformed_bulk_batch_is_decoded_once_not_once_per_slice.
HUGE_KIND_OF = {
    "post_created": "field",
    "post_created.backfill": "garbage",
    "follow_changes": "invalid_utf8",
    "preference_changes": "field",
    "device_changes": "field",
    "push.apns": "nul_bytes",
    "push.fcm": "many_items",
    "push.apns.bulk": "field",
    "push.fcm.bulk": "invalid_utf8",
    "push.retry": "field",
    "notification_acks": "nul_bytes",
}


@st.composite
def huge(draw: st.DrawFn, topic: str, how: str | None = None) -> Message:
    """A message of about 1 MB for `topic` (a huge field, or a megabyte of bytes)."""
    schema = SCHEMA_OF[topic]
    base = draw(VALID[schema])
    if how is None:
        how = draw(st.sampled_from(HUGE_KINDS))
    if how == "many_items" and schema != "dispatch":
        how = "field"
    if how == "field":
        field = draw(
            st.sampled_from(
                sorted(
                    f
                    for f, k in FIELDS[schema].items()
                    if k in ("id", "nid", "text", "tz", "token")
                )
            )
        )
        filler = draw(st.sampled_from(["x", "\u202e", "\U0001f44d", "\\u0000"]))
        if filler == "\\u0000":  # a JSON-escaped NUL: a million of them, six bytes each on the wire
            value = _dumps({**base, field: MARK.decode()}).replace(MARK, b"\\u0000" * (ONE_MB // 6))
        else:
            value = _dumps({**base, field: filler * (ONE_MB // len(filler.encode()))})
        return Message(topic, "huge_field", "schema", draw(keys), value)
    if how == "garbage":
        return Message(
            topic,
            "huge_garbage",
            "invalid_json",
            draw(keys),
            b"\xfe" + bytes(range(256)) * (ONE_MB // 256),
        )
    if how == "nul_bytes":
        return Message(topic, "huge_nul_bytes", "invalid_json", draw(keys), b"\x00" * ONE_MB)
    if how == "invalid_utf8":
        return Message(
            topic,
            "huge_invalid_utf8",
            "invalid_json",
            draw(keys),
            b'{"post_id": "' + b"\xff" * ONE_MB + b'"}',
        )
    # A dispatch batch of a million bytes of tiny items (far over 500): the bulk lanes slice it.
    return Message(
        topic,
        "huge_many_items",
        "schema",
        draw(keys),
        _dumps({**base, "items": [0] * (ONE_MB // 2)}),
    )


@st.composite
def unknown_author_post(draw: st.DrawFn, topic: str = "post_created") -> Message:
    """A valid post by an author nobody follows (odd unicode ids, a null key at times)."""
    post = draw(VALID["post"])
    post["author_id"] = "nobody-follows-" + post["author_id"]
    post["post_id"] = "unknown-author-post-" + post["post_id"]
    post["visibility"] = "public"
    post.pop("notify_followers", None)
    return Message(topic, "valid_unknown_author", None, draw(keys), _dumps(post))


# --- drawing a corpus deterministically ----------------------------------------------------------


def draw_examples(strategy: st.SearchStrategy[Any], n: int, fixed_seed: int) -> list[Any]:
    """`n` values of a strategy, the same ones on every run (Hypothesis with a fixed seed)."""
    out: list[Any] = []
    attempt = 0
    while len(out) < n:

        @seed(fixed_seed + attempt)
        @settings(
            max_examples=n - len(out),
            phases=[Phase.generate],
            database=None,
            deadline=None,
            derandomize=False,
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy)
        def collect(value: Any) -> None:
            out.append(value)

        collect()
        attempt += 1
    return out[:n]


def draw_corpus(per_topic: int, huge_per_topic: int, fixed_seed: int) -> dict[str, list[Message]]:
    """Malformed messages per input topic: `per_topic` drawn from `malformed`, plus 1 MB ones."""
    corpus: dict[str, list[Message]] = {}
    for i, topic in enumerate(INPUT_TOPICS):
        messages = draw_examples(malformed(topic), per_topic, fixed_seed + 1000 * i)
        messages += draw_examples(
            huge(topic, HUGE_KIND_OF[topic]), huge_per_topic, fixed_seed + 1000 * i + 500
        )
        corpus[topic] = messages
    return corpus


# --- the flows' decode steps, as the dataflows call them -----------------------------------------


def flow_decode(topic: str, key: bytes | None, value: bytes | None) -> DeadLetter | None:
    """Run the message through its flow's decode step: its dead letter, or None if accepted."""
    event = RawEvent(topic, 0, 7, key, value, time.time())
    if topic in POST_TOPICS:
        out: Any = decode_post(event)
        return out if isinstance(out, DeadLetter) else None
    if topic in CHANGELOGS:
        routed = ChangelogRouter(4).route(event)
        assert isinstance(routed, list) and len(routed) == 1
        return routed[0] if isinstance(routed[0], DeadLetter) else None
    if topic in CHANNELS:
        sends = decode_channel_message(event)
        letters = [s for s in sends if isinstance(s, DeadLetter)]
        assert len(letters) == len(sends) or not letters
        return letters[0] if letters else None
    if topic == "push.retry":
        retry = decode_retry_message(event)
        return retry if isinstance(retry, DeadLetter) else None
    assert topic == "notification_acks"
    ack = decode_ack(event)
    return ack if isinstance(ack, DeadLetter) else None


DECODERS: dict[str, Callable[[bytes | None], Any]] = {
    "post_created": decode_post_created,
    "follow_changes": decode_follow_change,
    "preference_changes": decode_preference_change,
    "device_changes": decode_device_change,
    "dispatch_batch": lambda raw: decode_dispatch_batch(raw, "normal"),
    "push_retry": decode_retry_record,
    "notification_acks": decode_notification_ack,
    "delivery_events": decode_delivery_event,
}

FAST = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
MANY = settings(
    max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
# For the known bugs: find one failing example, do not spend time shrinking it.
FIND = settings(
    max_examples=50,
    deadline=None,
    database=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def _decodes_or_invalid(decode: Callable[[bytes | None], Any], raw: bytes | None) -> None:
    try:
        decode(raw)
    except InvalidEvent as exc:
        assert exc.kind in {"schema", "invalid_json", "empty", "unknown_timezone"}, exc
        assert str(exc).startswith(exc.kind + ": ")


# --- the tests -----------------------------------------------------------------------------------


@MANY
@given(raw=st.one_of(st.binary(max_size=300), st.none()))
def test_decoders_raise_only_invalid_event_on_arbitrary_bytes(raw: bytes | None) -> None:
    for decode in DECODERS.values():
        _decodes_or_invalid(decode, raw)


@MANY
@given(value=json_values)
def test_decoders_raise_only_invalid_event_on_arbitrary_json(value: Any) -> None:
    raw = _dumps(value)
    for decode in DECODERS.values():
        _decodes_or_invalid(decode, raw)


@pytest.mark.parametrize("topic", INPUT_TOPICS)
@FAST
@given(data=st.data())
def test_byte_mutations_of_valid_messages_raise_only_invalid_event(
    topic: str, data: st.DataObject
) -> None:
    raw = bytearray(_dumps(data.draw(VALID[SCHEMA_OF[topic]])))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        edit = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if edit == "insert" or not raw:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif edit == "flip":
            raw[min(at, len(raw) - 1)] ^= 1 << data.draw(st.integers(0, 7))
        else:
            del raw[min(at, len(raw) - 1)]
    flow_decode(topic, None, bytes(raw))  # a dead letter or a record: never an exception


@pytest.mark.parametrize("topic", INPUT_TOPICS)
@FAST
@given(data=st.data())
def test_valid_messages_are_accepted(topic: str, data: st.DataObject) -> None:
    value = _dumps(data.draw(VALID[SCHEMA_OF[topic]]))
    assert flow_decode(topic, data.draw(keys), value) is None


@pytest.mark.parametrize("topic", INPUT_TOPICS)
@FAST
@given(data=st.data())
def test_every_malformed_message_gets_its_labelled_dead_letter(
    topic: str, data: st.DataObject
) -> None:
    message = data.draw(malformed(topic))
    letter = flow_decode(topic, message.key, message.value)
    if message.reason == "unknown_notification":  # decodes; the store refuses it (acks flow)
        assert letter is None
        return
    assert letter is not None, message
    assert letter.error.startswith(f"{message.reason}: "), (message, letter.error)
    assert (letter.source_topic, letter.partition, letter.offset) == (topic, 0, 7)


@pytest.mark.parametrize("topic", INPUT_TOPICS)
@settings(max_examples=6, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_one_megabyte_messages_get_their_labelled_dead_letter(
    topic: str, data: st.DataObject
) -> None:
    message = data.draw(huge(topic))
    assert message.value is not None and len(message.value) >= ONE_MB - 64
    letter = flow_decode(topic, message.key, message.value)
    assert letter is not None and letter.error.startswith(f"{message.reason}: ")
    assert len(encode_dead_letter(letter)) < 8 * ONE_MB  # the dead-letter producer's limit


@FAST
@given(post=unknown_author_post())
def test_posts_of_unknown_authors_are_valid(post: Message) -> None:
    assert flow_decode(post.topic, post.key, post.value) is None


@MANY
@given(name=st.from_regex(r"[A-Za-z0-9_+\-/]{1,64}", fullmatch=True))
def test_any_timezone_the_pattern_allows_is_known_or_unknown_timezone(name: str) -> None:
    value = _dumps({"user_id": "u", "timezone": name, "ts": "2026-06-01T12:00:00Z"})
    try:
        decode_preference_change(value)
    except InvalidEvent as exc:
        assert exc.kind == "unknown_timezone", exc
        assert not _zone_exists(name)
    else:
        assert _zone_exists(name)


def test_the_corpus_is_the_same_on_every_run() -> None:
    first = draw_examples(malformed("preference_changes"), 30, 7)
    assert first == draw_examples(malformed("preference_changes"), 30, 7)
    assert len({m.value for m in first}) > 20


# --- regressions: bugs this corpus found, each fixed (the reason says what went wrong) ---------------


# Regression: JSON Schema counts 7.0 as an integer, so quiet_hours_start/end decode as floats, and
# quiet_until -> datetime(..., hour=9.0) raises TypeError in the fan-out shard: the flow crash-
# loops (preferences are replayed on every start).
@FIND
@given(start=st.integers(0, 23), length=st.integers(1, 23))
def test_quiet_hours_written_as_integral_floats_decode_to_int_hours(
    start: int, length: int
) -> None:
    end = (start + length) % 24
    value = _dumps(
        {
            "user_id": "u",
            "quiet_hours_start": float(start),
            "quiet_hours_end": float(end),
            "timezone": "UTC",
            "ts": "2026-06-01T12:00:00Z",
        }
    )
    try:
        change = decode_preference_change(value)
    except InvalidEvent:
        return  # refusing them is a fix too
    assert type(change.quiet_hours_start) is int and type(change.quiet_hours_end) is int
    inside = datetime(2026, 6, 1, start, 30, tzinfo=UTC)
    assert quiet_until(inside, change.quiet_hours_start, change.quiet_hours_end, "UTC") is not None


# Regression: a dead letter carries the whole raw value, escaped (a control byte becomes \u0000, 6
# bytes): a 1.4 MB message of control bytes makes a dead letter over the dead-letter producer's 8
# MB message.max.bytes, and on a broker with the default 1 MB limit any ~1 MB input does; writing
# it raises and the flow crash-loops on that message.
@pytest.mark.parametrize("byte", [b"\x00", b"\x01", b"\xff", b"x"])
def test_a_dead_letter_stays_under_one_megabyte_whatever_the_input(byte: bytes) -> None:
    raw = byte * (ONE_MB + ONE_MB // 2)
    letter = dead_letter(
        RawEvent("post_created", 0, 0, None, raw, 0.0), InvalidEvent("invalid_json", "x")
    )
    assert len(encode_dead_letter(letter)) <= ONE_MB


# Regression: push.retry's source holds each record until its due_at, read before the record is
# validated: a malformed record with a due_at in the future is held (in memory and in snapshots)
# and dead-lettered only then, years later if so.
@pytest.mark.parametrize("due_at", [2e9, 4e9, 1e15])
@pytest.mark.parametrize("drop", ["item", "reason", "lane"])
def test_a_malformed_retry_record_is_due_now_whatever_its_due_at(due_at: float, drop: str) -> None:
    record = {
        "provider": "apns",
        "lane": "normal",
        "post_id": "p",
        "author_id": "a",
        "created_at": "2026-06-01T12:00:00Z",
        "item": {"notification_id": "p:u", "user_id": "u", "device_id": "d", "token": "0a" * 32},
        "attempt": 1,
        "seq": 1,
        "due_at": due_at,
        "reason": "timeout",
    }
    raw = _dumps({k: v for k, v in record.items() if k != drop})
    with pytest.raises(InvalidEvent):
        decode_retry_record(raw)
    assert retry_due_at(raw) <= time.time()


# Regression (cost): the bulk lanes sliced a batch by its item count before validating it, so a
# malformed batch claiming N items was handed out as N/100 slices and each slice decoded and
# validated the whole message again: a 1 MB batch of 524,288 tiny items cost ~5,200 decodes (~35
# s of a delivery worker here) for one dead letter. A lane now decodes each message once, as read.
@pytest.mark.parametrize("items", [[0] * 5_000, [{}] * 1_000, [{"token": 1}] * 501])
def test_a_malformed_bulk_batch_is_decoded_once_not_once_per_slice(
    items: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from operators.adapters.kafka import channel_lanes
    from tests.unit.test_bulk_slicing import FakeEngine, pair

    batch = {
        "schema": "dispatch_batch/v1",
        "post_id": "p",
        "author_id": "a",
        "created_at": "2026-06-01T12:00:00Z",
        "provider": "apns",
        "items": items,
    }
    decodes: list[int] = []
    real = channel_lanes.decode_channel_batch

    def counted(event: RawEvent) -> Any:
        decodes.append(1)
        return real(event)

    monkeypatch.setattr(channel_lanes, "decode_channel_batch", counted)
    engine = FakeEngine()
    lanes = pair([], [RawEvent("push.apns.bulk", 0, 0, None, _dumps(batch), 0.0)], engine)
    letters = [d for _ in range(10) for d in lanes.next_batch()]
    assert len(decodes) == 1
    assert len(letters) == 1 and isinstance(letters[0], DeadLetter)
    assert engine.submitted == []
