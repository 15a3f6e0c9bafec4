"""What a local channel server remembers: accepted messages, rejections, faults to inject.

One `ChannelState` per channel (email, sms, webpush, chat), touched only from the servers'
event loop. Records are plain dicts (what a test wants to look at); a benchmark's hundred
thousand messages fit.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from scripts.dev.local_providers.state import RateLimit

CHANNELS = ("email", "sms", "webpush", "chat")


@dataclass
class ChannelFaults:
    """Misbehaviour to inject; all off by default.

    `address_errors` maps an address (an email address, a phone number, a push subscription
    id, a webhook path) to how to answer it: `{"code": 550, "message": "5.1.1 ..."}` (SMTP, at
    RCPT), `{"code": 21610}` or `{"undelivered": 30006}` (SMS), `{"status": 410}` (web push),
    `{"status": 404, "body": "no_service"}` (chat).
    """

    address_errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    rate_limit: RateLimit | None = None
    outage_until: float = 0.0  # time.monotonic()
    outage_status: int = 503
    latency_s: float = 0.0

    def outage(self, now: float) -> bool:
        """True while an outage is on."""
        return self.outage_until > now

    def describe(self) -> dict[str, Any]:
        """The faults as JSON for the control API."""
        now = time.monotonic()
        rate = self.rate_limit
        return {
            "address_errors": dict(self.address_errors),
            "rate_limit": (
                {"per_second": rate.per_second, "retry_after_s": rate.retry_after_s}
                if rate
                else None
            ),
            "outage": (
                {"seconds_left": round(self.outage_until - now, 3), "status": self.outage_status}
                if self.outage(now)
                else None
            ),
            "latency_ms": round(self.latency_s * 1000, 3),
        }


class ChannelState:
    """Faults, accepted messages and rejection counts of one channel server."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.faults = ChannelFaults()
        self.rejected: Counter[str] = Counter()
        self.requests = 0
        self.records: list[dict[str, Any]] = []
        self.extra: list[dict[str, Any]] = []  # SMS status callbacks made, ...
        self.keys: set[str] = set()  # idempotency keys seen (email Message-ID, web push Topic)
        self.resends = 0

    def reset(self) -> None:
        """Forget records and counters and clear every fault."""
        self.faults = ChannelFaults()
        self.rejected.clear()
        self.requests = 0
        self.records = []
        self.extra = []
        self.keys = set()
        self.resends = 0

    def record(self, doc: dict[str, Any], key: str | None = None) -> None:
        """Keep an accepted message (with the server's receipt time).

        `key` is the message's idempotency key where the protocol carries one: a message whose
        key was seen before is kept marked `"resend": true` and counted (a provider could drop
        it; the local server keeps it so a test sees every copy).
        """
        doc.setdefault("time", time.time())
        if key is not None:
            doc["resend"] = key in self.keys
            self.resends += doc["resend"]
            self.keys.add(key)
        self.records.append(doc)

    def reject(self, reason: str) -> None:
        """Count a rejection by its reason."""
        self.rejected[reason] += 1

    def limited(self) -> bool:
        """True when the injected rate limit refuses one more request now."""
        rate = self.faults.rate_limit
        return rate is not None and not rate.take(time.monotonic())

    def stats(self) -> dict[str, Any]:
        """Counters for the control API's /stats."""
        return {
            "requests": self.requests,
            "accepted": len(self.records),
            "resends": self.resends,
            "rejected": dict(self.rejected),
            "rejected_total": sum(self.rejected.values()),
            "faults": self.faults.describe(),
        }
