"""The campaign scheduler: emits each campaign's per-user notifications at its rate.

One step per active campaign and tick, under the campaign's lease (so several schedulers can
run; one emits a campaign at a time, and another takes over within the lease when it dies):

1. a final campaign is left alone; a cancelled one with a pending chunk is settled (its
   written users counted) and taken off the list;
2. outside the send window nothing is sent (after it, the campaign ends `window_closed`);
3. the pacing credit says how many users may go now (at most MAX_CHUNK); the source gives
   them from the cursor;
4. the chunk is recorded as pending with the topic's marks, produced and acknowledged, then
   committed (count, cursor, credit) in one step that checks the lease.

A scheduler that dies between 4's produce and commit leaves the pending chunk: the next one
reads the topic from the marks, keeps the users of this campaign already written, and emits
only the others. So a restart (or kill -9) never sends a user twice, and never skips one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson

from operators.notify.campaigns import (
    CURSOR_END,
    FINAL_STATES,
    MAX_CHUNK,
    CampaignProgress,
    CampaignSpec,
    PendingChunk,
    Target,
    campaign_message,
    refill,
    window_position,
)
from operators.notify.ports import CampaignStore, Publisher, RecipientSource
from schemas.codecs import encode_notification_request
from schemas.topics import tier_topic

log = logging.getLogger(__name__)

MARKETING_TOPIC = tier_topic("marketing")


def written_users(
    publisher: Publisher,
    campaign_id: str,
    marks: dict[int, int],
    still_ours: Callable[[], bool] = lambda: True,
) -> set[str] | None:
    """Users of this campaign on the marketing topic at or after the marks.

    Read a partition at a time, renewing the lease after each (`still_ours`): a read-back can
    take longer than the lease, and a lease that lapsed meanwhile may have let another
    scheduler settle the chunk. None when it did lapse: what was read may be out of date.
    """
    found: set[str] = set()
    for partition, start in sorted(marks.items()):
        for raw in publisher.read_since(MARKETING_TOPIC, {partition: start}):
            try:
                message = orjson.loads(raw or b"")
                if message.get("campaign_id") == campaign_id:
                    found.update(message.get("recipients") or ())
            except (orjson.JSONDecodeError, AttributeError, TypeError):
                continue  # another producer's malformed message: not ours
        if not still_ours():
            return None
    return found


class CampaignScheduler:
    """Steps every active campaign; `tick()` is one pass (the command loops it)."""

    def __init__(
        self,
        store: CampaignStore,
        publisher: Publisher,
        source_for: Callable[[Target], RecipientSource],
        *,
        owner: str,
        lease_s: float,
        clock: Callable[[], float],
        max_chunk: int = MAX_CHUNK,
        after_produce: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._source_for = source_for
        self._owner = owner
        self._lease_s = lease_s
        self._clock = clock
        self._max_chunk = max_chunk
        # A test hook: runs between a chunk's produce and its commit (where a crash hurts).
        self._after_produce = after_produce
        self.held: set[str] = set()

    def tick(self) -> int:
        """One step of every active campaign; how many users were emitted."""
        emitted = 0
        for campaign_id in self._store.active():
            emitted += self.step(campaign_id)
        return emitted

    def release_all(self) -> None:
        """Give up every lease (a clean stop)."""
        for campaign_id in sorted(self.held):
            self._store.release(campaign_id, self._owner)
        self.held.clear()

    def step(self, campaign_id: str) -> int:
        """One step of one campaign (see the module's docstring)."""
        if not self._store.acquire(campaign_id, self._owner, self._lease_s):
            self.held.discard(campaign_id)
            return 0
        self.held.add(campaign_id)
        found = self._store.get(campaign_id)
        if found is None:
            return 0
        spec, progress = found
        if progress.state == "cancelled":
            self._settle_cancelled(spec, progress)
            return 0
        if progress.state in FINAL_STATES:
            return 0
        if progress.pending is not None:
            return self._recover(spec, progress, progress.pending)
        now = self._clock()
        if progress.cursor == CURSOR_END:
            self._finish(spec, "completed", now)
            return 0
        position = window_position(spec, now)
        if position == "before":
            return 0
        if position == "closed":
            self._finish(spec, "window_closed", now)
            return 0
        start_at = progress.credit_at if progress.credit_at is not None else spec.window_start
        credit = refill(progress.credit, max(start_at, spec.window_start), now, spec.rate_per_s)
        wanted = min(int(credit), self._max_chunk)
        if wanted < 1:
            return 0
        source = self._source_for(spec.target)
        users, after = source.page(progress.cursor, wanted)
        if not users:
            self._finish(spec, "completed", now)
            return 0
        sent = self._emit(spec, progress.cursor, users, skip=set())
        if sent < 0:
            return 0
        if not self._store.commit_chunk(
            spec.campaign_id,
            self._owner,
            emitted=sent,
            cursor=CURSOR_END if after is None else after,
            credit=credit - len(users),
            credit_at=now,
            started_at=progress.started_at or now,
        ):
            log.warning("campaign %s: lease lost before the commit", spec.campaign_id)
        return sent

    def _emit(
        self,
        spec: CampaignSpec,
        cursor_before: str | None,
        users: list[str],
        skip: set[str],
        marks: dict[int, int] | None = None,
    ) -> int:
        """Record the chunk as pending, produce the users not in `skip`; -1 if not ours now.

        A resumed chunk keeps its first marks, so a second interruption still finds what the
        first attempt wrote.
        """
        if marks is None:
            marks = self._publisher.marks(MARKETING_TOPIC)
        pending = PendingChunk(cursor_before, len(users), marks)
        if not self._store.begin_chunk(spec.campaign_id, self._owner, pending):
            return -1
        messages = []
        for user in users:
            if user in skip:
                continue
            message = campaign_message(spec, user)
            messages.append((message.key.encode(), encode_notification_request(message)))
        if messages:
            self._publisher.publish(MARKETING_TOPIC, messages)
        if self._after_produce is not None:
            self._after_produce(spec.campaign_id)
        return len(messages)

    def _recover(
        self, spec: CampaignSpec, progress: CampaignProgress, pending: PendingChunk
    ) -> int:
        """A chunk was produced (maybe in part) but not committed: finish it without repeats."""
        marks = dict(pending.marks)
        already = written_users(
            self._publisher, spec.campaign_id, marks, self._still_ours(spec.campaign_id)
        )
        if already is None:
            self._lapsed(spec.campaign_id)
            return 0
        source = self._source_for(spec.target)
        users, after = source.page(pending.cursor_before, pending.size)
        sent = 0
        if users:
            sent = self._emit(spec, pending.cursor_before, users, already, marks)
            if sent < 0:
                return 0
        now = self._clock()
        done_before = len([u for u in users if u in already])
        self._store.commit_chunk(
            spec.campaign_id,
            self._owner,
            emitted=sent + done_before,
            cursor=CURSOR_END if after is None or not users else after,
            credit=0.0,
            credit_at=now,
            started_at=progress.started_at or now,
        )
        log.info(
            "campaign %s: resumed an interrupted chunk of %d users (%d already written, %d "
            "emitted now)",
            spec.campaign_id,
            len(users),
            done_before,
            sent,
        )
        return sent

    def _settle_cancelled(self, spec: CampaignSpec, progress: CampaignProgress) -> None:
        """Count what an interrupted chunk of a cancelled campaign wrote; nothing more is sent."""
        counted = 0
        if progress.pending is not None:
            written = written_users(
                self._publisher,
                spec.campaign_id,
                dict(progress.pending.marks),
                self._still_ours(spec.campaign_id),
            )
            if written is None:
                self._lapsed(spec.campaign_id)
                return
            source = self._source_for(spec.target)
            users, _ = source.page(progress.pending.cursor_before, progress.pending.size)
            counted = len([u for u in users if u in written])
        self._store.settle(spec.campaign_id, self._owner, counted)
        self.held.discard(spec.campaign_id)

    def _still_ours(self, campaign_id: str) -> Callable[[], bool]:
        return lambda: self._store.renew(campaign_id, self._owner, self._lease_s)

    def _lapsed(self, campaign_id: str) -> None:
        # Said out loud: a lease shorter than one partition's read-back would retry forever.
        log.warning(
            "campaign %s: the lease (%g s, FANFARE_API_CAMPAIGN_LEASE_S) lapsed while an "
            "interrupted chunk was read back; the next step reads it again",
            campaign_id,
            self._lease_s,
        )
        self.held.discard(campaign_id)

    def _finish(self, spec: CampaignSpec, state: str, now: float) -> None:
        self._store.finish(spec.campaign_id, self._owner, state, now)
        self.held.discard(spec.campaign_id)
        log.info("campaign %s: %s", spec.campaign_id, state)
