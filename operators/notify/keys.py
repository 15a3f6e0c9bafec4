"""API keys: their form, their hash and their scopes.

A key reads `ffk_<key id>_<secret>`. Only the secret's SHA-256 is stored, beside the key id
(which finds the record without a scan). The secret is 32 random bytes: a fast hash is enough,
since nobody can guess 256 bits; slow password hashes (bcrypt, scrypt) protect low-entropy
passwords, at a cost on every request that would buy nothing here.

Scopes say which endpoints a key may call and which categories it may send, so a key of the
social team cannot send a login code.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

KEY_PREFIX = "ffk"
_KEY = re.compile(r"^ffk_([0-9a-f]{12})_([A-Za-z0-9_\-]{43})$")
ALL = "*"

ENDPOINT_SCOPES: dict[str, str] = {
    "send": "POST /v1/notifications",
    "campaigns": "/v1/notifications/bulk (create, read, cancel, audiences)",
    "status": "GET /v1/notifications/{id}/status",
    "inbox": "GET /v1/users/{id}/notifications, PATCH .../read, POST .../read-all",
    "users": "PUT /v1/users/{id}/preferences, POST/DELETE /v1/users/{id}/devices",
}
"""Endpoint scopes and what each allows."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A caller's key record (never the key itself)."""

    key_id: str
    name: str
    secret_hash: str
    endpoints: frozenset[str]
    categories: frozenset[str]
    rate_per_s: float
    burst: int
    created_at: float
    revoked_at: float | None = None

    def allows_endpoint(self, scope: str) -> bool:
        """Whether the key may call the endpoints of `scope`."""
        return ALL in self.endpoints or scope in self.endpoints

    def allows_category(self, category: str) -> bool:
        """Whether the key may send notifications of `category`."""
        return ALL in self.categories or category in self.categories


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key as created: the text shown once, and the record stored."""

    text: str
    record: ApiKey


def hash_secret(secret: str) -> str:
    """The stored form of a key's secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(text: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    found = _KEY.match(text.strip())
    return (found.group(1), found.group(2)) if found else None


def secret_matches(secret: str, record: ApiKey) -> bool:
    """Compare in constant time."""
    return hmac.compare_digest(hash_secret(secret), record.secret_hash)


def parse_scope_list(text: str, known: Iterable[str] | None, what: str) -> frozenset[str]:
    """`a,b` or `*` as a set; ValueError names an unknown entry."""
    items = frozenset(p.strip() for p in text.split(",") if p.strip())
    if not items:
        raise ValueError(f"give at least one {what} (or * for all)")
    if ALL in items:
        return frozenset({ALL})
    if known is not None:
        unknown = sorted(items - set(known))
        if unknown:
            raise ValueError(f"unknown {what} {unknown}; known: {', '.join(sorted(known))}")
    return items


def new_key(
    name: str,
    endpoints: frozenset[str],
    categories: frozenset[str],
    rate_per_s: float,
    burst: int,
    now: float,
) -> NewKey:
    """A fresh random key and its record."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    record = ApiKey(
        key_id=key_id,
        name=name,
        secret_hash=hash_secret(secret),
        endpoints=endpoints,
        categories=categories,
        rate_per_s=rate_per_s,
        burst=burst,
        created_at=now,
    )
    return NewKey(f"{KEY_PREFIX}_{key_id}_{secret}", record)
