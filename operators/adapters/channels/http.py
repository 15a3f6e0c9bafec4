"""What the HTTP channel senders share: their client, answers from exceptions, the host guard.

Users give fanfare the URLs of chat webhooks and web push endpoints, so a send is a request to
a host someone else chose. The codecs refuse URLs that name a private host; the guard here also
refuses a public-looking name that resolves to a loopback, private or link-local address (a
DNS name pointed at 127.0.0.1 or at a cloud metadata address), checked at send time, cached a
minute per host. FANFARE_DEV_MODE turns the guard off for the local servers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from operators.delivery.model import ProviderAnswer
from schemas.addresses import ip_is_public

GUARD_TTL_S = 60.0


def http_client(
    timeout_s: float, ca_file: str | Path | None, connections: int = 100
) -> httpx.AsyncClient:
    """An HTTP/1.1 keep-alive client trusting the system CAs (and `ca_file`); no redirects.

    Redirects are not followed: a webhook answering 3xx to an internal address must not turn
    into a request there.
    """
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=str(ca_file))
    return httpx.AsyncClient(
        timeout=timeout_s,
        verify=context,
        follow_redirects=False,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        headers={"user-agent": "fanfare/0.1 (+https://fanfare.dev)"},
    )


def retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (delta-seconds only; an HTTP date is ignored)."""
    raw = response.headers.get("retry-after", "").strip()
    return float(raw) if raw.isdigit() else None


def transport_answer(exc: Exception) -> ProviderAnswer:
    """An exception of the HTTP client as an answer (status None: retried)."""
    if isinstance(exc, httpx.TimeoutException):
        return ProviderAnswer(None, "timeout")
    return ProviderAnswer(None, f"connection: {type(exc).__name__}")


class HostGuard:
    """Refuses URLs whose host resolves to a non-public address (unless `allow_dev`)."""

    def __init__(self, allow_dev: bool) -> None:
        self._allow_dev = allow_dev
        self._cache: dict[str, tuple[float, str | None]] = {}

    async def refusal(self, url: str) -> str | None:
        """None when the URL may be requested, else why not."""
        if self._allow_dev:
            return None
        host = urlsplit(url).hostname or ""
        now = time.monotonic()
        cached = self._cache.get(host)
        if cached is not None and cached[0] > now:
            return cached[1]
        verdict = await self._check(host)
        self._cache[host] = (now + GUARD_TTL_S, verdict)
        return verdict

    async def _check(self, host: str) -> str | None:
        try:
            ipaddress.ip_address(host)
            addresses = [host]
        except ValueError:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, 443, type=socket.SOCK_STREAM
                )
            except OSError as exc:
                return f"dns: {exc.strerror or type(exc).__name__}"
            addresses = [str(info[4][0]) for info in infos]
        for address in addresses:
            if not ip_is_public(ipaddress.ip_address(address.split("%", 1)[0])):
                return f"{host} resolves to a non-public address ({address})"
        return None
