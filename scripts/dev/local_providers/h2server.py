"""An HTTP/2 server connection on asyncio and `h2`: the local APNs, and FCM over TLS, build on it.

What a client depends on (docs/providers.md): each answer body goes out as one DATA frame carrying
END_STREAM, and an answer without a body is a HEADERS frame with END_STREAM. The connection
advertises large receive windows and hands them back as requests are read, so bursts never wait
for a WINDOW_UPDATE; answers wait for window only when the client does not hand it back (aioapns
does not, see clients.WindowAckingProtocol). GOAWAY, added latency and many concurrent streams
are handled here; what to answer is the subclass's `answer_request`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any, Protocol

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings
from hpack import Encoder
from hyperframe.frame import GoAwayFrame

from scripts.dev.local_providers.state import ProviderState

MAX_STREAMS = 1000  # what APNs advertises; aioapns' own default as well
WINDOW = 1 << 24
GOAWAY_GRACE_S = 1.0  # after GOAWAY and the last answer owed, before we close the connection
GOAWAY_HARD_CLOSE_S = 10.0
SHUTDOWN = b'{"reason":"Shutdown"}'
_CONFIG = H2Configuration(
    client_side=False,
    header_encoding=None,  # bytes in, bytes out: no decoding per header
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
)
_STATUS = {s: str(s).encode() for s in range(100, 600)}

Headers = list[tuple[bytes, bytes]]
# status, headers besides :status, body (b"" for none), seconds to hold the answer back
Answer = tuple[int, Headers, bytes, float]


class Owner(Protocol):
    """The server a connection belongs to (counters shown by /stats)."""

    state: ProviderState
    connections: set[Any]
    connections_total: int
    goaways_sent: int


class PlainEncoder(Encoder):
    """Answer headers without Huffman coding: a few bytes more, no per-answer encoding cost."""

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        """Encode as hpack does, Huffman off."""
        return super().encode(headers, huffman=False)


class H2ServerConnection(asyncio.Protocol):
    """One client connection: h2 state, streams being received, answers owed."""

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self.state = owner.state
        self.conn = H2Connection(config=_CONFIG)
        self.conn.encoder = PlainEncoder()
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, list[Any]] = {}  # stream id -> [headers, body or None]
        self.blocked: deque[tuple[int, Headers, bytes]] = deque()
        self.goaway_after: int | None = None
        self.last_stream_id: int | None = None  # set once GOAWAY went out
        self.highest_answered = 0
        self.delayed = 0  # answers waiting on added latency
        self.closing = False
        self.close_timer: asyncio.TimerHandle | None = None

    def answer_request(self, stream_id: int, headers: dict[bytes, bytes], body: bytes) -> Answer:
        """What to answer to one complete request."""
        raise NotImplementedError

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the preface: our settings and a large connection window."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.owner.connections.add(self)
        self.owner.connections_total += 1
        # Announced in the connection preface, so they hold from the first request on.
        self.conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
            },
        )
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(WINDOW)
        transport.write(self.conn.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection and whatever it still owed."""
        self.owner.connections.discard(self)
        self.transport = None
        self.streams.clear()
        self.blocked.clear()

    def data_received(self, data: bytes) -> None:
        """Feed h2; answer each request whose stream ended; write everything once."""
        try:
            events = self.conn.receive_data(data)
        except H2Error:
            self._close()
            return
        acked, ack_stream = 0, 0
        streams = self.streams
        for event in events:
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream[1] = event.data if stream[1] is None else stream[1] + event.data
                acked += event.flow_controlled_length
                ack_stream = event.stream_id
            elif isinstance(event, RequestReceived):
                streams[event.stream_id] = [event.headers, None]
            elif isinstance(event, StreamEnded):
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    self._handle(event.stream_id, stream[0], stream[1] or b"")
                    if self.closing:
                        return
            elif isinstance(event, StreamReset):
                streams.pop(event.stream_id, None)
            elif isinstance(event, WindowUpdated):
                self._unblock()
            elif isinstance(event, ConnectionTerminated):
                self._close()
                return
        if acked:
            # Hand the window back; h2 sends WINDOW_UPDATE only once half of it is used.
            self.conn.acknowledge_received_data(acked, ack_stream)
        self._flush()

    # requests and answers

    def _handle(self, stream_id: int, headers: list[Any], body: bytes) -> None:
        if self.last_stream_id is not None and stream_id > self.last_stream_id:
            return  # after our GOAWAY: not processed, the client sends it again elsewhere
        status, answer_headers, answer_body, delay = self.answer_request(
            stream_id, dict(headers), body
        )
        if delay > 0:
            self.delayed += 1
            asyncio.get_running_loop().call_later(
                delay, self._answer_later, stream_id, status, answer_headers, answer_body
            )
        else:
            self._answer(stream_id, status, answer_headers, answer_body)
        if stream_id > self.highest_answered:
            self.highest_answered = stream_id
        if self.goaway_after is not None:
            self.goaway_after -= 1
            if self.goaway_after <= 0:
                self._send_goaway(stream_id)

    def _answer(self, stream_id: int, status: int, headers: Headers, body: bytes) -> None:
        headers = [(b":status", _STATUS.get(status) or str(status).encode()), *headers]
        if not body:
            with contextlib.suppress(H2Error):  # the client reset the stream meanwhile
                self.conn.send_headers(stream_id, headers, end_stream=True)
            return
        try:
            window = self.conn.local_flow_control_window(stream_id)
        except H2Error:
            return  # stream gone
        if self.blocked or window < len(body):
            # The client has not handed back enough receive window: wait for WINDOW_UPDATE.
            self.blocked.append((stream_id, headers, body))
            return
        self._send_with_body(stream_id, headers, body)

    def _send_with_body(self, stream_id: int, headers: Headers, body: bytes) -> None:
        with contextlib.suppress(H2Error):  # the client reset the stream meanwhile
            self.conn.send_headers(stream_id, headers)
            self.conn.send_data(stream_id, body, end_stream=True)  # one frame, END_STREAM

    def _unblock(self) -> None:
        blocked = self.blocked
        while blocked:
            stream_id, headers, body = blocked[0]
            try:
                window = self.conn.local_flow_control_window(stream_id)
            except H2Error:
                blocked.popleft()  # stream gone
                continue
            if window < len(body):
                return
            blocked.popleft()
            self._send_with_body(stream_id, headers, body)
        self._maybe_close_after_goaway()

    def _answer_later(self, stream_id: int, status: int, headers: Headers, body: bytes) -> None:
        self.delayed -= 1
        if self.transport is None or self.closing:
            return
        self._answer(stream_id, status, headers, body)
        self._flush()
        self._maybe_close_after_goaway()

    def _flush(self) -> None:
        if self.transport is not None and not self.closing:
            data = self.conn.data_to_send()
            if data:
                self.transport.write(data)

    # GOAWAY

    def arm_goaway(self, after_requests: int) -> None:
        """Send GOAWAY after this many more answered requests (0 or less: now)."""
        if self.last_stream_id is not None or self.transport is None or self.closing:
            return
        if after_requests <= 0:
            self._send_goaway(self.highest_answered)
            self._flush()
        else:
            self.goaway_after = after_requests

    def _send_goaway(self, last_stream_id: int) -> None:
        # Written beside h2, not through it: h2 refuses to send anything once it has sent
        # GOAWAY, and answers still owed (added latency, blocked bodies) must go out after it.
        if self.transport is None or self.closing:
            return
        self.goaway_after = None
        self.last_stream_id = last_stream_id
        self.owner.goaways_sent += 1
        frame = GoAwayFrame(0, last_stream_id=last_stream_id, additional_data=SHUTDOWN)
        self.transport.write(self.conn.data_to_send() + frame.serialize())
        loop = asyncio.get_running_loop()
        loop.call_later(GOAWAY_HARD_CLOSE_S, self._close)  # even if answers are still owed
        self._maybe_close_after_goaway()

    def _maybe_close_after_goaway(self) -> None:
        if self.last_stream_id is None or self.delayed or self.blocked or self.close_timer:
            return
        # Not at once: the client may still be sending, and closing a socket with unread input
        # resets the connection, which can destroy our answers and the GOAWAY before the client
        # reads them. The client closes on GOAWAY; this is for one that does not.
        self.close_timer = asyncio.get_running_loop().call_later(GOAWAY_GRACE_S, self._close)

    def _close(self) -> None:
        if self.transport is not None and not self.closing:
            self._flush()
            self.closing = True
            self.transport.close()  # writes what is buffered first


def goaway_all(connections: set[Any], after_requests: int) -> int:
    """Arm every open HTTP/2 connection in `connections`; returns how many."""
    armed = [c for c in list(connections) if isinstance(c, H2ServerConnection)]
    for conn in armed:
        conn.arm_goaway(after_requests)
    return len(armed)
