"""A lean HTTP/1.1 server protocol (keep-alive, Content-Length bodies) for FCM and the control API.

Hand-parsed because a full HTTP stack costs more per request than the FCM client it serves; only
what firebase-admin (httpx), google-auth (requests) and urllib send is supported: no chunked
request bodies, no pipelining beyond answering in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import NamedTuple
from urllib.parse import unquote

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024
MAX_BODY = 4 * 1024 * 1024
JSON = b"application/json; charset=UTF-8"


class Request(NamedTuple):
    """One parsed request; header names are lower-case."""

    method: bytes
    path: str
    query: str
    headers: dict[bytes, bytes]
    body: bytes


class Response(NamedTuple):
    """What to answer; `delay_s` holds the answer back without blocking other connections."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    delay_s: float = 0.0
    content_type: bytes = JSON


Handler = Callable[[Request], Response]
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def _head(status: int, response: Response, keep_alive: bool) -> bytes:
    lines = [
        b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Unknown")),
        b"content-type: " + response.content_type,
        b"content-length: %d" % len(response.body),
    ]
    lines += [name + b": " + value for name, value in response.headers]
    if not keep_alive:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Http11Protocol(asyncio.Protocol):
    """Parses requests off one connection and answers them in order through `handler`."""

    def __init__(self, handler: Handler, connections: set[Http11Protocol] | None = None) -> None:
        self.handler = handler
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        # method, path, query, headers, content length, keep-alive: a request awaiting its body
        self.pending: tuple[bytes, str, str, dict[bytes, bytes], int, bool] | None = None
        self.waiting = False  # an answer is held back (latency): later requests wait for it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Track the connection."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.connections is not None:
            self.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """Untrack the connection."""
        self.transport = None
        if self.connections is not None:
            self.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        """Buffer, then answer every complete request unless an answer is held back."""
        self.buf += data
        if not self.waiting:
            self._process()

    def close(self) -> None:
        """Close the connection (after what is already written)."""
        if self.transport is not None:
            self.transport.close()

    def _fail(self, status: int) -> None:
        if self.transport is not None:
            body = b'{"error":"%s"}' % _REASONS.get(status, b"error")
            response = Response(status, body)
            self.transport.write(_head(status, response, False) + body)
            self.transport.close()
        self.buf.clear()

    def _process(self) -> None:
        buf = self.buf
        while self.transport is not None and not self.waiting:
            if self.pending is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        self._fail(431)
                    return
                lines = bytes(buf[:end]).split(b"\r\n")
                del buf[: end + 4]
                parts = lines[0].split(b" ")
                if len(parts) != 3:
                    self._fail(400)
                    return
                method, target, version = parts
                headers: dict[bytes, bytes] = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(b":")
                    if not sep:
                        self._fail(400)
                        return
                    headers[name.strip().lower()] = value.strip()
                if b"transfer-encoding" in headers:
                    self._fail(501)  # nobody we serve sends chunked bodies
                    return
                try:
                    length = int(headers.get(b"content-length", b"0"))
                except ValueError:
                    self._fail(400)
                    return
                if length > MAX_BODY:
                    self._fail(413)
                    return
                conn = headers.get(b"connection", b"").lower()
                keep_alive = conn != b"close" if version == b"HTTP/1.1" else conn == b"keep-alive"
                if headers.get(b"expect", b"").lower() == b"100-continue":
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                path, _, query = target.decode("latin-1").partition("?")
                self.pending = (method, unquote(path), query, headers, length, keep_alive)
            method, path, query, headers, length, keep_alive = self.pending
            if len(buf) < length:
                return
            body = bytes(buf[:length])
            del buf[:length]
            self.pending = None
            try:
                response = self.handler(Request(method, path, query, headers, body))
            except Exception:
                log.exception("handler failed on %s %s", method.decode(errors="replace"), path)
                response = Response(500, b'{"error":"internal"}')
            if response.delay_s > 0:
                self.waiting = True
                asyncio.get_running_loop().call_later(
                    response.delay_s, self._send_later, response, keep_alive
                )
                return
            self._send(response, keep_alive)

    def _send(self, response: Response, keep_alive: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(_head(response.status, response, keep_alive) + response.body)
        if not keep_alive:
            self.transport.close()
            self.transport = None

    def _send_later(self, response: Response, keep_alive: bool) -> None:
        self.waiting = False
        self._send(response, keep_alive)
        if self.buf:
            self._process()
