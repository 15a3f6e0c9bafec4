"""The control API of the local channel servers (plain HTTP/1.1 JSON) and its typed client.

Endpoints (all JSON; CHANNEL is email, sms, webpush or chat):
  GET  /health                                   {"ok": true}
  GET  /stats                                    per channel: requests, accepted, rejected
                                                 {reason: n}, faults
  GET  /accepted?channel=C&since=N               {"records": [...], "next", "total"}
  GET  /callbacks                                the SMS status callbacks made, with answers
  POST /faults  {"channel": C, "address_errors": {address: spec}, "rate_limit":
                 {"per_second": n or null, "retry_after_s": s}, "outage": {"seconds": s,
                 "status": 421|451|500|503}, "latency_ms": ms}    (any subset of the keys)
  POST /reset   {"channel": C} or {} for all
  POST /webpush/subscriptions                    a new subscription the server can decrypt
                                                 pushes to: {"id", "subscription"}
  POST /sms/inbound {"url", "from", "to", "body"}  the SMS server posts a message from `from`
                                                 to `to` to the webhook `url`, signed: {"sid"}
  GET  /sms/inbound                              the inbound posts made and their answers

`ChannelControl` wraps them with the standard library only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlencode

from scripts.dev.local_channels.sms import SmsServer
from scripts.dev.local_channels.state import CHANNELS, ChannelState
from scripts.dev.local_channels.webpush import WebPushServer
from scripts.dev.local_providers.control_api import JsonControlClient, json_response
from scripts.dev.local_providers.http11 import Http11Protocol, Request, Response
from scripts.dev.local_providers.state import RateLimit


class ChannelControlApi:
    """Serves the endpoints above for the channel servers' states."""

    def __init__(
        self, states: Mapping[str, ChannelState], webpush: WebPushServer, sms: SmsServer
    ) -> None:
        self.states = states
        self.webpush = webpush
        self.sms = sms

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
                return json_response(200, {c: s.stats() for c, s in self.states.items()})
            if route == (b"GET", "/accepted"):
                query = parse_qs(req.query)
                state = self._state(query.get("channel", [""])[0])
                since = int(query.get("since", ["0"])[0])
                records = state.records[since:]
                return json_response(
                    200,
                    {"records": records, "next": since + len(records), "total": len(state.records)},
                )
            if route == (b"GET", "/callbacks"):
                return json_response(200, {"callbacks": self.states["sms"].extra})
            if route == (b"POST", "/faults"):
                return self.set_faults(json.loads(req.body or b"{}"))
            if route == (b"POST", "/reset"):
                channel = json.loads(req.body or b"{}").get("channel")
                for name in [channel] if channel else CHANNELS:
                    self._state(name).reset()
                return json_response(200, {"ok": True})
            if route == (b"POST", "/webpush/subscriptions"):
                return json_response(201, self.webpush.mint())
            if route == (b"POST", "/sms/inbound"):
                doc = json.loads(req.body or b"{}")
                sid = self.sms.inbound(
                    str(doc["url"]), str(doc["from"]), str(doc["to"]), str(doc["body"])
                )
                return json_response(202, {"sid": sid})
            if route == (b"GET", "/sms/inbound"):
                return json_response(200, {"answers": self.sms.inbound_answers})
            return json_response(404, {"error": f"no endpoint {req.method.decode()} {req.path}"})
        except (ValueError, TypeError, KeyError) as exc:
            return json_response(400, {"error": f"{type(exc).__name__}: {exc}"})

    def _state(self, channel: Any) -> ChannelState:
        if channel not in self.states:
            raise ValueError(f"channel must be one of {CHANNELS}, not {channel!r}")
        return self.states[channel]

    def set_faults(self, doc: dict[str, Any]) -> Response:
        """Apply the fault keys present in `doc` to one channel."""
        state = self._state(doc.get("channel"))
        faults = state.faults
        if "address_errors" in doc:
            errors = dict(doc["address_errors"] or {})
            if state.channel == "email":
                errors = {k.lower(): v for k, v in errors.items()}
            faults.address_errors = {str(k): dict(v) for k, v in errors.items()}
        if "rate_limit" in doc:
            limit = doc["rate_limit"] or {}
            per_second = limit.get("per_second")
            if per_second is None:
                faults.rate_limit = None
            elif float(per_second) <= 0:
                raise ValueError("rate_limit.per_second must be positive (or null for none)")
            else:
                faults.rate_limit = RateLimit(float(per_second), int(limit.get("retry_after_s", 1)))
        if "outage" in doc:
            outage = doc["outage"] or {}
            status = int(outage.get("status", 503))
            if status not in (421, 451, 500, 503):
                raise ValueError("outage.status must be 421 or 451 (SMTP), 500 or 503")
            faults.outage_until = time.monotonic() + float(outage.get("seconds", 0))
            faults.outage_status = status
        if "latency_ms" in doc:
            faults.latency_s = max(0.0, float(doc["latency_ms"] or 0) / 1000)
        return json_response(200, {"faults": faults.describe()})


