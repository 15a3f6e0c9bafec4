"""The `fanfare api` ASGI app: FastAPI routes over the notification service and the stores.

FastAPI (on Starlette, served by uvicorn) because the request and response models below are at
once the validation, the OpenAPI document and the docs page at `/docs`; Starlette alone would
need that schema written and kept true by hand. Endpoints are plain `def` functions: FastAPI
runs them on its thread pool, where the blocking clients (Redis, librdkafka's acknowledgements,
SQLite) belong; only the upload reads its body on the event loop.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from operators.adapters.http import inbox
from operators.adapters.http.channels import ChannelApi, install_channel_routes
from operators.adapters.http.devices import device_registration, device_removal
from operators.adapters.http.errors import error_response, install_error_handlers
from operators.adapters.http.middleware import ApiMetrics, BodyLimit, RecordMetrics
from operators.adapters.http.models import (
    ERRORS,
    AudienceOut,
    CampaignIn,
    CampaignOut,
    DeviceIn,
    DeviceOut,
    NotificationAccepted,
    NotificationIn,
    PreferencesIn,
    Published,
)
from operators.delivery.ledger import InvalidCursor
from operators.delivery.ports import NotificationStore
from operators.notify.campaigns import Target
from operators.notify.keys import ApiKey
from operators.notify.ports import Publisher, PublishFailed
from operators.notify.requests import NotifyRequest, Rejected
from operators.notify.service import Answer, CampaignRequest, NotifyService
from schemas.codecs import (
    InvalidEvent,
    decode_preference_change,
    encode_preference_change,
    format_timestamp,
)
from schemas.records import DeviceChange, PreferenceChange
from schemas.topics import DEVICE_CHANGES, PREFERENCE_CHANGES

log = logging.getLogger(__name__)

AUDIENCES_PATH = "/v1/notifications/bulk/audiences"
HealthCheck = Callable[[], tuple[bool, str]]


class CountingPublisher(Publisher):
    """A publisher that counts what it published, per topic, in the API's metrics."""

    def __init__(self, inner: Publisher, metrics: ApiMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def publish(self, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> list[tuple[int, int]]:
        """Publish, then count."""
        positions = self._inner.publish(topic, messages)
        self._metrics.published.labels(topic).inc(len(messages))
        return positions

    def marks(self, topic: str) -> dict[int, int]:
        """The inner publisher's."""
        return self._inner.marks(topic)

    def read_since(self, topic: str, marks: Mapping[int, int]) -> Iterator[bytes | None]:
        """The inner publisher's."""
        return self._inner.read_since(topic, marks)


@dataclass
class ApiDeps:
    """What the app is built from (real adapters in `fanfare api`, the same in tests)."""

    service: NotifyService
    publisher: Publisher  # the one the service publishes with: a CountingPublisher
    metrics: ApiMetrics
    notifications: Callable[[], NotificationStore]
    checks: Mapping[str, HealthCheck]
    max_body_bytes: int
    upload_max_bytes: int
    clock: Callable[[], float] = time.time
    channels: ChannelApi | None = None
    """The channels' endpoints (unsubscribe, live stream, SMS callbacks, web push key)."""


class _Cached:
    """A health check's answer, reused for a few seconds (a probe every second costs little)."""

    def __init__(self, check: HealthCheck, ttl_s: float = 5.0) -> None:
        self._check = check
        self._ttl_s = ttl_s
        self._at = float("-inf")
        self._answer: tuple[bool, str] = (False, "not checked yet")
        self._lock = threading.Lock()

    def __call__(self) -> tuple[bool, str]:
        with self._lock:
            if time.monotonic() - self._at > self._ttl_s:
                try:
                    self._answer = self._check()
                except Exception as exc:  # a health check reports, it never raises
                    self._answer = (False, f"{type(exc).__name__}: {exc}")
                self._at = time.monotonic()
            return self._answer


def _answer(answer: Answer) -> JSONResponse:
    headers = {"Idempotent-Replayed": "true"} if answer.replayed else None
    return JSONResponse(dict(answer.body), status_code=answer.status, headers=headers)


def create_app(deps: ApiDeps) -> Any:
    """The ASGI application: routes, error shape, body limit, metrics."""
    metrics = deps.metrics
    publisher = deps.publisher
    service = deps.service
    checks = {name: _Cached(check) for name, check in deps.checks.items()}
    store_lock = threading.Lock()
    store_box: list[NotificationStore] = []

    def store() -> NotificationStore:
        with store_lock:
            if not store_box:
                store_box.append(deps.notifications())
            return store_box[0]

    app = FastAPI(
        title="fanfare API",
        version="1",
        summary="Send notifications, run campaigns, read inboxes, manage preferences and devices.",
        description=(
            "Authenticate with `Authorization: Bearer KEY` (keys: `fanfare api keys create`). "
            'Errors are `{"error": {"code", "message", "field"?}}`.'
        ),
    )
    install_error_handlers(app)
    app.add_exception_handler(
        PublishFailed,
        lambda _r, exc: error_response(
            "unavailable", f"the broker did not take it ({exc}); retry", None, {"Retry-After": "1"}
        ),
    )
    bearer = HTTPBearer(auto_error=False, description="an API key (`fanfare api keys create`)")

    def needs(scope: str) -> Callable[..., ApiKey]:
        def caller(
            request: Request,
            _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
        ) -> ApiKey:
            return service.authenticate(request.headers.get("authorization"), scope)

        return caller

    UserPath = Annotated[str, Path(min_length=1, max_length=128)]
    IdPath = Annotated[str, Path(min_length=1, max_length=300)]

    def now() -> datetime:
        return datetime.fromtimestamp(deps.clock(), UTC)

    # --- operations ---------------------------------------------------------------------------

    @app.get("/health", tags=["operations"])
    def health() -> JSONResponse:
        """200 when Redis and the broker answer (and the tier topics exist), else 503."""
        results = {name: check() for name, check in checks.items()}
        ok = all(r[0] for r in results.values())
        body = {
            "status": "ok" if ok else "unavailable",
            "checks": {n: {"ok": r[0], "detail": r[1]} for n, r in results.items()},
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    def prometheus() -> Response:
        """The API's Prometheus metrics: requests by route and status, latency, publishes."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- notifications ------------------------------------------------------------------------

    @app.post(
        "/v1/notifications",
        status_code=202,
        response_model=NotificationAccepted,
        responses={**ERRORS, 409: {"description": "idempotency_key reused with another body"}},
        tags=["notifications"],
    )
    def send_notification(
        body: NotificationIn, key: Annotated[ApiKey, Depends(needs("send"))]
    ) -> JSONResponse:
        """Send a notification to up to 1,000 users; published to its category's tier topic."""
        request = NotifyRequest(
            idempotency_key=body.idempotency_key,
            category=body.category,
            template_id=body.template_id,
            recipients=body.recipients,
            data=body.data,
            channels=body.channels,
            send_at=body.send_at,
            collapse_key=body.collapse_key,
        )
        return _answer(service.send(key, request, body.model_dump(mode="json")))

    @app.get("/v1/notifications/{notification_id}/status", responses=ERRORS, tags=["notifications"])
    def notification_status(
        notification_id: IdPath, key: Annotated[ApiKey, Depends(needs("status"))]
    ) -> JSONResponse:
        """An accepted notification (its recipients' statuses), or one in the store.

        A per-user notification id is `id:user_id` (a post's: `post_id:user_id`).
        """
        accepted = service.accepted(notification_id)
        if accepted is not None and not key.allows_category(accepted.category):
            accepted = None
        view = inbox.status_view(store(), accepted, notification_id)
        if view is None:
            raise Rejected("not_found", f"no notification {notification_id!r}")
        return JSONResponse(view)

    @app.delete(
        "/v1/notifications/{notification_id}",
        status_code=202,
        responses={**ERRORS, 409: {"description": "not scheduled, or its send_at has passed"}},
        tags=["notifications"],
    )
    def cancel_notification(
        notification_id: IdPath, key: Annotated[ApiKey, Depends(needs("send"))]
    ) -> JSONResponse:
        """Cancel a scheduled notification (`send_at`) that has not been sent yet."""
        return _answer(service.cancel(key, notification_id))

    @app.patch(
        "/v1/notifications/{notification_id}/read",
        status_code=202,
        responses=ERRORS,
        tags=["inbox"],
    )
    def read_notification(
        notification_id: IdPath, key: Annotated[ApiKey, Depends(needs("inbox"))]
    ) -> JSONResponse:
        """Mark a per-user notification read: an `opened` ack per device on notification_acks."""
        acks = inbox.mark_read(store(), publisher, notification_id, deps.clock())
        if acks is None:
            raise Rejected("not_found", f"no notification {notification_id!r} in the store")
        return JSONResponse({"notification_id": notification_id, "acks": acks}, status_code=202)

    # --- campaigns ----------------------------------------------------------------------------

    @app.post(
        "/v1/notifications/bulk",
        status_code=202,
        response_model=CampaignOut,
        responses=ERRORS,
        tags=["campaigns"],
    )
    def create_campaign(
        body: CampaignIn, key: Annotated[ApiKey, Depends(needs("campaigns"))]
    ) -> JSONResponse:
        """Create a campaign, emitted user by user into the marketing tier.

        The scheduler (`fanfare api scheduler`) emits it at its rate, inside its window.
        """
        t = body.targeting
        target = None
        if t.followers_of is not None:
            target = Target("followers", t.followers_of)
        elif t.audience_id is not None:
            target = Target("audience", t.audience_id)
        request = CampaignRequest(
            idempotency_key=body.idempotency_key,
            category=body.category,
            template_id=body.template_id,
            data=body.data,
            target=target,
            segment=t.segment.model_dump() if t.segment is not None else None,
            rate_per_s=body.rate_per_s,
            window_start=body.window.start,
            window_end=body.window.end,
            channels=body.channels,
            collapse_key=body.collapse_key,
            fallback=body.fallback,
        )
        return _answer(service.create_campaign(key, request, body.model_dump(mode="json")))

    @app.post(
        AUDIENCES_PATH,
        status_code=201,
        response_model=AudienceOut,
        responses=ERRORS,
        tags=["campaigns"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "one user id a line (an optional `user_id` header line)",
            }
        },
    )
    async def upload_audience(
        request: Request, key: Annotated[ApiKey, Depends(needs("campaigns"))]
    ) -> JSONResponse:
        """Upload a list of user ids (a file: `curl --data-binary @users.txt`) for a campaign."""
        content_type = request.headers.get("content-type", "text/plain")
        if not content_type.startswith(("text/plain", "text/csv")):
            raise Rejected("unsupported_media_type", "send the list as text/plain or text/csv")
        raw = await request.body()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected("invalid_body", "the list is not UTF-8 text", "body") from None
        body = await run_in_threadpool(service.upload_audience, key, text)
        return JSONResponse(body, status_code=201)

    @app.get(
        "/v1/notifications/bulk/{campaign_id}",
        response_model=CampaignOut,
        responses=ERRORS,
        tags=["campaigns"],
    )
    def campaign_progress(
        campaign_id: IdPath, key: Annotated[ApiKey, Depends(needs("campaigns"))]
    ) -> JSONResponse:
        """A campaign's progress: emitted, remaining, state."""
        return JSONResponse(service.campaign(key, campaign_id))

    @app.delete(
        "/v1/notifications/bulk/{campaign_id}",
        response_model=CampaignOut,
        responses=ERRORS,
        tags=["campaigns"],
    )
    def cancel_campaign(
        campaign_id: IdPath, key: Annotated[ApiKey, Depends(needs("campaigns"))]
    ) -> JSONResponse:
        """Cancel what has not been sent (a finished campaign stays as it is)."""
        return JSONResponse(service.cancel_campaign(key, campaign_id))

    # --- inbox --------------------------------------------------------------------------------

    @app.get("/v1/users/{user_id}/notifications", responses=ERRORS, tags=["inbox"])
    def user_notifications(
        user_id: UserPath,
        key: Annotated[ApiKey, Depends(needs("inbox"))],
        cursor: Annotated[str | None, Query(max_length=1024)] = None,
        unread_only: bool = False,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> JSONResponse:
        """The user's notifications, newest first; `unread_only`: no device opened it."""
        try:
            page = inbox.inbox_page(store(), user_id, cursor, limit, unread_only)
        except InvalidCursor as exc:
            raise Rejected("invalid_cursor", str(exc), "cursor") from None
        return JSONResponse(page)

    @app.post(
        "/v1/users/{user_id}/notifications/read-all",
        status_code=202,
        responses=ERRORS,
        tags=["inbox"],
    )
    def read_all(
        user_id: UserPath, key: Annotated[ApiKey, Depends(needs("inbox"))]
    ) -> JSONResponse:
        """Mark every unread notification read (`complete: false`: call again for more)."""
        return JSONResponse(
            inbox.mark_all_read(store(), publisher, user_id, deps.clock()), status_code=202
        )

    # --- users --------------------------------------------------------------------------------

    def published(topic: str, user_id: str, raw: bytes) -> JSONResponse:
        publisher.publish(topic, [(user_id.encode(), raw)])
        body = Published(
            user_id=user_id, topic=topic, accepted_at=format_timestamp(deps.clock(), "milliseconds")
        )
        return JSONResponse(body.model_dump(), status_code=202)

    @app.put(
        "/v1/users/{user_id}/preferences",
        status_code=202,
        response_model=Published,
        responses=ERRORS,
        tags=["users"],
    )
    def put_preferences(
        user_id: UserPath,
        body: PreferencesIn,
        key: Annotated[ApiKey, Depends(needs("users"))],
    ) -> JSONResponse:
        """Replace the user's push preferences (published to preference_changes)."""
        change = PreferenceChange(
            user_id=user_id,
            push_enabled=body.push_enabled,
            quiet_hours_start=body.quiet_hours_start,
            quiet_hours_end=body.quiet_hours_end,
            timezone=body.timezone,
            ts=now(),
            locale=body.locale,
        )
        raw = encode_preference_change(change)
        try:
            decode_preference_change(raw)  # the contract's own codec, as the flow reads it
        except InvalidEvent as exc:
            raise Rejected("invalid_preferences", exc.detail) from None
        return published(PREFERENCE_CHANGES, user_id, raw)

    def device_change(user_id: str, change: DeviceChange, raw: bytes) -> JSONResponse:
        publisher.publish(DEVICE_CHANGES, [(user_id.encode(), raw)])
        numbers = deps.channels.sms_numbers if deps.channels is not None else None
        if numbers is not None and change.provider == "sms":
            # After the publish: the index must never name an address that was not registered.
            if change.active and change.token:
                numbers.register(user_id, change.device_id, change.token, deps.clock())
            else:
                numbers.remove(user_id, change.device_id)
        body = Published(
            user_id=user_id,
            topic=DEVICE_CHANGES,
            accepted_at=format_timestamp(deps.clock(), "milliseconds"),
            device_id=change.device_id,
        )
        return JSONResponse(body.model_dump(), status_code=202)

    allow_dev = deps.channels is not None and deps.channels.dev_mode

    @app.post(
        "/v1/users/{user_id}/devices",
        status_code=202,
        response_model=Published,
        responses=ERRORS,
        tags=["users"],
    )
    def add_device(
        user_id: UserPath, body: DeviceIn, key: Annotated[ApiKey, Depends(needs("users"))]
    ) -> JSONResponse:
        """Register or refresh a device or a channel address (device_changes, active).

        A phone: `{device_id, provider: apns|fcm, token}`; a browser: `{platform: web,
        subscription}`; `{provider: email|sms|chat, address}`. Addresses are checked (email
        syntax, E.164, https webhooks on public hosts, the subscription's keys).
        """
        return device_change(user_id, *device_registration(user_id, body, now(), allow_dev))

    @app.delete(
        "/v1/users/{user_id}/devices",
        status_code=202,
        response_model=Published,
        responses=ERRORS,
        tags=["users"],
    )
    def remove_device(
        user_id: UserPath, body: DeviceOut, key: Annotated[ApiKey, Depends(needs("users"))]
    ) -> JSONResponse:
        """Deactivate a device or a channel address (device_changes, inactive)."""
        return device_change(user_id, *device_removal(user_id, body, now()))

    if deps.channels is not None:
        install_channel_routes(app, deps.channels, service, publisher, deps.clock)

    limited = BodyLimit(app, deps.max_body_bytes, deps.upload_max_bytes, {AUDIENCES_PATH})
    return RecordMetrics(limited, metrics, app)
