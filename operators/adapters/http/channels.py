"""The channels' endpoints on `fanfare api`.

- `GET /v1/unsubscribe/{token}`: a confirmation page (a GET never unsubscribes: mail scanners
  and link previews fetch links); `POST /v1/unsubscribe/{token}` with `List-Unsubscribe=One-Click`
  (RFC 8058, what a mail client sends for the List-Unsubscribe-Post header, and what the page's
  button sends): the token names (user, category); the category is turned off for the user by a
  `category_switch` event on `preference_changes`. No API key: the signed token is the
  credential.
- `GET /v1/users/{id}/notifications/stream`: Server-Sent Events, the user's in-app
  notifications as the in-app sender publishes them (`event: notification`, `id:` the stream
  id; `Last-Event-ID` or `?since=ID` replays what was kept after it, `since=0` all of it), an
  `event: ready` once subscribed, a comment every FANFARE_SSE_HEARTBEAT_S. Authenticated by an
  API key (scope `inbox`) or by `?access_token=` from
  `POST /v1/users/{id}/notifications/stream-token` (a browser's EventSource cannot send a key).
- `POST /v1/callbacks/sms`: the SMS provider's status callbacks (Twilio-signed):
  `delivered` becomes a `delivered` ack on `notification_acks`; `undelivered`/`failed` for an
  opted-out or unreachable number (21610, 30005, 30006) deactivates it on `device_changes`.
- `POST /v1/channels/sms/inbound`: messages sent to our number (Twilio-signed, as the status
  callbacks): STOP (STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT) deactivates every SMS address with
  the sender's number on `device_changes`, START (UNSTOP, YES) activates them again, HELP
  answers; the answer is TwiML (operators/notify/sms_keywords.py). The number's addresses come
  from the index the devices endpoints keep (operators/adapters/redis/sms_numbers.py).
- `GET /v1/webpush/key`: the VAPID public key browsers subscribe with.
- `GET /dev/inbox?user=ID` (FANFARE_DEV_MODE only): a page with the bell and the live inbox.

No `from __future__ import annotations` here: FastAPI reads the routes' annotations at runtime,
and the path types are local to `install_channel_routes`.
"""

import base64
import hashlib
import hmac
import html
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import parse_qs, quote

import anyio
import orjson
from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.concurrency import run_in_threadpool

from operators.adapters.channels.ports import SmsNumberIndex
from operators.adapters.http.errors import error_response, retry_after
from operators.adapters.http.models import ERRORS, StreamToken
from operators.adapters.redis.live import LiveHub, stream_id_key
from operators.notify.catalog import Catalog
from operators.notify.links import (
    InvalidLink,
    read_stream_token,
    read_unsubscribe,
    stream_token,
)
from operators.notify.ports import Publisher
from operators.notify.requests import Rejected
from operators.notify.service import NotifyService
from operators.notify.sms_keywords import REPLIES, parse_keyword, twiml
from schemas.codecs import encode_category_switch, encode_device_change, encode_notification_ack
from schemas.records import CategorySwitch, DeviceChange, NotificationAck
from schemas.topics import DEVICE_CHANGES, NOTIFICATION_ACKS, PREFERENCE_CHANGES

DEAD_NUMBER_CODES = frozenset({"21610", "30005", "30006"})
"""Status callback error codes that mean the number will not take SMS: opted out (STOP),
unknown handset, landline or unreachable carrier."""
_ONE_CLICK = re.compile(rb'name="List-Unsubscribe"\r\n(?:[^\r\n]+\r\n)*\r\nOne-Click\r\n')


@dataclass
class ChannelApi:
    """What the channels' endpoints need (built by `fanfare api` from the settings)."""

    catalog: Catalog
    link_secret: bytes | None
    unsubscribe_ttl_s: float
    stream_token_ttl_s: float
    dev_mode: bool
    public_url: str
    hub: LiveHub | None
    sms_auth_token: str | None = None
    vapid_public_key: str | None = None
    registry: CollectorRegistry | None = None
    sms_numbers: SmsNumberIndex | None = None
    """Phone number -> SMS addresses, kept by the devices endpoints (inbound STOP/START)."""


