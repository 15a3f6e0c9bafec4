"""Delivery decisions, pure: what a send request is, what its ledger row says, what to do next.

A *send request* is one dispatch item on its way to a device, carried by one message (a
dispatch batch on `push.*`, or a record on `push.retry`). Its *ledger row* (the notification
store's unique (notification_id, device_id) row) says who owns the send and where it stands.

Exactly one push per device rests on three rules:
- the first message to claim a (notification, device) owns it; any other message carrying the
  same item later is a duplicate and is skipped;
- the same message read again (Bytewax replays the epoch after a crash) is the owner: a send
  that had not finished is sent again with the same apns-id, a finished one re-emits its
  outcome (the delivery_events sink drops what it already wrote);
- a retry record takes the send over only if the row is still waiting for exactly that retry
  (`schedules` matches its sequence number); stale copies are skipped.
"""

from __future__ import annotations

import hashlib
import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from operators.events import MessageOrigin
from schemas.records import ChannelMessage, DispatchItem, Provider

Lane = Literal["transactional", "normal", "bulk"]
"""A send's delivery lane, served in this order (schemas/topics.py, TIER_LANES)."""
RowState = Literal[
    "sending",
    "retry_scheduled",
    "accepted",
    "invalid_token",
    "expired",
    "failed",
    "dead_lettered",
]
TERMINAL_STATES: frozenset[str] = frozenset(
    {"accepted", "invalid_token", "expired", "failed", "dead_lettered"}
)


@dataclass(frozen=True, slots=True)
class SendRequest:
    """One push to one device, with the post it is about and the message that carries it.

    `attempt` is the number of provider sends already made for this item; `seq` counts how
    often it was scheduled through `push.retry` (0 for a dispatch item).
    """

    provider: Provider
    lane: Lane
    post_id: str
    author_id: str
    created_at: str
    created_ts: float
    item: DispatchItem
    origin: MessageOrigin
    """The message that carries the send: its key owns the ledger row (see `decide`)."""
    attempt: int = 0
    seq: int = 0
    message: ChannelMessage | None = None
    """What an API notification says (template, data, tier), from its dispatch batch or retry
    record; None for a post, whose text comes from FANFARE_PUSH_TITLE/BODY/LINK."""

    @property
    def key(self) -> tuple[str, str]:
        """The unique key of the send: (notification_id, device_id)."""
        return (self.item["notification_id"], self.item["device_id"])

    @property
    def apns_id(self) -> str:
        """A stable apns-id: a resend after a crash carries the same one (APNs' own dedupe id).

        `uuid.uuid5(_APNS_NS, "notification_id|device_id")`, formatted without building a UUID
        object (a third of the cost, for every push).
        """
        name = f"{self.item['notification_id']}|{self.item['device_id']}"
        h = hashlib.sha1(_APNS_NS_BYTES + name.encode()).hexdigest()
        return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


_APNS_NS = uuid.UUID("6f1c2d4e-9a7b-4c3d-8e5f-0a1b2c3d4e5f")
_APNS_NS_BYTES = _APNS_NS.bytes
# The RFC 4122 variant bits (10xx) over a hex digit, as uuid5 sets them.
_VARIANT = {f"{d:x}": f"{(d & 0x3) | 0x8:x}" for d in range(16)}


EARLIER_COPY_IN_CALL = "(an earlier copy of the same item in this call)"
"""The owner a claim answers for the second copy of an item claimed twice in one call: no
message's key, so `decide` skips the copy (the first one owns the send)."""


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """The notification store's row for one (notification, device) send."""

    owner: str
    state: RowState
    attempts: int
    schedules: int
    status: int | None = None
    reason: str | None = None
    due_at: float | None = None


class Action(Enum):
    """What to do with a send request, given its ledger row."""

    SEND = "send"  # new, or a retry whose turn it is
    RESEND = "resend"  # the owner was replayed before its send finished: same apns-id again
    REEMIT = "reemit"  # the owner was replayed after it finished: repeat its recorded outcome
    SKIP = "skip"  # a duplicate or stale copy: someone else owns or already moved the send