class ChannelControl(JsonControlClient):
    """Typed client of the control API (standard library only)."""

    def stats(self) -> dict[str, Any]:
        """Counters per channel."""
        result: dict[str, Any] = self._call("GET", "/stats")
        return result

    def accepted(self, channel: str, since: int = 0) -> list[dict[str, Any]]:
        """Every record the channel accepted from index `since` on."""
        query = urlencode({"channel": channel, "since": since})
        records: list[dict[str, Any]] = self._call("GET", f"/accepted?{query}")["records"]
        return records

    def callbacks(self) -> list[dict[str, Any]]:
        """The SMS status callbacks made so far, with what each got back."""
        result: list[dict[str, Any]] = self._call("GET", "/callbacks")["callbacks"]
        return result

    def set_address_errors(self, channel: str, errors: Mapping[str, Mapping[str, Any]]) -> None:
        """Answer these addresses so from now on (replaces the previous map)."""
        self._call("POST", "/faults", {"channel": channel, "address_errors": dict(errors)})

    def set_rate_limit(
        self, channel: str, per_second: float | None, retry_after_s: int = 1
    ) -> None:
        """Accept at most `per_second` a second (None: no limit); the rest get 429 (SMTP 451)."""
        limit = {"per_second": per_second, "retry_after_s": retry_after_s}
        self._call("POST", "/faults", {"channel": channel, "rate_limit": limit})

    def set_outage(self, channel: str, seconds: float, status: int = 503) -> None:
        """Answer everything with `status` for the next `seconds` (0 ends it)."""
        self._call(
            "POST",
            "/faults",
            {"channel": channel, "outage": {"seconds": seconds, "status": status}},
        )

    def set_latency(self, channel: str, ms: float) -> None:
        """Hold every answer back this long."""
        self._call("POST", "/faults", {"channel": channel, "latency_ms": ms})

    def mint_subscription(self) -> dict[str, Any]:
        """A web push subscription whose pushes the server decrypts: {"id", "subscription"}."""
        result: dict[str, Any] = self._call("POST", "/webpush/subscriptions", {})
        return result

    def sms_inbound(
        self, url: str, sender: str, to: str, body: str, timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """Have the SMS server post a message from `sender` to `to` to the webhook `url`.

        Returns its answer ({"status", "content_type", "answer"}) once it came.
        """
        doc = {"url": url, "from": sender, "to": to, "body": body}
        sid = self._call("POST", "/sms/inbound", doc)["sid"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for entry in self._call("GET", "/sms/inbound")["answers"]:
                if entry["sid"] == sid:
                    return dict(entry)
            time.sleep(0.05)
        raise TimeoutError(f"the inbound message {sid} got no answer within {timeout_s} s")

    def reset(self, channel: str | None = None) -> None:
        """Forget records, counters and faults (of one channel, or all)."""
        self._call("POST", "/reset", {"channel": channel} if channel else {})
