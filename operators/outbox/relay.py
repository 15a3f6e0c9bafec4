"""The outbox relay: claim a batch of rows, publish it, delete it, in one transaction; repeat.

One relay is one loop on one database session. A batch's rows stay locked (other relays skip
them) from the claim until the delete commits, after the broker acknowledged every message;
a relay that dies anywhere in between leaves its rows pending, and they are published again.
So a row reaches its topic at least once, and the consumer drops a second copy: the fan-out's
post claim binds a post_id to the first message that carried it (see the README, "The outbox
relay"). An idle relay waits for the table's NOTIFY (sent when a transaction that inserted
rows commits), or `poll_s` at most, in case a notification was lost (the listening session
broke).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from operators import metrics
from operators.outbox.model import Backoff, split_publishable, unknown_topic_letter
from operators.outbox.ports import Outbox, OutboxUnavailable, PublishFailed, RowPublisher
from schemas.topics import ALL_TOPICS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelaySettings:
    """A relay's knobs (from Settings)."""

    batch_size: int = 500
    poll_s: float = 1.0
    table: str = "fanfare_outbox"
    """The table's name, the label of the backlog gauges."""
    backlog_every_s: float = 2.0
    backoff: Backoff = field(default_factory=Backoff)


class OutboxRelay:
    """Publishes an outbox's rows to their topics; `run` until stopped."""

    def __init__(
        self,
        outbox: Outbox,
        publisher: RowPublisher,
        settings: RelaySettings,
        *,
        known_topics: Collection[str] = ALL_TOPICS,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._outbox = outbox
        self._publisher = publisher
        self._settings = settings
        self._known = frozenset(known_topics)
        self._clock = clock
        self._rand = rand
        self._backlog_at = 0.0
        self.published = 0

    def relay_batch(self) -> int:
        """Claim, publish and delete one batch; the rows done (0 when none was pending).

        Raises PublishFailed or OutboxUnavailable with the batch released (still pending).
        """
        rows = self._outbox.claim(self._settings.batch_size)
        if not rows:
            self._outbox.release()  # ends the claim's empty transaction
            return 0
        claimed_at = self._clock()
        publish, unknown = split_publishable(rows, self._known)
        try:
            if unknown:
                self._publisher.dead_letter([unknown_topic_letter(r, self._known) for r in unknown])
            self._publisher.publish(publish)
        except BaseException:
            self._release_quietly()
            raise
        acked_in = self._clock() - claimed_at
        self._outbox.complete(rows)
        for row in publish:
            metrics.OUTBOX_PUBLISHED.labels(row.topic).inc()
            metrics.OUTBOX_PUBLISH_DELAY.observe(row.age_s + acked_in)
        for row in unknown:
            log.error("outbox row %d names no fanfare topic (%r): dead-lettered", row.id, row.topic)
            metrics.DEAD_LETTERS_WRITTEN.labels("outbox", "unknown_topic").inc()
        self.published += len(publish)
        return len(rows)

    def run(self, stop: threading.Event) -> None:
        """Relay until `stop` is set; failures are retried with backoff, never fatal."""
        failures = 0
        while not stop.is_set():
            try:
                done = self.relay_batch()
                self._sample_backlog()
            except (PublishFailed, OutboxUnavailable) as exc:
                failures += 1
                cause = "broker" if isinstance(exc, PublishFailed) else "database"
                metrics.OUTBOX_RELAY_FAILURES.labels(cause).inc()
                delay = self._settings.backoff.delay(failures, self._rand)
                log.warning(
                    "outbox relay: %s (%d in a row); the batch stays pending, retrying in %.1f s",
                    exc,
                    failures,
                    delay,
                )
                stop.wait(delay)
                continue
            if failures:
                log.info("outbox relay: publishing again after %d failure(s)", failures)
                failures = 0
            if done == 0:
                try:
                    self._outbox.wait_for_rows(self._settings.poll_s)
                except OutboxUnavailable:
                    stop.wait(self._settings.poll_s)  # the claim reconnects

    def _sample_backlog(self) -> None:
        now = self._clock()
        if now < self._backlog_at:
            return
        self._backlog_at = now + self._settings.backlog_every_s
        backlog = self._outbox.backlog()
        metrics.OUTBOX_PENDING.labels(self._settings.table).set(backlog.pending)
        metrics.OUTBOX_OLDEST_AGE.labels(self._settings.table).set(backlog.oldest_age_s)

    def _release_quietly(self) -> None:
        with contextlib.suppress(OutboxUnavailable):  # the session is gone, and the claim
            self._outbox.release()
