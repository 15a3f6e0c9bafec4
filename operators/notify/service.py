"""The notification API's service: authenticate, limit, validate, de-duplicate, publish.

What every endpoint that writes does, through the ports, with no HTTP in it: the HTTP adapter
(`operators/adapters/http/app.py`) parses bodies into the request records and turns `Rejected`
into JSON errors. Idempotency keys are per API key and per endpoint: the first answer is stored
with the request's fingerprint; a repeat with the same body gets that answer again, one with
another body is refused (409), and one that arrives while the first is still being handled is
refused too (409, retry).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from operators.notify.campaigns import MAX_WINDOW, CampaignSpec, Target, progress_view
from operators.notify.catalog import Catalog
from operators.notify.keys import ApiKey, secret_matches, split_key
from operators.notify.ports import (
    Accepted,
    AcceptedLog,
    AudienceStore,
    CampaignStore,
    FollowerCounts,
    IdempotencyStore,
    KeyStore,
    Publisher,
    PublishFailed,
    RequestLimiter,
    SegmentIndex,
    StoredAnswer,
)
from operators.notify.requests import (
    NotifyRequest,
    Rejected,
    check_send_at,
    fingerprint,
    new_id,
    plan_notification,
    request_id,
    resolve_category,
    resolve_fallback,
    resolve_template,
)
from operators.notify.segments import Segment, SegmentError
from operators.notify.templates import DataValue
from schemas.codecs import (
    encode_notification_cancel,
    encode_notification_request,
    format_timestamp,
    parse_timestamp,
)
from schemas.records import Channel, NotificationCancel, Tier
from schemas.topics import tier_topic

log = logging.getLogger(__name__)

USER_ID = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")
"""A user id, as every contract has it: 1 to 128 characters, no control characters."""


class RateLimited(Rejected):
    """The key's token bucket is empty; `retry_after_s` says when it has one again."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("rate_limited", "too many requests for this API key; retry later")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Answer:
    """An endpoint's answer: status and JSON body (`replayed`: an idempotent repeat)."""

    status: int
    body: Mapping[str, Any]
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class CampaignRequest:
    """`POST /v1/notifications/bulk`, parsed."""

    idempotency_key: str
    category: str
    template_id: str
    data: Mapping[str, DataValue]
    target: Target | None
    segment: Mapping[str, Any] | None
    rate_per_s: float
    window_start: datetime | None = None
    window_end: datetime | None = None
    channels: Sequence[Channel] | None = None
    collapse_key: str | None = None
    fallback: Sequence[Channel] | None = None
    """The campaign's own fallback order (None: its category's)."""


def parse_audience(text: str) -> tuple[list[str], int]:
    """An uploaded list: one user id a line (blank lines skipped, an optional `user_id` header).

    Returns the users in order, each once, and how many repeated lines were dropped.
    """
    users: dict[str, None] = {}
    repeats = 0
    for number, line in enumerate(text.splitlines(), 1):
        user = line.strip()
        if not user or (number == 1 and user == "user_id"):
            continue
        if not USER_ID.match(user):
            raise Rejected(
                "invalid_audience",
                f"line {number}: not a user id (1-128 characters, no control characters)",
                "body",
            )
        if user in users:
            repeats += 1
        users[user] = None
    if not users:
        raise Rejected("invalid_audience", "the list holds no user id", "body")
    return list(users), repeats


