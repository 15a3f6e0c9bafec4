"""A local push service (RFC 8030) over TLS: VAPID checked, encrypted pushes recorded.

Endpoints are `https://localhost:PORT/push/{id}`. A push is `POST` with `TTL` (required),
`Content-Encoding: aes128gcm`, an encrypted body of at most 4,096 bytes and `Authorization:
vapid t=JWT, k=KEY` (RFC 8292): the JWT must be ES256, signed by that key, `aud` this origin,
`exp` in the next 24 hours. Answers: 201 with a `Location`; 400 without TTL; 401 for a bad
VAPID token; 413 over 4,096 bytes; 415 for another encoding; faults: `{"status": 410}` (the
subscription is gone), 404, 429 (with Retry-After) per subscription id, the rate limit (429),
an outage (503).

The control API mints subscriptions (`POST /webpush/subscriptions`: a P-256 key pair and an
auth secret, as a browser makes): pushes to those are decrypted (RFC 8291) and recorded in
clear too, which is how the tests see that what fanfare encrypted is what it meant to send.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from scripts.dev.local_channels.state import ChannelState
from scripts.dev.local_providers.http11 import Request, Response


def b64url(raw: bytes) -> str:
    """Base64url without padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    """Base64url, padding optional."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Minted:
    """A subscription the control API made: its keys, so pushes to it can be decrypted."""

    private_key: ec.EllipticCurvePrivateKey
    auth: bytes


def parse_vapid(header: str) -> tuple[str, str] | None:
    """(jwt, key) of `vapid t=..., k=...`; None when it is not one."""
    scheme, _, rest = header.partition(" ")
    if scheme.lower() != "vapid":
        return None
    fields = {}
    for part in rest.split(","):
        name, _, value = part.strip().partition("=")
        fields[name.strip()] = value.strip()
    if "t" not in fields or "k" not in fields:
        return None
    return fields["t"], fields["k"]


class WebPushServer:
    """The push service: one origin, subscriptions by id."""

    def __init__(self, state: ChannelState) -> None:
        self.state = state
        self.origin = ""  # https://localhost:PORT, set once listening
        self.minted: dict[str, Minted] = {}
        self._keys: dict[str, Any] = {}

    def mint(self) -> dict[str, Any]:
        """A new subscription, as a browser's PushSubscription.toJSON() gives it."""
        key = ec.generate_private_key(ec.SECP256R1())
        auth = secrets.token_bytes(16)
        sub_id = secrets.token_urlsafe(16)
        self.minted[sub_id] = Minted(key, auth)
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return {
            "id": sub_id,
            "subscription": {
                "endpoint": f"{self.origin}/push/{sub_id}",
                "expirationTime": None,
                "keys": {"p256dh": b64url(point), "auth": b64url(auth)},
            },
        }

    def _vapid_ok(self, header: bytes | None) -> str | None:
        """None when the VAPID authorization is valid, else why not."""
        parsed = parse_vapid((header or b"").decode("latin-1"))
        if parsed is None:
            return "missing or malformed VAPID authorization"
        token, key = parsed
        public = self._keys.get(key)
        if public is None:
            try:
                public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(key))
            except ValueError:
                return "k is not a P-256 public key"
            self._keys[key] = public
        try:
            claims = jwt.decode(
                token,
                public,
                algorithms=["ES256"],
                audience=self.origin,
                options={"require": ["exp"]},
            )
        except jwt.PyJWTError as exc:
            return f"VAPID token: {exc}"
        if claims["exp"] > time.time() + 86_400:
            return "VAPID token: exp more than 24 hours ahead"
        if not str(claims.get("sub", "")).startswith(("mailto:", "https:")):
            return "VAPID token: sub must be a mailto: or https: contact"
        return None

    def handle(self, req: Request) -> Response:
        """Route one request."""
        if req.method != b"POST" or not req.path.startswith("/push/"):
            return Response(404, b'{"error":"not found"}')
        state = self.state
        state.requests += 1
        sub_id = req.path.removeprefix("/push/")
        faults = state.faults
        if faults.outage(time.monotonic()):
            state.reject("outage")
            return Response(faults.outage_status, b'{"error":"unavailable"}')
        problem = self._vapid_ok(req.headers.get(b"authorization"))
        if problem is not None:
            state.reject("401")
            return Response(401, json.dumps({"error": problem}).encode())
        if b"ttl" not in req.headers or not req.headers[b"ttl"].isdigit():
            state.reject("400")
            return Response(400, b'{"error":"TTL header required"}')
        if req.headers.get(b"content-encoding", b"").lower() != b"aes128gcm":
            state.reject("415")
            return Response(415, b'{"error":"Content-Encoding must be aes128gcm"}')
        if len(req.body) > 4096:
            state.reject("413")
            return Response(413, b'{"error":"payload too large"}')
        fault = faults.address_errors.get(sub_id)
        if fault is not None:
            status = int(fault.get("status", 410))
            state.reject(str(status))
            headers: tuple[tuple[bytes, bytes], ...] = ()
            if status == 429:
                headers = ((b"retry-after", str(fault.get("retry_after_s", 1)).encode()),)
            return Response(status, json.dumps({"errno": status}).encode(), headers)
        if state.limited():
            state.reject("429")
            retry = str(faults.rate_limit.retry_after_s if faults.rate_limit else 1).encode()
            return Response(429, b'{"error":"too many requests"}', ((b"retry-after", retry),))
        message_id = secrets.token_urlsafe(12)
        record: dict[str, Any] = {
            "subscription_id": sub_id,
            "message_id": message_id,
            "ttl": int(req.headers[b"ttl"]),
            "urgency": req.headers.get(b"urgency", b"normal").decode(),
            "topic": req.headers.get(b"topic", b"").decode() or None,
            "size": len(req.body),
            "payload": None,
        }
        minted = self.minted.get(sub_id)
        if minted is not None:
            import http_ece

            plain = http_ece.decrypt(
                req.body,
                private_key=minted.private_key,
                auth_secret=minted.auth,
                version="aes128gcm",
            )
            record["payload"] = json.loads(plain)
        # The Topic replaces an undelivered push with the same one (RFC 8030 5.4): per
        # subscription, a resend of the same notification carries the same Topic.
        topic = record["topic"]
        state.record(record, key=f"{sub_id} {topic}" if topic else None)
        location = f"{self.origin}/m/{message_id}".encode()
        return Response(201, b"", ((b"location", location),), delay_s=faults.latency_s)
