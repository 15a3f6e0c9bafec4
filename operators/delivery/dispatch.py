"""Sends on the worker's event loop: a queue per provider and lane, rate-limit grants sent as taken.

The engine (`operators.delivery.engine`) hands rendered requests to a `SendDispatcher` and never
waits for them; the dispatcher reports each send's answers (or that it was held) through
`report`, and the engine judges them later. One task per provider takes tokens and sends, so a
slow or failing provider never holds up another's sends.

The shared bucket bounds the tokens *taken* in any W seconds, by every process together, to
rate x W + its capacity. That bounds what the provider *receives* only if each send leaves when
its token is taken, so:

- a grant's requests start right after the take (in sends of at most `SEND_CHUNK` requests, so
  one slow answer holds back the report of few others);
- a sender that sends a chunk at a time (`one_send_at_a_time`: firebase-admin) takes tokens for
  one chunk, sends it, and takes for the next once it is answered;
- short of tokens, a provider's task sleeps until about one more is due, not until all are, so
  grants stay small and spread at the rate; the transactional lane is served first, then the
  normal lane, then the bulk lane;
- a request waits for its tokens at most `rate_wait_max_s` from when it was queued; what is
  still waiting then is held (reported as held: retry_scheduled, cause rate_limited).

A provider's bulk lane has a window: the bulk requests it keeps unanswered (`DelayWindow`). A
provider answers in arrival order, more or less, so every bulk request sent and not answered is
one a normal push sent now waits behind. The window grows while answers come back as fast as
the fastest recently seen, and shrinks when they come back `queue_target_s` slower, so the
provider's queue of our bulk requests stays near that long: the bulk lane gets the provider's
full throughput and a normal push waits for at most about `queue_target_s` of bulk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from operators import metrics
from operators.delivery.model import ProviderAnswer, SendRequest
from operators.delivery.ports import PushSender, RateLimiter

log = logging.getLogger(__name__)

MIN_PAUSE_S = 0.02
"""The shortest wait for tokens: at most about 50 takes a second per provider and worker."""
SEND_CHUNK = 64
"""The most requests in one `PushSender.send` call when a sender takes any number."""
TAKE_MAX = 1_000
"""The most tokens asked for in one take (a sender without `max_per_send`)."""


@dataclass(slots=True)
class Queued:
    """A rendered request waiting for its rate-limit token."""

    request: SendRequest
    payload: object
    deadline: float  # time.monotonic(): held if it has no token by then


@dataclass(frozen=True, slots=True)
class Sent:
    """A send's requests and their answers, one each."""

    provider: str
    requests: list[SendRequest]
    answers: list[ProviderAnswer]


@dataclass(frozen=True, slots=True)
class Held:
    """Requests that found no token within their wait budget."""

    provider: str
    requests: list[SendRequest]


Report = Callable[[Sent | Held], None]


class DelayWindow:
    """How many bulk requests a provider may have unanswered (a delay-based window).

    It grows while answers come back as fast as the quickest seen lately, and shrinks when they
    come back `queue_target_s` slower (as TCP Vegas does with a connection's round trips).
    """

    def __init__(
        self,
        *,
        initial: float = 64.0,
        smallest: float = 16.0,
        largest: float = 10_000.0,
        queue_target_s: float = 0.05,
        memory_s: float = 10.0,
    ) -> None:
        self.size = min(max(initial, smallest), largest)
        self._smallest = smallest
        self._largest = largest
        self._target = queue_target_s
        self._memory = memory_s
        self._base = float("inf")  # the quickest answer seen lately
        self._base_next = float("inf")
        self._base_since = 0.0
        self._shrunk_at = 0.0

    def answered(self, requests: int, seconds: float, now: float) -> None:
        """A send of `requests` bulk requests was answered `seconds` after it left."""
        if now - self._base_since >= self._memory:  # forget old minimums (a route changed)
            self._base, self._base_next = self._base_next, float("inf")
            self._base_since = now
        self._base = min(self._base, seconds)
        self._base_next = min(self._base_next, seconds)
        if seconds > self._base + self._target:
            if now - self._shrunk_at >= max(self._base, 0.01):  # once per round trip
                self._shrunk_at = now
                self.size = max(self._smallest, self.size * 0.8)
        else:
            self.size = min(self._largest, self.size + requests * SEND_CHUNK / self.size)


@dataclass
class _Lanes:
    transactional: deque[Queued] = field(default_factory=deque)
    normal: deque[Queued] = field(default_factory=deque)
    bulk: deque[Queued] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    window: DelayWindow = field(default_factory=DelayWindow)
    bulk_out: int = 0  # bulk requests sent and not answered


def _queue(lanes: _Lanes, lane: str) -> deque[Queued]:
    """A provider's queue for a lane (anything unknown waits in the normal one)."""
    if lane == "transactional":
        return lanes.transactional
    return lanes.bulk if lane == "bulk" else lanes.normal


