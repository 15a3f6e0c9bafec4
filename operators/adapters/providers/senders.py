"""APNs (aioapns) and FCM (firebase-admin) behind the engine's `PushSender` port.

Each worker builds its own clients on its own event loop (aioapns insists on a running loop).
Retries belong to fanfare (`push.retry` with backoff), so the libraries' own are turned off
where they have any, and every send is bounded by a timeout (aioapns has none of its own).

Credentials come from files named in configuration; their contents are never logged and never
put in events. On the embedded stack, with no credentials configured, the local provider
servers started by `fanfare dev up` are used (their `providers.json`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from operators.adapters.redis.rate_limiter import BucketSpec
from operators.config import Settings
from operators.delivery.engine import LoopRunner, PushSender
from operators.delivery.model import ProviderAnswer, RetryPolicy, SendRequest
from operators.delivery.payloads import PushTemplate, apns_payload, collapse_id, fcm_content

log = logging.getLogger(__name__)
T = TypeVar("T")


class ProviderConfigError(RuntimeError):
    """Provider credentials are missing or unusable; the message says what to set."""


@dataclass(frozen=True, slots=True)
class ApnsConfig:
    """Where and how to reach APNs."""

    host: str
    port: int
    key_file: Path
    key_id: str
    team_id: str
    topic: str
    ca_file: Path | None


@dataclass(frozen=True, slots=True)
class FcmConfig:
    """Where and how to reach FCM."""

    url: str
    credentials_file: Path
    project_id: str
    ca_file: Path | None = None  # a private CA (the local server); None = the system's


def _local_providers(settings: Settings) -> dict[str, Any] | None:
    path = settings.local_providers_dir / "providers.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def apns_config(settings: Settings) -> ApnsConfig | None:
    """APNs from FANFARE_APNS_*, else the local server; None when neither is there."""
    if settings.apns_key_file:
        missing = [
            name
            for name, value in (
                ("FANFARE_APNS_KEY_ID", settings.apns_key_id),
                ("FANFARE_APNS_TEAM_ID", settings.apns_team_id),
                ("FANFARE_APNS_TOPIC", settings.apns_topic),
            )
            if not value
        ]
        if missing:
            raise ProviderConfigError(f"FANFARE_APNS_KEY_FILE is set but {', '.join(missing)} not")
        return ApnsConfig(
            settings.apns_host,
            settings.apns_port,
            Path(settings.apns_key_file),
            settings.apns_key_id,
            settings.apns_team_id,
            settings.apns_topic,
            Path(settings.apns_ca_file) if settings.apns_ca_file else None,
        )
    local = _local_providers(settings)
    if local is None:
        return None
    a = local["apns"]
    return ApnsConfig(
        a["host"],
        int(a["port"]),
        Path(a["key_file"]),
        a["key_id"],
        a["team_id"],
        a["topic"],
        Path(a["ca_file"]),
    )


def fcm_config(settings: Settings) -> FcmConfig | None:
    """FCM from FANFARE_FCM_*, else the local server; None when neither is there."""
    if settings.fcm_credentials_file:
        path = Path(settings.fcm_credentials_file)
        try:
            project = json.loads(path.read_text())["project_id"]
        except (OSError, ValueError, KeyError) as exc:
            # Say which file and why, never what is in it.
            raise ProviderConfigError(
                f"FANFARE_FCM_CREDENTIALS_FILE={path}: not a service-account JSON with a "
                f"project_id ({type(exc).__name__})"
            ) from None
        return FcmConfig(settings.fcm_url.rstrip("/"), path, project)
    local = _local_providers(settings)
    if local is None:
        return None
    f = local["fcm"]
    # Its TLS endpoint speaks HTTP/2 as FCM does (about twice the sends/s of HTTP/1.1 here).
    url, ca = (f["https_url"], Path(f["ca_file"])) if f.get("https_url") else (f["url"], None)
    return FcmConfig(url.rstrip("/"), Path(f["credentials_file"]), f["project_id"], ca)


class EventLoopThread(LoopRunner):
    """A worker's event loop on a daemon thread; the worker waits on its futures."""

    def __init__(self, name: str = "delivery-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run on the loop; block this (worker) thread until done."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result()

    def stop(self) -> None:
        """Stop the loop."""
        self.loop.call_soon_threadsafe(self.loop.stop)


def window_acking_protocol(base: type[Any]) -> type[Any]:
    """Aioapns' protocol, handing back HTTP/2 receive window for the bodies it reads.

    aioapns never acknowledges received DATA, so a connection's 64 KiB receive window is used
    up by error bodies (~30-60 bytes each): after about 1,500 errors on one connection every
    further error answer waits forever (a burst of 410s would stall delivery). Found against
    the local APNs server; real APNs enforces the same flow control.
    """

    class WindowAckingProtocol(base):  # type: ignore[misc]
        def on_data_received(self, data: bytes, stream_id: int) -> None:
            self.conn.acknowledge_received_data(len(data), stream_id)
            super().on_data_received(data, stream_id)

    return WindowAckingProtocol


def _ttl_s(policy: RetryPolicy, request: SendRequest, now: float) -> int:
    """apns-expiration: APNs keeps it for an offline device only while it is worth showing."""
    return max(1, int(policy.max_age_s - (now - request.created_ts)))


class ApnsSender(PushSender):
    """aioapns with token auth, pointed at `config.host:port`."""

    provider = "apns"

    def __init__(
        self,
        config: ApnsConfig,
        template: PushTemplate,
        bucket: BucketSpec,
        policy: RetryPolicy,
        timeout_s: float,
    ) -> None:
        # Must run on the event loop: aioapns binds its pool to the running loop.
        from aioapns import APNs
        from aioapns.connection import APNsProductionClientProtocol

        self.bucket = bucket
        self._template = template
        self._policy = policy
        self._timeout = timeout_s
        self._topic = config.topic
        try:
            key = config.key_file.read_text()
        except OSError as exc:
            raise ProviderConfigError(
                f"cannot read the APNs key {config.key_file}: {exc}"
            ) from None
        context = ssl.create_default_context()
        if config.ca_file is not None:
            context.load_verify_locations(cafile=str(config.ca_file))

        async def quiet(_request: object, _result: object) -> None:
            return None  # outcomes are recorded as events; the default logs every error

        self._client = APNs(
            key=key,
            key_id=config.key_id,
            team_id=config.team_id,
            topic=config.topic,
            use_sandbox=False,
            ssl_context=context,
            err_func=quiet,
        )
        # aioapns has no host setting: its protocol class carries it (PROVIDERS.md).
        self._client.pool.protocol_class = type(
            "FanfareApnsProtocol",
            (window_acking_protocol(APNsProductionClientProtocol),),
            {"APNS_SERVER": config.host, "APNS_PORT": config.port},
        )

    def render(self, request: SendRequest) -> object:
        """The JSON payload (aioapns encodes it; size checked on our encoding)."""
        return apns_payload(self._template, request)

    async def _send_one(self, request: SendRequest, payload: object, now: float) -> ProviderAnswer:
        from aioapns import NotificationRequest, PushType

        notification = NotificationRequest(
            device_token=request.item["token"],
            message=payload,  # type: ignore[arg-type]
            notification_id=request.apns_id,
            time_to_live=_ttl_s(self._policy, request, now),
            priority=10,
            collapse_key=collapse_id(request.post_id),
            push_type=PushType.ALERT,
        )
        try:
            result = await asyncio.wait_for(
                self._client.send_notification(notification), self._timeout
            )
        except TimeoutError:
            return ProviderAnswer(None, "timeout")
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            return ProviderAnswer(None, f"connection: {type(exc).__name__}")
        except Exception as exc:  # aioapns raises its own (e.g. MaxAttemptsExceeded)
            return ProviderAnswer(None, f"client: {type(exc).__name__}")
        status = int(result.status) if str(result.status).isdigit() else None
        reason = None if result.is_successful else (result.description or None)
        return ProviderAnswer(status, reason)

    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        """One HTTP/2 stream per send, all at once (the pool multiplexes them)."""
        now = time.time()
        return list(
            await asyncio.gather(
                *(self._send_one(r, p, now) for r, p in zip(requests, payloads, strict=True))
            )
        )


_FCM_CHUNK = 50
_FCM_PARALLEL_CHUNKS = 1
_FCM_ERRORS = {
    "UnregisteredError": "UNREGISTERED",
    "SenderIdMismatchError": "SENDER_ID_MISMATCH",
    "QuotaExceededError": "QUOTA_EXCEEDED",
    "UnavailableError": "UNAVAILABLE",
    "InternalError": "INTERNAL",
    "InvalidArgumentError": "INVALID_ARGUMENT",
    "ThirdPartyAuthError": "THIRD_PARTY_AUTH_ERROR",
}


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

    def __init__(
        self,
        config: FcmConfig,
        template: PushTemplate,
        bucket: BucketSpec,
        policy: RetryPolicy,
        timeout_s: float,
        app_name: str,
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
        self._app = firebase_admin.initialize_app(
            cred, {"projectId": config.project_id, "httpTimeout": timeout_s}, name=app_name
        )
        service = messaging._get_messaging_service(self._app)
        # No endpoint setting exists for messaging; the service reads this URL (PROVIDERS.md).
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

    def render(self, request: SendRequest) -> object:
        """A firebase_admin Message (size checked on the JSON FCM would get)."""
        m = self._messaging
        content = fcm_content(self._template, request)
        ttl = _ttl_s(self._policy, request, time.time())
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
        code = _FCM_ERRORS.get(type(exc).__name__)
        if code is None:
            code = str(getattr(exc, "code", "UNKNOWN")).upper()
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
                    batch = await asyncio.wait_for(
                        self._messaging.send_each_async(chunk, app=self._app), self._timeout
                    )
                except TimeoutError:
                    return [ProviderAnswer(None, "timeout")] * len(chunk)
                return [self._answer(r) for r in batch.responses]

        results = await asyncio.gather(*(one(c) for c in chunks))
        return [a for chunk in results for a in chunk]

    async def close(self) -> None:
        """Close the HTTP client on this loop, then delete the app.

        delete_app closes the async client with asyncio.run, which fails inside a running loop:
        close it here first (a closed httpx client closes again as a no-op), then delete the
        app from a thread with no loop.
        """
        import firebase_admin

        await self._service._async_client.aclose()
        await asyncio.to_thread(firebase_admin.delete_app, self._app)
