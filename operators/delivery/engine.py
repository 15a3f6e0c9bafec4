"""The delivery engine: send requests in, judged outcomes out, with thousands of sends in flight.

    claim (Redis edge claim, then the store's unique key: one round trip each per call)
      -> expired?            -> `expired`
      -> circuit open?       -> held: `retry_scheduled` (cause circuit_open), no attempt used
      -> render (<= 4 KB)    -> `failed` (PayloadTooLarge) + dead letter
      -> queued for the provider's send task on the worker's event loop (`dispatch.py`): each
         rate-limit grant sent as taken, normal lane first; no token within
         FANFARE_RATE_WAIT_MAX_MS -> held (cause rate_limited)
      -> classify: accepted | invalid_token (+ device_changes active:false)
                   | failed (+ dead letter) | transient -> retry_scheduled (+ push.retry)
                     or, past the caps, expired | dead_lettered (+ dead letter)
                   | held by the sender's own pacing -> retry_scheduled at its wait, no
                     attempt used, not a failure for the breaker
      -> record in the store, then the outputs for the sinks

Pipelined: `submit` starts the sends and returns at once; `collect` judges what was answered
since. The Bytewax worker never waits for a provider. A request's outputs exist only once it is
*judged*; the delivery sources (`operators/delivery/pipeline.py`) emit them then, and snapshot
their input position only past what is judged, so no input offset is snapshotted ahead of the
outcome of what it carried (docs/design.md, "Delivery: pipelined, one outcome per item").
`deliver` is the blocking form (submit, wait for every answer, collect), for tests and tools.
Retries are never waited for here: they go to `push.retry` and come back through its source.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

from operators import metrics
from operators.delivery.circuit_breaker import CircuitBreaker
from operators.delivery.dispatch import Held, Report, SendDispatcher, Sent
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

DeliveryOutput = DeliveryEvent | DeviceChange | RetryRecord | DeadLetter
T = TypeVar("T")
CONCURRENCY_ROUNDS = 4
"""In flight per provider with a bound of its own: its sends under way and three rounds ready
(a round trip through the flow takes a while on a loaded machine: the sessions must not idle)."""
SESSION_BOUND_SHARE = 0.25
"""...or this share of the in-flight limit when more: email on 4 SMTP sessions held to 20 in
flight sent 20 a second where 400 in flight gave 110 (the flow's round trip, not the sessions,
was then the bound)."""


@dataclass
class DeliverySettings:
    """The engine's knobs (from Settings)."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    rate_wait_max_s: float = 0.5  # the longest a request waits for its rate-limit token
    breaker_failures: int = 20
    breaker_cooldown_s: float = 5.0
    in_flight: int = 2_000
    """The most requests a worker has submitted and not judged (FANFARE_DELIVERY_IN_FLIGHT)."""
    bulk_share: float = 0.8
    """Share of `in_flight` the bulk lane may fill: the rest is kept for normal posts."""
    transactional_reserve: float = 0.1
    """Share of `in_flight` the normal and bulk lanes leave free, so a transactional send (a
    login code) always finds room, however full the other lanes are."""


