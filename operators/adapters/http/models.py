"""The API's request and response bodies as pydantic models: types, sizes, OpenAPI docs.

Shape only; the rules that need the catalog or a store are in `operators.notify`. Unknown
fields are refused (a typo must not be silently ignored).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictBool, model_validator

UserId = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$", examples=["u42"])
]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_]+$")]
IdempotencyKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="the caller's id for this request: a repeat with the same body gets the "
        "first answer; with another body, 409 (kept FANFARE_API_IDEMPOTENCY_TTL_S)",
        examples=["order-1234-receipt"],
    ),
]
DataKey = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
DataValue = Annotated[str, Field(max_length=4096)] | int | float | bool | None
Data = Annotated[
    dict[DataKey, DataValue],
    Field(
        max_length=64,
        description="the template's variables (strings, numbers, booleans)",
        examples=[{"code": "482913", "minutes": 10}],
    ),
]
ChannelName = Literal["push", "inbox", "email", "sms", "chat"]
CollapseKey = Annotated[str, Field(min_length=1, max_length=64)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NotificationIn(_Body):
    """`POST /v1/notifications`."""

    idempotency_key: IdempotencyKey
    category: Name = Field(examples=["login_code"])
    template_id: Name = Field(examples=["login_code"])
    recipients: list[UserId] = Field(min_length=1, max_length=1000)
    data: Data = Field(default_factory=dict)
    channels: list[ChannelName] | None = Field(
        default=None, min_length=1, description="default: the category's channels"
    )
    send_at: AwareDatetime | None = Field(
        default=None,
        description="RFC 3339 with an offset; at most 30 days ahead (a past time: now)",
    )
    collapse_key: CollapseKey | None = None


class NotificationAccepted(BaseModel):
    """202 to `POST /v1/notifications`."""

    notification_id: str
    tier: str
    topic: str
    recipients: int
    channels: list[str]
    send_at: str | None
    accepted_at: str


class Segment(_Body):
    """A segment by locale and/or platform (see the README's "Campaigns")."""

    locale: str | None = Field(default=None, max_length=35)
    platform: Literal["ios", "android"] | None = None


class Targeting(_Body):
    """Exactly one of: an author's followers, an uploaded audience, a segment."""

    followers_of: UserId | None = Field(default=None, description="an author's user id")
    audience_id: str | None = Field(
        default=None,
        pattern=r"^a_[0-9a-f]{32}$",
        description="from POST /v1/notifications/bulk/audiences",
    )
    segment: Segment | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Targeting:
        given = [f for f in ("followers_of", "audience_id", "segment") if getattr(self, f)]
        if len(given) != 1:
            raise ValueError("give exactly one of followers_of, audience_id, segment")
        return self


class Window(_Body):
    """When a campaign may send: from `start` (default now) until `end` (optional)."""

    start: AwareDatetime | None = None
    end: AwareDatetime | None = None


class CampaignIn(_Body):
    """`POST /v1/notifications/bulk`."""

    idempotency_key: IdempotencyKey
    category: Name = Field(examples=["campaign"])
    template_id: Name = Field(examples=["campaign"])
    data: Data = Field(default_factory=dict)
    targeting: Targeting
    window: Window = Field(default_factory=Window)
    rate_per_s: float = Field(
        gt=0, description="users per second (at most FANFARE_API_CAMPAIGN_MAX_RATE)"
    )
    channels: list[ChannelName] | None = Field(default=None, min_length=1)
    collapse_key: CollapseKey | None = None
    fallback: list[ChannelName] | None = Field(
        default=None,
        min_length=2,
        description="channels tried in this order per user, the first that reaches them and "
        "only that one (default: the category's fallback)",
        examples=[["push", "email"]],
    )


class CampaignOut(BaseModel):
    """A campaign and its progress."""

    campaign_id: str
    state: str
    category: str
    template_id: str
    targeting: dict[str, str]
    channels: list[str]
    fallback: list[str]
    rate_per_s: float
    window: dict[str, str | None]
    total: int
    emitted: int
    remaining: int
    not_sent: int
    in_flight: int
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    cancelled_at: str | None


class AudienceOut(BaseModel):
    """201 to an upload."""

    audience_id: str
    users: int
    duplicates_dropped: int


class PreferencesIn(_Body):
    """`PUT /v1/users/{id}/preferences`: the user's complete push preferences."""

    push_enabled: StrictBool = True
    quiet_hours_start: int | None = Field(default=None, ge=0, le=23)
    quiet_hours_end: int | None = Field(default=None, ge=0, le=23)
    timezone: str = Field(min_length=1, max_length=64, examples=["Europe/Paris"])
    locale: str | None = Field(
        default=None, min_length=1, max_length=35, pattern=r"^[A-Za-z0-9_-]+$", examples=["fr-CA"]
    )


DeviceProvider = Literal["apns", "fcm", "webpush", "email", "sms", "chat"]
Platform = Literal["ios", "android", "web"]


class WebPushKeys(_Body):
    """A push subscription's keys (base64url)."""

    p256dh: str = Field(min_length=1, max_length=200)
    auth: str = Field(min_length=1, max_length=100)


class WebPushSubscription(_Body):
    """What a browser's `PushSubscription.toJSON()` gives."""

    endpoint: str = Field(min_length=1, max_length=2048)
    keys: WebPushKeys
    expirationTime: int | None = None  # the browser's name for it


class DeviceIn(_Body):
    """`POST /v1/users/{id}/devices`: register (or refresh) a device or a channel address.

    - a phone: `{device_id, provider: apns|fcm, token}` (or `platform: ios|android`);
    - a browser: `{platform: web, subscription: {endpoint, keys: {p256dh, auth}}}`;
    - `{provider: email, address}`, `{provider: sms, address: +E.164}`,
      `{provider: chat, address: webhook URL}`.
    A channel address without a `device_id` gets one made from it (answered back).
    """

    device_id: str | None = Field(default=None, min_length=1, max_length=128)
    provider: DeviceProvider | None = None
    platform: Platform | None = None
    token: str | None = Field(default=None, min_length=1, max_length=4096)
    address: str | None = Field(default=None, min_length=1, max_length=2048)
    subscription: WebPushSubscription | None = None


class DeviceOut(_Body):
    """`DELETE /v1/users/{id}/devices`: deactivate a device or a channel address."""

    device_id: str = Field(min_length=1, max_length=128)
    provider: DeviceProvider | None = None
    platform: Platform | None = None


class Published(BaseModel):
    """202: the change is on its topic; the flows apply it."""

    user_id: str
    topic: str
    accepted_at: str
    device_id: str | None = None


class StreamToken(BaseModel):
    """A token a browser reads the user's live stream with."""

    user_id: str
    token: str
    expires_in: int
    url: str


class ErrorDetail(BaseModel):
    """The error."""

    code: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    """Every error response."""

    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": what}
    for status, what in (
        (401, "no key, a bad key or a revoked key"),
        (403, "the key may not use this endpoint or category"),
        (413, "the body is over the limit"),
        (422, "the request breaks a rule (the code and field say which)"),
        (429, "the key's rate limit; see Retry-After"),
        (503, "Redis or the broker is unavailable; retry"),
    )
}
"""Error responses every authenticated endpoint documents."""
