"""A delivery engine on in-memory parts and a hand-driven clock, for the engine's unit tests."""

from __future__ import annotations

import time
from typing import Any

from operators.adapters.redis.rate_limiter import LocalRateLimiter
from operators.adapters.stores.sqlite_notifications import SQLiteNotificationStore
from operators.delivery.edge_claims import InMemoryEdgeClaims
from operators.delivery.engine import DeliveryEngine, DeliverySettings
from tests.fakes import InlineLoop, ScriptedSender


class Clock:
    """Time that moves only when a test sets `now`."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def engine(
    store: SQLiteNotificationStore,
    *senders: ScriptedSender,
    clock: Clock | None = None,
    claims: InMemoryEdgeClaims | None = None,
    **settings: Any,
) -> DeliveryEngine:
    """An engine over `senders` (one per provider), run inline, with jitter fixed at 0.5."""
    clock = clock or Clock()
    return DeliveryEngine(
        claims=claims or InMemoryEdgeClaims(),
        store=store,
        limiter=LocalRateLimiter(clock=clock),
        senders={s.provider: s for s in senders},
        loop=InlineLoop(),
        settings=DeliverySettings(**settings),
        clock=clock,
        rand=lambda: 0.5,
    )
