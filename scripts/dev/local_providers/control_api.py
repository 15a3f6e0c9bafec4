"""What the local servers' control APIs share: the JSON answer, the error and the client.

The local providers (APNs, FCM) and the local channel servers (email, SMS, web push, chat) each
serve a small HTTP/1.1 control API for tests and the dev stack: faults, records and counters.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from scripts.dev.local_providers.http11 import Response


class ControlError(RuntimeError):
    """The control API refused a call; the message is its explanation."""


def json_response(status: int, doc: Any) -> Response:
    """A control API answer: ``doc`` as JSON with ``status``."""
    return Response(status, json.dumps(doc).encode())


class JsonControlClient:
    """Typed client base of a control API (standard library only)."""

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"content-type": "application/json"} if data is not None else {},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise ControlError(f"{method} {path}: {exc.code} {detail}") from None
