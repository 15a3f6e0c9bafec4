"""A local APNs: HTTP/2 over TLS on asyncio and `h2`, answering as Apple does.

It serves `POST /3/device/<token>` with Apple's statuses and `{"reason"}` bodies; every answer
echoes `apns-id`, which aioapns needs to match it (h2server.py has the HTTP/2 side). Per-request
work is kept small because benchmarks push thousands of requests a second through one core:
header values stay bytes, a provider token is verified once per distinct bearer string, nothing
is logged per request.
"""

from __future__ import annotations

import re
import ssl
import time
import uuid
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from hpack import NeverIndexedHeaderTuple

from scripts.dev.local_providers.credentials import LocalCredentials
from scripts.dev.local_providers.h2server import Answer, H2ServerConnection, goaway_all
from scripts.dev.local_providers.state import ProviderState

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
_BODIES = {r: orjson.dumps({"reason": r}) for r in REASON_STATUS}
# token, apns-id, notification_id, device_id, collapse id, payload size, dedupe key
_Record = tuple[bytes, bytes, bytes, bytes, bytes, int, tuple[bytes, ...]]


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
        return goaway_all(self.connections, after_requests)


class ApnsConnection(H2ServerConnection):
    """One client connection; remembers its provider token (refreshes are rate-limited)."""

    def __init__(self, server: ApnsServer) -> None:
        super().__init__(server)
        self.server = server
        self.bearer: bytes | None = None
        self.bearer_since = 0.0

    def answer_request(self, stream_id: int, headers: dict[bytes, bytes], body: bytes) -> Answer:
        """Check the request as APNs does; record it if accepted."""
        state = self.state
        state.requests += 1
        apns_id = headers.get(b"apns-id") or str(uuid.uuid4()).encode()
        verdict = self._check(headers, body, apns_id)
        delay = state.faults.latency_s
        # apns-id is unique per request: never indexed, it stays out of the HPACK table.
        id_header = NeverIndexedHeaderTuple(b"apns-id", apns_id)
        if not isinstance(verdict, str):
            state.record(*verdict)
            return 200, [id_header], b"", delay
        state.reject(verdict)
        status = REASON_STATUS.get(verdict, 400)
        if status == 410:
            error = orjson.dumps({"reason": verdict, "timestamp": int(time.time() * 1000)})
        else:
            error = _BODIES.get(verdict) or orjson.dumps({"reason": verdict})
        return status, [id_header, (b"content-type", b"application/json")], error, delay

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
