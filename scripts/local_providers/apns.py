"""A local APNs: HTTP/2 over TLS on asyncio and `h2`, answering as Apple does.

It serves `POST /3/device/<token>` with Apple's statuses and `{"reason"}` bodies. What a client
depends on (PROVIDERS.md): every response echoes `apns-id`, every error has a JSON body, and each
body goes out as one DATA frame carrying END_STREAM (a success is a HEADERS frame with END_STREAM
and no body at all). Per-request work is kept small because benchmarks push tens of thousands of
requests a second through one core: header values stay bytes, a provider token is verified once
per distinct bearer string, nothing is logged per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
import uuid
from collections import deque
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
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
from hpack import Encoder, NeverIndexedHeaderTuple
from hyperframe.frame import GoAwayFrame

from scripts.local_providers.credentials import LocalCredentials
from scripts.local_providers.state import ProviderState

# Every reason APNs documents, with its status. "BadPayload" is ours: Apple documents no reason
# for a body that is not a JSON object with an "aps" dictionary.
REASON_STATUS: dict[str, int] = {
    "BadCollapseId": 400,
    "BadDeviceToken": 400,
    "BadExpirationDate": 400,
    "BadMessageId": 400,
    "BadPayload": 400,
    "BadPriority": 400,
    "BadTopic": 400,
    "DeviceTokenNotForTopic": 400,
    "DuplicateHeaders": 400,
    "IdleTimeout": 400,
    "InvalidPushType": 400,
    "MissingDeviceToken": 400,
    "MissingTopic": 400,
    "PayloadEmpty": 400,
    "TopicDisallowed": 400,
    "BadCertificate": 403,
    "BadCertificateEnvironment": 403,
    "ExpiredProviderToken": 403,
    "Forbidden": 403,
    "InvalidProviderToken": 403,
    "MissingProviderToken": 403,
    "UnrelatedKeyIdInToken": 403,
    "BadEnvironmentKeyIdInToken": 403,
    "BadPath": 404,
    "MethodNotAllowed": 405,
    "ExpiredToken": 410,
    "Unregistered": 410,
    "PayloadTooLarge": 413,
    "TooManyProviderTokenUpdates": 429,
    "TooManyRequests": 429,
    "InternalServerError": 500,
    "ServiceUnavailable": 503,
    "Shutdown": 503,
}
OUTAGE_REASONS = {503: "ServiceUnavailable", 500: "InternalServerError"}
MAX_PAYLOAD = 4096
MAX_VOIP_PAYLOAD = 5120
MAX_COLLAPSE_ID = 64
TOKEN_MAX_AGE_S = 3600  # a provider token older than an hour is expired
TOKEN_MIN_REFRESH_S = 1200  # a connection may switch to a new provider token every 20 min
MAX_STREAMS = 1000
GOAWAY_GRACE_S = 1.0  # after GOAWAY and the last answer owed, before we close the connection
GOAWAY_HARD_CLOSE_S = 10.0
_WINDOW = 1 << 24  # inbound windows big enough that a burst of bodies never waits for an ack

_STRICT_TOKEN = re.compile(rb"[0-9a-fA-F]{64}")
_LOOSE_TOKEN = re.compile(rb"[^/\s]{1,512}")
_UUID = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_TOPIC = re.compile(rb"[A-Za-z0-9][A-Za-z0-9.\-_]*")
_PRIORITIES = frozenset({b"10", b"5", b"1"})
_PUSH_TYPES = frozenset(
    {
        b"alert",
        b"background",
        b"location",
        b"voip",
        b"complication",
        b"fileprovider",
        b"mdm",
        b"liveactivity",
        b"pushtotalk",
        b"widgets",
    }
)
_H2_CONFIG = H2Configuration(
    client_side=False,
    header_encoding=None,  # bytes in, bytes out: no decoding per header
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
)
_SHUTDOWN = b'{"reason":"Shutdown"}'
_STATUS = {s: str(s).encode() for s in set(REASON_STATUS.values()) | {200}}
_BODIES = {r: orjson.dumps({"reason": r}) for r in REASON_STATUS}
# token, apns-id, notification_id, device_id, collapse id, payload size, dedupe key
_Record = tuple[bytes, bytes, bytes, bytes, bytes, int, tuple[bytes, ...]]


class _PlainEncoder(Encoder):
    """Response headers without Huffman coding: a few bytes more, no per-answer encoding cost."""

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        """Encode as hpack does, Huffman off."""
        return super().encode(headers, huffman=False)


class ApnsServer:
    """What all APNs connections share: the key to verify provider tokens, topic, state."""

    def __init__(
        self, state: ProviderState, creds: LocalCredentials, *, strict_tokens: bool = True
    ) -> None:
        self.state = state
        self.strict_tokens = strict_tokens
        self.topic = creds.apns_topic.encode()
        # Token auth may push to the app's topic and its push-type variants.
        self.topics = frozenset(
            self.topic + suffix
            for suffix in (b"", b".voip", b".complication", b".push-type.liveactivity")
        )
        self.key_id = creds.apns_key_id
        self.team_id = creds.apns_team_id
        key = load_pem_private_key(creds.apns_key_file.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.public_key = key.public_key()
        self.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ssl_context.load_cert_chain(creds.server_cert_file, creds.server_key_file)
        self.ssl_context.set_alpn_protocols(["h2"])
        self.connections: set[ApnsConnection] = set()
        self.connections_total = 0
        self.goaways_sent = 0
        # bearer header value -> (reason it is refused, or None; its iat)
        self._bearers: dict[bytes, tuple[str | None, int]] = {}

    def protocol(self) -> ApnsConnection:
        """Protocol factory for loop.create_server."""
        return ApnsConnection(self)

    def check_bearer(self, value: bytes | None, now: float) -> str | None:
        """The 403 reason for an authorization header, or None when it is good."""
        if not value:
            return "MissingProviderToken"
        verdict = self._bearers.get(value)
        if verdict is None:
            verdict = self._verify(value)
            if len(self._bearers) > 10_000:
                self._bearers.clear()
            self._bearers[value] = verdict
        reason, iat = verdict
        if reason is None and now - iat > TOKEN_MAX_AGE_S:
            return "ExpiredProviderToken"
        return reason

    def _verify(self, value: bytes) -> tuple[str | None, int]:
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return "InvalidProviderToken", 0
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token,
                self.public_key,
                algorithms=["ES256"],
                options={"verify_iat": False, "verify_exp": False, "require": ["iss", "iat"]},
            )
        except jwt.PyJWTError:
            return "InvalidProviderToken", 0
        iat = claims.get("iat")
        if header.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            return "InvalidProviderToken", 0
        if not isinstance(iat, int) or iat > time.time() + 60:
            return "InvalidProviderToken", 0
        return None, iat

    def reset_counters(self) -> None:
        """Zero the counters /stats shows (open connections stay open)."""
        self.connections_total = 0
        self.goaways_sent = 0

    def describe(self) -> dict[str, Any]:
        """Connection counters for /stats."""
        return {
            "connections": len(self.connections),
            "connections_total": self.connections_total,
            "goaways_sent": self.goaways_sent,
        }

    def goaway(self, after_requests: int) -> int:
        """Arm every open connection to send GOAWAY after `after_requests` more answers (0: now).

        Returns the number of connections armed. New connections are not affected.
        """
        conns = list(self.connections)
        for conn in conns:
            conn.arm_goaway(after_requests)
        return len(conns)


class ApnsConnection(asyncio.Protocol):
    """One client connection: h2 state, streams being received, answers waiting for window."""

    def __init__(self, server: ApnsServer) -> None:
        self.server = server
        self.state = server.state
        self.conn = H2Connection(config=_H2_CONFIG)
        self.conn.encoder = _PlainEncoder()
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, list[Any]] = {}  # stream id -> [headers, body or None]
        self.blocked: deque[tuple[int, list[tuple[bytes, bytes]], bytes]] = deque()
        self.bearer: bytes | None = None
        self.bearer_since = 0.0
        self.goaway_after: int | None = None
        self.last_stream_id: int | None = None  # set once GOAWAY went out
        self.highest_answered = 0
        self.delayed = 0  # answers waiting on added latency
        self.closing = False
        self.close_timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the preface: our settings and a large connection window."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.add(self)
        self.server.connections_total += 1
        # Announced in the connection preface, so they hold from the first request on.
        self.conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
            },
        )
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(_WINDOW)
        transport.write(self.conn.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection and whatever it still owed."""
        self.server.connections.discard(self)
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
                    self._handle(event.stream_id, stream[0], stream[1])
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

    # requests

    def _handle(self, stream_id: int, headers: list[Any], body: bytes | None) -> None:
        if self.last_stream_id is not None and stream_id > self.last_stream_id:
            return  # after our GOAWAY: not processed, the client sends it again elsewhere
        state = self.state
        state.requests += 1
        h: dict[bytes, bytes] = dict(headers)
        apns_id = h.get(b"apns-id") or str(uuid.uuid4()).encode()
        verdict = self._check(h, body, apns_id)
        reason: str | None
        if isinstance(verdict, str):
            reason = verdict
            state.reject(reason)
        else:
            reason = None
            state.record(*verdict)
        delay = state.faults.latency_s
        if delay > 0:
            self.delayed += 1
            asyncio.get_running_loop().call_later(
                delay, self._answer_later, stream_id, apns_id, reason
            )
        else:
            self._answer(stream_id, apns_id, reason)
        if stream_id > self.highest_answered:
            self.highest_answered = stream_id
        if self.goaway_after is not None:
            self.goaway_after -= 1
            if self.goaway_after <= 0:
                self._send_goaway(stream_id)

    def _check(self, h: dict[bytes, bytes], body: bytes | None, apns_id: bytes) -> str | _Record:
        """Why the request is refused (a reason), or what to record of it."""
        server = self.server
        if h.get(b":method") != b"POST":
            return "MethodNotAllowed"
        path = h.get(b":path", b"")
        if not path.startswith(b"/3/device/"):
            return "BadPath"
        now = time.monotonic()
        reason = server.check_bearer(h.get(b"authorization"), time.time())
        if reason is not None:
            return reason
        bearer = h[b"authorization"]
        if bearer != self.bearer:
            if self.bearer is not None and now - self.bearer_since < TOKEN_MIN_REFRESH_S:
                return "TooManyProviderTokenUpdates"
            self.bearer, self.bearer_since = bearer, now
        faults = self.state.faults
        if faults.outage_until > now:
            return OUTAGE_REASONS.get(faults.outage_status, "ServiceUnavailable")
        token = path[10:]
        if not token:
            return "MissingDeviceToken"
        if not (_STRICT_TOKEN if server.strict_tokens else _LOOSE_TOKEN).fullmatch(token):
            return "BadDeviceToken"
        topic = h.get(b"apns-topic")
        if not topic:
            return "MissingTopic"
        if topic not in server.topics:
            return "DeviceTokenNotForTopic" if _TOPIC.fullmatch(topic) else "BadTopic"
        if not _UUID.fullmatch(apns_id):
            return "BadMessageId"
        priority = h.get(b"apns-priority")
        if priority is not None and priority not in _PRIORITIES:
            return "BadPriority"
        expiration = h.get(b"apns-expiration")
        if expiration is not None and not expiration.isdigit():
            return "BadExpirationDate"
        collapse_id = h.get(b"apns-collapse-id", b"")
        if len(collapse_id) > MAX_COLLAPSE_ID:
            return "BadCollapseId"
        push_type = h.get(b"apns-push-type")
        if push_type is not None and push_type not in _PUSH_TYPES:
            return "InvalidPushType"
        if not body:
            return "PayloadEmpty"
        if len(body) > (MAX_VOIP_PAYLOAD if push_type == b"voip" else MAX_PAYLOAD):
            return "PayloadTooLarge"
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return "BadPayload"
        if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
            return "BadPayload"
        if faults.token_errors:
            reason = faults.token_errors.get(token.decode("utf-8", "replace"))
            if reason is not None:
                return reason
        rate = faults.rate_limit
        if rate is not None and not rate.take(now):
            return "TooManyRequests"
        nid, did = payload.get("notification_id"), payload.get("device_id")
        nid_b = nid.encode() if isinstance(nid, str) else b""
        did_b = did.encode() if isinstance(did, str) else b""
        dedupe = (token, nid_b, did_b) if nid_b else (token, apns_id)
        return (token, apns_id, nid_b, did_b, collapse_id, len(body), dedupe)

    # answers

    def _answer(self, stream_id: int, apns_id: bytes, reason: str | None) -> None:
        if reason is None:
            with contextlib.suppress(H2Error):  # the client reset the stream meanwhile
                self.conn.send_headers(
                    stream_id,
                    [(b":status", b"200"), NeverIndexedHeaderTuple(b"apns-id", apns_id)],
                    end_stream=True,
                )
            return
        status = REASON_STATUS.get(reason, 400)
        if status == 410:
            body = orjson.dumps({"reason": reason, "timestamp": int(time.time() * 1000)})
        else:
            body = _BODIES.get(reason) or orjson.dumps({"reason": reason})
        headers = [
            (b":status", _STATUS.get(status) or str(status).encode()),
            NeverIndexedHeaderTuple(b"apns-id", apns_id),  # unique: keep it out of the table
            (b"content-type", b"application/json"),
        ]
        if self.blocked or self.conn.local_flow_control_window(stream_id) < len(body):
            # The client has not handed back enough receive window: wait for WINDOW_UPDATE.
            self.blocked.append((stream_id, headers, body))
            return
        self._send_error(stream_id, headers, body)

    def _send_error(self, stream_id: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        try:
            self.conn.send_headers(stream_id, headers)
            self.conn.send_data(stream_id, body, end_stream=True)  # one frame, END_STREAM
        except H2Error:
            pass  # the client reset the stream meanwhile

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
            self._send_error(stream_id, headers, body)
        self._maybe_close_after_goaway()

    def _answer_later(self, stream_id: int, apns_id: bytes, reason: str | None) -> None:
        self.delayed -= 1
        if self.transport is None or self.closing:
            return
        self._answer(stream_id, apns_id, reason)
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
        self.server.goaways_sent += 1
        frame = GoAwayFrame(0, last_stream_id=last_stream_id, additional_data=_SHUTDOWN)
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
