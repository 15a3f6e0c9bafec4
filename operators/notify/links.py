"""Signed links: one-click unsubscribe tokens and browsers' live-stream tokens.

A token is `PAYLOAD.TAG`: the payload is compact JSON in base64url (who it is for, what it
allows, when it was issued), the tag an HMAC-SHA256 of the purpose and the payload under the
key in FANFARE_LINK_SECRET_FILE. The purpose is inside the MAC, so a stream token is never an
unsubscribe token. Nothing is stored: any API process checks a token with the key alone, and a
token cannot be forged or altered without it. Tokens expire (`ttl_s`); to revoke every token
at once, change the key.

- An unsubscribe token names (user, category): the `List-Unsubscribe` URL of an email, whose
  one-click POST (RFC 8058) turns that category off for that user. It must keep working long
  after the message left (RFC 8058 asks for no login; the CAN-SPAM Act for at least 30 days).
- A stream token names a user: the browser's `EventSource` cannot send an API key (and must
  never hold one), so the app's backend asks the API for a short-lived token and hands it to
  the page, which reads `/v1/users/{id}/notifications/stream?access_token=...`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

UNSUBSCRIBE = "unsubscribe"
STREAM = "stream"
MIN_SECRET_BYTES = 32
MAX_TOKEN = 1024


class InvalidLink(ValueError):
    """A token that is malformed, forged, for another purpose or expired; `code` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _tag(secret: bytes, purpose: str, payload: str) -> str:
    mac = hmac.new(secret, f"fanfare-link/{purpose}/{payload}".encode(), hashlib.sha256)
    return _b64(mac.digest())


def sign(secret: bytes, purpose: str, claims: dict[str, Any], issued_at: float) -> str:
    """A token for `purpose` carrying `claims` (short keys, JSON values)."""
    body = json.dumps({**claims, "t": int(issued_at)}, separators=(",", ":"), sort_keys=True)
    payload = _b64(body.encode())
    return f"{payload}.{_tag(secret, purpose, payload)}"


def verify(secret: bytes, purpose: str, token: str, now: float, ttl_s: float) -> dict[str, Any]:
    """The claims of a valid, unexpired token for `purpose`; InvalidLink otherwise."""
    if len(token) > MAX_TOKEN or token.count(".") != 1:
        raise InvalidLink("invalid_token", "the link is not one fanfare made")
    payload, tag = token.split(".")
    if not hmac.compare_digest(tag, _tag(secret, purpose, payload)):
        raise InvalidLink("invalid_token", "the link is not one fanfare made (or was altered)")
    try:
        claims: dict[str, Any] = json.loads(_unb64(payload))
        issued = float(claims.pop("t"))
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidLink("invalid_token", "the link is not one fanfare made") from None
    if now - issued > ttl_s:
        raise InvalidLink("expired_token", "the link has expired")
    if issued - now > 300:
        raise InvalidLink("invalid_token", "the link was issued in the future")
    return claims


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """What an unsubscribe link turns off: one category for one user."""

    user_id: str
    category: str


def unsubscribe_token(secret: bytes, user_id: str, category: str, now: float) -> str:
    """The token of an email's one-click unsubscribe URL."""
    return sign(secret, UNSUBSCRIBE, {"u": user_id, "c": category}, now)


def read_unsubscribe(secret: bytes, token: str, now: float, ttl_s: float) -> Unsubscribe:
    """Who and what an unsubscribe token names; InvalidLink otherwise."""
    claims = verify(secret, UNSUBSCRIBE, token, now, ttl_s)
    user, category = claims.get("u"), claims.get("c")
    if not isinstance(user, str) or not isinstance(category, str):
        raise InvalidLink("invalid_token", "the link is not one fanfare made")
    return Unsubscribe(user, category)


def stream_token(secret: bytes, user_id: str, now: float) -> str:
    """A token that lets a browser read one user's live stream."""
    return sign(secret, STREAM, {"u": user_id}, now)


def read_stream_token(secret: bytes, token: str, now: float, ttl_s: float) -> str:
    """The user a stream token is for; InvalidLink otherwise."""
    user = verify(secret, STREAM, token, now, ttl_s).get("u")
    if not isinstance(user, str):
        raise InvalidLink("invalid_token", "the token is not one fanfare made")
    return user
