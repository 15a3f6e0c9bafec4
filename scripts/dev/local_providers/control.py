"""The control API of the local providers (plain HTTP/1.1 JSON) and its typed client.

Endpoints (all JSON):
  GET  /health                                   {"ok": true}
  GET  /stats                                    per provider: requests, accepted, distinct,
                                                 duplicates, rejected {reason: n}, connections...
  GET  /accepted?provider=P&since=N&limit=M      {"fields", "records": [[...]], "next", "total"}
  GET  /faults                                   the faults in effect, per provider
  POST /faults  {"provider": P, "token_errors": {token: reason}, "rate_limit": {"per_second": n
                 or null, "retry_after_s": s}, "outage": {"seconds": s, "status": 503|500},
                 "latency_ms": ms, "goaway": {"after_requests": k}}    (any subset of the keys;
                 goaway reaches HTTP/2 connections: APNs, FCM over TLS)
  POST /reset   {"provider": P} or {} for both   records, counters and faults

`ProviderControl` wraps them with the standard library only, so any test or script can use it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict
from urllib.parse import parse_qs, urlencode

from scripts.dev.local_providers.control_api import JsonControlClient, json_response
from scripts.dev.local_providers.http11 import Http11Protocol, Request, Response
from scripts.dev.local_providers.state import RECORD_FIELDS, ProviderState, RateLimit

if TYPE_CHECKING:
    from scripts.dev.local_providers.apns import ApnsServer
    from scripts.dev.local_providers.fcm import FcmServer

PROVIDERS = ("apns", "fcm")
MAX_PAGE = 100_000


class ProviderStats(TypedDict, total=False):
    """One provider's /stats entry; `tokens_issued` and `validated` are FCM only."""

    requests: int
    accepted: int
    distinct: int
    duplicates: int
    rejected: dict[str, int]
    rejected_total: int
    connections: int
    connections_total: int
    goaways_sent: int
    tokens_issued: int
    validated: int
    faults: dict[str, Any]


class AcceptedRecord(NamedTuple):
    """One accepted message as the provider saw it.

    `message_id` is the apns-id (APNs) or the message name the send returned (FCM);
    `notification_id` and `device_id` come from the payload's top level (APNs) or
    `message.data` (FCM) when present; `time` is the server's time.time() on receipt.
    """

    provider: str
    token: str
    message_id: str
    notification_id: str | None
    device_id: str | None
    collapse_id: str | None
    size: int
    time: float


# server side


class ControlApi:
    """Serves the endpoints above for the two provider servers it is given."""

    def __init__(self, apns: ApnsServer, fcm: FcmServer) -> None:
        self.apns = apns
        self.fcm = fcm
        self.states: dict[str, ProviderState] = {"apns": apns.state, "fcm": fcm.state}

    def protocol(self) -> Http11Protocol:
        """Protocol factory for loop.create_server."""
        return Http11Protocol(self.handle)

    def handle(self, req: Request) -> Response:
        """Route one request."""
        try:
            route = (req.method, req.path)
            if route == (b"GET", "/health"):
                return json_response(200, {"ok": True})
            if route == (b"GET", "/stats"):
                return json_response(200, self.stats())
            if route == (b"GET", "/accepted"):
                return self.accepted(parse_qs(req.query))
            if route == (b"GET", "/faults"):
                return json_response(200, {p: s.faults.describe() for p, s in self.states.items()})
            if route == (b"POST", "/faults"):
                return self.set_faults(json.loads(req.body or b"{}"))
            if route == (b"POST", "/reset"):
                return self.reset(json.loads(req.body or b"{}"))
            return json_response(404, {"error": f"no endpoint {req.method.decode()} {req.path}"})
        except (ValueError, TypeError, KeyError) as exc:
            return json_response(400, {"error": f"{type(exc).__name__}: {exc}"})

    def stats(self) -> dict[str, Any]:
        """Every provider's counters and faults."""
        out: dict[str, Any] = {}
        for provider, server in (("apns", self.apns), ("fcm", self.fcm)):
            state = server.state
            out[provider] = {
                **state.stats(),
                **server.describe(),
                "faults": state.faults.describe(),
            }
        return out

    def _state(self, provider: Any) -> ProviderState:
        if provider not in self.states:
            raise ValueError(f"provider must be one of {PROVIDERS}, not {provider!r}")
        return self.states[provider]

    def accepted(self, query: dict[str, list[str]]) -> Response:
        """A page of accepted records, from index `since`."""
        provider = query.get("provider", [""])[0]
        state = self._state(provider)
        since = int(query.get("since", ["0"])[0])
        limit = min(MAX_PAGE, int(query.get("limit", ["10000"])[0]))
        records = list(state.records(since, since + limit))
        if provider == "fcm":
            # FCM records keep the message number; answer with the name the send returned.
            prefix = f"projects/{self.fcm.project}/messages/"
            for record in records:
                record[1] = prefix + record[1]
        return json_response(
            200,
            {
                "provider": provider,
                "fields": RECORD_FIELDS,
                "records": records,
                "next": max(since, 0) + len(records),
                "total": state.accepted,
            },
        )

    def set_faults(self, doc: dict[str, Any]) -> Response:
        """Apply the fault keys present in `doc` to one provider."""
        provider = str(doc.get("provider"))
        state = self._state(provider)
        faults = state.faults
        result: dict[str, Any] = {}
        if "token_errors" in doc:
            errors = dict(doc["token_errors"] or {})
            known = self._reasons(provider)
            unknown = sorted({r for r in errors.values() if r not in known})
            if unknown:
                raise ValueError(f"unknown {provider} reasons {unknown}; known: {sorted(known)}")
            faults.token_errors = {str(t): str(r) for t, r in errors.items()}
        if "rate_limit" in doc:
            limit = doc["rate_limit"] or {}
            per_second = limit.get("per_second")
            if per_second is None:
                faults.rate_limit = None
            elif float(per_second) <= 0:
                raise ValueError("rate_limit.per_second must be positive (or null for none)")
            else:
                retry_after = int(limit.get("retry_after_s", 1))
                faults.rate_limit = RateLimit(float(per_second), retry_after)
        if "outage" in doc:
            outage = doc["outage"] or {}
            status = int(outage.get("status", 503))
            if status not in (500, 503):
                raise ValueError("outage.status must be 503 or 500")
            faults.outage_until = time.monotonic() + float(outage.get("seconds", 0))
            faults.outage_status = status
        if "latency_ms" in doc:
            faults.latency_s = max(0.0, float(doc["latency_ms"] or 0) / 1000)
        if "goaway" in doc:
            # HTTP/2 connections only: all of APNs, FCM's over TLS.
            after = int((doc["goaway"] or {}).get("after_requests", 0))
            server = self.apns if provider == "apns" else self.fcm
            result["goaway_connections"] = server.goaway(after)
        return json_response(200, {"faults": faults.describe(), **result})

    def _reasons(self, provider: str) -> set[str]:
        from scripts.dev.local_providers.apns import REASON_STATUS
        from scripts.dev.local_providers.fcm import FCM_ERRORS

        return set(REASON_STATUS if provider == "apns" else FCM_ERRORS)

    def reset(self, doc: dict[str, Any]) -> Response:
        """Forget records, counters and faults of one provider, or of both."""
        provider = doc.get("provider")
        servers: dict[str, ApnsServer | FcmServer] = {"apns": self.apns, "fcm": self.fcm}
        for name in [provider] if provider else PROVIDERS:
            self._state(name).reset()
            servers[name].reset_counters()
        return json_response(200, {"ok": True})


