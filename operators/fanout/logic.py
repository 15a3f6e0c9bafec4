"""Bytewax adapter of a follower shard: feeds `FollowerShard` and schedules its work."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from bytewax.operators import StatefulBatchLogic

from operators import metrics
from operators.events import CaughtUp
from operators.fanout.checkpoint import ShardCheckpointer
from operators.fanout.loaded import ShardsLoaded
from operators.fanout.notify import CancelNotice, NotifyTally, RecipientJob
from operators.fanout.ports import FollowerStore
from operators.fanout.shard import (
    Batch,
    ChangelogEvent,
    FanoutTally,
    FollowerShard,
    ShardJob,
    ShardMarker,
)
from operators.fanout.step_budget import StepBudget
from operators.probe_demand import ProbeDemand
from schemas.records import (
    CategorySwitch,
    DeviceChange,
    FollowChange,
    PreferenceChange,
)

log = logging.getLogger(__name__)

READ_AHEAD_POLL_S = 0.02  # how often a shard looks whether its column read ahead is done
SETTLE_POLL_S = 0.05  # how often a caught-up shard looks whether the others caught up too


class ExpandFollowerShardLogic(StatefulBatchLogic[Any, Batch, dict[str, Any]]):
    """Applies changelogs, queues jobs, and expands within a budget per activation.

    Normal jobs expand up to `expand_budget` followers per activation; bulk jobs up to
    `bulk_budget` followers or `bulk_time_s` of work, so a celebrity's portion in this shard
    usually goes in one activation while normal posts wait at most that long.
    """

    def __init__(
        self,
        shard: FollowerShard,
        store: Callable[[], FollowerStore],
        expand_budget: int,
        clock: Callable[[], datetime],
        *,
        bulk_budget: int | None = None,
        bulk_time_s: float | None = None,
        checkpoints: Callable[[int], ShardCheckpointer] | None = None,
        loaded: ShardsLoaded | None = None,
        demand: ProbeDemand | None = None,
        step_budget: Callable[[], StepBudget] | None = None,
    ) -> None:
        self.shard = shard
        self._step_budget = step_budget
        self._demand = demand
        self._loaded = loaded
        if loaded is not None:
            loaded.shard_built()
        self._store = store
        self._budget = expand_budget
        self._bulk_budget = bulk_budget
        self._bulk_time_s = bulk_time_s
        self._clock = clock
        self._checkpointer_for = checkpoints
        self._checkpoints: ShardCheckpointer | None = None
        self._shard_id: int | None = None
        self._built_at = time.monotonic()
        # Readiness: counted once in metrics.CHANGELOGS_CAUGHT_UP_SHARDS when every changelog
        # partition has been read to its end (a shard with no changelog is caught up at once).
        self._caught_up = False
        # Caught up, table not compacted yet: done once every shard of the process caught up.
        self._settle_due = False
        self._note_caught_up()
        self._reading_ahead = False  # a bulk job's column is being read ahead (poll for it)
        self._step_until_last: float | None = None  # the window the last `_work` was given

    def on_batch(self, values: list[Any]) -> tuple[Iterable[Batch], bool]:
        """Apply everything that arrived, in order, then do a budget of work."""
        tally = FanoutTally()
        notified = NotifyTally()
        now = self._clock()
        follows: list[FollowChange] = []
        prefs = devices = 0
        markers = False
        newest: float | None = None  # the latest read_at of the jobs that arrived
        if self._shard_id is None:
            self._start(values)
        for v in values:
            if isinstance(v, ShardMarker):
                self.shard.note_caught_up(v.marker)
                markers = True
            elif isinstance(v, CaughtUp):
                self.shard.note_caught_up(v)
                markers = True
            elif isinstance(v, ShardJob):
                self.shard.add_job(v, now.timestamp(), tally)
                newest = v.read_at if newest is None else max(newest, v.read_at)
            elif isinstance(v, RecipientJob):
                self.shard.notify.add_job(v)
                newest = v.read_at if newest is None else max(newest, v.read_at)
            elif isinstance(v, CancelNotice):
                self.shard.notify.cancel(v.notification_id, now.timestamp(), notified)
            elif isinstance(v, ChangelogEvent):
                if isinstance(v.change, FollowChange):
                    follows.append(v.change)
                elif isinstance(v.change, PreferenceChange | CategorySwitch):
                    prefs += self.shard.apply(v)
                else:
                    devices += self.shard.apply(v)
            elif isinstance(v, PreferenceChange):
                self.shard.apply_preference(v)
                prefs += 1
            elif isinstance(v, DeviceChange):
                self.shard.apply_device(v)
                devices += 1
            elif isinstance(v, FollowChange):
                follows.append(v)
            else:
                raise TypeError(f"unexpected item for a follower shard: {type(v).__name__}")
        if follows:
            # Before any expansion below: the gate promised these are applied.
            self._store().apply_follow_changes(follows)
            self.shard.follows_changed({f.author_id for f in follows})
            metrics.CHANGES_APPLIED.labels("follow_changes").inc(len(follows))
        if prefs:
            metrics.CHANGES_APPLIED.labels("preference_changes").inc(prefs)
        if devices:
            metrics.CHANGES_APPLIED.labels("device_changes").inc(devices)
        if markers and not self._caught_up:
            self._note_caught_up()
        if newest is not None and self._demand is not None:
            # One ask for the newest: a probe late enough for it is late enough for the rest.
            wanted = self.shard.probe_wanted(newest)
            if wanted is not None:
                self._demand.ask(wanted)
        out = self._work(now, tally, notified)
        self._build_columns_ahead()
        self._housekeeping()
        return out, StatefulBatchLogic.RETAIN

    def _build_columns_ahead(self) -> None:
        # Building a column is work that can wait: only in the window `_work` was given.
        window_open = self._step_until_last is None or time.monotonic() < self._step_until_last
        self._reading_ahead = self.shard.build_columns_ahead(self._store, build=window_open)

    def _housekeeping(self) -> None:
        """Compact the table after the catch-up, then checkpoint when due.

        Neither is needed to open the gate, and each costs CPU per user (about 1 s for 1M
        users at a start from checkpoints): done in the activation that caught up, they made
        each shard's catch-up wait for every earlier shard's. So both wait until every shard
        of the process has caught up (`ShardsLoaded`); the first checkpoint after the catch-up
        is then of the compacted table.
        """
        if self._settle_due:
            if self._loaded is not None and not self._loaded.all_caught_up():
                return
            self._settle_due = False
            self.shard.users.compact()  # after the load: see UserTable.compact
            if self._loaded is not None:
                self._loaded.shard_settled()
        if self._checkpoints is not None and self._checkpoints.maybe_save(
            self.shard, caught_up=self._caught_up
        ):
            metrics.SHARD_CHECKPOINTS_SAVED.inc()

    def _start(self, values: list[Any]) -> None:
        """Learn the shard's id from its first items, and load its checkpoint before them."""
        for v in values:
            if isinstance(v, ShardJob | ChangelogEvent | ShardMarker | RecipientJob | CancelNotice):
                self._shard_id = v.shard_id
                break
        if self._shard_id is None:
            return
        if self._checkpointer_for is None:
            self.shard.resume_caps()
            return
        self._checkpoints = self._checkpointer_for(self._shard_id)
        started = time.monotonic()
        if self._checkpoints.load_into(self.shard):
            metrics.SHARD_CHECKPOINTS_LOADED.inc()
            log.info(
                "shard %d: checkpoint of %d users loaded in %.3f s",
                self._shard_id,
                self.shard.users.rows,
                time.monotonic() - started,
            )
        self.shard.resume_caps()  # a snapshot's caps, over the table just loaded

    def _note_caught_up(self) -> None:
        if self.shard.changelog_sources <= self.shard.caught_up.keys():
            self._caught_up = True
            self._settle_due = True
            metrics.CHANGELOGS_CAUGHT_UP_SHARDS.inc()
            if self._loaded is not None:
                self._loaded.shard_caught_up()
            log.info(
                "shard %s: changelogs caught up %.2f s after it was built",
                self._shard_id,
                time.monotonic() - self._built_at,
            )

    def on_notify(self) -> tuple[Iterable[Batch], bool]:
        """Continue expansion, release deferred notifications, send the bundle summaries due."""
        out = self._work(self._clock(), FanoutTally(), NotifyTally())
        self._build_columns_ahead()
        self._housekeeping()
        return out, StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[Iterable[Batch], bool]:
        """A finite input ended (tests, backfills): finish every job whose gate is open."""
        # Once first: it also releases holds already due (a scheduled send at the input's end).
        out: list[Batch] = self._work(self._clock(), FanoutTally(), NotifyTally())
        while self._runnable():
            out.extend(self._work(self._clock(), FanoutTally(), NotifyTally()))
        return out, StatefulBatchLogic.RETAIN

    def _runnable(self) -> bool:
        return self.shard.has_runnable_jobs() or self.shard.notify.runnable(self._notify_gate)

    def _notify_gate(self, read_at: float) -> bool:
        # A released hold (read_at 0) waits, as deferred pushes do, for a complete user table.
        return self.shard.gate_open_for(max(read_at, self.shard.ready_after))

    def _work(self, now: datetime, tally: FanoutTally, notified: NotifyTally) -> list[Batch]:
        out: list[Batch] = []
        # Asked once per call: a shard asking twice is how the budget tells a new activation.
        step_until = self._step_until_last = self._step_until()
        notify = self.shard.notify
        due = notify.next_due()
        if (due is not None and due <= now.timestamp()) or notify.runnable(self._notify_gate):
            # API notifications first: a transactional one never waits behind a post's expansion.
            out.extend(
                notify.work(
                    self.shard.users,
                    now,
                    self._notify_gate,
                    notified,
                    releases_allowed=self.shard.releases_allowed(),
                    batch_size=self.shard.batch_size,
                    until=step_until,
                )
            )
        _record_notify(notified)
        release = self.shard.next_release()
        if not self.shard.jobs and (release is None or release > now.timestamp()):
            _record(tally)  # nothing to expand or release (most calls: caught-up markers)
            return out
        store = self._store()
        out.extend(self.shard.release_due(store, now, tally))
        until = None if self._bulk_time_s is None else time.monotonic() + self._bulk_time_s
        if step_until is not None:
            until = step_until if until is None else min(until, step_until)
        out.extend(
            self.shard.expand(
                store, now, self._budget, tally, bulk_budget=self._bulk_budget, bulk_until=until
            )
        )
        _record(tally)
        return out

    def _step_until(self) -> float | None:
        """The worker's deadline for work that can wait (None: no step budget)."""
        return None if self._step_budget is None else self._step_budget().until(self._shard_id)

    def notify_at(self) -> datetime | None:
        """Now while runnable jobs remain, else the next quiet-hours release or held send."""
        now = self._clock()
        if self._runnable():
            return now
        dues = [
            t for t in (self.shard.next_release(), self.shard.notify.next_due()) if t is not None
        ]
        if self._reading_ahead:  # look again soon: the column is built while the gate is shut
            dues.append(now.timestamp() + READ_AHEAD_POLL_S)
        if self._settle_due:  # soon, once the other shards caught up (`_housekeeping`)
            dues.append(now.timestamp() + SETTLE_POLL_S)
        return datetime.fromtimestamp(min(dues), UTC) if dues else None

    def snapshot(self) -> dict[str, Any]:
        """The shard's state (see FollowerShard.snapshot)."""
        return self.shard.snapshot()


