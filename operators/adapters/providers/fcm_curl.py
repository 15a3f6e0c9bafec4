"""FCM HTTP v1 on libcurl's HTTP/2 (pycurl's multi interface), behind the engine's `PushSender`.

The default FCM client (FANFARE_FCM_CLIENT=curl): the requests firebase-admin would make
(`messages:send`, one per push, as `send_each_async` does) and its answers read as the
firebase-admin sender (`fcm.py`) reports them, at a fraction of the CPU: every push is its own
HTTP/2 stream, all of a grant's at once. The OAuth token comes from firebase-admin's credentials
(the service-account file); google-auth fetches it with a blocking call, so it runs in a thread,
before the first send (`warm_up`) and again in the background once the token is within
`REFRESH_BEFORE` of expiry, while sends go on with the old one. A 401 marks the token for
renewal. The service account comes from a file and is never logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

from operators.adapters.providers.config import FcmConfig, ProviderConfigError
from operators.adapters.providers.curl_multi import CurlAnswer, CurlMulti, CurlTarget
from operators.adapters.providers.fcm import token_needs_refresh
from operators.adapters.providers.fcm_errors import FCM_ERROR_CLASSES, fcm_reason
from operators.delivery.model import ProviderAnswer, RetryPolicy, SendRequest
from operators.delivery.payloads import PushSource, fcm_body, time_to_live_s
from operators.delivery.ports import PushSender
from operators.delivery.token_bucket import BucketSpec

log = logging.getLogger(__name__)

_REFRESH_RETRY_S = 30.0
_FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
# Google's platform codes firebase-admin knows (anything else is UNKNOWN), and its code per HTTP
# status when an error body names none.
_PLATFORM_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "NOT_FOUND",
        "ABORTED",
        "ALREADY_EXISTS",
        "CONFLICT",
        "RESOURCE_EXHAUSTED",
        "CANCELLED",
        "DATA_LOSS",
        "UNKNOWN",
        "INTERNAL",
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
    }
)
_STATUS_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "CONFLICT",
    412: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


_ACCEPTED = ProviderAnswer(200, None)


def fcm_answer(answer: CurlAnswer) -> ProviderAnswer:
    """An HTTP answer (or transport failure) as the firebase-admin sender reports it."""
    status = answer.status
    if status is None:
        return ProviderAnswer(None, f"transport: {answer.error or 'unknown'}")
    if 200 <= status < 300:
        return _ACCEPTED
    error = answer.json_object().get("error")
    if not isinstance(error, dict):
        error = {}
    message = error.get("message") or (
        f"Unexpected HTTP response with status: {status}; "
        f"body: {answer.body.decode('utf-8', 'replace')}"
    )
    fcm_code = None
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and detail.get("@type") == _FCM_ERROR:
            fcm_code = detail.get("errorCode")
            break
    named = error.get("status")
    if named:
        platform = named if named in _PLATFORM_CODES else "UNKNOWN"
    else:
        platform = _STATUS_CODES.get(status, "UNKNOWN")
    error_class = FCM_ERROR_CLASSES.get(fcm_code) if isinstance(fcm_code, str) else None
    code = fcm_reason(error_class, platform)
    return ProviderAnswer(status, code, answer.retry_after_s, detail=str(message)[:300])


class FcmCurlSender(PushSender):
    """FCM v1 `messages:send`, one HTTP/2 stream per push, OAuth from the service account."""

    provider = "fcm"

    def __init__(
        self,
        config: FcmConfig,
        template: PushSource,
        bucket: BucketSpec,
        policy: RetryPolicy,
        timeout_s: float,
        *,
        connections: int = 4,
        streams_per_connection: int = 500,
    ) -> None:
        from firebase_admin import __version__, credentials

        self.bucket = bucket
        self._template = template
        self._policy = policy
        try:
            certificate = credentials.Certificate(str(config.credentials_file))
        except (OSError, ValueError) as exc:
            raise ProviderConfigError(
                f"cannot load the FCM service account {config.credentials_file} "
                f"({type(exc).__name__})"
            ) from None
        self._credential = certificate.get_credential()
        self._base = config.url
        self._url = f"{config.url}/v1/projects/{config.project_id}/messages:send"
        self._static = [
            "content-type: application/json; charset=utf-8",
            "x-goog-api-format-version: 2",
            f"x-firebase-client: fire-admin-python/{__version__}",
        ]
        self._target = CurlTarget(
            ca_file=str(config.ca_file) if config.ca_file is not None else None,
            http2=config.url.startswith("https://"),
            max_connections=connections,
            streams_per_connection=streams_per_connection,
            timeout_s=timeout_s,
            connect_timeout_s=timeout_s,
        )
        self._multi: CurlMulti | None = None
        self._auth = ""
        self._refreshing: asyncio.Task[None] | None = None
        self._refresh_after = 0.0  # time.monotonic(): after a failed renewal, wait

    def _client(self) -> CurlMulti:
        if self._multi is None:
            self._multi = CurlMulti(self._target)
        return self._multi

    async def _renew(self) -> None:
        from google.auth.transport.requests import Request

        credential = self._credential
        try:
            await asyncio.to_thread(credential.refresh, Request())
        except Exception as exc:  # the next send tries again, in a while
            self._refresh_after = time.monotonic() + _REFRESH_RETRY_S
            log.warning("FCM: renewing the OAuth token failed (%s: %s)", type(exc).__name__, exc)
            return
        self._auth = f"authorization: Bearer {credential.token}"

    def _renew_in_background(self) -> None:
        if (self._refreshing is None or self._refreshing.done()) and (
            time.monotonic() >= self._refresh_after
        ):
            self._refreshing = asyncio.get_running_loop().create_task(self._renew())

    async def _authorization(self) -> str:
        """The bearer header: renewed in the background before it expires, never in a send."""
        if token_needs_refresh(self._credential, datetime.now(UTC).replace(tzinfo=None)):
            self._renew_in_background()
        if not self._auth:  # no token at all: nothing can be sent without one
            if self._refreshing is not None:
                await self._refreshing
            if not self._auth:
                await self._renew()
        return self._auth

    async def warm_up(self) -> None:
        """Get an OAuth token and open the connection before the first send, sending nothing."""
        await self._renew()
        if not self._auth:
            raise ConnectionError("FCM: no OAuth token (see the warning above)")
        await self._client().preconnect(f"{self._base}/", [self._auth, *self._static])

    def render(self, request: SendRequest) -> object:
        """The `messages:send` body (size checked as FCM counts the message)."""
        ttl = time_to_live_s(self._policy, request, time.time())
        return fcm_body(self._template, request, ttl)

    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        """One HTTP/2 stream per push, all at once."""
        auth = await self._authorization()
        if not auth:
            return [ProviderAnswer(None, "transport: no OAuth token")] * len(requests)
        multi = self._client()
        headers = [auth, *self._static]
        url = self._url
        answers = [
            fcm_answer(a)
            for a in await multi.send_all([(url, headers, cast(bytes, body)) for body in payloads])
        ]
        if any(a.reason == "UNAUTHENTICATED" for a in answers):
            self._auth_rejected()
        return answers

    def _auth_rejected(self) -> None:
        """FCM refused the token (UNAUTHENTICATED): renew it (in the background)."""
        self._credential.expiry = None
        self._renew_in_background()

    async def close(self) -> None:
        """Close the connections."""
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self._multi is not None:
            self._multi.close()
            self._multi = None
