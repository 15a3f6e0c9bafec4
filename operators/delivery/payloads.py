"""Payloads rendered at send time from the compact dispatch item (nothing rendered is stored).

One notification template: a title and a body with `{author_id}` and `{post_id}` fields, a deep
link to the post, and a collapse id per post, so a device shows one notification per post
however often it is resent. The providers refuse more than 4096 bytes: checked before sending.
"""

from __future__ import annotations

import functools
import hashlib
import json
import string
from dataclasses import dataclass
from typing import Any

import orjson

from operators.delivery.model import RetryPolicy, SendRequest

MAX_PAYLOAD_BYTES = 4096
MAX_COLLAPSE_ID_BYTES = 64
TEMPLATE_FIELDS = frozenset({"author_id", "post_id"})


class PayloadTooLarge(ValueError):
    """The rendered payload is over the providers' 4096-byte limit."""


@dataclass(frozen=True, slots=True)
class PushTemplate:
    """What a post notification says; fields are filled from the dispatch batch."""

    title: str = "{author_id} posted"
    body: str = "Tap to read the new post"
    deep_link: str = "fanfare://posts/{post_id}"

    def __post_init__(self) -> None:
        for text in (self.title, self.body, self.deep_link):
            for _, name, _, _ in string.Formatter().parse(text):
                if name is not None and name not in TEMPLATE_FIELDS:
                    raise ValueError(
                        f"template {text!r} uses {{{name}}}; "
                        f"available fields: {', '.join(sorted(TEMPLATE_FIELDS))}"
                    )

    def fill(self, request: SendRequest) -> tuple[str, str, str]:
        """(title, body, deep link) for a request (the same for every device of a post)."""
        return _filled(self, request.author_id, request.post_id)


@functools.lru_cache(maxsize=4_096)
def _filled(template: PushTemplate, author_id: str, post_id: str) -> tuple[str, str, str]:
    fields = {"author_id": author_id, "post_id": post_id}
    return (
        template.title.format(**fields),
        template.body.format(**fields),
        template.deep_link.format(**fields),
    )


def collapse_id(post_id: str) -> str:
    """The post's collapse id: the post_id, or its digest when over APNs' 64 bytes."""
    if len(post_id.encode()) <= MAX_COLLAPSE_ID_BYTES:
        return post_id
    return "p-" + hashlib.sha256(post_id.encode()).hexdigest()[:40]


def collapse_key_for(request: SendRequest) -> str:
    """The apns-collapse-id / FCM collapse_key of a push.

    Its message's collapse key when it has one (a bundle summary: a newer one replaces the
    older on the device), else the post's.
    """
    key = request.message.get("collapse_key") if request.message is not None else None
    return collapse_id(key if key else request.post_id)


def _data(request: SendRequest, link: str) -> dict[str, str]:
    # notification_id and device_id let the app (and the local servers) tell resends apart.
    return {
        "notification_id": request.item["notification_id"],
        "device_id": request.item["device_id"],
        "post_id": request.post_id,
        "link": link,
    }


def apns_payload(template: PushTemplate, request: SendRequest) -> dict[str, Any]:
    """The APNs JSON body; raises PayloadTooLarge.

    Measured as aioapns encodes it (`json.dumps(..., ensure_ascii=False)`), byte for byte.
    """
    title, body, link = template.fill(request)
    payload: dict[str, Any] = {
        "aps": {"alert": {"title": title, "body": body}, "sound": "default"},
        **_data(request, link),
    }
    size = len(json.dumps(payload, ensure_ascii=False).encode())
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(f"APNs payload is {size} bytes (limit {MAX_PAYLOAD_BYTES})")
    return payload


@dataclass(frozen=True, slots=True)
class FcmContent:
    """The parts of an FCM message the sender turns into a firebase_admin Message."""

    title: str
    body: str
    data: dict[str, str]
    collapse_key: str


def fcm_content(template: PushTemplate, request: SendRequest) -> FcmContent:
    """The FCM message content; raises PayloadTooLarge (measured as FCM counts: the JSON)."""
    title, body, link = template.fill(request)
    content = FcmContent(title, body, _data(request, link), collapse_key_for(request))
    size = len(
        orjson.dumps(
            {
                "notification": {"title": title, "body": body},
                "data": content.data,
                "android": {"collapse_key": content.collapse_key},
            }
        )
    )
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(f"FCM message is {size} bytes (limit {MAX_PAYLOAD_BYTES})")
    return content


def time_to_live_s(policy: RetryPolicy, request: SendRequest, now: float) -> int:
    """A push's time to live in seconds (apns-expiration, FCM's ttl).

    A provider keeps a push for an offline device only while it is worth showing: until the
    notification's age reaches `max_age_s`.
    """
    return max(1, int(policy.max_age_s - (now - request.created_ts)))


def apns_body(template: PushTemplate, request: SendRequest) -> bytes:
    """The APNs request body as sent by the libcurl sender; raises PayloadTooLarge.

    Compact JSON, measured as sent (never larger than `apns_payload`'s measure).
    """
    title, body, link = template.fill(request)
    data = orjson.dumps(
        {
            "aps": {"alert": {"title": title, "body": body}, "sound": "default"},
            **_data(request, link),
        }
    )
    if len(data) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(f"APNs payload is {len(data)} bytes (limit {MAX_PAYLOAD_BYTES})")
    return data


def fcm_body(template: PushTemplate, request: SendRequest, ttl_s: int) -> bytes:
    """The FCM v1 `messages:send` body, as firebase-admin encodes the same Message.

    Raises PayloadTooLarge (measured as FCM counts: the message's JSON, see `fcm_content`).
    """
    content = fcm_content(template, request)
    return orjson.dumps(
        {
            "message": {
                "token": request.item["token"],
                "notification": {"title": content.title, "body": content.body},
                "data": content.data,
                "android": {
                    "collapse_key": content.collapse_key,
                    "priority": "high",
                    "ttl": f"{ttl_s}s",
                },
            }
        }
    )