class NotifyService:
    """The API's writes and campaign reads, over the ports."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        keys: KeyStore,
        idempotency: IdempotencyStore,
        limiter: RequestLimiter,
        publisher: Publisher,
        accepted: AcceptedLog,
        campaigns: CampaignStore,
        audiences: AudienceStore,
        segments: SegmentIndex,
        followers: Callable[[], FollowerCounts],
        max_campaign_rate: float,
        clock: Callable[[], float],
    ) -> None:
        self.catalog = catalog
        self._keys = keys
        self._idempotency = idempotency
        self._limiter = limiter
        self._publisher = publisher
        self._accepted = accepted
        self._campaigns = campaigns
        self._audiences = audiences
        self._segments = segments
        self._followers = followers
        self._max_rate = max_campaign_rate
        self._clock = clock

    # --- callers -------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None, scope: str) -> ApiKey:
        """The caller's key from `Authorization: Bearer ffk_...`, allowed `scope`, not limited."""
        if not authorization:
            raise Rejected("missing_api_key", "send the API key as `Authorization: Bearer KEY`")
        scheme, _, text = authorization.partition(" ")
        parts = split_key(text) if scheme.lower() == "bearer" else None
        record = self._keys.get(parts[0]) if parts else None
        if parts is None or record is None or not secret_matches(parts[1], record):
            raise Rejected("invalid_api_key", "the API key is not valid")
        if record.revoked_at is not None:
            raise Rejected("revoked_api_key", "the API key was revoked")
        if not record.allows_endpoint(scope):
            raise Rejected(
                "forbidden", f"the API key may not use this endpoint (scope {scope!r} missing)"
            )
        allowance = self._limiter.take(record)
        if not allowance.allowed:
            raise RateLimited(allowance.retry_after_s)
        return record

    def require_category(self, key: ApiKey, category: str) -> None:
        """Forbidden unless the key may send `category`."""
        if not key.allows_category(category):
            raise Rejected(
                "forbidden", f"the API key may not send category {category!r}", "category"
            )

    # --- idempotency ---------------------------------------------------------------------------

    def _once(
        self,
        key: ApiKey,
        scope: str,
        idempotency_key: str,
        body: Mapping[str, Any],
        act: Callable[[], tuple[Answer, Callable[[], None] | None]],
    ) -> Answer:
        """`act()` once per (key, scope, idempotency key); repeats get its first answer.

        `act` returns the answer and what to do once it is stored (a failure there is logged:
        the request did what it had to). A failure inside `act` releases the key, so the
        caller's retry runs.
        """
        mark = fingerprint(body)
        held = self._idempotency.reserve(key.key_id, scope, idempotency_key, mark)
        if held is not None:
            if held.fingerprint != mark:
                raise Rejected(
                    "idempotency_key_reused",
                    "this idempotency_key was used with a different request body",
                    "idempotency_key",
                )
            if held.status is None or held.body is None:
                raise Rejected(
                    "request_in_progress",
                    "a request with this idempotency_key is still being handled; retry",
                    "idempotency_key",
                )
            return Answer(held.status, held.body, replayed=True)
        try:
            answer, then = act()
        except BaseException:
            self._idempotency.release(key.key_id, scope, idempotency_key)
            raise
        self._idempotency.complete(
            key.key_id, scope, idempotency_key, StoredAnswer(mark, answer.status, answer.body)
        )
        if then is not None:
            try:
                then()
            except Exception:
                log.exception("after answering %s %s: a record was not kept", scope, answer.body)
        return answer

    # --- POST /v1/notifications ----------------------------------------------------------------

    def send(self, key: ApiKey, request: NotifyRequest, body: Mapping[str, Any]) -> Answer:
        """Validate, then publish once per idempotency key to the category's tier topic."""
        self.require_category(key, request.category)
        now = datetime.fromtimestamp(self._clock(), UTC)
        notification_id = request_id("n", key.key_id, request.idempotency_key)
        event = plan_notification(
            self.catalog, request, notification_id=notification_id, api_key_id=key.key_id, now=now
        )

        def publish() -> tuple[Answer, Callable[[], None]]:
            if self._accepted.get(notification_id) is not None:
                raise Rejected(
                    "idempotency_key_reused",
                    f"this idempotency_key made notification {notification_id} (its first "
                    "answer is no longer kept): use a new key",
                    "idempotency_key",
                )
            topic = tier_topic(event.tier)
            try:
                [(partition, offset)] = self._publisher.publish(
                    topic, [(event.key.encode(), encode_notification_request(event))]
                )
            except PublishFailed as exc:
                raise Rejected("unavailable", f"the broker did not take it: {exc}") from None
            accepted_at = now.timestamp()
            accepted = Accepted(
                notification_id=notification_id,
                category=event.category,
                tier=event.tier,
                template_id=event.template_id,
                topic=topic,
                partition=partition,
                offset=offset,
                recipients=event.recipients,
                accepted_at=accepted_at,
                send_at=None if event.send_at is None else format_timestamp(event.send_at),
                api_key_id=key.key_id,
                channels=event.channels,
            )
            answer = Answer(
                202,
                {
                    "notification_id": notification_id,
                    "tier": event.tier,
                    "topic": topic,
                    "recipients": len(event.recipients),
                    "channels": list(event.channels),
                    "send_at": None if event.send_at is None else format_timestamp(event.send_at),
                    "accepted_at": format_timestamp(accepted_at, "milliseconds"),
                },
            )
            return answer, lambda: self._accepted.add(accepted)

        return self._once(key, "send", request.idempotency_key, body, publish)

    # --- DELETE /v1/notifications/{id} ----------------------------------------------------------

    def cancel(self, key: ApiKey, notification_id: str) -> Answer:
        """Cancel a scheduled notification before its `send_at`: a cancel on its tier's topic.

        The fan-out holds a scheduled notification until `send_at` and drops it when the cancel
        (keyed by the id, so on the request's partition, after it) arrives first. A notification
        sent at once, or whose `send_at` has passed, cannot be called back: 409.
        """
        accepted = self._accepted.get(notification_id)
        if accepted is None or not key.allows_category(accepted.category):
            raise Rejected("not_found", f"no notification {notification_id!r}")
        if accepted.send_at is None:
            raise Rejected(
                "not_cancellable",
                "it had no send_at and was sent at once: only a scheduled notification can be "
                "cancelled",
            )
        send_at = parse_timestamp(accepted.send_at)
        now = datetime.fromtimestamp(self._clock(), UTC)
        if send_at <= now:
            raise Rejected(
                "not_cancellable", f"its send_at ({accepted.send_at}) has passed: it was sent"
            )
        topic = tier_topic(accepted.tier)
        tier: Tier = accepted.tier  # type: ignore[assignment]
        cancel = NotificationCancel(notification_id, tier, key.key_id, now)
        try:
            self._publisher.publish(
                topic, [(notification_id.encode(), encode_notification_cancel(cancel))]
            )
        except PublishFailed as exc:
            raise Rejected("unavailable", f"the broker did not take it: {exc}") from None
        return Answer(
            202,
            {
                "notification_id": notification_id,
                "state": "cancelled",
                "topic": topic,
                "send_at": accepted.send_at,
                "cancelled_at": format_timestamp(now, "milliseconds"),
            },
        )

    # --- campaigns ----------------------------------------------------------------------------

    def create_campaign(
        self, key: ApiKey, request: CampaignRequest, body: Mapping[str, Any]
    ) -> Answer:
        """Validate and store a campaign (`scheduled`); the scheduler emits it."""
        self.require_category(key, request.category)
        category = resolve_category(self.catalog, request.category)
        if category.tier != "marketing":
            raise Rejected(
                "invalid_category",
                f"campaigns send marketing-tier categories; {category.name!r} is "
                f"{category.tier}: send it with POST /v1/notifications",
                "category",
            )
        resolve_template(self.catalog, request.template_id, category, request.data)
        channels, fallback = resolve_fallback(category, request.channels, request.fallback)
        segment = None
        if request.segment is not None:
            try:
                segment = Segment(request.segment.get("locale"), request.segment.get("platform"))
            except SegmentError as exc:
                raise Rejected("invalid_segment", str(exc), "targeting.segment") from None
        target = request.target
        if segment is not None:
            target = Target("segment", "")  # its audience is made when the campaign is
        if target is None:
            raise Rejected(
                "invalid_request",
                "targeting needs followers_of, audience_id or segment",
                "targeting",
            )
        if not 0 < request.rate_per_s <= self._max_rate:
            raise Rejected(
                "invalid_rate",
                f"rate_per_s must be above 0 and at most {self._max_rate:g} "
                "(FANFARE_API_CAMPAIGN_MAX_RATE)",
                "rate_per_s",
            )
        now_s = self._clock()
        now = datetime.fromtimestamp(now_s, UTC)
        start = request.window_start or now
        check_send_at(start, now)
        end = request.window_end
        if end is not None:
            if end.tzinfo is None:
                raise Rejected("invalid_window", "window.end needs a UTC offset", "window.end")
            if end <= max(start, now):
                raise Rejected(
                    "invalid_window", "the window must end after it starts", "window.end"
                )
            if end - start > MAX_WINDOW:
                raise Rejected(
                    "invalid_window",
                    f"the window is longer than {MAX_WINDOW.days} days",
                    "window.end",
                )

        asked: Target = target

        def create() -> tuple[Answer, None]:
            target = asked
            if segment is not None:
                target = Target("segment", self._segment_audience(segment))
            if target.kind in ("audience", "segment"):
                size = self._audiences.size(target.ref)
                if size is None:
                    raise Rejected(
                        "unknown_audience",
                        f"no audience {target.ref!r} (uploads expire; upload it again)",
                        "targeting.audience_id",
                    )
                self._audiences.keep_until_used(target.ref)
            else:
                size = self._followers().follower_count(target.ref)
            spec = CampaignSpec(
                campaign_id=request_id("c", key.key_id, request.idempotency_key),
                category=category.name,
                template_id=request.template_id,
                data=dict(request.data),
                channels=channels,
                quiet_hours=category.quiet_hours,
                caps=category.caps,
                cap_limit=category.cap,
                cap_window_s=category.cap_window_s,
                fallback=fallback,
                segment=None if segment is None else segment.describe(),
                target=target,
                window_start=start.timestamp(),
                window_end=None if end is None else end.timestamp(),
                rate_per_s=request.rate_per_s,
                api_key_id=key.key_id,
                created_at=now_s,
                total=size,
                collapse_key=request.collapse_key,
            )
            if not self._campaigns.create(spec):
                raise Rejected(
                    "idempotency_key_reused",
                    f"this idempotency_key made campaign {spec.campaign_id} (its first answer "
                    "is no longer kept): use a new key",
                    "idempotency_key",
                )
            found = self._campaigns.get(spec.campaign_id)
            assert found is not None
            return Answer(202, progress_view(*found)), None

        return self._once(key, "campaigns", request.idempotency_key, body, create)

    def _segment_audience(self, segment: Segment) -> str:
        """The segment's members now, stored as an audience of the campaign's own."""
        users = self._segments.members(segment)
        if not users:
            raise Rejected(
                "empty_segment",
                f"no user matches {segment.describe()} (the segment index is kept from the "
                "changelogs by fanfare api scheduler: is one running?)",
                "targeting.segment",
            )
        audience_id = new_id("a")
        self._audiences.create(audience_id, users)
        return audience_id

    def campaign(self, key: ApiKey, campaign_id: str) -> dict[str, Any]:
        """A campaign's progress; not_found for another caller's campaign too."""
        found = self._campaigns.get(campaign_id)
        if found is None or not key.allows_category(found[0].category):
            raise Rejected("not_found", f"no campaign {campaign_id!r}")
        return progress_view(*found)

    def cancel_campaign(self, key: ApiKey, campaign_id: str) -> dict[str, Any]:
        """Cancel what has not been sent; the progress after it."""
        self.campaign(key, campaign_id)
        self._campaigns.cancel(campaign_id, self._clock())
        return self.campaign(key, campaign_id)

    def upload_audience(self, key: ApiKey, text: str) -> dict[str, Any]:
        """Store an uploaded list of user ids; its id, for a campaign's targeting."""
        users, repeats = parse_audience(text)
        audience_id = new_id("a")
        count = self._audiences.create(audience_id, users)
        return {"audience_id": audience_id, "users": count, "duplicates_dropped": repeats}

    def accepted(self, notification_id: str) -> Accepted | None:
        """An accepted notification, or None."""
        return self._accepted.get(notification_id)