class SendDispatcher:
    """The send side of one engine, living on one event loop (build it there)."""

    def __init__(
        self,
        senders: dict[str, PushSender],
        limiter: RateLimiter,
        report: Report,
        *,
        rate_wait_max_s: float,
        on_bulk_pause: Callable[[str, float], None] = lambda provider, until: None,
        bulk_window: Callable[[], DelayWindow] = DelayWindow,
    ) -> None:
        self._senders = senders
        self._limiter = limiter
        self._report = report
        self._wait_max = rate_wait_max_s
        self._on_bulk_pause = on_bulk_pause
        self._lanes = {p: _Lanes(window=bulk_window()) for p in senders}
        self._sending: set[asyncio.Task[None]] = set()
        self._closed = False

    def bulk_backlog(self, provider: str) -> tuple[int, float]:
        """A provider's bulk requests queued or unanswered, and its bulk window (a snapshot)."""
        lanes = self._lanes.get(provider)
        if lanes is None:
            return 0, float("inf")
        return len(lanes.bulk) + lanes.bulk_out, lanes.window.size

    def waiting(self, provider: str, lane: str) -> int:
        """Requests of a provider's lane waiting for tokens (read from any thread: a snapshot)."""
        lanes = self._lanes.get(provider)
        if lanes is None:
            return 0
        return len(_queue(lanes, lane))

    def enqueue(self, provider: str, items: Sequence[tuple[SendRequest, object]]) -> None:
        """Queue rendered requests (on the loop's thread); the provider's task sends them."""
        lanes = self._lanes[provider]
        deadline = time.monotonic() + self._wait_max
        for request, payload in items:
            _queue(lanes, request.lane).append(Queued(request, payload, deadline))
        if lanes.task is None or lanes.task.done():
            lanes.task = asyncio.get_running_loop().create_task(self._run(provider, lanes))
        lanes.wake.set()

    async def drained(self) -> None:
        """Wait until nothing is queued or being sent."""
        while (
            any(lanes.transactional or lanes.normal or lanes.bulk for lanes in self._lanes.values())
            or self._sending
        ):
            if self._sending:
                await asyncio.wait(list(self._sending))
            else:
                await asyncio.sleep(0.001)

    async def close(self) -> None:
        """Stop the providers' tasks (what is queued stays unsent: a restart resends it)."""
        self._closed = True
        for lanes in self._lanes.values():
            if lanes.task is not None:
                lanes.task.cancel()
        for task in list(self._sending):
            task.cancel()

    # -- one provider ------------------------------------------------------------------------
    async def _run(self, provider: str, lanes: _Lanes) -> None:
        sender = self._senders[provider]
        spec = sender.bucket
        per_take = sender.max_per_send or TAKE_MAX
        while not self._closed:
            lane, queue = (
                ("transactional", lanes.transactional)
                if lanes.transactional
                else ("normal", lanes.normal)
                if lanes.normal
                else ("bulk", lanes.bulk)
            )
            wanted = min(len(queue), per_take)
            if lane == "bulk":
                wanted = min(wanted, int(lanes.window.size) - lanes.bulk_out)
            if wanted <= 0:  # nothing to send, or the bulk window is full: wait for either
                lanes.wake.clear()
                await lanes.wake.wait()
                continue
            grant = self._limiter.take(spec, wanted, lane)
            if grant.granted:
                go = [queue.popleft() for _ in range(grant.granted)]
                metrics.SENDS.labels(provider, lane).inc(len(go))
                if lane == "bulk":
                    lanes.bulk_out += len(go)
                chunk = len(go) if sender.one_send_at_a_time else SEND_CHUNK
                tasks = []
                for start in range(0, len(go), chunk):
                    task = asyncio.get_running_loop().create_task(
                        self._send(provider, sender, go[start : start + chunk])
                    )
                    self._sending.add(task)
                    task.add_done_callback(self._sending.discard)
                    tasks.append(task)
                if sender.one_send_at_a_time:
                    await asyncio.wait(tasks)  # the next take when the next chunk can leave
                else:
                    await asyncio.sleep(0)  # the sends start before the next take
                continue
            if lane == "bulk":
                self._on_bulk_pause(provider, time.monotonic() + grant.wait_s)
            # Until about one more token is due (the grant's wait is for all of `wanted`).
            one_more = max(grant.wait_s - (wanted - 1) / spec.rate, 0.0)
            pause = max(one_more, MIN_PAUSE_S)
            self._hold_expired(provider, lanes, time.monotonic() + pause)
            metrics.RATE_LIMIT_WAIT.labels(provider).inc(pause)
            lanes.wake.clear()
            # New requests (a normal one behind a waiting bulk lane) end the pause early.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lanes.wake.wait(), pause)

    def _hold_expired(self, provider: str, lanes: _Lanes, by: float) -> None:
        """Hold the requests that would wait past their deadline (both lanes)."""
        held: list[SendRequest] = []
        for queue in (lanes.transactional, lanes.normal, lanes.bulk):
            while queue and queue[0].deadline <= by:
                held.append(queue.popleft().request)
        if held:
            self._report(Held(provider, held))

    async def _send(self, provider: str, sender: PushSender, items: list[Queued]) -> None:
        requests = [q.request for q in items]
        started = time.monotonic()
        try:
            answers = await sender.send(requests, [q.payload for q in items])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a sender's bug must not lose the requests: retry them
            log.exception("%s: send failed", provider)
            answers = [ProviderAnswer(None, f"client: {type(exc).__name__}")] * len(requests)
        if len(answers) != len(requests):
            log.error("%s: %d answers for %d requests", provider, len(answers), len(requests))
            answers = [ProviderAnswer(None, "client: answers missing")] * len(requests)
        bulk = sum(1 for r in requests if r.lane == "bulk")
        if bulk:
            lanes = self._lanes[provider]
            lanes.bulk_out -= bulk
            now = time.monotonic()
            lanes.window.answered(bulk, now - started, now)
            lanes.wake.set()
        self._report(Sent(provider, requests, answers))