class Judged(NamedTuple):
    """A request whose fate is known, and what to write for it (nothing for a duplicate)."""

    request: SendRequest
    outputs: list[DeliveryOutput]


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
        self._reports: collections.deque[Sent | Held] = collections.deque()
        self._dispatcher: SendDispatcher | None = None
        self._in_flight = {"transactional": 0, "normal": 0, "bulk": 0}
        self._in_flight_by_provider: collections.Counter[str] = collections.Counter()
        self._closed = False
        self._ts: tuple[float, str] = (-1.0, "")
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

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
            self._metric(metrics.OUTCOMES, r.provider, outcome).inc()
        if now != self._ts[0]:  # a call judges many at one time: format it once
            self._ts = (now, format_timestamp(now, "milliseconds"))
        item = r.item
        return DeliveryEvent(
            notification_id=item["notification_id"],
            post_id=r.post_id,
            user_id=item["user_id"],
            device_id=item["device_id"],
            provider=r.provider,
            outcome=outcome,  # type: ignore[arg-type]
            status=status,
            reason=reason,
            attempt=attempt,
            ts=self._ts[1],
            retry_at=None if retry_at is None else format_timestamp(retry_at, "milliseconds"),
        )

    def _metric(self, metric: Any, *labels: str) -> Any:
        """A labelled child of a metric, looked up once (labels() costs more than inc())."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _finish(
        self,
        r: SendRequest,
        state: RowState,
        attempts: int,
        now: float,
        out: list[Judged],
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
        out.append(
            Judged(r, self._outputs(r, state, attempts, schedules, now, status, reason, due_at))
        )

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
                    r.message,
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

    # -- submit, collect ------------------------------------------------------------------
    def _prepare(
        self, requests: Sequence[SendRequest]
    ) -> tuple[list[Judged], dict[str, list[tuple[SendRequest, object]]]]:
        """The ledger and every decision made before a send: (judged now, what to send)."""
        now = self._clock()
        judged: list[Judged] = []
        updates: list[LedgerUpdate] = []
        to_send: dict[str, list[SendRequest]] = {}
        for r, action, row in self._ledger(requests):
            if action is Action.SKIP:
                judged.append(Judged(r, []))
                continue
            if action is Action.REEMIT:
                judged.append(Judged(r, self._reemit(r, row, now)))
                continue
            if action is Action.RESEND:
                metrics.RESENDS.labels(r.provider).inc()
            if self._settings.retry.expired(r.created_ts, now):
                self._finish(r, "expired", r.attempt, now, judged, updates, reason="max_age")
                continue
            to_send.setdefault(r.provider, []).append(r)

        batches: dict[str, list[tuple[SendRequest, object]]] = {}
        for provider, reqs in to_send.items():
            sender = self._senders.get(provider)
            if sender is None:
                for r in reqs:
                    self._finish(
                        r,
                        "failed",
                        r.attempt,
                        now,
                        judged,
                        updates,
                        reason="provider_not_configured",
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
                    judged,
                    updates,
                    reason="circuit_open",
                    due_at=due,
                )
            go: list[tuple[SendRequest, object]] = []
            for r in reqs[:admitted]:
                try:
                    go.append((r, sender.render(r)))
                except PayloadTooLarge as exc:
                    self._finish(r, "failed", r.attempt, now, judged, updates, reason=str(exc))
            if go:
                batches[provider] = go
        if updates:
            self._store.record(updates, self._clock())
        return judged, batches

    def _count_in(self, batches: dict[str, list[tuple[SendRequest, object]]]) -> None:
        n = 0
        for items in batches.values():
            for r, _ in items:
                self._in_flight[r.lane] += 1
                self._in_flight_by_provider[r.provider] += 1
            n += len(items)
        metrics.IN_FLIGHT.inc(n)

    def submit(self, requests: Sequence[SendRequest]) -> list[Judged]:
        """Claim, decide and start the sends on the event loop; returns what is judged already.

        The others come out of `collect` once answered, or held for want of a token.
        """
        judged, batches = self._prepare(requests)
        if batches:
            self._count_in(batches)
            self._loop.call_soon(lambda: self._enqueue(batches))
        return judged

    def _enqueue(self, batches: dict[str, list[tuple[SendRequest, object]]]) -> None:
        """On the loop: hand the requests to the dispatcher (made there, on first use)."""
        if self._closed:
            return
        if self._dispatcher is None:
            self._dispatcher = SendDispatcher(
                self._senders,
                self._limiter,
                self._reports.append,
                rate_wait_max_s=self._settings.rate_wait_max_s,
                on_bulk_pause=self._on_bulk_pause,
            )
        for provider, items in batches.items():
            self._dispatcher.enqueue(provider, items)

    def collect(self) -> list[Judged]:
        """Judge what was answered (or held) since the last call, and record it in the store."""
        reports = self._reports
        if not reports:
            return []
        judged: list[Judged] = []
        updates: list[LedgerUpdate] = []
        done = self._clock()
        answered = 0
        while reports:
            report = reports.popleft()
            for r in report.requests:
                self._in_flight[r.lane] -= 1
                self._in_flight_by_provider[r.provider] -= 1
            answered += len(report.requests)
            if isinstance(report, Held):
                metrics.HELD.labels(report.provider, "rate_limited").inc(len(report.requests))
                for r in report.requests:
                    self._finish(
                        r,
                        "retry_scheduled",
                        r.attempt,
                        done,
                        judged,
                        updates,
                        reason="rate_limited",
                        due_at=done + self._rand() + 0.5,
                    )
            else:
                self._judge(report.provider, report.requests, report.answers, done, judged, updates)
        metrics.IN_FLIGHT.dec(answered)
        self._store.record(updates, self._clock())
        return judged

    @property
    def in_flight(self) -> int:
        """Requests submitted and not judged yet."""
        return sum(self._in_flight.values())

    def room(self, lane: str, provider: str | None = None) -> int:
        """How many more requests of a lane (and provider) may be submitted now.

        The in-flight limit (the bulk lane may fill `bulk_share` of it), and for a provider
        what it can send within FANFARE_RATE_WAIT_MAX_MS at its rate: a request queued beyond
        that would only be held (rate_limited) and come back through push.retry, so it is
        better left unread; for a sender with a `concurrency` of its own, a few rounds of it.
        The normal and bulk lanes leave `transactional_reserve` of the limit to the
        transactional lane.
        """
        limit = self._settings.in_flight
        free = limit - self.in_flight
        if lane != "transactional":
            kept = int(limit * self._settings.transactional_reserve)
            free = min(free, limit - kept - self._in_flight["normal"] - self._in_flight["bulk"])
        if lane == "bulk":
            free = min(free, int(limit * self._settings.bulk_share) - self._in_flight["bulk"])
        sender = self._senders.get(provider) if provider is not None else None
        if sender is not None and sender.concurrency is not None:
            # Beyond a few rounds of its sessions, a provider's requests only wait in memory,
            # holding in-flight room: one slow channel (email on its SMTP sessions) would keep
            # every other channel of the worker from reading.
            # A transactional send may go one round beyond, so a backlog of the provider's
            # other lanes never keeps it unread (its sessions serve it first).
            share = max(CONCURRENCY_ROUNDS * sender.concurrency, int(limit * SESSION_BOUND_SHARE))
            if lane == "transactional":
                share += sender.concurrency
            free = min(free, share - self._in_flight_by_provider[sender.provider])
        dispatcher = self._dispatcher
        if sender is not None and dispatcher is not None:
            spec = sender.bucket
            sendable = int(spec.rate * self._settings.rate_wait_max_s + spec.capacity) + 1
            free = min(free, sendable - dispatcher.waiting(sender.provider, lane))
            if lane == "bulk":
                # Queued bulk beyond two windows would only sit here, in the room another
                # provider's bulk lane could use.
                backlog, window = dispatcher.bulk_backlog(sender.provider)
                free = min(free, int(2 * window) - backlog)
        return max(0, free)

    def waiting_for_tokens(self, provider: str) -> int:
        """Requests of a provider queued for rate-limit tokens (a snapshot, any thread)."""
        dispatcher = self._dispatcher
        if dispatcher is None:
            return 0
        return sum(dispatcher.waiting(provider, lane) for lane in self._in_flight)

    def deliver(self, requests: Sequence[SendRequest]) -> list[DeliveryOutput]:
        """Everything for these requests: ledger, sends, outcomes (blocks until all answered)."""
        judged, batches = self._prepare(requests)
        if batches:
            self._count_in(batches)
            reports: collections.deque[Sent | Held] = collections.deque()
            self._loop.run(self._send_now(batches, reports.append))
            self._reports.extend(reports)
            judged.extend(self.collect())
        return [o for j in judged for o in j.outputs]

    async def _send_now(
        self, batches: dict[str, list[tuple[SendRequest, object]]], report: Report
    ) -> None:
        dispatcher = SendDispatcher(
            self._senders,
            self._limiter,
            report,
            rate_wait_max_s=self._settings.rate_wait_max_s,
            on_bulk_pause=self._on_bulk_pause,
        )
        for provider, items in batches.items():
            dispatcher.enqueue(provider, items)
        try:
            await dispatcher.drained()
        finally:
            await dispatcher.close()

    def close(self) -> None:
        """Stop sending (what is in flight is sent again after a restart); close the senders."""
        if self._closed:
            return
        self._closed = True

        async def stop() -> None:
            if self._dispatcher is not None:
                await self._dispatcher.close()
            for sender in self._senders.values():
                try:
                    await sender.close()
                except Exception as exc:  # closing must not hide why we stop
                    log.warning("closing %s: %s: %s", sender.provider, type(exc).__name__, exc)

        self._loop.run(stop())

    def _judge(
        self,
        provider: str,
        sent: list[SendRequest],
        answers: list[ProviderAnswer],
        now: float,
        out: list[Judged],
        updates: list[LedgerUpdate],
    ) -> None:
        successes = failures = 0
        if now != self._ts[0]:
            self._ts = (now, format_timestamp(now, "milliseconds"))
        ts = self._ts[1]
        latency: dict[str, list[float]] = {lane: [] for lane in self._in_flight}
        accepted = 0
        for r, answer in zip(sent, answers, strict=True):
            attempts = r.attempt + 1
            status = answer.status
            if status is not None and 200 <= status < 300:
                # The common case, spelled out: what `_finish` does for an accepted send.
                accepted += 1
                latency[r.lane].append(now - r.created_ts)
                item = r.item
                updates.append(
                    LedgerUpdate(r.key, "accepted", attempts, r.seq, status, None, None, True)
                )
                event = DeliveryEvent(
                    item["notification_id"],
                    r.post_id,
                    item["user_id"],
                    item["device_id"],
                    r.provider,
                    "accepted",
                    status,
                    None,
                    attempts,
                    ts,
                )
                out.append(Judged(r, [event]))
                continue
            verdict = classify(r.provider, answer)
            if verdict is Verdict.HELD:
                # The sender's own pacing kept it back (a per-domain or per-webhook bucket): it
                # never left, so no attempt is used and the breaker does not count it.
                self._hold(r, answer, now, out, updates)
                continue
            self._metric(metrics.PROVIDER_ERRORS, provider, answer.reason or "transport").inc()
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
        if accepted:
            successes += accepted
            self._metric(metrics.OUTCOMES, provider, "accepted").inc(accepted)
            for lane, seconds in latency.items():
                if seconds:
                    metrics.observe_many(
                        self._metric(metrics.ACCEPT_LATENCY, provider, lane), seconds
                    )
        breaker = self.breakers[provider]
        breaker.record(successes, failures)
        self._metric(metrics.BREAKER_STATE, provider).set(breaker.state.value)

    def _hold(
        self,
        r: SendRequest,
        answer: ProviderAnswer,
        now: float,
        out: list[Judged],
        updates: list[LedgerUpdate],
    ) -> None:
        """A send its sender held back: scheduled at the wait the sender gave, attempts kept.

        A little jitter spreads the sends one bucket held. The notification's age cap still
        applies (a hold past it is `expired`).
        """
        self._metric(metrics.HELD, r.provider, "paced").inc()
        due = now + max(answer.retry_after_s or 0.0, 0.0) + self._rand() * 0.5
        if due - r.created_ts > self._settings.retry.max_age_s:
            self._finish(r, "expired", r.attempt, now, out, updates, reason="max_age")
            return
        self._finish(
            r,
            "retry_scheduled",
            r.attempt,
            now,
            out,
            updates,
            reason=answer.reason,
            due_at=due,
        )
