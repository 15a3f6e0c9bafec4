"""Channel addresses: what each kind of address must look like, and where a URL may point.

A user's channel addresses travel on `device_changes` beside push devices, each with its
provider naming the kind (docs/design.md, "Channel addresses"):

- `email`: an address (`ada@example.com`); the domain is kept lower-case (IDNA for
  international names), the local part as given (it is case-sensitive). Quoted local parts,
  address literals (`user@[10.0.0.1]`) and non-ASCII local parts (SMTPUTF8) are refused: a
  relay need not support them, and no sign-up form produces them.
- `sms`: an E.164 number, `+` and 7 to 15 digits, the first not 0 (`+14155550123`).
- `chat`: a Slack- or Teams-compatible incoming-webhook URL.
- `webpush`: a browser's push subscription (RFC 8030 endpoint, RFC 8291 keys), carried as the
  compact JSON `{"endpoint": URL, "keys": {"auth": B64URL, "p256dh": B64URL}}`.

Webhook URLs and push endpoints are requests fanfare makes on a user's behalf, so outside the
development stack they must be https and must not name a loopback, private, link-local or
otherwise non-public address (a webhook pointed at 169.254.169.254 or a database port is an
SSRF). The check here is on the URL's text; senders check the addresses a name resolves to as
well, at send time. `allow_dev` (FANFARE_DEV_MODE) lifts both rules for the local servers.

Standard library only: the codecs, the API and the senders share these checks.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from typing import Final
from urllib.parse import urlsplit

PUSH_PROVIDERS: Final = ("apns", "fcm")
"""Providers of mobile push devices: what `device_changes` carried before channels."""
ADDRESS_PROVIDERS: Final = ("webpush", "email", "sms", "chat")
"""Channel address kinds registered through `device_changes` (in-app needs no address)."""
CHANNEL_PROVIDERS: Final = (*ADDRESS_PROVIDERS, "inapp")
"""The channel senders beyond mobile push; `inapp` delivers to the user id itself."""
DEVICE_PROVIDERS: Final = (*PUSH_PROVIDERS, *ADDRESS_PROVIDERS)
"""Every provider a `device_changes` event may name."""
ALL_PROVIDERS: Final = (*PUSH_PROVIDERS, *CHANNEL_PROVIDERS)
"""Every provider a dispatch item, a retry or a delivery event may name."""

MAX_URL = 2048
MAX_EMAIL = 254
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_B64URL = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")
_DEV_ONLY_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".lan")


class InvalidAddress(ValueError):
    """An address that cannot be used; the message says why, for an API answer or a dead letter."""


def _domain(domain: str, what: str) -> str:
    """A host name, lower-case ASCII (IDNA), at least two labels, a TLD that is not a number."""
    if not domain:
        raise InvalidAddress(f"{what} has no domain")
    try:
        ascii_domain = domain.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise InvalidAddress(f"{what}: {domain!r} is not a valid domain name") from None
    labels = ascii_domain.split(".")
    if len(ascii_domain) > 253 or len(labels) < 2 or not all(_LABEL.fullmatch(x) for x in labels):
        raise InvalidAddress(f"{what}: {domain!r} is not a valid domain name")
    if labels[-1].isdigit():
        raise InvalidAddress(f"{what}: {domain!r} is an IP address, not a domain name")
    return ascii_domain


def check_email(address: str) -> str:
    """The address with its domain normalized; InvalidAddress says what is wrong."""
    if len(address) > MAX_EMAIL:
        raise InvalidAddress(f"an email address has at most {MAX_EMAIL} characters")
    if any(c.isspace() or ord(c) < 32 for c in address):
        raise InvalidAddress("an email address has no spaces or control characters")
    local, at, domain = address.rpartition("@")
    if not at or not local:
        raise InvalidAddress(f"{address!r} is not an email address (local@domain)")
    if len(local) > 64:
        raise InvalidAddress("the part before @ has at most 64 characters")
    if local.startswith('"'):
        raise InvalidAddress("quoted local parts are not accepted")
    if domain.startswith("["):
        raise InvalidAddress("address literals (user@[ip]) are not accepted")
    if not local.isascii():
        raise InvalidAddress("the part before @ must be ASCII (SMTPUTF8 is not supported)")
    atoms = local.split(".")
    if not all(_ATEXT.fullmatch(atom) for atom in atoms):
        raise InvalidAddress(
            f"{local!r} is not a valid local part (letters, digits, !#$%&'*+/=?^_`{{|}}~- and "
            "single dots between them)"
        )
    return f"{local}@{_domain(domain, 'the email address')}"


def email_domain(address: str) -> str:
    """The (normalized) domain of a checked address: the per-domain rate limit's key."""
    return address.rpartition("@")[2].lower()


def check_phone(number: str) -> str:
    """An E.164 number as given; InvalidAddress otherwise."""
    if not _E164.fullmatch(number):
        raise InvalidAddress(
            f"{number!r} is not an E.164 number (+ and 7 to 15 digits, no spaces, e.g. "
            "+14155550123)"
        )
    return number


