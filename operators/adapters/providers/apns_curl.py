"""APNs over HTTP/2 on libcurl (pycurl's multi interface), behind the engine's `PushSender` port.

The default APNs client (FANFARE_APNS_CLIENT=curl): the same requests and answers as the aioapns
sender (`apns.py`), at a fraction of its CPU (docs/providers.md). Each worker builds its own on
its event loop. Token auth: an ES256 provider token (JWT) signed with the .p8 key, made again
every 30 minutes (APNs refuses one older than an hour, and a change more often than every 20
minutes), or after an ExpiredProviderToken answer if the token is older than 20 minutes.
Retries belong to fanfare (`push.retry`); each request has FANFARE_SEND_TIMEOUT_MS. The key comes
from a file and is never logged.

Connection loss: a GOAWAY's streams the server did not process are sent again by libcurl on a
new connection (the server never saw them); a request whose connection broke before its answer
came is answered `connection: ...` (transient: fanfare retries it with the same apns-id, which
APNs' protocol allows).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import cast

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from operators.adapters.providers.config import ApnsConfig, ProviderConfigError
from operators.adapters.providers.curl_multi import CurlAnswer, CurlMulti, CurlTarget
from operators.delivery.model import ProviderAnswer, RetryPolicy, SendRequest
from operators.delivery.payloads import (
    PushSource,
    apns_body,
    push_collapse_id,
    time_to_live_s,
)
from operators.delivery.ports import PushSender
from operators.delivery.token_bucket import BucketSpec

TOKEN_TTL_S = 30 * 60
"""A provider token is made again after this long (APNs: younger than 60 min, and changed at
most every 20 min)."""
TOKEN_MIN_AGE_S = 20 * 60
"""An ExpiredProviderToken answer renews the token only if it is at least this old."""


class ProviderToken:
    """The ES256 provider token (JWT) of an APNs key, renewed every `ttl_s`."""

    def __init__(
        self,
        key_pem: str,
        key_id: str,
        team_id: str,
        *,
        ttl_s: float = TOKEN_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        try:
            key = load_pem_private_key(key_pem.encode(), password=None)
        except (ValueError, TypeError):
            raise ProviderConfigError("the APNs key is not a PEM private key (.p8)") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ProviderConfigError("the APNs key is not an EC (ES256) key")
        self._key = key
        self._key_id = key_id
        self._team_id = team_id
        self._ttl = ttl_s
        self._clock = clock
        self._issued_at = 0.0
        self._header = ""

    @property
    def header(self) -> str:
        """`authorization: bearer <jwt>`, renewed when due."""
        now = self._clock()
        if not self._header or now - self._issued_at >= self._ttl:
            self._issued_at = now
            token = jwt.encode(
                {"iss": self._team_id, "iat": int(now)},
                self._key,
                algorithm="ES256",
                headers={"kid": self._key_id},
            )
            self._header = f"authorization: bearer {token}"
        return self._header

    def expired(self) -> None:
        """APNs said the token expired: renew it, unless that would be too soon."""
        if self._clock() - self._issued_at >= TOKEN_MIN_AGE_S:
            self._header = ""


_ACCEPTED = ProviderAnswer(200, None)


def apns_answer(answer: CurlAnswer) -> ProviderAnswer:
    """An HTTP answer (or transport failure) as the engine classifies it, as aioapns reports it."""
    status = answer.status
    if status is None:
        return ProviderAnswer(None, answer.error or "connection: unknown")
    if status == 200:
        return _ACCEPTED
    reason = answer.json_object().get("reason")
    return ProviderAnswer(status, reason if isinstance(reason, str) else None, answer.retry_after_s)


class ApnsCurlSender(PushSender):
    """APNs token auth over libcurl's HTTP/2, pointed at `config.host:port`."""

    provider = "apns"

    def __init__(
        self,
        config: ApnsConfig,
        template: PushSource,
        bucket: BucketSpec,
        policy: RetryPolicy,
        timeout_s: float,
        *,
        connections: int = 4,
        streams_per_connection: int = 500,
    ) -> None:
        self.bucket = bucket
        self._template = template
        self._policy = policy
        try:
            key = config.key_file.read_text()
        except OSError as exc:
            raise ProviderConfigError(
                f"cannot read the APNs key {config.key_file}: {exc}"
            ) from None
        self._token = ProviderToken(key, config.key_id, config.team_id)
        self._base = f"https://{config.host}:{config.port}"
        self._device_url = f"{self._base}/3/device/"
        self._static = [
            f"apns-topic: {config.topic}",
            "apns-push-type: alert",
            "apns-priority: 10",
        ]
        self._target = CurlTarget(
            ca_file=str(config.ca_file) if config.ca_file is not None else None,
            max_connections=connections,
            streams_per_connection=streams_per_connection,
            timeout_s=timeout_s,
            connect_timeout_s=timeout_s,
        )
        self._multi: CurlMulti | None = None

    def _client(self) -> CurlMulti:
        if self._multi is None:
            self._multi = CurlMulti(self._target)
        return self._multi

    async def warm_up(self) -> None:
        """Sign the provider token and open a connection, sending nothing."""
        await self._client().preconnect(f"{self._base}/", [self._token.header, *self._static])

    def render(self, request: SendRequest) -> object:
        """The JSON body (compact, size checked as sent)."""
        return apns_body(self._template, request)

    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        """One HTTP/2 stream per request, all at once."""
        multi = self._client()
        now = time.time()
        auth = self._token.header
        static = self._static
        url = self._device_url
        policy = self._policy
        batch = []
        for r, body in zip(requests, payloads, strict=True):
            headers = [
                auth,
                *static,
                f"apns-id: {r.apns_id}",
                f"apns-expiration: {int(now) + time_to_live_s(policy, r, now)}",
                f"apns-collapse-id: {push_collapse_id(r)}",
            ]
            batch.append((url + r.item["token"], headers, cast(bytes, body)))
        answers = [apns_answer(a) for a in await multi.send_all(batch)]
        if any(a.reason == "ExpiredProviderToken" for a in answers):
            self._token.expired()
        return answers

    async def close(self) -> None:
        """Close the connections."""
        if self._multi is not None:
            self._multi.close()
            self._multi = None
