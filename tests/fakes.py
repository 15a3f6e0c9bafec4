"""Fakes for delivery tests: a scripted provider, an inline event loop, request builders."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from operators.adapters.redis.rate_limiter import BucketSpec
from operators.delivery.engine import LoopRunner, PushSender
from operators.delivery.model import ProviderAnswer, SendRequest
from operators.delivery.payloads import PayloadTooLarge

T = TypeVar("T")
OK = ProviderAnswer(200, None)


class InlineLoop(LoopRunner):
    """Runs each coroutine on a fresh loop in the calling thread."""

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run(coro)


class ScriptedSender(PushSender):
    """Answers per token from `answers` (default 200), recording every send."""

    def __init__(
        self,
        provider: str = "apns",
        answers: dict[str, ProviderAnswer | list[ProviderAnswer]] | None = None,
        per_minute: int = 6_000_000,
        too_large: set[str] | None = None,
        default: Callable[[SendRequest], ProviderAnswer] = lambda r: OK,
    ) -> None:
        self.provider = provider  # type: ignore[assignment]
        self.bucket = BucketSpec(f"{provider}:test", per_minute)
        self.answers = answers or {}
        self.too_large = too_large or set()
        self.default = default
        self.sent: list[SendRequest] = []

    def render(self, request: SendRequest) -> object:
        if request.item["token"] in self.too_large:
            raise PayloadTooLarge("APNs payload is 5000 bytes (limit 4096)")
        return {"aps": {}}

    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        out = []
        for r in requests:
            self.sent.append(r)
            scripted = self.answers.get(r.item["token"])
            if isinstance(scripted, list):
                out.append(scripted.pop(0) if scripted else OK)
            elif scripted is not None:
                out.append(scripted)
            else:
                out.append(self.default(r))
        return out


def request(
    user: str = "u1",
    device: str = "d1",
    *,
    token: str | None = None,
    post: str = "p1",
    provider: str = "apns",
    lane: str = "normal",
    source: str = "push.apns/0@1",
    created_ts: float | None = None,
    attempt: int = 0,
    seq: int = 0,
) -> SendRequest:
    """A send request with sensible defaults."""
    return SendRequest(
        provider=provider,  # type: ignore[arg-type]
        lane=lane,  # type: ignore[arg-type]
        post_id=post,
        author_id="a1",
        created_at="2026-11-22T10:00:00Z",
        created_ts=time.time() if created_ts is None else created_ts,
        item={
            "notification_id": f"{post}:{user}",
            "user_id": user,
            "device_id": device,
            "token": token or f"tok-{user}-{device}",
        },
        source=source,
        attempt=attempt,
        seq=seq,
    )