def decide(request: SendRequest, row: LedgerRow | None) -> Action:
    """The ledger rules (module docstring). `row` is None only when no message claimed it yet."""
    if row is None:
        return Action.SEND
    if row.owner == request.origin.key:
        if row.state == "sending":
            return Action.RESEND
        return Action.REEMIT
    if request.seq > 0 and row.state == "retry_scheduled" and row.schedules == request.seq:
        return Action.SEND
    return Action.SKIP


class Verdict(Enum):
    """How a provider's answer is handled."""

    ACCEPTED = "accepted"
    INVALID_TOKEN = "invalid_token"  # permanent token error: deactivate the device, no retry
    PERMANENT = "failed"  # the provider will never take this request as it is
    TRANSIENT = "transient"  # retry with backoff
    HELD = "held"
    """The sender's own pacing held the send before it left (a per-domain or per-webhook bucket
    was empty): schedule it at `retry_after_s`, with no attempt used, and do not count it
    towards the breaker: the provider did not fail (`DeliveryEngine._hold`)."""


HELD_PREFIX = "held: "
"""The reason of an answer a sender made up for a send its own pacing held (see Verdict.HELD)."""


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """A provider's answer to one send, or a transport failure (status None)."""

    status: int | None
    reason: str | None
    retry_after_s: float | None = None
    detail: str | None = None  # the provider's message text (FCM says what was invalid)

    @property
    def short(self) -> str:
        """`410 Unregistered`, `timeout`: for events and logs."""
        if self.status is None:
            return self.reason or "transport_error"
        return f"{self.status} {self.reason}" if self.reason else str(self.status)


_APNS_TOKEN_REASONS = frozenset({"Unregistered", "BadDeviceToken", "DeviceTokenNotForTopic"})
_FCM_TOKEN_CODES = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})
_FCM_TRANSIENT_CODES = frozenset({"QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL"})
# APNs answers that say our provider token or connection needs attention, not the request.
_APNS_TRANSIENT_REASONS = frozenset(
    {
        "ExpiredProviderToken",
        "TooManyProviderTokenUpdates",
        "TooManyRequests",
        "InternalServerError",
        "ServiceUnavailable",
        "Shutdown",
        "IdleTimeout",
    }
)


def classify(provider: Provider, answer: ProviderAnswer) -> Verdict:
    """Sort an answer into accepted, bad token, permanent failure or transient failure.

    For the channels, INVALID_TOKEN means a dead address: an email hard bounce, an SMS
    recipient who opted out, a web push subscription or chat webhook that is gone; the engine
    deactivates it through `device_changes` as it does a push token.
    """
    status, reason = answer.status, answer.reason or ""
    if reason.startswith(HELD_PREFIX):
        return Verdict.HELD
    if status is None:
        return Verdict.TRANSIENT  # timeout, connection lost, GOAWAY without a resend
    if 200 <= status < 300:
        return Verdict.ACCEPTED
    channel = _CHANNEL_RULES.get(provider)
    if channel is not None:
        return channel(status, reason)
    if provider == "apns":
        if status == 410 or reason in _APNS_TOKEN_REASONS:
            return Verdict.INVALID_TOKEN
        if status == 429 or status >= 500 or reason in _APNS_TRANSIENT_REASONS:
            return Verdict.TRANSIENT
        return Verdict.PERMANENT
    if reason in _FCM_TOKEN_CODES:
        return Verdict.INVALID_TOKEN
    if reason == "INVALID_ARGUMENT" and "registration token" in (answer.detail or "").lower():
        return Verdict.INVALID_TOKEN
    if status in (429, 500, 502, 503, 504) or reason in _FCM_TRANSIENT_CODES:
        return Verdict.TRANSIENT
    if status == 401 or reason == "THIRD_PARTY_AUTH_ERROR":
        # Our credentials (or the APNs key behind FCM) need fixing: retry until the age cap.
        return Verdict.TRANSIENT
    return Verdict.PERMANENT


# --- the channels' answers (docs/providers.md says what each provider answers) -------------

_SMTP_AUTH_CODES = frozenset({530, 534, 535, 538})
"""AUTH refused or required: our credentials or TLS setup, not the message (retried, breaker)."""