class LiveMetrics:
    """The live stream's gauges and counters (in the API's registry)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.clients = Gauge(
            "fanfare_api_live_clients", "live streams connected to this process", registry=registry
        )
        self.events = Counter(
            "fanfare_api_live_events_total",
            "in-app events written to live streams",
            registry=registry,
        )
        self.unsubscribed = Counter(
            "fanfare_api_unsubscribed_total",
            "one-click unsubscribes applied, by category",
            ["category"],
            registry=registry,
        )
        self.sms_callbacks = Counter(
            "fanfare_api_sms_callbacks_total",
            "SMS status callbacks, by status and what was done",
            ["status", "action"],
            registry=registry,
        )
        self.sms_inbound = Counter(
            "fanfare_api_sms_inbound_total",
            "inbound SMS, by keyword (stop, start, help, other) and what was done",
            ["keyword", "action"],
            registry=registry,
        )


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    document = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(title)}</title>
<style>body{{font-family:-apple-system,Segoe UI,Roboto,sans-serif;max-width:32rem;margin:3rem auto;
padding:0 1rem;color:#222}}button{{font-size:1rem;padding:.5rem 1rem}}</style></head>
<body>{body}</body></html>"""
    return HTMLResponse(document, status_code=status, headers={"Cache-Control": "no-store"})


def _one_click(content_type: str, body: bytes) -> bool:
    """Whether a POST body says `List-Unsubscribe=One-Click` (urlencoded or multipart)."""
    if content_type.startswith("multipart/form-data"):
        return _ONE_CLICK.search(body) is not None
    fields = parse_qs(body.decode("utf-8", "replace"))
    return fields.get("List-Unsubscribe") == ["One-Click"]


def twilio_signature(token: str, url: str, params: dict[str, str]) -> str:
    """The provider's signature of a callback: HMAC-SHA1 over the URL and sorted parameters."""
    data = url + "".join(f"{k}{params[k]}" for k in sorted(params))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def _frame(event_id: str, payload: str) -> bytes:
    return f"id: {event_id}\nevent: notification\ndata: {payload}\n\n".encode()


