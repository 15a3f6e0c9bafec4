"""What the HTTP channel senders share: their client, answers from exceptions, the host guard.

The client is aiohttp's (a pywebpush dependency, pinned for this): against the local servers on
the 2-core machine it made 1,266 to 3,036 HTTPS requests/s at 137-233 us of CPU each, where
httpx made 83 to 435/s at 1.1 to 5.7 ms each (its connection pool rescans its queue for every
request in flight; measured with 4 to 100 requests in flight, scripts/bench/channels.py).

Users give fanfare the URLs of chat webhooks and web push endpoints, so a send is a request to
a host someone else chose. The codecs refuse URLs that name a private host; the guard here also
refuses a public-looking name that resolves to a loopback, private or link-local address (a
DNS name pointed at 127.0.0.1 or at a cloud metadata address), checked at send time, cached a
minute per host. Redirects are never followed (a webhook answering 3xx towards an internal
address must not become a request there). FANFARE_DEV_MODE turns the guard off for the local
servers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from operators.adapters.channels.sessions import LanePool
from operators.delivery.model import ProviderAnswer
from schemas.addresses import ip_is_public

GUARD_TTL_S = 60.0
USER_AGENT = "fanfare/0.1 (+https://fanfare.dev)"


@dataclass(frozen=True, slots=True)
class HttpReply:
    """An HTTP answer: status, body text (first 4 KB), Retry-After in seconds."""

    status: int
    text: str
    retry_after_s: float | None


class HttpClient:
    """A keep-alive HTTPS client (one per sender, made on the worker's event loop).

    At most `connections` requests at once; a free slot goes to a transactional send first,
    then normal, then bulk (aiohttp's own pool would serve whoever asked first).
    """

    def __init__(self, timeout_s: float, ca_file: str | Path | None, connections: int = 32) -> None:
        self.connections = connections
        self._timeout = timeout_s
        self._whole_timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._slots: LanePool[int] = LanePool(range(connections))
        context = ssl.create_default_context()
        if ca_file:
            context.load_verify_locations(cafile=str(ca_file))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=connections, ttl_dns_cache=60),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            headers={"User-Agent": USER_AGENT},
        )

    async def post(
        self,
        url: str,
        *,
        data: bytes | Mapping[str, str],
        headers: Mapping[str, str] | None = None,
        lane: str = "normal",
    ) -> HttpReply | ProviderAnswer:
        """POST; the reply, or an answer for a transport failure (status None: retried).

        Waiting for a slot counts towards the timeout, as waiting for a connection did.
        """
        slot = self._slots.try_get()
        timeout = self._whole_timeout
        if slot is None:
            started = time.monotonic()
            try:
                slot = await asyncio.wait_for(self._slots.get(lane), self._timeout)
            except TimeoutError:
                return ProviderAnswer(None, "timeout")
            timeout = aiohttp.ClientTimeout(total=self._timeout - (time.monotonic() - started))
        try:
            return await self._post(url, data, headers, timeout)
        finally:
            self._slots.put(slot)

    async def _post(
        self,
        url: str,
        data: bytes | Mapping[str, str],
        headers: Mapping[str, str] | None,
        timeout: aiohttp.ClientTimeout,
    ) -> HttpReply | ProviderAnswer:
        try:
            async with self._session.post(
                url,
                data=data,
                headers=headers,
                allow_redirects=False,
                timeout=timeout,
            ) as response:
                body = await response.content.read(4096)
                return HttpReply(
                    response.status,
                    body.decode("utf-8", "replace"),
                    parse_retry_after(response.headers.get("Retry-After")),
                )
        except TimeoutError:
            return ProviderAnswer(None, "timeout")
        except (aiohttp.ClientError, OSError) as exc:
            return ProviderAnswer(None, f"connection: {type(exc).__name__}")

    async def head(self, url: str) -> None:
        """Open a connection (TLS) before the first send; any answer will do."""
        async with self._session.head(url, allow_redirects=False):
            pass

    async def close(self) -> None:
        """Close the connections."""
        await self._session.close()


def parse_retry_after(raw: str | None) -> float | None:
    """Retry-After in seconds (delta-seconds only; an HTTP date is ignored)."""
    value = (raw or "").strip()
    return float(value) if value.isdigit() else None


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
                infos: list[Any] = await asyncio.get_running_loop().getaddrinfo(
                    host, 443, type=socket.SOCK_STREAM
                )
            except OSError as exc:
                return f"dns: {exc.strerror or type(exc).__name__}"
            addresses = [str(info[4][0]) for info in infos]
        for address in addresses:
            if not ip_is_public(ipaddress.ip_address(address.split("%", 1)[0])):
                return f"{host} resolves to a non-public address ({address})"
        return None
