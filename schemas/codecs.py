"""Decode and validate events against the JSON Schema files in this folder; encode records.

Decoders raise :class:`InvalidEvent` with a reason that goes to ``dead_letters`` verbatim.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import fastjsonschema
import orjson

from schemas.addresses import DEVICE_PROVIDERS, PUSH_PROVIDERS, InvalidAddress, check_address
from schemas.records import (
    CategorySwitch,
    Channel,
    ChannelMessage,
    DeadLetter,
    DeliveryEvent,
    DeviceChange,
    DispatchBatch,
    DispatchItem,
    FollowChange,
    NotificationAck,
    NotificationCancel,
    NotificationRequest,
    PostCreated,
    PreferenceChange,
    RetryRecord,
)

SCHEMA_NAMES = (
    "post_created",
    "follow_changes",
    "preference_changes",
    "device_changes",
    "dispatch_batch",
    "delivery_events",
    "push_retry",
    "notification_acks",
    "dead_letters",
    "notification_request",
    "notification_cancel",
)


class InvalidEvent(ValueError):
    """An event that does not decode or validate; `reason` is short and machine-groupable."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema document of a topic contract."""
    text = resources.files("schemas").joinpath(f"{name}.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.cache
def validator(name: str) -> Callable[[Any], Any]:
    """A compiled validator for a contract (compiled once per process, on first use)."""
    return fastjsonschema.compile(load_schema(name))  # type: ignore[no-any-return]


def _parse(raw: bytes | str | None, schema: str) -> dict[str, Any]:
    if raw is None:
        raise InvalidEvent("empty", "message has no value")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("invalid_json", str(exc)) from None
    if not isinstance(data, dict):
        raise InvalidEvent("schema", f"expected a JSON object, got {type(data).__name__}")
    try:
        validator(schema)(data)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise InvalidEvent("schema", exc.message) from None
    return data


def _whole(value: int | float | None) -> int | None:
    """A schema integer as an int: JSON Schema counts 7.0 as one, datetime() refuses it."""
    return None if value is None else int(value)


def parse_timestamp(value: str) -> datetime:
    """RFC 3339 to an aware datetime; naive times are refused (they have no meaning here)."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidEvent("schema", f"timestamp {value!r} is not RFC 3339") from None
    if parsed.tzinfo is None:
        raise InvalidEvent("schema", f"timestamp {value!r} has no UTC offset")
    return parsed


@functools.lru_cache(maxsize=1024)
def _zone_exists(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def decode_post_created(raw: bytes | str | None) -> PostCreated:
    """A validated :class:`PostCreated`."""
    d = _parse(raw, "post_created")
    return PostCreated(
        post_id=d["post_id"],
        author_id=d["author_id"],
        visibility=d["visibility"],
        created_at=parse_timestamp(d["created_at"]),
        notify_followers=d.get("notify_followers", True),
        text=d.get("text"),
    )


def decode_follow_change(raw: bytes | str | None) -> FollowChange:
    """A validated :class:`FollowChange`."""
    d = _parse(raw, "follow_changes")
    return FollowChange(
        author_id=d["author_id"],
        follower_id=d["follower_id"],
        op=d["op"],
        notify_on_post=d.get("notify_on_post", True),
        muted=d.get("muted", False),
        ts=parse_timestamp(d["ts"]),
    )


def decode_preference_change(raw: bytes | str | None) -> PreferenceChange:
    """A validated :class:`PreferenceChange`; the timezone must exist in the tz database.

    A category switch (`kind: category_switch`) is refused with `unsupported_kind`: this is the
    decoder of consumers that keep complete records only; `decode_preference_event` reads both.
    """
    d = _parse(raw, "preference_changes")
    if "kind" in d:
        raise InvalidEvent(
            "unsupported_kind",
            f"{d['kind']} events need a consumer that reads per-category switches "
            "(decode_preference_event)",
        )
    return _preference_change(d)


def decode_preference_event(raw: bytes | str | None) -> PreferenceChange | CategorySwitch:
    """A complete :class:`PreferenceChange`, or a :class:`CategorySwitch` (`kind` set)."""
    d = _parse(raw, "preference_changes")
    if "kind" not in d:
        return _preference_change(d)
    return CategorySwitch(
        user_id=d["user_id"],
        category=d["category"],
        channel=d["channel"],
        enabled=d["enabled"],
        ts=parse_timestamp(d["ts"]),
        source=d.get("source", "api"),
    )


def encode_category_switch(switch: CategorySwitch) -> bytes:
    """The wire form of a category switch (on preference_changes, keyed by user_id)."""
    return orjson.dumps(
        {
            "kind": "category_switch",
            "user_id": switch.user_id,
            "category": switch.category,
            "channel": switch.channel,
            "enabled": switch.enabled,
            "source": switch.source,
            "ts": format_timestamp(switch.ts),
        }
    )


def _preference_change(d: dict[str, Any]) -> PreferenceChange:
    start, end = d.get("quiet_hours_start"), d.get("quiet_hours_end")
    if (start is None) != (end is None):
        raise InvalidEvent(
            "schema", "quiet_hours_start and quiet_hours_end must both be set or both be null"
        )
    if not _zone_exists(d["timezone"]):
        raise InvalidEvent("unknown_timezone", f"{d['timezone']!r} is not an IANA time zone")
    return PreferenceChange(
        user_id=d["user_id"],
        push_enabled=d.get("push_enabled", True),
        quiet_hours_start=_whole(start),
        quiet_hours_end=_whole(end),
        timezone=d["timezone"],
        ts=parse_timestamp(d["ts"]),
        locale=d.get("locale"),
    )


def decode_device_change(
    raw: bytes | str | None,
    *,
    providers: Collection[str] = PUSH_PROVIDERS,
    allow_dev_addresses: bool = False,
) -> DeviceChange:
    """A validated :class:`DeviceChange` of one of `providers`, its address canonical.

    `providers` are the kinds the consumer keeps: by default mobile push devices, as every
    consumer did before channel addresses; another kind is `unsupported_provider` (a dead
    letter, never a crash in a consumer that would not know what to do with it). Pass
    `DEVICE_PROVIDERS` to read channel addresses too: each is checked as
    `schemas.addresses.check_address` says (`invalid_address` otherwise), with
    `allow_dev_addresses` (FANFARE_DEV_MODE) allowing http and loopback or private hosts.
    """
    d = _parse(raw, "device_changes")
    provider = d["provider"]
    if provider not in providers:
        raise InvalidEvent(
            "unsupported_provider",
            f"{provider} addresses need a consumer that reads channel addresses; this one "
            f"reads {', '.join(providers)}",
        )
    token = d.get("token")
    if token is not None and provider in DEVICE_PROVIDERS:
        try:
            token = check_address(provider, token, allow_dev=allow_dev_addresses)
        except InvalidAddress as exc:
            raise InvalidEvent("invalid_address", f"{provider}: {exc}") from None
    return DeviceChange(
        user_id=d["user_id"],
        device_id=d["device_id"],
        provider=provider,
        token=token,
        active=d["active"],
        ts=parse_timestamp(d["ts"]),
    )


def decode_notification_ack(raw: bytes | str | None) -> NotificationAck:
    """A validated :class:`NotificationAck`."""
    d = _parse(raw, "notification_acks")
    return NotificationAck(
        notification_id=d["notification_id"],
        device_id=d["device_id"],
        event=d["event"],
        ts=parse_timestamp(d["ts"]),
    )


def encode_notification_ack(ack: NotificationAck) -> bytes:
    """JSON for the notification_acks topic."""
    return orjson.dumps(
        {
            "notification_id": ack.notification_id,
            "device_id": ack.device_id,
            "event": ack.event,
            "ts": format_timestamp(ack.ts),
        }
    )


def format_timestamp(when: datetime | float, timespec: str = "auto") -> str:
    """RFC 3339 in UTC with a `Z`: how fanfare writes every time (an aware datetime or epoch s).

    `timespec` is `datetime.isoformat`'s: "auto" (microseconds when there are any),
    "milliseconds", "seconds".
    """
    if isinstance(when, datetime):
        moment = when.astimezone(UTC)
    else:
        moment = datetime.fromtimestamp(when, UTC)
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")


def encode_post_created(post: PostCreated) -> bytes:
    """The wire form of a post."""
    body: dict[str, Any] = {
        "event_type": "post_created",
        "post_id": post.post_id,
        "author_id": post.author_id,
        "visibility": post.visibility,
        "created_at": format_timestamp(post.created_at),
        "notify_followers": post.notify_followers,
    }
    if post.text is not None:
        body["text"] = post.text
    return orjson.dumps(body)


def encode_follow_change(change: FollowChange) -> bytes:
    """The wire form of a follow change."""
    return orjson.dumps(
        {
            "author_id": change.author_id,
            "follower_id": change.follower_id,
            "op": change.op,
            "notify_on_post": change.notify_on_post,
            "muted": change.muted,
            "ts": format_timestamp(change.ts),
        }
    )


def encode_preference_change(change: PreferenceChange) -> bytes:
    """The wire form of a preference change."""
    return orjson.dumps(
        {
            "user_id": change.user_id,
            "push_enabled": change.push_enabled,
            "quiet_hours_start": change.quiet_hours_start,
            "quiet_hours_end": change.quiet_hours_end,
            "timezone": change.timezone,
            "ts": format_timestamp(change.ts),
            **({"locale": change.locale} if change.locale is not None else {}),
        }
    )


def encode_device_change(change: DeviceChange) -> bytes:
    """The wire form of a device change."""
    body: dict[str, Any] = {
        "user_id": change.user_id,
        "device_id": change.device_id,
        "provider": change.provider,
        "active": change.active,
        "ts": format_timestamp(change.ts),
    }
    if change.token is not None:
        body["token"] = change.token
    return orjson.dumps(body)


def encode_dispatch_batch(batch: DispatchBatch) -> bytes:
    """The wire form of a dispatch batch."""
    return orjson.dumps(
        {
            "schema": "dispatch_batch/v1",
            "post_id": batch.post_id,
            "author_id": batch.author_id,
            "provider": batch.provider,
            "created_at": batch.created_at,
            "items": batch.items,
            **({"message": batch.message} if batch.message is not None else {}),
        }
    )


def _item(i: dict[str, Any]) -> DispatchItem:
    item = DispatchItem(
        notification_id=i["notification_id"],
        user_id=i["user_id"],
        device_id=i["device_id"],
        token=i["token"],
    )
    if "locale" in i:
        item["locale"] = i["locale"]
    return item


def _message(d: dict[str, Any]) -> ChannelMessage | None:
    m = d.get("message")
    if m is None:
        return None
    message = ChannelMessage(
        category=m["category"], template_id=m["template_id"], tier=m["tier"], data=m["data"]
    )
    if m.get("collapse_key") is not None:
        message["collapse_key"] = m["collapse_key"]
    return message


def decode_dispatch_batch(raw: bytes | str | None, lane: str) -> DispatchBatch:
    """A validated :class:`DispatchBatch` read back from a channel topic."""
    d = _parse(raw, "dispatch_batch")
    return DispatchBatch(
        post_id=d["post_id"],
        author_id=d["author_id"],
        provider=d["provider"],
        created_at=d["created_at"],
        lane=lane,
        items=tuple(_item(i) for i in d["items"]),
        message=_message(d),
    )


def encode_delivery_event(event: DeliveryEvent) -> bytes:
    """The wire form of a delivery event (`retry_at` only on retry_scheduled)."""
    body: dict[str, Any] = {
        "notification_id": event.notification_id,
        "post_id": event.post_id,
        "user_id": event.user_id,
        "device_id": event.device_id,
        "provider": event.provider,
        "outcome": event.outcome,
        "status": event.status,
        "reason": event.reason,
        "attempt": event.attempt,
        "ts": event.ts,
    }
    if event.retry_at is not None:
        body["retry_at"] = event.retry_at
    return orjson.dumps(body)


def decode_delivery_event(raw: bytes | str | None) -> DeliveryEvent:
    """A validated :class:`DeliveryEvent`."""
    d = _parse(raw, "delivery_events")
    return DeliveryEvent(
        notification_id=d["notification_id"],
        post_id=d["post_id"],
        user_id=d["user_id"],
        device_id=d["device_id"],
        provider=d["provider"],
        outcome=d["outcome"],
        status=d.get("status"),
        reason=d.get("reason"),
        attempt=d["attempt"],
        ts=d["ts"],
        retry_at=d.get("retry_at"),
    )


def encode_retry_record(record: RetryRecord) -> bytes:
    """The wire form of a scheduled retry (`message` only when the send has one)."""
    if record.message is None:
        return orjson.dumps({f: getattr(record, f) for f in _RETRY_FIELDS})
    return orjson.dumps(record)


_RETRY_FIELDS = tuple(f for f in RetryRecord.__slots__ if f != "message")


def decode_retry_record(raw: bytes | str | None) -> RetryRecord:
    """A validated :class:`RetryRecord`."""
    d = _parse(raw, "push_retry")
    i = d["item"]
    return RetryRecord(
        provider=d["provider"],
        lane=d["lane"],
        post_id=d["post_id"],
        author_id=d["author_id"],
        created_at=d["created_at"],
        item=_item(i),
        attempt=int(d["attempt"]),
        seq=int(d["seq"]),
        due_at=float(d["due_at"]),
        reason=d["reason"],
        message=_message(d),
    )


def encode_notification_request(request: NotificationRequest) -> bytes:
    """The wire form of a notification request (optional fields as null when unset).

    `fallback` and `cap` are written only when there is one, so a request without is what
    readers built before them accept.
    """
    doc: dict[str, Any] = {
        "schema": "notification_request/v1",
        "notification_id": request.notification_id,
        "tier": request.tier,
        "category": request.category,
        "template_id": request.template_id,
        "recipients": list(request.recipients),
        "data": request.data,
        "channels": list(request.channels),
        "quiet_hours": request.quiet_hours,
        "caps": request.caps,
        "send_at": None if request.send_at is None else format_timestamp(request.send_at),
        "collapse_key": request.collapse_key,
        "campaign_id": request.campaign_id,
        "api_key_id": request.api_key_id,
        "created_at": format_timestamp(request.created_at),
    }
    if request.fallback:
        doc["fallback"] = list(request.fallback)
    cap = {
        k: v
        for k, v in (("limit", request.cap_limit), ("window_s", request.cap_window_s))
        if v is not None
    }
    if cap:
        doc["cap"] = cap
    return orjson.dumps(doc)


def decode_notification_request(raw: bytes | str | None) -> NotificationRequest:
    """A validated :class:`NotificationRequest` (times must carry a UTC offset)."""
    d = _parse(raw, "notification_request")
    send_at = d.get("send_at")
    return NotificationRequest(
        notification_id=d["notification_id"],
        tier=d["tier"],
        category=d["category"],
        template_id=d["template_id"],
        recipients=tuple(d["recipients"]),
        data=d["data"],
        channels=tuple(d["channels"]),
        quiet_hours=d["quiet_hours"],
        caps=d["caps"],
        api_key_id=d["api_key_id"],
        created_at=parse_timestamp(d["created_at"]),
        send_at=None if send_at is None else parse_timestamp(send_at),
        collapse_key=d.get("collapse_key"),
        campaign_id=d.get("campaign_id"),
        fallback=_fallback(d),
        cap_limit=d.get("cap", {}).get("limit"),
        cap_window_s=d.get("cap", {}).get("window_s"),
    )


def _fallback(d: dict[str, Any]) -> tuple[Channel, ...]:
    """A request's fallback order: channels of its own `channels` only."""
    fallback = tuple(d.get("fallback", ()))
    stray = [c for c in fallback if c not in d["channels"]]
    if stray:
        raise InvalidEvent("schema", f"fallback names channels not in channels: {stray}")
    return fallback


def encode_notification_cancel(cancel: NotificationCancel) -> bytes:
    """The wire form of a cancel (on the tier topic, keyed by the notification id)."""
    return orjson.dumps(
        {
            "schema": "notification_cancel/v1",
            "notification_id": cancel.notification_id,
            "tier": cancel.tier,
            "api_key_id": cancel.api_key_id,
            "created_at": format_timestamp(cancel.created_at),
        }
    )


def decode_tier_event(raw: bytes | str | None) -> NotificationRequest | NotificationCancel:
    """A message of a tier topic: a request, or (`schema: notification_cancel/v1`) a cancel."""
    # Only a message that names the cancel schema is parsed twice (requests are the many).
    named = (
        b"notification_cancel/v1" in raw
        if isinstance(raw, bytes)
        else raw is not None and "notification_cancel/v1" in raw
    )
    if raw is not None and named:
        try:
            head = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidEvent("invalid_json", str(exc)) from None
        if isinstance(head, dict) and head.get("schema") == "notification_cancel/v1":
            d = _parse(raw, "notification_cancel")
            return NotificationCancel(
                notification_id=d["notification_id"],
                tier=d["tier"],
                api_key_id=d["api_key_id"],
                created_at=parse_timestamp(d["created_at"]),
            )
    return decode_notification_request(raw)


def encode_dead_letter(letter: DeadLetter) -> bytes:
    """The wire form of a dead letter (`item` only for one about an item of a batch message)."""
    fields: dict[str, object] = {
        "source_topic": letter.source_topic,
        "partition": letter.partition,
        "offset": letter.offset,
        "error": letter.error,
        "raw": letter.raw,
    }
    if letter.item is not None:
        fields["item"] = letter.item
    return orjson.dumps(fields)


def encode_send_reference(post_id: str, item: DispatchItem, provider: str) -> str:
    """The `raw` of a dead letter about one send: which push, not the whole batch it came in."""
    reference = {
        "post_id": post_id,
        "notification_id": item["notification_id"],
        "device_id": item["device_id"],
        "provider": provider,
    }
    return orjson.dumps(reference).decode()


RAW_TEXT_LIMIT = 64 * 1024
"""Characters of an original message a dead letter keeps: a dead letter must stay far below the
broker's message size limit (1 MB by default) whatever the input, or writing it would fail and
the flow would crash-loop on that message."""


def raw_text(raw: bytes | str | None, limit: int | None = None) -> str:
    """The original message as text, keeping bytes that are not UTF-8 as escapes.

    With `limit`, at most that many characters of it, then a marker with the original size.
    """
    if raw is None:
        return ""
    text = raw if isinstance(raw, str) else raw.decode("utf-8", errors="backslashreplace")
    if limit is None or len(text) <= limit:
        return text
    size = len(raw.encode("utf-8", errors="surrogatepass")) if isinstance(raw, str) else len(raw)
    return f"{text[:limit]}...[truncated: the original value is {size} bytes]"