def install_channel_routes(
    app: FastAPI,
    channels: ChannelApi,
    service: NotifyService,
    publisher: Publisher,
    clock: Callable[[], float],
) -> None:
    """Add the endpoints above to the app."""
    metrics = LiveMetrics(channels.registry)
    UserPath = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
    TokenPath = Annotated[str, Path(min_length=1, max_length=1024)]

    def secret() -> bytes:
        if channels.link_secret is None:
            raise Rejected(
                "unavailable",
                "links are not configured on this server (FANFARE_LINK_SECRET_FILE)",
            )
        return channels.link_secret

    def now() -> datetime:
        return datetime.fromtimestamp(clock(), UTC)

    # --- one-click unsubscribe (RFC 8058) ---------------------------------------------------

    def category_label(name: str) -> str:
        category = channels.catalog.categories.get(name)
        return category.description or name if category is not None else name

    @app.get("/v1/unsubscribe/{token}", response_class=HTMLResponse, tags=["channels"])
    def unsubscribe_page(token: TokenPath) -> HTMLResponse:
        """A confirmation page with one button (a GET changes nothing)."""
        try:
            found = read_unsubscribe(secret(), token, clock(), channels.unsubscribe_ttl_s)
        except InvalidLink as exc:
            return _page(
                "Unsubscribe",
                f"<p>{html.escape(str(exc))}.</p>",
                410 if exc.code == "expired_token" else 400,
            )
        label = html.escape(category_label(found.category))
        return _page(
            "Unsubscribe",
            f"<h1>Unsubscribe?</h1><p>You will stop getting <b>{label}</b> notifications.</p>"
            '<form method="post"><input type="hidden" name="List-Unsubscribe" '
            'value="One-Click"><button type="submit">Unsubscribe</button></form>',
        )

    @app.post(
        "/v1/unsubscribe/{token}",
        tags=["channels"],
        responses={400: {"description": "not a one-click request, or a bad link"}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {"type": "string", "example": "List-Unsubscribe=One-Click"}
                    }
                },
            }
        },
    )
    async def unsubscribe(token: TokenPath, request: Request) -> Response:
        """RFC 8058 one-click: turn the link's category off for its user."""
        wants_html = "text/html" in request.headers.get("accept", "")
        try:
            found = read_unsubscribe(secret(), token, clock(), channels.unsubscribe_ttl_s)
        except InvalidLink as exc:
            if wants_html:
                return _page("Unsubscribe", f"<p>{html.escape(str(exc))}.</p>", 400)
            raise Rejected(exc.code, str(exc), "token") from None
        body = await request.body()
        if not _one_click(request.headers.get("content-type", ""), body):
            raise Rejected(
                "invalid_body", "a one-click unsubscribe POSTs List-Unsubscribe=One-Click", "body"
            )
        switch = CategorySwitch(
            found.user_id, found.category, None, False, now(), "unsubscribe_link"
        )
        raw = encode_category_switch(switch)
        await run_in_threadpool(
            publisher.publish, PREFERENCE_CHANGES, [(found.user_id.encode(), raw)]
        )
        metrics.unsubscribed.labels(found.category).inc()
        if wants_html:
            label = html.escape(category_label(found.category))
            return _page(
                "Unsubscribed", f"<h1>Done</h1><p>No more <b>{label}</b> notifications.</p>"
            )
        return JSONResponse({"unsubscribed": True, "category": found.category})

    # --- the live stream (Server-Sent Events) ---------------------------------------------

    @app.post(
        "/v1/users/{user_id}/notifications/stream-token",
        response_model=StreamToken,
        responses=ERRORS,
        tags=["inbox"],
    )
    def live_token(user_id: UserPath, request: Request) -> JSONResponse:
        """A short-lived token a browser reads the user's live stream with (scope `inbox`)."""
        service.authenticate(request.headers.get("authorization"), "inbox")
        token = stream_token(secret(), user_id, clock())
        url = (
            f"{channels.public_url}/v1/users/{quote(user_id, safe='')}/notifications/stream"
            f"?access_token={token}"
        )
        body = StreamToken(
            user_id=user_id, token=token, expires_in=int(channels.stream_token_ttl_s), url=url
        )
        return JSONResponse(body.model_dump())

    @app.get(
        "/v1/users/{user_id}/notifications/stream",
        responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
        tags=["inbox"],
    )
    async def live_stream(
        user_id: UserPath,
        request: Request,
        access_token: Annotated[str | None, Query(max_length=1024)] = None,
        since: Annotated[str | None, Query(max_length=64, pattern=r"^[0-9]+(-[0-9]+)?$")] = None,
    ) -> Response:
        """The user's in-app notifications as they are delivered (text/event-stream)."""
        hub = channels.hub
        if hub is None:
            raise Rejected("unavailable", "the live stream is not configured on this server")
        if access_token is not None:
            try:
                holder = read_stream_token(
                    secret(), access_token, clock(), channels.stream_token_ttl_s
                )
            except InvalidLink as exc:
                raise Rejected("invalid_api_key", f"access_token: {exc}") from None
            if holder != user_id:
                raise Rejected("forbidden", "the access_token is for another user")
        else:
            await run_in_threadpool(
                service.authenticate, request.headers.get("authorization"), "inbox"
            )
        if hub.clients >= hub.max_clients:
            return error_response(
                "unavailable",
                f"this server holds {hub.max_clients} live streams (FANFARE_SSE_MAX_CLIENTS); "
                "retry on another",
                None,
                {"Retry-After": retry_after(5)},
            )
        after = request.headers.get("last-event-id") or since
        if after is not None and stream_id_key(after) == (-1, -1):
            after = None

        async def events() -> AsyncIterator[bytes]:
            listener = await hub.listen(user_id)
            metrics.clients.inc()
            try:
                yield f"retry: 3000\n: {hub.clients} clients\n\n".encode()
                last = after
                if last is not None:
                    for event_id, payload in await hub.history(user_id, last):
                        yield _frame(event_id, payload)
                        metrics.events.inc()
                        last = event_id
                yield b"event: ready\ndata: {}\n\n"
                last_key = stream_id_key(last) if last is not None else (-1, -1)
                while True:
                    event_id, payload = await listener.queue.get()
                    if not event_id:  # the hub's heartbeat
                        yield b": keep-alive\n\n"
                        continue
                    if stream_id_key(event_id) <= last_key:
                        continue  # already replayed from the stream
                    yield _frame(event_id, payload)
                    metrics.events.inc()
            finally:
                metrics.clients.dec()
                with anyio.CancelScope(shield=True):
                    await hub.leave(listener)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # --- SMS status callbacks ---------------------------------------------------------------

    async def signed_form(request: Request) -> dict[str, str]:
        """The provider's form-encoded POST, once its X-Twilio-Signature is checked."""
        if channels.sms_auth_token is None:
            raise Rejected("not_found", "SMS is not configured on this server")
        body = await request.body()
        params = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        query = request.url.query
        url = f"{channels.public_url}{request.url.path}" + (f"?{query}" if query else "")
        expected = twilio_signature(channels.sms_auth_token, url, params)
        given = request.headers.get("x-twilio-signature", "")
        if not hmac.compare_digest(given, expected):
            raise Rejected("forbidden", "the request's X-Twilio-Signature does not match")
        return params

    @app.post("/v1/callbacks/sms", status_code=204, tags=["channels"])
    async def sms_status(request: Request) -> Response:
        """The SMS provider's status callback (signed with the account's auth token)."""
        params = await signed_form(request)
        ids = parse_qs(request.url.query)
        notification_id = ids.get("n", [""])[0]
        device_id = ids.get("d", [""])[0]
        user_id = ids.get("u", [""])[0]
        status = params.get("MessageStatus", "")
        action = "none"
        if status == "delivered" and notification_id and device_id:
            ack = NotificationAck(notification_id, device_id, "delivered", now())
            await run_in_threadpool(
                publisher.publish,
                NOTIFICATION_ACKS,
                [(notification_id.encode(), encode_notification_ack(ack))],
            )
            action = "ack"
        elif (
            status in ("undelivered", "failed")
            and params.get("ErrorCode") in DEAD_NUMBER_CODES
            and user_id
            and device_id
        ):
            change = DeviceChange(user_id, device_id, "sms", None, False, now())
            await run_in_threadpool(
                publisher.publish,
                DEVICE_CHANGES,
                [(user_id.encode(), encode_device_change(change))],
            )
            action = "deactivate"
        metrics.sms_callbacks.labels(status or "unknown", action).inc()
        return Response(status_code=204)

    @app.post("/v1/channels/sms/inbound", tags=["channels"])
    async def sms_inbound(request: Request) -> Response:
        """A message to our number: STOP, START or HELP (signed like the status callbacks)."""
        params = await signed_form(request)
        number = params.get("From", "")
        keyword = parse_keyword(params.get("Body", ""))
        action = "none"
        if keyword in ("stop", "start"):
            if channels.sms_numbers is None:
                raise Rejected("unavailable", "this server keeps no SMS number index")
            holders = await run_in_threadpool(channels.sms_numbers.holders, number)
            active = keyword == "start"
            changes = [
                DeviceChange(user, device, "sms", number if active else None, active, now())
                for user, device in holders
            ]
            if changes:
                await run_in_threadpool(
                    publisher.publish,
                    DEVICE_CHANGES,
                    [(c.user_id.encode(), encode_device_change(c)) for c in changes],
                )
                action = "activate" if active else "deactivate"
        metrics.sms_inbound.labels(keyword or "other", action).inc()
        reply = REPLIES[keyword] if keyword is not None else None
        return Response(twiml(reply), media_type="application/xml")

    # --- web push -------------------------------------------------------------------------

    @app.get("/v1/webpush/key", tags=["channels"])
    def webpush_key() -> JSONResponse:
        """The VAPID public key (applicationServerKey) browsers subscribe with."""
        if channels.vapid_public_key is None:
            raise Rejected(
                "not_found", "web push is not configured (FANFARE_WEBPUSH_VAPID_KEY_FILE)"
            )
        return JSONResponse({"public_key": channels.vapid_public_key})

    # --- the development stack's live inbox page -------------------------------------------

    if channels.dev_mode:

        @app.get("/dev/inbox", response_class=HTMLResponse, include_in_schema=False)
        def dev_inbox(user: Annotated[str, Query(min_length=1, max_length=128)]) -> HTMLResponse:
            """The bell and the live inbox of one user (FANFARE_DEV_MODE only)."""
            token = stream_token(secret(), user, clock())
            path = f"/v1/users/{quote(user, safe='')}/notifications/stream"
            stream = f"{path}?since=0&access_token={token}"
            return HTMLResponse(dev_inbox_page(user, stream))


