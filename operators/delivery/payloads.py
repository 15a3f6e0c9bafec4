"""Payloads rendered at send time from the compact dispatch item (nothing rendered is stored).

A post's push: one template, a title and a body with `{author_id}` and `{post_id}` fields, a
deep link to the post, and a collapse id per post, so a device shows one notification per post
however often it is resent.

An API notification's push (its batch carries a `message`): rendered by a `PushRenderer` from
the catalog's template (`operators/notify/templates.py`) in the item's `locale`, falling back to
its language and then to the template's default locale; its `collapse_key` becomes
`apns-collapse-id` and FCM's `collapse_key` (the notification id when it has none). The
providers refuse more than 4096 bytes: a template's body is shortened to fit (then its title),
with an ellipsis, and every payload is checked before sending.
"""

from __future__ import annotations

import functools
import hashlib
import json
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import orjson

from operators.delivery.model import RetryPolicy, SendRequest

MAX_PAYLOAD_BYTES = 4096
MAX_COLLAPSE_ID_BYTES = 64
TEMPLATE_FIELDS = frozenset({"author_id", "post_id"})


class PayloadTooLarge(ValueError):
    """The rendered payload is over the providers' 4096-byte limit."""


class UnrenderablePush(PayloadTooLarge):
    """A notification's push that cannot be rendered (unknown template, data that fails).

    Recorded as an oversized push is: `failed` and a dead letter, never retried.
    """


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


def push_collapse_id(request: SendRequest) -> str:
    """A push's collapse id (at most 64 bytes): its message's `collapse_key`, else its post's.

    An API notification's post_id is its notification id.
    """
    message = request.message
    key = message.get("collapse_key") if message is not None else None
    return collapse_id(key or request.post_id)


class PushRenderer(ABC):
    """Port: what pushes say, a post's and an API notification's (from its template).

    The adapter (`operators/adapters/providers/push_texts.py`) renders notifications from the
    catalog's templates; it is built per worker.
    """

    post: PushTemplate

    @abstractmethod
    def texts(self, request: SendRequest) -> tuple[str, str, dict[str, str]]:
        """(title, body, data) of a push; UnrenderablePush if it cannot be rendered.

        A notification's texts fit the providers' payload limit with `data` beside them.
        """


PushSource = PushTemplate | PushRenderer
"""What the push senders render with (a bare PushTemplate renders posts only)."""


def post_texts(template: PushTemplate, request: SendRequest) -> tuple[str, str, dict[str, str]]:
    """(title, body, data) of a post's push."""
    title, body, link = template.fill(request)
    return title, body, _data(request, link)


def _texts(source: PushSource, request: SendRequest) -> tuple[str, str, dict[str, str]]:
    if isinstance(source, PushRenderer):
        return source.texts(request)
    if request.message is not None:
        raise UnrenderablePush("no template catalog to render a notification's push")
    return post_texts(source, request)


def _data(request: SendRequest, link: str) -> dict[str, str]:
    # notification_id and device_id let the app (and the local servers) tell resends apart.
    return {
        "notification_id": request.item["notification_id"],
        "device_id": request.item["device_id"],
        "post_id": request.post_id,
        "link": link,
    }


def apns_payload(template: PushSource, request: SendRequest) -> dict[str, Any]:
    """The APNs JSON body; raises PayloadTooLarge.

    Measured as aioapns encodes it (`json.dumps(..., ensure_ascii=False)`), byte for byte.
    """
    title, body, data = _texts(template, request)
    payload: dict[str, Any] = {
        "aps": {"alert": {"title": title, "body": body}, "sound": "default"},
        **data,
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


def fcm_content(template: PushSource, request: SendRequest) -> FcmContent:
    """The FCM message content; raises PayloadTooLarge (measured as FCM counts: the JSON)."""
    title, body, data = _texts(template, request)
    content = FcmContent(title, body, data, push_collapse_id(request))
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


def apns_body(template: PushSource, request: SendRequest) -> bytes:
    """The APNs request body as sent by the libcurl sender; raises PayloadTooLarge.

    Compact JSON, measured as sent (never larger than `apns_payload`'s measure).
    """
    title, body, fields = _texts(template, request)
    data = orjson.dumps(
        {
            "aps": {"alert": {"title": title, "body": body}, "sound": "default"},
            **fields,
        }
    )
    if len(data) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(f"APNs payload is {len(data)} bytes (limit {MAX_PAYLOAD_BYTES})")
    return data


def fcm_body(template: PushSource, request: SendRequest, ttl_s: int) -> bytes:
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
