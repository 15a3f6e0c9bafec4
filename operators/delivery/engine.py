"""The delivery engine: one call takes the send requests a worker read and returns every output.

    claim (Redis edge claim, then the store's unique key)
      -> expired?            -> `expired`
      -> circuit open?       -> held: `retry_scheduled` (cause circuit_open), no attempt used
      -> render (<= 4 KB)    -> `failed` (PayloadTooLarge) + dead letter
      -> rate-limit tokens   -> each grant sent as soon as it is taken, concurrently on the
                                worker's event loop (HTTP/2 streams); a bounded async wait
                                for more, then the rest held (cause rate_limited)
      -> classify: accepted | invalid_token (+ device_changes active:false)
                   | failed (+ dead letter) | transient -> retry_scheduled (+ push.retry)
                     or, past the caps, expired | dead_lettered (+ dead letter)
      -> record in the store, then return the outputs for the sinks

The call returns only after every send in it has an answer, and its outputs are written by the
sinks within the same Bytewax epoch: an input offset is never snapshotted ahead of the outcome
of what it carried. Retries are never waited for here: they go to `push.retry` and come back
through a timer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from operators import metrics
from operators.delivery.circuit_breaker import CircuitBreaker
from operators.delivery.ledger import LedgerUpdate
from operators.delivery.model import (
    Action,
    LedgerRow,
    ProviderAnswer,
    RetryPolicy,
    RowState,
    SendRequest,
    Verdict,
    classify,
    decide,
    plan_retry,
)
from operators.delivery.payloads import PayloadTooLarge
from operators.delivery.ports import (
    EdgeClaims,
    LoopRunner,
    NotificationStore,
    PushSender,
    RateLimiter,
)
from schemas.codecs import encode_send_reference, format_timestamp
from schemas.records import DeadLetter, DeliveryEvent, DeviceChange, RetryRecord

log = logging.getLogger(__name__)
_MIN_PAUSE_S = 0.02
"""The shortest wait for tokens: at most about 50 takes a second per provider and worker."""

DeliveryOutput = DeliveryEvent | DeviceChange | RetryRecord | DeadLetter
T = TypeVar("T")


@dataclass
class DeliverySettings:
    """The engine's knobs (from Settings)."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    rate_wait_max_s: float = 0.5  # per call, both lanes together
    breaker_failures: int = 20
    breaker_cooldown_s: float = 5.0


def _dead_letter(request: SendRequest, error: str) -> DeadLetter:
    """A send given up on (its outcome is counted as `dead_lettered`, not as bad input)."""
    origin = request.origin
    raw = encode_send_reference(request.post_id, request.item, request.provider)
    # One message may carry many sends: the item keeps their dead letters apart.
    return DeadLetter(origin.topic, origin.partition, origin.offset, error, raw, origin.item)


