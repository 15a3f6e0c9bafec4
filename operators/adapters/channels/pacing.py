"""Per-address pacing: a rate-limit bucket per recipient domain (email) or webhook (chat).

The engine takes one token per send from the sender's own bucket (the relay's or the whole
channel's rate). A sender whose provider also limits per destination takes a second token from
that destination's bucket through the `DestinationLimiter` port (a Redis bucket per name,
shared by every worker, taken with redis.asyncio: the sender runs on the worker's event loop,
which a blocking Redis call would stall for every send in flight): Gmail throttles a sender per
receiving domain, Slack a webhook to about one message a second. A send whose destination
bucket is empty never leaves: its answer is a HELD one (`operators.delivery.model.HELD_PREFIX`)
with the wait as `retry_after_s`, which `classify` turns into Verdict.HELD (scheduled again, no
attempt used, not a provider failure).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from operators import metrics
from operators.adapters.channels.ports import DestinationLimiter
from operators.delivery.model import HELD_PREFIX, ProviderAnswer, SendRequest
from operators.delivery.token_bucket import BucketSpec

MIN_HOLD_S = 0.5
"""The shortest hold: a retry due sooner would find the bucket about as empty."""


def webhook_key(url: str) -> str:
    """A bucket name part for a webhook URL (its digest: the URL is a secret)."""
    return hashlib.sha256(url.encode()).hexdigest()[:20]


class KeyedPacer:
    """Splits a send call's requests into those that may go now and HELD answers for the rest."""

    def __init__(
        self,
        provider: str,
        limiter: DestinationLimiter | None,
        per_minute: int,
        key_of: Callable[[SendRequest], str],
        what: str,
    ) -> None:
        self._provider = provider
        self._limiter = limiter
        self._per_minute = per_minute
        self._key_of = key_of
        self._what = what

    async def admit(self, requests: Sequence[SendRequest]) -> dict[int, ProviderAnswer]:
        """HELD answers by request index; every index not in it may be sent now."""
        if self._limiter is None:
            return {}
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(self._key_of(request), []).append(i)
        held: dict[int, ProviderAnswer] = {}
        for key, indexes in groups.items():
            spec = BucketSpec(f"{self._provider}-{self._what}:{key}", self._per_minute)
            lane = requests[indexes[0]].lane
            grant = await self._limiter.take(spec, len(indexes), lane)
            waiting = indexes[grant.granted :]
            if not waiting:
                continue
            metrics.CHANNEL_PACED.labels(self._provider).inc(len(waiting))
            # The bucket refills at rate/s: the k-th waiting request's token is due k/rate later.
            for k, i in enumerate(waiting):
                due = max(MIN_HOLD_S, grant.wait_s * (k + 1) / len(waiting))
                held[i] = ProviderAnswer(None, f"{HELD_PREFIX}{self._what} {key}", due)
        return held
