"""A local chat webhook receiver over TLS: Slack-shaped and Teams-shaped incoming webhooks.

- `POST /services/T.../B.../X...` (Slack): JSON with `text` or `blocks`; `200 ok` (text/plain);
  `400 invalid_payload` for a body that is not JSON, `400 no_text` without either.
- `POST /webhookb2/...` (Teams): a MessageCard (`@type: MessageCard`) or an Adaptive Card
  message (`type: message`); `200 1`.
Any other path is `404 no_service`, as Slack answers for a removed webhook. Faults per webhook
path: `{"status": 404, "body": "no_service"}`, `{"status": 410, "body":
"channel_is_archived"}`, `{"status": 403, "body": "invalid_token"}`, `{"status": 429}` (with
Retry-After); the rate limit (429 `rate_limited`), an outage (503), latency.
"""

from __future__ import annotations

import json
import time
from typing import Any

from scripts.dev.local_channels.state import ChannelState
from scripts.dev.local_providers.http11 import Request, Response

TEXT = b"text/plain; charset=utf-8"


def _text(status: int, body: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Response:
    return Response(status, body.encode(), headers, content_type=TEXT)


class ChatServer:
    """Slack and Teams incoming webhooks on one origin."""

    def __init__(self, state: ChannelState) -> None:
        self.state = state

    def handle(self, req: Request) -> Response:
        """Route one request."""
        slack = req.path.startswith("/services/")
        teams = req.path.startswith("/webhookb2/")
        if req.method != b"POST" or not (slack or teams):
            return _text(404, "no_service")
        state = self.state
        state.requests += 1
        faults = state.faults
        if faults.outage(time.monotonic()):
            state.reject("outage")
            return _text(faults.outage_status, "service_unavailable")
        fault = faults.address_errors.get(req.path)
        if fault is not None:
            status = int(fault.get("status", 404))
            body = str(fault.get("body", "no_service" if status == 404 else "error"))
            state.reject(body)
            headers: tuple[tuple[bytes, bytes], ...] = ()
            if status == 429:
                headers = ((b"retry-after", str(fault.get("retry_after_s", 1)).encode()),)
            return _text(status, body, headers)
        if state.limited():
            state.reject("rate_limited")
            retry = str(faults.rate_limit.retry_after_s if faults.rate_limit else 1).encode()
            return _text(429, "rate_limited", ((b"retry-after", retry),))
        try:
            doc: Any = json.loads(req.body)
        except ValueError:
            state.reject("invalid_payload")
            return _text(400, "invalid_payload")
        if not isinstance(doc, dict):
            state.reject("invalid_payload")
            return _text(400, "invalid_payload")
        if slack and not (doc.get("text") or doc.get("blocks")):
            state.reject("no_text")
            return _text(400, "no_text")
        if teams and doc.get("@type") != "MessageCard" and doc.get("type") != "message":
            state.reject("invalid_payload")
            return _text(400, "invalid_payload")
        state.record({"path": req.path, "kind": "slack" if slack else "teams", "body": doc})
        return Response(200, b"ok" if slack else b"1", content_type=TEXT, delay_s=faults.latency_s)
