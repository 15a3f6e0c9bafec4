"""Web push (RFC 8030) with VAPID (RFC 8292) and aes128gcm (RFC 8291), behind `PushSender`.

A browser subscribes with the VAPID public key (`GET /v1/webpush/key` on `fanfare api`) and
registers its subscription through the devices endpoint (platform `web`). A send encrypts the
notification's JSON for the subscription's keys (pywebpush, aes128gcm: an ephemeral ECDH key
per message, about 0.15 ms of CPU) and POSTs it (aiohttp) to the endpoint with `TTL`,
`Urgency` (high for transactional, normal for social, low for marketing), `Topic` (the
collapse key's digest: a newer push replaces an undelivered one) and `Authorization: vapid
t=JWT, k=KEY` (an ES256 JWT per push service origin, reused for 12 hours).

Answers: 201 accepted; 404 and 410 say the subscription is gone (`invalid_token`: the engine
deactivates it); 429 (Retry-After) and 5xx are retried; 401 (our VAPID token refused) is
retried; 400, 403 (the subscription was made with another VAPID key) and 413 fail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from operators.adapters.channels.content import ChannelRenderer
from operators.adapters.channels.http import HostGuard, HttpClient
from operators.adapters.providers.config import ProviderConfigError
from operators.delivery.model import ProviderAnswer, RetryPolicy, SendRequest
from operators.delivery.payloads import PayloadTooLarge, time_to_live_s
from operators.delivery.ports import PushSender
from operators.delivery.token_bucket import BucketSpec
from schemas.addresses import subscription_parts

MAX_PLAINTEXT = 3993
"""RFC 8291: 4096 bytes of record, less the header (86) and the padding delimiter and tag (17)."""
JWT_LIFETIME_S = 12 * 3600
URGENCY = {"transactional": "high", "social": "normal", "marketing": "low"}


@dataclass(frozen=True, slots=True)
class WebPushConfig:
    """The VAPID key and contact, and where to trust certificates from."""

    vapid_key_file: Path
    subject: str
    ca_file: Path | None
    allow_dev: bool


@dataclass(frozen=True, slots=True)
class RenderedPush:
    """A push before encryption: the endpoint, the keys, the JSON and its headers."""

    endpoint: str
    p256dh: str
    auth: str
    data: bytes
    headers: dict[str, str]


def load_vapid(key_file: Path) -> Any:
    """The VAPID key of a PEM file (py_vapid's from_file would make a new key if it is missing).

    ProviderConfigError says which file and why, never what is in it.
    """
    from py_vapid import Vapid02

    try:
        return Vapid02.from_pem(key_file.read_bytes())
    except Exception as exc:  # OSError, or py_vapid's own for a key it cannot read
        raise ProviderConfigError(
            f"FANFARE_WEBPUSH_VAPID_KEY_FILE={key_file}: not a readable PEM P-256 private key "
            f"({type(exc).__name__})"
        ) from None


def vapid_public_key(key_file: Path) -> str:
    """The application server key browsers subscribe with (base64url, uncompressed point)."""
    from cryptography.hazmat.primitives import serialization
    from py_vapid import b64urlencode

    raw = load_vapid(key_file).public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return str(b64urlencode(raw))


class VapidWebPushSender(PushSender):
    """pywebpush's encryption and py_vapid's signatures, sent with aiohttp."""

    provider = "webpush"

    def __init__(
        self,
        config: WebPushConfig,
        renderer: ChannelRenderer,
        bucket: BucketSpec,
        policy: RetryPolicy,
        timeout_s: float,
    ) -> None:
        self.bucket = bucket
        self._config = config
        self._renderer = renderer
        self._policy = policy
        self._vapid = load_vapid(config.vapid_key_file)
        self._vapid_headers: dict[str, tuple[float, str]] = {}
        self._client = HttpClient(timeout_s, config.ca_file, connections=64)
        self.concurrency = self._client.connections
        self._guard = HostGuard(config.allow_dev)

    def _authorization(self, endpoint: str) -> str:
        parts = urlsplit(endpoint)
        origin = f"{parts.scheme}://{parts.netloc}"
        now = time.time()
        cached = self._vapid_headers.get(origin)
        if cached is not None and cached[0] > now + 3600:
            return cached[1]
        expires = int(now) + JWT_LIFETIME_S
        claims = {"aud": origin, "exp": expires, "sub": self._config.subject}
        header = str(self._vapid.sign(claims)["Authorization"])
        self._vapid_headers[origin] = (expires, header)
        return header

    def render(self, request: SendRequest) -> object:
        """The JSON the service worker gets, and the headers; PayloadTooLarge past 3,993 B."""
        content = self._renderer.content(request, limit=MAX_PLAINTEXT - 512)
        endpoint, p256dh, auth = subscription_parts(request.item["token"])
        data = orjson.dumps(
            {
                "notification_id": content.notification_id,
                "category": content.category,
                "title": content.title,
                "body": content.body,
                "link": content.link,
                "tag": content.tag,
            }
        )
        if len(data) > MAX_PLAINTEXT:
            raise PayloadTooLarge(f"web push is {len(data)} bytes (limit {MAX_PLAINTEXT})")
        headers = {
            "TTL": str(time_to_live_s(self._policy, request, time.time())),
            "Urgency": URGENCY.get(content.tier, "normal"),
            "Topic": content.tag[:32],
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
        }
        return RenderedPush(endpoint, p256dh, auth, data, headers)

    def _encrypt(self, push: RenderedPush) -> bytes:
        from pywebpush import WebPusher

        keys = {"p256dh": push.p256dh, "auth": push.auth}
        subscription = {"endpoint": push.endpoint, "keys": keys}
        body: bytes = WebPusher(subscription).encode(push.data, "aes128gcm")["body"]
        return body

    async def _send_one(self, push: RenderedPush, lane: str) -> ProviderAnswer:
        refusal = await self._guard.refusal(push.endpoint)
        if refusal is not None:
            return ProviderAnswer(400, "endpoint_not_public", detail=refusal)
        headers = {**push.headers, "Authorization": self._authorization(push.endpoint)}
        reply = await self._client.post(
            push.endpoint, data=self._encrypt(push), headers=headers, lane=lane
        )
        if isinstance(reply, ProviderAnswer):
            return reply
        if 200 <= reply.status < 300:
            return ProviderAnswer(reply.status, None)
        return ProviderAnswer(
            reply.status, None, reply.retry_after_s, detail=reply.text[:300] or None
        )

    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        """Every push at once (each to its own push service endpoint)."""
        return list(
            await asyncio.gather(
                *(
                    self._send_one(p, r.lane)  # type: ignore[arg-type]
                    for r, p in zip(requests, payloads, strict=True)
                )
            )
        )

    async def close(self) -> None:
        """Close the connections."""
        await self._client.close()
