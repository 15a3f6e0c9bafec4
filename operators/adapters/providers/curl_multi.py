"""HTTP/2 requests on libcurl's multi interface (pycurl), driven by an asyncio event loop.

libcurl (with nghttp2) does the HTTP/2 framing, HPACK, TLS and flow control in C; Python only
sets a request's options and reads its answer, about 30-50 µs of CPU per request where the
pure-Python `h2` stack of aioapns costs about 250 µs (docs/providers.md). The loop watches
libcurl's sockets (`M_SOCKETFUNCTION` -> `add_reader` / `add_writer`) and its timer
(`M_TIMERFUNCTION` -> `call_later`), and calls `socket_action` when either fires; finished
transfers are read with `info_read`.

Deadlines: a request's `timeout_s` is kept here (`answered_within`), not by libcurl, whose
TIMEOUT_MS is checked before it reads the answer: after the loop was busy past a deadline
(the other provider's sends share it), libcurl failed answers that had already come, and
fanfare sent those pushes again. A request past its deadline is removed from the multi handle.

Connections: requests to one host share its HTTP/2 connections (`PIPE_MULTIPLEX`, `PIPEWAIT`):
a new connection is opened only when every open one carries `streams_per_connection` requests,
up to `max_connections`. A GOAWAY's unprocessed streams (refused) are sent again by libcurl on
a new connection; a connection that breaks fails the requests it carried (the caller retries).
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pycurl

from operators.adapters.providers.event_loop import answered_within

log = logging.getLogger(__name__)

_TIMEOUT = pycurl.E_OPERATION_TIMEDOUT
_ERROR_NAMES = {
    pycurl.E_COULDNT_CONNECT: "couldnt_connect",
    pycurl.E_COULDNT_RESOLVE_HOST: "couldnt_resolve_host",
    pycurl.E_SEND_ERROR: "send_error",
    pycurl.E_RECV_ERROR: "recv_error",
    pycurl.E_GOT_NOTHING: "got_nothing",
    pycurl.E_SSL_CONNECT_ERROR: "ssl_connect_error",
    pycurl.E_PEER_FAILED_VERIFICATION: "peer_failed_verification",
    pycurl.E_HTTP2: "http2",
    92: "http2_stream",  # CURLE_HTTP2_STREAM (no pycurl constant)
    pycurl.E_ABORTED_BY_CALLBACK: "aborted",
}


@dataclass(frozen=True, slots=True)
class CurlAnswer:
    """One request's answer: a status and body, or a transport failure (status None)."""

    status: int | None
    body: bytes = b""
    retry_after_s: float | None = None
    error: str | None = None  # "timeout", or "connection: <libcurl error>"

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object: {} when it is empty, not JSON or not an object.

        Providers' error answers are JSON objects; anything else (a proxy's HTML page) still
        has a status the caller can classify.
        """
        try:
            parsed = orjson.loads(self.body) if self.body else None
        except orjson.JSONDecodeError:
            return {}
        return parsed if isinstance(parsed, dict) else {}


@dataclass(frozen=True, slots=True)
class CurlTarget:
    """Where requests go and how: TLS trust, HTTP version, limits."""

    ca_file: str | None = None
    http2: bool = True  # HTTP/2 over TLS (ALPN); False: HTTP/1.1 (plain local servers)
    max_connections: int = 4
    streams_per_connection: int = 500
    timeout_s: float = 10.0
    connect_timeout_s: float = 10.0


Done = Callable[[int, CurlAnswer], object]
"""Called with a request's token and its answer (on the loop's thread)."""


class _Transfer:
    """A reusable easy handle, and who to tell about the request it carries."""

    __slots__ = ("body", "done", "handle", "token")

    def __init__(self, handle: pycurl.Curl) -> None:
        self.handle = handle
        self.body = io.BytesIO()
        self.done: Done | None = None
        self.token = 0


class CurlMulti:
    """Asynchronous HTTP requests on one libcurl multi handle, on the running event loop.

    Build it inside the loop that will use it; every call must come from that loop's thread.
    """

    def __init__(self, target: CurlTarget) -> None:
        self._loop = asyncio.get_running_loop()
        self._target = target
        self._multi = pycurl.CurlMulti()
        m = self._multi
        m.setopt(pycurl.M_PIPELINING, pycurl.PIPE_MULTIPLEX)
        m.setopt(pycurl.M_MAX_HOST_CONNECTIONS, max(1, target.max_connections))
        m.setopt(pycurl.M_MAX_CONCURRENT_STREAMS, max(1, target.streams_per_connection))
        m.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        m.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self._timer: asyncio.TimerHandle | None = None
        self._idle: list[_Transfer] = []
        self._busy: dict[pycurl.Curl, _Transfer] = {}
        self._watched: dict[int, int] = {}
        self._closed = False
        self._soon = False
        self._version = (
            pycurl.CURL_HTTP_VERSION_2TLS if target.http2 else pycurl.CURL_HTTP_VERSION_1_1
        )

    @property
    def in_flight(self) -> int:
        """Requests sent and not answered."""
        return len(self._busy)

    # -- libcurl's callbacks ----------------------------------------------------------------
    def _on_socket(self, what: int, fd: int, _multi: object, _data: object) -> None:
        loop = self._loop
        before = self._watched.get(fd, 0)
        want_in = what in (pycurl.POLL_IN, pycurl.POLL_INOUT)
        want_out = what in (pycurl.POLL_OUT, pycurl.POLL_INOUT)
        if before & 1 and not want_in:
            loop.remove_reader(fd)
        if before & 2 and not want_out:
            loop.remove_writer(fd)
        if want_in and not before & 1:
            loop.add_reader(fd, self._act, fd, pycurl.CSELECT_IN)
        if want_out and not before & 2:
            loop.add_writer(fd, self._act, fd, pycurl.CSELECT_OUT)
        now = (1 if want_in else 0) | (2 if want_out else 0)
        if now:
            self._watched[fd] = now
        else:
            self._watched.pop(fd, None)

    def _on_timer(self, ms: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if ms >= 0 and not self._closed:
            self._timer = self._loop.call_later(ms / 1000.0, self._act, pycurl.SOCKET_TIMEOUT, 0)

    def _act(self, fd: int, events: int) -> None:
        if self._closed:
            return
        multi = self._multi
        while True:
            ret, _running = multi.socket_action(fd, events)
            if ret != pycurl.E_CALL_MULTI_PERFORM:
                break
        self._finish()

    def _finish(self) -> None:
        multi = self._multi
        while True:
            queued, ok, failed = multi.info_read()
            for handle in ok:
                self._done(handle, None, "")
            for handle, errno, message in failed:
                self._done(handle, errno, message)
            if not queued:
                return

    def _abort(self, transfer: _Transfer) -> None:
        """Give up on a request past its deadline (libcurl resets its stream): a timeout."""
        handle = transfer.handle
        if self._busy.pop(handle, None) is None:
            return  # answered meanwhile
        self._multi.remove_handle(handle)
        done, transfer.done = transfer.done, None
        self._idle.append(transfer)
        if done is not None:
            done(transfer.token, CurlAnswer(None, error="timeout"))

    async def _within_deadline(self, answered: asyncio.Future[None], sent: list[_Transfer]) -> None:
        """Wait until `answered`; past the requests' deadline, abort those still unanswered."""
        try:
            await answered_within(answered, self._target.timeout_s)
        except TimeoutError:
            for transfer in sent:
                self._abort(transfer)

    def _done(self, handle: pycurl.Curl, errno: int | None, message: str) -> None:
        self._multi.remove_handle(handle)
        transfer = self._busy.pop(handle, None)
        if transfer is None:
            return
        done, transfer.done = transfer.done, None
        if errno is None:
            status = handle.getinfo(pycurl.RESPONSE_CODE)
            retry_after = handle.getinfo(pycurl.RETRY_AFTER) if status in (429, 503) else 0
            answer = CurlAnswer(
                status, transfer.body.getvalue(), float(retry_after) if retry_after else None
            )
        elif errno == _TIMEOUT:
            answer = CurlAnswer(None, error="timeout")
        else:
            name = _ERROR_NAMES.get(errno, f"curl_{errno}")
            log.debug("request failed: %s (%s)", name, message)
            answer = CurlAnswer(None, error=f"connection: {name}")
        self._idle.append(transfer)
        if done is not None:
            done(transfer.token, answer)

    # -- requests ---------------------------------------------------------------------------
    def _transfer(self) -> _Transfer:
        if self._idle:
            return self._idle.pop()
        c = pycurl.Curl()
        t = self._target
        c.setopt(pycurl.HTTP_VERSION, self._version)
        c.setopt(pycurl.PIPEWAIT, 1)
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.TCP_NODELAY, 1)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, int(t.connect_timeout_s * 1000)))
        if t.ca_file is not None:
            c.setopt(pycurl.CAINFO, t.ca_file)
        transfer = _Transfer(c)
        c.setopt(pycurl.WRITEDATA, transfer.body)
        return transfer

    def _request(
        self, url: str, headers: Sequence[str], body: bytes | None, done: Done, token: int = 0
    ) -> _Transfer | None:
        """POST `body` (GET when None) with `headers` ("name: value"); `done(token, answer)`.

        A callback, not a future: a future per request costs more than the rest of the
        request's Python work. No deadline of its own: its caller keeps it (`_within_deadline`).
        """
        if self._closed:
            done(token, CurlAnswer(None, error="connection: closed"))
            return None
        transfer = self._transfer()
        c = transfer.handle
        c.setopt(pycurl.URL, url)
        c.setopt(pycurl.HTTPHEADER, headers)
        if body is None:
            c.setopt(pycurl.HTTPGET, 1)
        else:
            c.setopt(pycurl.POSTFIELDS, body)
        buffer = transfer.body
        if buffer.tell():
            buffer.seek(0)
            buffer.truncate()
        transfer.done = done
        transfer.token = token
        self._busy[c] = transfer
        self._multi.add_handle(c)  # libcurl asks for a timeout of 0: started on the loop
        return transfer

    async def fetch(self, url: str, headers: Sequence[str], body: bytes | None) -> CurlAnswer:
        """One request's answer."""
        [answer] = await self.send_all([(url, headers, body)])
        return answer

    async def send_all(
        self, requests: Sequence[tuple[str, Sequence[str], bytes | None]]
    ) -> list[CurlAnswer]:
        """Several requests at once; their answers in order (`timeout` past the deadline)."""
        answers: list[CurlAnswer | None] = [None] * len(requests)
        future: asyncio.Future[None] = self._loop.create_future()
        left = len(requests)

        def done(i: int, answer: CurlAnswer) -> None:
            nonlocal left
            answers[i] = answer
            left -= 1
            if not left and not future.done():
                future.set_result(None)

        if not requests:
            return []
        sent = []
        for i, (url, headers, body) in enumerate(requests):
            transfer = self._request(url, headers, body, done, i)
            if transfer is not None:
                sent.append(transfer)
        if not future.done():
            await self._within_deadline(future, sent)
        return answers  # type: ignore[return-value]

    async def preconnect(self, url: str, headers: Sequence[str]) -> None:
        """Open a connection to `url`'s host without sending a request.

        The transfer connects (TLS, HTTP/2 settings) and is stopped just before its request
        would be sent; the connection stays in the pool for the requests that follow.
        """
        transfer = self._transfer()
        c = transfer.handle
        c.setopt(pycurl.PREREQFUNCTION, lambda *_: pycurl.PREREQFUNC_ABORT)
        self._idle.append(transfer)  # the next request takes it
        try:
            answer = await self.fetch(url, headers, None)
        finally:
            c.unsetopt(pycurl.PREREQFUNCTION)
        if answer.error not in (None, "connection: aborted"):
            raise ConnectionError(f"could not connect to {url}: {answer.error}")

    def close(self) -> None:
        """Fail what is in flight, close every connection."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for fd, mask in list(self._watched.items()):
            if mask & 1:
                self._loop.remove_reader(fd)
            if mask & 2:
                self._loop.remove_writer(fd)
        self._watched.clear()
        for handle, transfer in list(self._busy.items()):
            self._multi.remove_handle(handle)
            if transfer.done is not None:
                transfer.done(transfer.token, CurlAnswer(None, error="connection: closed"))
        self._busy.clear()
        for transfer in self._idle:
            transfer.handle.close()
        self._idle.clear()
        self._multi.close()