def _email(status: int, reason: str) -> Verdict:
    # `reason` starts with the SMTP phase the code answered: "RCPT", "MAIL", "DATA", "AUTH"...
    if 400 <= status < 500 or status == 552 or status in _SMTP_AUTH_CODES:
        # 4xx: try later (greylisting, mailbox busy); 552 at RCPT is "mailbox full", which RFC
        # 5321 says to treat as 452.
        return Verdict.TRANSIENT
    if 500 <= status < 600 and reason.startswith("RCPT"):
        return Verdict.INVALID_TOKEN  # a hard bounce: no such mailbox, domain, relaying denied
    return Verdict.PERMANENT  # 5xx at MAIL or DATA: the message itself is refused


_TWILIO_DEAD_NUMBER = frozenset(
    {
        "21610",  # the recipient replied STOP: unsubscribed until they send START
        "21211",  # the 'To' number is not a valid phone number
        "21614",  # the 'To' number is not a mobile number
    }
)


def _sms(status: int, reason: str) -> Verdict:
    # `reason` is Twilio's error code (a number as text), or a sender's own refusal.
    if reason in _TWILIO_DEAD_NUMBER:
        return Verdict.INVALID_TOKEN
    if status == 429 or reason == "20429" or status >= 500 or status == 401:
        return Verdict.TRANSIENT  # 401 (20003): our credentials need fixing, not the message
    return Verdict.PERMANENT  # budgets (402), a category not SMS-eligible (403), bad requests


def _webpush(status: int, reason: str) -> Verdict:
    if status in (404, 410):
        return Verdict.INVALID_TOKEN  # the subscription expired or was unsubscribed (RFC 8030)
    if status in (429, 401) or status >= 500:
        return Verdict.TRANSIENT  # 401: our VAPID token was refused (clock, key), not the push
    return Verdict.PERMANENT  # 400, 403 (VAPID key not the subscription's), 413 too large


_CHAT_GONE = frozenset({"invalid_token", "no_service", "channel_not_found", "channel_is_archived"})


def _chat(status: int, reason: str) -> Verdict:
    if status in (404, 410) or reason in _CHAT_GONE:
        return Verdict.INVALID_TOKEN  # the webhook was removed or its channel archived
    if status == 429 or status >= 500:
        return Verdict.TRANSIENT
    return Verdict.PERMANENT  # invalid_payload, action_prohibited, ...


def _inapp(status: int, reason: str) -> Verdict:
    return Verdict.TRANSIENT if status >= 500 else Verdict.PERMANENT


_CHANNEL_RULES = {
    "email": _email,
    "sms": _sms,
    "webpush": _webpush,
    "chat": _chat,
    "inapp": _inapp,
}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, capped by attempts and by the post's age."""

    max_attempts: int = 8
    base_s: float = 1.0
    max_backoff_s: float = 300.0
    max_age_s: float = 3_600.0

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Delay before send number `attempt + 1`: uniform over [0, min(cap, base * 2^(n-1))]."""
        ceiling = min(self.max_backoff_s, self.base_s * math.pow(2, max(0, attempt - 1)))
        return rand() * ceiling

    def expired(self, created_ts: float, now: float) -> bool:
        """A notification older than the age cap is not sent any more."""
        return now - created_ts > self.max_age_s


@dataclass(frozen=True, slots=True)
class RetryPlan:
    """The next step of a failed send: `retry` at `due_at`, or give up as `outcome`."""

    kind: Literal["retry", "expired", "dead_lettered"]
    due_at: float = 0.0


def plan_retry(
    policy: RetryPolicy,
    request: SendRequest,
    attempts_made: int,
    now: float,
    retry_after_s: float | None,
    rand: Callable[[], float] = random.random,
) -> RetryPlan:
    """After a transient failure: when to try again, or why not."""
    if attempts_made >= policy.max_attempts:
        return RetryPlan("dead_lettered")
    delay = policy.backoff(attempts_made, rand)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)  # the provider's own pacing is a floor
    due = now + delay
    if due - request.created_ts > policy.max_age_s:
        return RetryPlan("expired")
    return RetryPlan("retry", due)