def dev_inbox_page(user: str, stream_url: str) -> str:
    """The live inbox page: a bell with an unread count and the list, fed by EventSource."""
    config = orjson.dumps({"user": user, "stream": stream_url}).decode()
    return (
        """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>fanfare: live inbox</title>
<style>
body{font-family:-apple-system,Segoe UI,Roboto,sans-serif;max-width:36rem;margin:2rem auto;
color:#222}
header{display:flex;justify-content:space-between;align-items:center}
#bell{font-size:1.6rem;position:relative;cursor:pointer}
#count{position:absolute;top:-.4rem;right:-.9rem;background:#d33;color:#fff;border-radius:1rem;
font-size:.75rem;padding:.1rem .4rem}#count[data-n="0"]{display:none}
#status{font-size:.8rem;color:#666}ul{list-style:none;padding:0}
li{border-bottom:1px solid #eee;padding:.6rem 0}li b{display:block}li small{color:#888}
</style></head><body>
<header><h1>Inbox of <span id="user"></span></h1>
<div id="bell" title="mark all read">&#x1F514;<span id="count" data-n="0">0</span></div></header>
<div id="status">connecting...</div><ul id="inbox"></ul>
<script>
const config = """
        + config
        + """;
document.getElementById("user").textContent = config.user;
const inbox = document.getElementById("inbox"), count = document.getElementById("count");
const status = document.getElementById("status"), seen = new Set();
let unread = 0;
function show(n) { count.textContent = String(n); count.dataset.n = String(n); }
document.getElementById("bell").onclick = () => { unread = 0; show(0); };
const source = new EventSource(config.stream);
source.addEventListener("ready", () => {
  status.textContent = "live"; document.body.dataset.live = "ready"; });
source.addEventListener("notification", (event) => {
  const n = JSON.parse(event.data);
  if (seen.has(n.notification_id)) return;
  seen.add(n.notification_id);
  const li = document.createElement("li");
  li.dataset.id = n.notification_id; li.dataset.received = String(Date.now());
  const title = document.createElement("b"); title.textContent = n.title;
  const body = document.createElement("span"); body.textContent = n.body;
  const when = document.createElement("small"); when.textContent = " " + n.category;
  li.append(title, body, when); inbox.prepend(li);
  unread += 1; show(unread);
});
source.onerror = () => { status.textContent = "reconnecting..."; document.body.dataset.live = ""; };
</script></body></html>"""
    )
