"""FCM HTTP v1 through firebase-admin, behind the engine's `PushSender` port.

Each worker builds its own app on its own event loop. Retries belong to fanfare (`push.retry`
with backoff), so firebase-admin's own are turned off, and every send is bounded by a timeout,
counted as the provider's time (`answered_within`): FCM has no idempotency key, so a send
given up on that FCM had answered is accepted twice.
The service account comes from a file and is never logged.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
import time
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from operators.adapters.providers.config import FcmConfig, ProviderConfigError
from operators.adapters.providers.event_loop import answered_within
from operators.adapters.providers.fcm_errors import fcm_reason
from operators.delivery.model import ProviderAnswer, RetryPolicy, SendRequest
from operators.delivery.payloads import PushSource, fcm_content, time_to_live_s
from operators.delivery.ports import PushSender
from operators.delivery.token_bucket import BucketSpec

log = logging.getLogger(__name__)

# Devices register FCM *registration tokens* (`device_changes.token`), which the v1 API takes in
# `message.token`. firebase-admin 7.7 deprecates that field in favour of `fid`, a Firebase
# installation id: another kind of id, which no app here registers. Until apps send those, the
# token field is the right one, so its warning would only be noise in every delivery log.
warnings.filterwarnings(
    "ignore", message=r"Message\.token is deprecated", category=DeprecationWarning
)

_FCM_CHUNK = 50
_APP_NUMBERS = itertools.count(1)
_REFRESH_BEFORE = timedelta(minutes=5)
"""Refresh the OAuth token this long before it expires: before google-auth would (3 min 45 s
before, in version 2), so it never refreshes inside a request."""
_REFRESH_RETRY_S = 30.0


_FCM_PARALLEL_CHUNKS = 1


def app_name() -> str:
    """A firebase app name no other sender of this process had.

    firebase-admin keeps every app in a process-wide registry until `delete_app`, and refuses a
    name twice. A name made of an object's `id()` is reused once that object is freed: when an
    engine was dropped without being closed, its app was still registered and the next one
    raised ValueError, which crashed the cluster.
    """
    return f"fanfare-{os.getpid()}-{next(_APP_NUMBERS)}"


def token_needs_refresh(credential: Any, now: datetime) -> bool:
    """True when the OAuth token is missing or expires within `_REFRESH_BEFORE` of `now`.

    google-auth (expiry and `now` in naive UTC) refreshes an expiring token inside the request
    that finds it, with a blocking HTTP call on the worker's event loop: every send of that loop
    (APNs too) then leaves that much after its rate-limit token was taken. So the
    sender refreshes it first, in a thread, between sends.
    """
    expiry: datetime | None = getattr(credential, "expiry", None)
    if not getattr(credential, "token", None) or expiry is None:
        return True
    return expiry - _REFRESH_BEFORE <= now


def trust_private_ca(
    wrapper: Any, credential: Any, retry: Any, ca_file: Path | str, timeout_s: float
) -> None:
    """Give firebase-admin's HttpxAsyncClient an HTTP/2 httpx client that trusts `ca_file`.

    HttpxAsyncClient has no CA setting; this builds the httpx client as it builds its own.
    """
    import httpx
    from firebase_admin import _http_client

    wrapper._async_client = httpx.AsyncClient(
        http2=True,
        timeout=timeout_s,
        headers=wrapper._headers,
        auth=_http_client.GoogleAuthCredentialFlow(credential),
        mounts={
            "https://": _http_client.HttpxRetryTransport(
                retry=retry, verify=ssl.create_default_context(cafile=str(ca_file))
            )
        },
    )


class FcmSender(PushSender):
    """firebase-admin's send_each_async (httpx), with its built-in retries turned off."""

    provider = "fcm"
    # firebase-admin sends a chunk's messages at once and chunks one after another: the engine
    # takes tokens for one chunk at a time and sends it at once.
    max_per_send = _FCM_CHUNK
    one_send_at_a_time = True

    def __init__(
        self,
        config: FcmConfig,
        template: PushSource,
        bucket: BucketSpec,
        policy: RetryPolicy,
        timeout_s: float,
        name: str | None = None,
    ) -> None:
        import firebase_admin
        from firebase_admin import _http_client, credentials, messaging
        from firebase_admin._retry import HttpxRetry

        self.bucket = bucket
        self._template = template
        self._policy = policy
        self._timeout = timeout_s
        self._messaging = messaging
        try:
            cred = credentials.Certificate(str(config.credentials_file))
        except (OSError, ValueError) as exc:
            raise ProviderConfigError(
                f"cannot load the FCM service account {config.credentials_file} "
                f"({type(exc).__name__})"
            ) from None
        options = {"projectId": config.project_id, "httpTimeout": timeout_s}
        self._app = firebase_admin.initialize_app(cred, options, name=name or app_name())
        service = messaging._get_messaging_service(self._app)
        # No endpoint setting exists for messaging; the service reads this URL (docs/providers.md).
        service._fcm_url = f"{config.url}/v1/projects/{config.project_id}/messages:send"
        # fanfare owns retries (push.retry + backoff): the client must not retry on its own.
        retry = HttpxRetry(max_retries=0)
        wrapper = _http_client.HttpxAsyncClient(
            credential=service._credential,
            timeout=timeout_s,
            retry_config=retry,
            http2=config.url.startswith("https://"),
        )
        if config.ca_file is not None:
            trust_private_ca(wrapper, service._credential, retry, config.ca_file, timeout_s)
        service._async_client = wrapper
        self._service = service
        self._url = config.url
        self._refresh_after = 0.0  # time.monotonic()

    def render(self, request: SendRequest) -> object:
        """A firebase_admin Message (size checked on the JSON FCM would get)."""
        m = self._messaging
        content = fcm_content(self._template, request)
        ttl = time_to_live_s(self._policy, request, time.time())
        return m.Message(
            token=request.item["token"],
            notification=m.Notification(title=content.title, body=content.body),
            data=content.data,
            android=m.AndroidConfig(collapse_key=content.collapse_key, priority="high", ttl=ttl),
        )

    def _answer(self, response: Any) -> ProviderAnswer:
        if response.success:
            return ProviderAnswer(200, None)
        exc = response.exception
        http = getattr(exc, "http_response", None)
        status = getattr(http, "status_code", None)
        code = fcm_reason(type(exc).__name__, str(getattr(exc, "code", "UNKNOWN")).upper())
        retry_after = None
        if http is not None:
            raw = http.headers.get("retry-after")
            if raw is not None and raw.strip().isdigit():
                retry_after = float(raw.strip())
        if status is None and code == "UNKNOWN":
            return ProviderAnswer(None, f"transport: {type(exc.cause).__name__}")
        return ProviderAnswer(status, code, retry_after, detail=str(exc)[:300])

    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        """send_each_async in chunks, a bounded number in flight.

        firebase-admin starts one request per message at once; with hundreds in flight httpx's
        connection pool spends its time rescanning its queue (1,500 at once all timed out
        here), so chunks of `_FCM_CHUNK` go one at a time: the fastest we measured (~265/s).
        """
        gate = asyncio.Semaphore(_FCM_PARALLEL_CHUNKS)
        chunks = [list(payloads[i : i + _FCM_CHUNK]) for i in range(0, len(payloads), _FCM_CHUNK)]

        async def one(chunk: list[object]) -> list[ProviderAnswer]:
            async with gate:
                try:
                    batch = await answered_within(
                        self._messaging.send_each_async(chunk, app=self._app), self._timeout
                    )
                except TimeoutError:
                    return [ProviderAnswer(None, "timeout")] * len(chunk)
                return [self._answer(r) for r in batch.responses]

        results = await asyncio.gather(*(one(c) for c in chunks))
        if time.monotonic() >= self._refresh_after:
            try:
                await self._fresh_token()  # between sends: no rate-limit token waits on it
            except Exception as exc:  # the next request tries itself; this, in a while
                self._refresh_after = time.monotonic() + _REFRESH_RETRY_S
                what = f"{type(exc).__name__}: {exc}"
                log.warning("FCM: renewing the OAuth token failed (%s)", what)
        return [a for chunk in results for a in chunk]

    async def _fresh_token(self) -> None:
        credential = self._service._credential
        if token_needs_refresh(credential, datetime.now(UTC).replace(tzinfo=None)):
            from google.auth.transport.requests import Request

            await asyncio.to_thread(credential.refresh, Request())

    async def warm_up(self) -> None:
        """Get an OAuth token and open the connection before the first send.

        Otherwise the first chunk pays for both after its rate-limit tokens were taken (measured
        against the local server: 170 ms, more than the send slack).
        """
        await self._fresh_token()
        client = self._service._async_client._async_client  # the httpx client, with our auth
        await client.get(f"{self._url}/", timeout=self._timeout)  # any answer will do (404)

    async def close(self) -> None:
        """Close the HTTP client on this loop, then delete the app.

        delete_app closes the async client with asyncio.run, which fails inside a running loop:
        close it here first (a closed httpx client closes again as a no-op), then delete the
        app from a thread with no loop.
        """
        import firebase_admin

        await self._service._async_client.aclose()
        await asyncio.to_thread(firebase_admin.delete_app, self._app)