# client side


class ProviderControl(JsonControlClient):
    """Typed client of the control API (standard library only)."""

    def health(self) -> bool:
        """True if the control API answers."""
        try:
            return bool(self._call("GET", "/health").get("ok"))
        except OSError:
            return False

    def stats(self) -> dict[str, ProviderStats]:
        """Counters per provider ("apns", "fcm")."""
        result: dict[str, ProviderStats] = self._call("GET", "/stats")
        return result

    def faults(self) -> dict[str, dict[str, Any]]:
        """The faults in effect per provider."""
        result: dict[str, dict[str, Any]] = self._call("GET", "/faults")
        return result

    def accepted(self, provider: str, since: int = 0, page: int = 50_000) -> list[AcceptedRecord]:
        """Every record accepted from index `since` on (pages through them)."""
        out: list[AcceptedRecord] = []
        while True:
            query = urlencode({"provider": provider, "since": since, "limit": page})
            doc = self._call("GET", f"/accepted?{query}")
            out += [AcceptedRecord(provider, *r) for r in doc["records"]]
            if not doc["records"] or doc["next"] >= doc["total"]:
                return out
            since = doc["next"]

    def set_token_errors(self, provider: str, errors: Mapping[str, str]) -> None:
        """Answer these tokens with these reasons from now on (replaces the previous map).

        APNs reasons are Apple's (`Unregistered`, `BadDeviceToken`, ...); FCM reasons are
        errorCodes (`UNREGISTERED`, `SENDER_ID_MISMATCH`, `INVALID_ARGUMENT`, ...).
        """
        self._call("POST", "/faults", {"provider": provider, "token_errors": dict(errors)})

    def set_rate_limit(
        self, provider: str, per_second: float | None, retry_after_s: int = 1
    ) -> None:
        """Accept at most `per_second` sends a second (None: no limit); excess gets 429."""
        limit = {"per_second": per_second, "retry_after_s": retry_after_s}
        self._call("POST", "/faults", {"provider": provider, "rate_limit": limit})

    def set_outage(self, provider: str, seconds: float, status: int = 503) -> None:
        """Answer every send with `status` (503 or 500) for the next `seconds` (0 ends it)."""
        outage = {"seconds": seconds, "status": status}
        self._call("POST", "/faults", {"provider": provider, "outage": outage})

    def goaway(self, provider: str = "apns", after_requests: int = 0) -> int:
        """Make every open HTTP/2 connection send GOAWAY after `after_requests` more answers.

        0 means now. New connections are not affected, nor FCM's HTTP/1.1 ones. Returns how many
        were armed.
        """
        doc = self._call(
            "POST", "/faults", {"provider": provider, "goaway": {"after_requests": after_requests}}
        )
        return int(doc["goaway_connections"])

    def set_latency(self, provider: str, ms: float) -> None:
        """Hold every answer back this long (other streams and connections go on)."""
        self._call("POST", "/faults", {"provider": provider, "latency_ms": ms})

    def reset(self, provider: str | None = None) -> None:
        """Forget records, counters and faults (of one provider, or both)."""
        self._call("POST", "/reset", {"provider": provider} if provider else {})
