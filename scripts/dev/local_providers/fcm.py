"""A local FCM HTTP v1: `POST /v1/projects/<id>/messages:send` and an OAuth2 token endpoint.

Errors have FCM's exact shape (`error.code/message/status/details[FcmError.errorCode]`), which is
what firebase-admin maps to its exception classes. `POST /token` completes google-auth's
service-account flow (an RS256 JWT assertion for an access token); the tokens it issues, and one
fixed token set at start, are the bearers the send endpoint accepts.

Two listeners serve the same handler: plain HTTP/1.1, and TLS where ALPN picks HTTP/2 (what
firebase-admin's httpx client speaks to the real FCM) or HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import ssl
import time
from typing import Any
from urllib.parse import parse_qs, unquote

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from scripts.dev.local_providers.credentials import GOOGLE_TOKEN_URI, LocalCredentials
from scripts.dev.local_providers.h2server import Answer, H2ServerConnection, goaway_all
from scripts.dev.local_providers.http11 import Http11Protocol, Request, Response
from scripts.dev.local_providers.state import ProviderState

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
MAX_PAYLOAD = 4096
TOKEN_TTL_S = 3600
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"

# errorCode -> (HTTP status, google.rpc status, message), as FCM answers them.
FCM_ERRORS: dict[str, tuple[int, str, str]] = {
    "INVALID_ARGUMENT": (
        400,
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
    ),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service"),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch"),
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found."),
    "QUOTA_EXCEEDED": (
        429,
        "RESOURCE_EXHAUSTED",
        "Quota exceeded for quota metric 'Send requests' and limit 'Send requests per minute'.",
    ),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered."),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable."),
}
OUTAGE_CODES = {503: "UNAVAILABLE", 500: "INTERNAL"}
_UNAUTHENTICATED = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
    "or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
# Real registration tokens are long base64url strings, often "<instance id>:APA91b<...>";
# a Firebase installation id (message.fid may carry one) is 22 base64url characters.
_STRICT_TOKEN = re.compile(r"[A-Za-z0-9_\-:]{100,4096}")
_FID = re.compile(r"[A-Za-z0-9_\-]{22}")
_LOOSE_TOKEN = re.compile(r"[^\s/]{1,4096}")
_TARGETS = ("token", "fid", "topic", "condition")


def error_body(
    status: int, google_status: str, message: str, code: str | None, *extra: dict[str, Any]
) -> bytes:
    """An FCM v1 error document; `code` goes into an FcmError detail when given."""
    details: list[dict[str, Any]] = [{"@type": FCM_ERROR_TYPE, "errorCode": code}] if code else []
    details += extra
    error: dict[str, Any] = {"code": status, "message": message, "status": google_status}
    if details:
        error["details"] = details
    return orjson.dumps({"error": error})


def _fcm_error(code: str, message: str | None = None, *extra: dict[str, Any]) -> Response:
    status, google_status, default = FCM_ERRORS[code]
    return Response(status, error_body(status, google_status, message or default, code, *extra))


_CANNED = {code: _fcm_error(code) for code in FCM_ERRORS}
_UNAUTHORIZED = Response(401, error_body(401, "UNAUTHENTICATED", _UNAUTHENTICATED, None))


def _bad_request(message: str, field: str | None = None) -> Response:
    violation = {"field": field, "description": message}
    extra = [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [violation]}]
    return _fcm_error("INVALID_ARGUMENT", message, *(extra if field else []))


class FcmServer:
    """Request handling shared by all FCM connections."""

    def __init__(
        self,
        state: ProviderState,
        creds: LocalCredentials,
        *,
        strict_tokens: bool = True,
        fixed_token: str | None = None,
    ) -> None:
        self.state = state
        self.strict_tokens = strict_tokens
        self.project = creds.fcm_project_id
        sa: dict[str, Any] = json.loads(creds.fcm_service_account_file.read_text())
        key = load_pem_private_key(sa["private_key"].encode(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        self.sa_public_key = key.public_key()
        self.sa_email = str(sa["client_email"])
        self.sa_key_id = str(sa["private_key_id"])
        self.token_uri = GOOGLE_TOKEN_URI  # set to the local /token once the port is known
        self.fixed_token = fixed_token.encode() if fixed_token else None
        self.access_tokens: dict[bytes, float] = {}  # token -> expiry (time.time())
        self.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ssl_context.load_cert_chain(creds.server_cert_file, creds.server_key_file)
        self.ssl_context.set_alpn_protocols(["h2", "http/1.1"])
        self.connections: set[Any] = set()  # Http11Protocol and FcmH2Connection
        self.connections_total = 0
        self.goaways_sent = 0
        self.tokens_issued = 0
        self.validated = 0
        self._seq = 0
        self._name_prefix = b"projects/%s/messages/" % self.project.encode()

    def protocol(self) -> Http11Protocol:
        """Protocol factory for the plain HTTP/1.1 listener."""
        self.connections_total += 1
        return Http11Protocol(self.handle, self.connections)

    def protocol_tls(self) -> AlpnSwitch:
        """Protocol factory for the TLS listener (HTTP/2 or HTTP/1.1, as ALPN says)."""
        return AlpnSwitch(self)

    def goaway(self, after_requests: int) -> int:
        """Arm the open HTTP/2 connections to send GOAWAY (see ApnsServer.goaway)."""
        return goaway_all(self.connections, after_requests)

    def reset_counters(self) -> None:
        """Zero the counters /stats shows (issued tokens stay valid)."""
        self.connections_total = 0
        self.goaways_sent = 0
        self.tokens_issued = 0
        self.validated = 0

    def describe(self) -> dict[str, Any]:
        """Counters for /stats."""
        return {
            "connections": len(self.connections),
            "connections_total": self.connections_total,
            "goaways_sent": self.goaways_sent,
            "tokens_issued": self.tokens_issued,
            "validated": self.validated,
        }

    def handle(self, req: Request) -> Response:
        """Answer one request."""
        path = req.path
        if req.method == b"POST" and path.startswith("/v1/projects/"):
            project, sep, rest = path[13:].partition("/")
            if sep and rest == "messages:send":
                self.state.requests += 1
                code, response = self._send(req, project)
                if code is not None:
                    self.state.reject(code)
                delay = self.state.faults.latency_s
                return response._replace(delay_s=delay) if delay > 0 else response
        elif req.method == b"POST" and path == "/token":
            return self._token(req)
        message = f"The requested URL {path} was not found on this server."
        return Response(404, error_body(404, "NOT_FOUND", message, None))

    def _authorized(self, value: bytes | None) -> bool:
        if not value or value[:7].lower() != b"bearer ":
            return False
        token = value[7:].strip()
        if token == self.fixed_token:
            return True
        expiry = self.access_tokens.get(token)
        return expiry is not None and expiry > time.time()

    def _send(self, req: Request, project: str) -> tuple[str | None, Response]:
        """(the code counted as the rejection reason or None, the answer)."""
        if not self._authorized(req.headers.get(b"authorization")):
            # Google's answer to a bad OAuth token: UNAUTHENTICATED without an FcmError detail.
            return "UNAUTHENTICATED", _UNAUTHORIZED
        if project != self.project:
            denied = (
                "Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist)."
            )
            return "PERMISSION_DENIED", Response(
                403, error_body(403, "PERMISSION_DENIED", denied, None)
            )
        faults = self.state.faults
        now = time.monotonic()
        left = faults.outage_left(now)
        if left:
            code = OUTAGE_CODES.get(faults.outage_status, "UNAVAILABLE")
            if code == "UNAVAILABLE":
                retry_after = str(max(1, int(left + 0.999))).encode()
                return code, _CANNED[code]._replace(headers=((b"retry-after", retry_after),))
            return code, _CANNED[code]
        verdict = self._check(req.body)
        if isinstance(verdict, Response):
            return "INVALID_ARGUMENT", verdict
        token, message, size, validate_only = verdict
        reason = faults.token_errors.get(token) if faults.token_errors else None
        if reason is not None:
            if reason == "QUOTA_EXCEEDED":
                return reason, _CANNED[reason]._replace(headers=((b"retry-after", b"1"),))
            return reason, _CANNED[reason]
        if validate_only:
            # Dry run: validated as a send would be, never delivered.
            self.validated += 1
            return None, Response(200, b'{"name":"%sfake_message_id"}' % self._name_prefix)
        rate = faults.rate_limit
        if rate is not None and not rate.take(now):
            retry_after = str(rate.retry_after_s).encode()
            response = _CANNED["QUOTA_EXCEEDED"]._replace(headers=((b"retry-after", retry_after),))
            return "QUOTA_EXCEEDED", response
        self._seq += 1
        seq = str(self._seq).encode()
        data = message.get("data")
        nid = did = None
        if isinstance(data, dict):
            nid, did = data.get("notification_id"), data.get("device_id")
        nid_b = nid.encode() if isinstance(nid, str) else b""
        did_b = did.encode() if isinstance(did, str) else b""
        android = message.get("android")
        collapse = android.get("collapse_key") if isinstance(android, dict) else None
        token_b = token.encode()
        self.state.record(
            token_b,
            seq,
            nid_b,
            did_b,
            collapse.encode() if isinstance(collapse, str) else b"",
            size,
            (token_b, nid_b, did_b) if nid_b else (token_b, req.body),
        )
        return None, Response(200, b'{"name":"%s%s"}' % (self._name_prefix, seq))

    def _check(self, body: bytes) -> Response | tuple[str, dict[str, Any], int, bool]:
        """The error for a malformed send, or (target, message, payload size, validate_only)."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _bad_request("Invalid JSON payload received.")
        message = doc.get("message") if isinstance(doc, dict) else None
        if not isinstance(message, dict):
            return _bad_request("Request contains an invalid argument.", "message")
        targets = [t for t in _TARGETS if message.get(t) is not None]
        if len(targets) != 1:
            return _bad_request(
                "Exactly one of message.token, message.fid, message.topic or message.condition "
                "must be set.",
                "message",
            )
        target = message[targets[0]]
        if not isinstance(target, str):
            return _bad_request("Request contains an invalid argument.", f"message.{targets[0]}")
        if targets[0] in ("token", "fid"):
            pattern = _STRICT_TOKEN if self.strict_tokens else _LOOSE_TOKEN
            fid = targets[0] == "fid" and _FID.fullmatch(target)
            if not (pattern.fullmatch(target) or fid):
                return _bad_request(
                    "The registration token is not a valid FCM registration token",
                    f"message.{targets[0]}",
                )
        data = message.get("data")
        if data is not None and not (
            isinstance(data, dict) and all(isinstance(v, str) for v in data.values())
        ):
            return _bad_request("Invalid value at 'message.data': values must be strings.")
        # The 4 KB limit is on the message content, so measure it without the target.
        size = len(orjson.dumps({k: v for k, v in message.items() if k != targets[0]}))
        if size > MAX_PAYLOAD:
            return _bad_request("Message is too big", "message")
        return target, message, size, doc.get("validate_only") is True

    def _token(self, req: Request) -> Response:
        form = parse_qs(req.body.decode("utf-8", "replace"))
        grant = form.get("grant_type", [""])[0]
        if grant != JWT_BEARER:
            return _oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant}")
        assertion = form.get("assertion", [""])[0]
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(
                assertion,
                self.sa_public_key,
                algorithms=["RS256"],
                audience=[GOOGLE_TOKEN_URI, self.token_uri],
                options={"require": ["iss", "aud", "iat", "exp"]},
                leeway=60,
            )
        except jwt.PyJWTError as exc:
            return _oauth_error("invalid_grant", f"Invalid JWT: {exc}")
        kid = header.get("kid", self.sa_key_id)
        if claims.get("iss") != self.sa_email or kid != self.sa_key_id:
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")
        token = "ya29.local." + secrets.token_urlsafe(32)
        now = time.time()
        if len(self.access_tokens) > 10_000:
            self.access_tokens = {t: e for t, e in self.access_tokens.items() if e > now}
        self.access_tokens[token.encode()] = now + TOKEN_TTL_S
        self.tokens_issued += 1
        body = {"access_token": token, "expires_in": TOKEN_TTL_S, "token_type": "Bearer"}
        return Response(200, orjson.dumps(body))


