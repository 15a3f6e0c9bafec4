"""Two ASGI middlewares: the request body limit and the API's own Prometheus metrics.

The body limit refuses a declared `Content-Length` over the limit before the app runs (nothing
is read or parsed), and a chunked body as soon as it passes the limit; both get a 413 in the
error shape. Uploads (the audience endpoint) have their own, larger limit.
"""

from __future__ import annotations

import time
from collections.abc import Collection

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from operators.adapters.http.errors import error_body


class _TooLarge(Exception):
    """The body passed the limit while being read."""


async def _send_error(send: Send, status: int, body: dict[str, object]) -> None:
    data = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """413 for bodies over `limit` bytes (`upload_limit` on `upload_paths`)."""

    def __init__(
        self, app: ASGIApp, limit: int, upload_limit: int, upload_paths: Collection[str]
    ) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit
        self.upload_paths = frozenset(upload_paths)

    def _too_large(self, limit: int) -> dict[str, object]:
        return error_body(
            "payload_too_large",
            f"the body is over {limit} bytes (FANFARE_API_MAX_BODY_BYTES, uploads "
            "FANFARE_API_UPLOAD_MAX_BYTES)",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the declared length, then count what is read."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope["path"] in self.upload_paths else self.limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _send_error(
                    send, 400, error_body("invalid_body", "Content-Length is not a number")
                )
                return
            if size > limit:
                await _send_error(send, 413, self._too_large(limit))
                return
        received = 0
        exceeded = False
        started = False

        async def counted() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def guarded(message: Message) -> None:
            # A body that passed the limit becomes a 413, whatever the app made of the error.
            nonlocal started
            if exceeded:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _send_error(send, 413, self._too_large(limit))
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, self._too_large(limit))


class ApiMetrics:
    """The API's metrics, in a registry of their own (served on /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fanfare_api_requests_total",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fanfare_api_request_seconds",
            "seconds from request to the end of the response, by route template and method",
            ["route", "method"],
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.published = Counter(
            "fanfare_api_published_total",
            "messages the API published, by topic",
            ["topic"],
            registry=self.registry,
        )


class RecordMetrics:
    """Count and time every request by its route template (never the raw path)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, routed: ASGIApp) -> None:
        self.app = app
        self.metrics = metrics
        self.routed = routed  # the FastAPI app, whose routes name a path that was not routed

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None and hasattr(route, "path"):
            return str(route.path)
        for candidate in getattr(self.routed, "routes", ()):
            match, _ = candidate.matches(scope)
            if match == Match.FULL:
                return str(candidate.path)
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Time the request; record its status when the response starts."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = self._route(scope)
            method = str(scope.get("method", ""))
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - started)