def _host_is_public(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.lower().rstrip(".")
        return name != "localhost" and not name.endswith(_DEV_ONLY_SUFFIXES)
    return ip_is_public(ip)


def ip_is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for a globally routable unicast address (not loopback, private, link-local, ...)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip_is_public(ip.ipv4_mapped)
    return ip.is_global and not ip.is_multicast


def check_url(url: str, what: str, *, allow_dev: bool = False) -> str:
    """An absolute https URL that names a public host (http and any host with `allow_dev`).

    Returns the URL as given. InvalidAddress names the rule it breaks.
    """
    if len(url) > MAX_URL:
        raise InvalidAddress(f"{what} has at most {MAX_URL} characters")
    if not url.isascii() or any(c.isspace() or ord(c) < 33 or ord(c) == 127 for c in url):
        raise InvalidAddress(f"{what} must be ASCII with no spaces (percent-encode the rest)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidAddress(f"{what} is not a valid URL ({exc})") from None
    if parts.scheme not in ("https", "http"):
        raise InvalidAddress(f"{what} must be an https:// URL")
    if parts.scheme == "http" and not allow_dev:
        raise InvalidAddress(f"{what} must be https (http only in the development stack)")
    if "@" in parts.netloc:
        raise InvalidAddress(f"{what} must not carry a user name or password")
    if parts.fragment:
        raise InvalidAddress(f"{what} must not have a #fragment")
    host = parts.hostname
    if not host:
        raise InvalidAddress(f"{what} has no host")
    if port == 0:
        raise InvalidAddress(f"{what} has port 0")
    if not allow_dev and not _host_is_public(host):
        raise InvalidAddress(
            f"{what} names a loopback, private or local host ({host}); only public hosts "
            "outside the development stack"
        )
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not allow_dev or "." in host:  # a bare `localhost` only in the development stack
            _domain(host, what)
    return url


def _b64url_bytes(value: object, what: str, size: int) -> bytes:
    if not isinstance(value, str) or not _B64URL.fullmatch(value):
        raise InvalidAddress(f"{what} must be a base64url string")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise InvalidAddress(f"{what} is not valid base64url") from None
    if len(raw) != size:
        raise InvalidAddress(f"{what} must decode to {size} bytes, not {len(raw)}")
    return raw


def check_subscription(token: str, *, allow_dev: bool = False) -> str:
    """A web push subscription token, canonical (sorted keys, no spaces, no other fields).

    The endpoint is the push service's URL (public https, see `check_url`); `keys.p256dh` is
    the browser's P-256 public key (65 bytes, uncompressed point), `keys.auth` its 16-byte
    authentication secret (RFC 8291). `expirationTime` is accepted and dropped.
    """
    try:
        doc = json.loads(token)
    except ValueError:
        raise InvalidAddress("a web push subscription is a JSON object") from None
    if not isinstance(doc, dict):
        raise InvalidAddress("a web push subscription is a JSON object")
    unknown = sorted(set(doc) - {"endpoint", "keys", "expirationTime"})
    if unknown:
        raise InvalidAddress(f"a web push subscription has no fields {unknown}")
    endpoint = doc.get("endpoint")
    if not isinstance(endpoint, str):
        raise InvalidAddress("the subscription needs its endpoint (a URL)")
    check_url(endpoint, "the subscription's endpoint", allow_dev=allow_dev)
    keys = doc.get("keys")
    if not isinstance(keys, dict) or set(keys) != {"p256dh", "auth"}:
        raise InvalidAddress("the subscription needs keys: {p256dh, auth} and nothing else")
    point = _b64url_bytes(keys["p256dh"], "keys.p256dh", 65)
    if point[0] != 4:
        raise InvalidAddress("keys.p256dh must be an uncompressed P-256 point (0x04...)")
    _b64url_bytes(keys["auth"], "keys.auth", 16)
    canonical = {"endpoint": endpoint, "keys": {"auth": keys["auth"], "p256dh": keys["p256dh"]}}
    return json.dumps(canonical, separators=(",", ":"), sort_keys=True)


def subscription_parts(token: str) -> tuple[str, str, str]:
    """(endpoint, p256dh, auth) of a checked subscription token."""
    doc = json.loads(token)
    return doc["endpoint"], doc["keys"]["p256dh"], doc["keys"]["auth"]


def check_address(provider: str, token: str, *, allow_dev: bool = False) -> str:
    """A channel address of its provider's kind, canonical; InvalidAddress otherwise.

    Push tokens (apns, fcm) are returned as they are: their shape is the schema's.
    """
    if provider == "email":
        return check_email(token)
    if provider == "sms":
        return check_phone(token)
    if provider == "chat":
        return check_url(token, "a chat webhook URL", allow_dev=allow_dev)
    if provider == "webpush":
        return check_subscription(token, allow_dev=allow_dev)
    return token
