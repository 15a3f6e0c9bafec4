"""`POST`/`DELETE /v1/users/{id}/devices`: a request body to the `device_changes` event.

A phone registers a push token (`provider` apns or fcm, or `platform` ios or android); a browser
its web push subscription (`platform: web`); a user an email address, a phone number for SMS or
a chat webhook (`provider` email, sms, chat with `address`). Every address goes through the
contract's own codec (schemas/addresses.py) before it is published, so a malformed one is a 422
with the reason, and what is published is canonical. A channel address without a `device_id`
gets one made from the address, so registering the same address twice is one address.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

from operators.adapters.http.models import DeviceIn, DeviceOut
from operators.notify.requests import Rejected
from schemas.addresses import DEVICE_PROVIDERS, InvalidAddress, check_address
from schemas.codecs import InvalidEvent, decode_device_change, encode_device_change
from schemas.records import DeviceChange, Provider

_PLATFORMS: dict[str, Provider] = {"ios": "apns", "android": "fcm", "web": "webpush"}


def _provider(provider: str | None, platform: str | None) -> Provider:
    if platform is not None:
        implied = _PLATFORMS[platform]
        if provider is not None and provider != implied:
            raise Rejected(
                "invalid_device",
                f"platform {platform} is provider {implied}, not {provider}",
                "provider",
            )
        return implied
    if provider is None:
        raise Rejected("missing_field", "give the provider (or the platform)", "provider")
    return provider  # type: ignore[return-value]


def _token(provider: Provider, body: DeviceIn) -> str:
    given = [f for f in ("token", "address", "subscription") if getattr(body, f) is not None]
    if provider == "webpush":
        if body.subscription is not None and body.token is None and body.address is None:
            sub = body.subscription
            return json.dumps(
                {
                    "endpoint": sub.endpoint,
                    "keys": {"p256dh": sub.keys.p256dh, "auth": sub.keys.auth},
                }
            )
        if given == ["token"] and body.token is not None:
            return body.token
        raise Rejected(
            "invalid_device",
            "a browser registers its subscription: {endpoint, keys}",
            "subscription",
        )
    if provider in ("apns", "fcm"):
        if given != ["token"] or body.token is None:
            raise Rejected("invalid_device", f"a {provider} device registers its token", "token")
        return body.token
    value = body.address or body.token
    if len(given) != 1 or value is None or body.subscription is not None:
        raise Rejected(
            "invalid_device", f"an {provider} address goes in `address` (one value)", "address"
        )
    return value


def device_registration(
    user_id: str, body: DeviceIn, now: datetime, allow_dev: bool
) -> tuple[DeviceChange, bytes]:
    """The `device_changes` event (and its bytes) for a registration; Rejected with why not."""
    provider = _provider(body.provider, body.platform)
    token = _token(provider, body)
    try:
        token = check_address(provider, token, allow_dev=allow_dev)
    except InvalidAddress as exc:
        raise Rejected("invalid_address", f"{provider}: {exc}", _field(provider)) from None
    device_id = body.device_id
    if device_id is None:
        if provider in ("apns", "fcm"):
            raise Rejected("missing_field", "a push device needs its device_id", "device_id")
        device_id = f"{provider}-{hashlib.sha256(token.encode()).hexdigest()[:16]}"
    change = DeviceChange(user_id, device_id, provider, token, True, now)
    return _checked(change, allow_dev)


def device_removal(user_id: str, body: DeviceOut, now: datetime) -> tuple[DeviceChange, bytes]:
    """The `device_changes` event (inactive) for a removal."""
    provider = _provider(body.provider, body.platform)
    return _checked(DeviceChange(user_id, body.device_id, provider, None, False, now), True)


def _field(provider: str) -> str:
    return {"webpush": "subscription", "apns": "token", "fcm": "token"}.get(provider, "address")


def _checked(change: DeviceChange, allow_dev: bool) -> tuple[DeviceChange, bytes]:
    raw = encode_device_change(change)
    try:
        decode_device_change(raw, providers=DEVICE_PROVIDERS, allow_dev_addresses=allow_dev)
    except InvalidEvent as exc:
        raise Rejected("invalid_device", exc.detail) from None
    return change, raw