def _record_notify(t: NotifyTally) -> None:
    if t.candidates:
        metrics.CANDIDATES.inc(t.candidates)
    for reason, n in t.suppressed.items():
        metrics.SUPPRESSED.labels(reason).inc(n)
    if t.deferred:
        metrics.DEFERRED.inc(t.deferred)
    if t.cancelled:
        metrics.SUPPRESSED.labels("cancelled").inc(t.cancelled)
    if t.held:
        metrics.NOTIFICATIONS_HELD.inc(t.held)
    for channel, n in t.fell_back.items():
        metrics.NOTIFICATIONS_FELL_BACK.labels(channel).inc(n)
    for tier, seconds in t.read_to_run:
        metrics.NOTIFY_READ_TO_RUN.labels(tier).observe(seconds)


def _record(t: FanoutTally) -> None:
    if t.candidates:
        metrics.CANDIDATES.inc(t.candidates)
    for reason, n in t.suppressed.items():
        metrics.SUPPRESSED.labels(str(reason)).inc(n)
    if t.deferred:
        metrics.DEFERRED.inc(t.deferred)
    if t.released:
        metrics.RELEASED.inc(t.released)
    if t.deduped_jobs:
        metrics.DEDUPED.labels("shard_job").inc(t.deduped_jobs)
    if t.jobs_completed:
        metrics.SHARD_JOBS_COMPLETED.inc(t.jobs_completed)
    if t.summaries:
        metrics.BUNDLE_SUMMARIES.inc(t.summaries)
        metrics.BUNDLED.inc(t.summarised)