class FcmH2Connection(H2ServerConnection):
    """FCM over HTTP/2: the same handler as HTTP/1.1, fed from h2 streams."""

    def __init__(self, server: FcmServer) -> None:
        super().__init__(server)
        self.server = server

    def answer_request(self, stream_id: int, headers: dict[bytes, bytes], body: bytes) -> Answer:
        """Answer through FcmServer.handle."""
        path, _, query = headers.get(b":path", b"").decode("latin-1").partition("?")
        method = headers.get(b":method", b"")
        response = self.server.handle(Request(method, unquote(path), query, headers, body))
        extra = [(b"content-type", response.content_type), *response.headers]
        return response.status, extra, response.body, response.delay_s


class AlpnSwitch(asyncio.Protocol):
    """Hands a TLS connection to the HTTP/2 or the HTTP/1.1 protocol, as ALPN chose."""

    def __init__(self, server: FcmServer) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The handshake is done: pick the protocol and step aside."""
        assert isinstance(transport, asyncio.Transport)
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        inner: asyncio.Protocol = (
            FcmH2Connection(self.server) if alpn == "h2" else self.server.protocol()
        )
        transport.set_protocol(inner)
        inner.connection_made(transport)


def _oauth_error(error: str, description: str) -> Response:
    return Response(400, orjson.dumps({"error": error, "error_description": description}))