class DeliveryEngine:
    """Per worker: the ledger, the limiter, a breaker per provider and the senders."""

    def __init__(
        self,
        *,
        claims: EdgeClaims,
        store: NotificationStore,
        limiter: RateLimiter,
        senders: dict[str, PushSender],
        loop: LoopRunner,
        settings: DeliverySettings,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        on_bulk_pause: Callable[[str, float], None] = lambda provider, until: None,
    ) -> None:
        self._claims = claims
        self._store = store
        self._limiter = limiter
        self._senders = senders
        self._loop = loop
        self._settings = settings
        self._clock = clock
        self._rand = rand
        self._on_bulk_pause = on_bulk_pause
        self.breakers = {
            p: CircuitBreaker(
                clock=clock,
                failure_threshold=settings.breaker_failures,
                cooldown_s=settings.breaker_cooldown_s,
            )
            for p in senders
        }

    # -- the ledger -----------------------------------------------------------------------
    def _ledger(self, requests: Sequence[SendRequest]) -> list[tuple[SendRequest, Action, Any]]:
        decided: list[tuple[SendRequest, Action, Any]] = []
        fresh = [r for r in requests if r.seq == 0]
        retries = [r for r in requests if r.seq > 0]
        holders = self._claims.claim([(*r.key, r.origin.key) for r in fresh])
        to_store = []
        for r, holder in zip(fresh, holders, strict=True):
            if holder is None or holder == r.origin.key:
                to_store.append(r)
            else:
                metrics.DELIVERY_DEDUPED.labels("edge").inc()
                decided.append((r, Action.SKIP, None))
        for r, row in zip(to_store, self._store.claim(to_store), strict=True):
            action = decide(r, row)
            if action is Action.SKIP:
                metrics.DELIVERY_DEDUPED.labels("store").inc()
            decided.append((r, action, row))
        if retries:
            rows = self._store.rows([r.key for r in retries])
            takers = []
            for r, row in zip(retries, rows, strict=True):
                action = decide(r, row)
                if action is Action.SEND:
                    takers.append((r, row))
                else:
                    decided.append((r, action, row))
            taken = self._store.take_over([r for r, _ in takers])
            for (r, row), ok in zip(takers, taken, strict=True):
                decided.append((r, Action.SEND if ok else Action.SKIP, row))
        return decided

    # -- outputs ----------------------------------------------------------------------------
    def _event(
        self,
        r: SendRequest,
        outcome: str,
        attempt: int,
        now: float,
        status: int | None = None,
        reason: str | None = None,
        retry_at: float | None = None,
        *,
        count: bool = True,
    ) -> DeliveryEvent:
        if count:
            metrics.OUTCOMES.labels(r.provider, outcome).inc()
        return DeliveryEvent(
            notification_id=r.item["notification_id"],
            post_id=r.post_id,
            user_id=r.item["user_id"],
            device_id=r.item["device_id"],
            provider=r.provider,
            outcome=outcome,  # type: ignore[arg-type]
            status=status,
            reason=reason,
            attempt=attempt,
            ts=format_timestamp(now, "milliseconds"),
            retry_at=None if retry_at is None else format_timestamp(retry_at, "milliseconds"),
        )

    def _finish(
        self,
        r: SendRequest,
        state: RowState,
        attempts: int,
        now: float,
        out: list[DeliveryOutput],
        updates: list[LedgerUpdate],
        *,
        status: int | None = None,
        reason: str | None = None,
        due_at: float | None = None,
        attempted: bool = False,
    ) -> None:
        """Record a decision and produce its outputs."""
        schedules = r.seq + 1 if state == "retry_scheduled" else r.seq
        updates.append(
            LedgerUpdate(r.key, state, attempts, schedules, status, reason, due_at, attempted)
        )
        out.extend(self._outputs(r, state, attempts, schedules, now, status, reason, due_at))

    def _outputs(
        self,
        r: SendRequest,
        state: RowState,
        attempts: int,
        schedules: int,
        now: float,
        status: int | None,
        reason: str | None,
        due_at: float | None,
        *,
        count: bool = True,
    ) -> list[DeliveryOutput]:
        out: list[DeliveryOutput] = [
            self._event(r, state, attempts, now, status, reason, due_at, count=count)
        ]
        if state == "retry_scheduled":
            out.append(
                RetryRecord(
                    r.provider,
                    r.lane,
                    r.post_id,
                    r.author_id,
                    r.created_at,
                    r.item,
                    attempts,
                    schedules,
                    due_at if due_at is not None else now,
                    reason or "",
                )
            )
        elif state == "invalid_token":
            if count:
                metrics.TOKENS_DEACTIVATED.labels(r.provider).inc()
            out.append(
                DeviceChange(
                    user_id=r.item["user_id"],
                    device_id=r.item["device_id"],
                    provider=r.provider,
                    token=None,
                    active=False,
                    ts=datetime.fromtimestamp(now, UTC),
                )
            )
        elif state in ("failed", "dead_lettered"):
            out.append(_dead_letter(r, f"{state}: {reason}"))
        return out

    def _reemit(self, r: SendRequest, row: LedgerRow, now: float) -> list[DeliveryOutput]:
        """Repeat a finished decision of the owner that was replayed (sinks drop repeats)."""
        # A retry_scheduled row re-emits its retry record too: it may not have reached push.retry.
        # Not counted again: the outcome was counted when it was decided.
        return self._outputs(
            r,
            row.state,
            row.attempts,
            row.schedules,
            now,
            row.status,
            row.reason,
            row.due_at,
            count=False,
        )

    # -- one call ---------------------------------------------------------------------------
    def deliver(self, requests: Sequence[SendRequest]) -> list[DeliveryOutput]:
        """Everything for these requests: ledger, sends, outcomes (blocks until all answered)."""
        now = self._clock()
        out: list[DeliveryOutput] = []
        updates: list[LedgerUpdate] = []
        to_send: dict[str, list[SendRequest]] = {}
        for r, action, row in self._ledger(requests):
            if action is Action.SKIP:
                continue
            if action is Action.REEMIT:
                out.extend(self._reemit(r, row, now))
                continue
            if action is Action.RESEND:
                metrics.RESENDS.labels(r.provider).inc()
            if self._settings.retry.expired(r.created_ts, now):
                self._finish(r, "expired", r.attempt, now, out, updates, reason="max_age")
                continue
            to_send.setdefault(r.provider, []).append(r)

        batches: dict[str, tuple[list[SendRequest], list[object]]] = {}
        for provider, reqs in to_send.items():
            sender = self._senders.get(provider)
            if sender is None:
                for r in reqs:
                    self._finish(
                        r, "failed", r.attempt, now, out, updates, reason="provider_not_configured"
                    )
                continue
            breaker = self.breakers[provider]
            admitted = breaker.admit(len(reqs))
            metrics.BREAKER_STATE.labels(provider).set(breaker.state.value)
            for r in reqs[admitted:]:
                metrics.HELD.labels(provider, "circuit_open").inc()
                due = max(breaker.retry_at, now) + self._rand() * 1.0
                self._finish(
                    r,
                    "retry_scheduled",
                    r.attempt,
                    now,
                    out,
                    updates,
                    reason="circuit_open",
                    due_at=due,
                )
            ok_reqs, payloads = [], []
            for r in reqs[:admitted]:
                try:
                    payloads.append(sender.render(r))
                    ok_reqs.append(r)
                except PayloadTooLarge as exc:
                    self._finish(r, "failed", r.attempt, now, out, updates, reason=str(exc))
            batches[provider] = (ok_reqs, payloads)

        if batches:
            results = self._loop.run(self._send_all(batches))
            done = self._clock()
            for provider, (sent, answers, held) in results.items():
                for r in held:
                    metrics.HELD.labels(provider, "rate_limited").inc()
                    self._finish(
                        r,
                        "retry_scheduled",
                        r.attempt,
                        done,
                        out,
                        updates,
                        reason="rate_limited",
                        due_at=done + self._rand() + 0.5,
                    )
                self._judge(provider, sent, answers, done, out, updates)
        self._store.record(updates, self._clock())
        return out

    async def _send_all(
        self, batches: dict[str, tuple[list[SendRequest], list[object]]]
    ) -> dict[str, tuple[list[SendRequest], list[ProviderAnswer], list[SendRequest]]]:
        providers = list(batches)
        results = await asyncio.gather(*(self._send_provider(p, *batches[p]) for p in providers))
        return dict(zip(providers, results, strict=True))

    async def _send_provider(
        self, provider: str, reqs: list[SendRequest], payloads: list[object]
    ) -> tuple[list[SendRequest], list[ProviderAnswer], list[SendRequest]]:
        """Send each grant as soon as it is taken (normal lane first); hold what waited too long.

        The shared bucket bounds the tokens *taken* in any W seconds, by every process together,
        to rate x W + its capacity. That bounds what the provider *receives* only if each send
        leaves when its token is taken: tokens taken up to a second apart and sent together (as
        this did before, issue 20) let a window receive about rate x (W + 1) + burst. So:

        - a grant's sends start right after the take (APNs: every stream of the grant at once);
        - a sender that sends a chunk at a time (`max_per_send`, `one_send_at_a_time`: FCM)
          takes tokens for one chunk, sends it, and takes for the next once it is answered;
        - short of tokens, it sleeps until about one more is due, not until all are, so grants
          stay small and spread at the rate;
        - one waiting budget (`rate_wait_max_s`) for both lanes together; what is left when it
          is spent is held (retry_scheduled, cause rate_limited).
        """
        sender = self._senders[provider]
        spec = sender.bucket
        per_send = sender.max_per_send or max(len(reqs), 1)
        loop = asyncio.get_running_loop()
        sending: list[tuple[list[int], asyncio.Task[list[ProviderAnswer]]]] = []
        held: list[SendRequest] = []
        waited = 0.0
        for lane in ("normal", "bulk"):
            waiting = [i for i, r in enumerate(reqs) if r.lane == lane]
            while waiting:
                wanted = min(len(waiting), per_send)
                grant = self._limiter.take(spec, wanted, lane)
                if grant.granted:
                    go, waiting = waiting[: grant.granted], waiting[grant.granted :]
                    metrics.SENDS.labels(provider, lane).inc(len(go))
                    task = loop.create_task(
                        sender.send([reqs[i] for i in go], [payloads[i] for i in go])
                    )
                    sending.append((go, task))
                    if sender.one_send_at_a_time:
                        await task  # the next take when the next chunk can leave
                    else:
                        await asyncio.sleep(0)  # the sends start before the next take
                    continue
                if lane == "bulk":
                    self._on_bulk_pause(provider, time.monotonic() + grant.wait_s)
                # Until about one more token is due (the grant's wait is for all of `wanted`).
                one_more = max(grant.wait_s - (wanted - 1) / spec.rate, 0.0)
                pause = min(max(one_more, _MIN_PAUSE_S), self._settings.rate_wait_max_s - waited)
                if pause <= 0:
                    held.extend(reqs[i] for i in waiting)
                    break
                metrics.RATE_LIMIT_WAIT.labels(provider).inc(pause)
                await asyncio.sleep(pause)  # bounded pacing; the rest is held, not waited for
                waited += pause
        sent: list[SendRequest] = []
        answers: list[ProviderAnswer] = []
        for go, task in sending:
            sent.extend(reqs[i] for i in go)
            answers.extend(await task)
        return sent, answers, held

    def _judge(
        self,
        provider: str,
        sent: list[SendRequest],
        answers: list[ProviderAnswer],
        now: float,
        out: list[DeliveryOutput],
        updates: list[LedgerUpdate],
    ) -> None:
        successes = failures = 0
        for r, answer in zip(sent, answers, strict=True):
            attempts = r.attempt + 1
            verdict = classify(r.provider, answer)
            if verdict is Verdict.ACCEPTED:
                successes += 1
                metrics.ACCEPT_LATENCY.labels(provider, r.lane).observe(
                    max(0.0, now - r.created_ts)
                )
                self._finish(
                    r,
                    "accepted",
                    attempts,
                    now,
                    out,
                    updates,
                    status=answer.status,
                    attempted=True,
                )
                continue
            metrics.PROVIDER_ERRORS.labels(provider, answer.reason or "transport").inc()
            if verdict is Verdict.INVALID_TOKEN:
                successes += 1
                self._finish(
                    r,
                    "invalid_token",
                    attempts,
                    now,
                    out,
                    updates,
                    status=answer.status,
                    reason=answer.reason,
                    attempted=True,
                )
            elif verdict is Verdict.PERMANENT:
                successes += 1
                self._finish(
                    r,
                    "failed",
                    attempts,
                    now,
                    out,
                    updates,
                    status=answer.status,
                    reason=answer.short,
                    attempted=True,
                )
            else:
                failures += 1
                plan = plan_retry(
                    self._settings.retry, r, attempts, now, answer.retry_after_s, self._rand
                )
                state: RowState = "retry_scheduled" if plan.kind == "retry" else plan.kind
                self._finish(
                    r,
                    state,
                    attempts,
                    now,
                    out,
                    updates,
                    status=answer.status,
                    reason=answer.short,
                    due_at=plan.due_at if plan.kind == "retry" else None,
                    attempted=True,
                )
        breaker = self.breakers[provider]
        breaker.record(successes, failures)
        metrics.BREAKER_STATE.labels(provider).set(breaker.state.value)
