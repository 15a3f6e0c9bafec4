"""One follower shard's fan-out: its users in columns, jobs, deferrals, the gate.

A shard holds its users' preferences and devices (`operators.fanout.columns.UserTable`), its
expansion jobs, its deferred (quiet-hours) notifications, the posts' frequency cap and bundles
(`operators.fanout.caps`), the changelog gate, and how far each changelog partition has been
applied (`positions`, what a checkpoint records).

Everything a shard needs to decide who gets a push is local to it: users are bucketed into
shards by id (`operators.fanout.sharding`), follow edges are stored by the follower's shard, and
the preference and device changelogs are routed to the shard of their user. A page of followers
is decided as one mask (`operators.fanout.decide`), and dispatch batches are joined from the
devices' pre-encoded JSON fragments (`operators.fanout.batching.encode_batches`). A celebrity's
followers in the shard are read once into a column of rows (`FollowerColumn`), kept while the
store says the edges have not changed.

This module is plain Python: the Bytewax adapter (`operators.fanout.logic`) calls it, and the unit
tests drive it directly with an in-memory follower store.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from operators.events import CaughtUp
from operators.fanout.batching import encode_batches
from operators.fanout.caps import Bundle, CapRule, FrequencyCap, row_arrays
from operators.fanout.columns import (
    I32,
    PROVIDERS,
    U8,
    Columns,
    UserTable,
    ZoneHours,
    json_text,
    quiet_mask,
    release_times,
)
from operators.fanout.decide import Admit, AdmitOne, PageDecision, decide_few, decide_page
from operators.fanout.eligibility import Suppressed
from operators.fanout.notify import ChannelBook, NotifyShard
from operators.fanout.ports import FollowerStore, Position
from operators.fanout.prefetch import ColumnPrefetch
from schemas.addresses import PUSH_PROVIDERS
from schemas.codecs import format_timestamp
from schemas.records import (
    CategorySwitch,
    ChannelMessage,
    DeviceChange,
    DispatchBatch,
    DispatchItem,
    EncodedDispatchBatch,
    FollowChange,
    PreferenceChange,
    Provider,
)
from schemas.topics import DEVICE_CHANGES, PREFERENCE_CHANGES

log = logging.getLogger(__name__)

Batch = EncodedDispatchBatch | DispatchBatch
"""What a shard emits: posts' batches (encoded) and bundle summaries (with their message)."""

USER_TOPICS = frozenset((PREFERENCE_CHANGES, DEVICE_CHANGES))
"""The changelogs a shard's user table is built from (and checkpoints positions in)."""

# Completed jobs are remembered this long so a duplicate job reaching the shard in the same
# execution is dropped; post-level dedupe (the post claim) covers longer windows.
RECENT_JOB_TTL_S = 600.0
FEW = 48  # pages smaller than this are decided one follower at a time (decide.decide_few)
MAX_COLUMN_EDGES = 8_000_000  # cached column entries per shard (5 bytes each)
POST_CATEGORY = "new_post"  # the catalog's category of a post (operators/notify/defaults)
NOTIFY_CAP = "notify_cap:"  # checkpoint columns of the API categories' caps: PREFIX<category>:
BUNDLE_TEMPLATE = "new_posts_bundle"  # operators/notify/defaults/templates/new_posts_bundle.toml
MAX_COLLAPSE_KEY_BYTES = 64  # APNs' limit on apns-collapse-id


def lane_for(follower_count: int, celebrity_threshold: int) -> str:
    """Celebrities (more followers than the threshold) use the bulk lanes."""
    return "bulk" if follower_count > celebrity_threshold else "normal"


@dataclass(frozen=True, slots=True)
class ChangelogEvent:
    """A decoded changelog event, its user's shard, and where it was read.

    `source` is `topic/partition`, `log` the id of the topic's log (None when not known).
    """

    change: PreferenceChange | CategorySwitch | DeviceChange | FollowChange
    shard_id: int
    source: str
    offset: int
    log: str | None = None


@dataclass(frozen=True, slots=True)
class ShardMarker:
    """A caught-up marker on its way to one shard (the shard learns its id from its items)."""

    shard_id: int
    marker: CaughtUp


@dataclass(slots=True)
class ShardJob:
    """Expand one post's followers in this shard; `cursor` is the last follower done."""

    post_id: str
    author_id: str
    created_at: str
    lane: str
    read_at: float
    shard_id: int
    cursor: str | None = None


@dataclass(slots=True)
class FanoutTally:
    """What one call decided, for the funnel metrics."""

    candidates: int = 0
    suppressed: Counter[str] = field(default_factory=Counter)
    deferred: int = 0
    released: int = 0
    deduped_jobs: int = 0
    jobs_completed: int = 0
    items: Counter[tuple[str, str]] = field(default_factory=Counter)  # (provider, lane)
    summaries: int = 0  # bundle summaries sent (one per user and window)
    summarised: int = 0  # notifications those summaries carry

    def add_items(self, batches: Iterable[EncodedDispatchBatch]) -> None:
        """Count dispatched items by provider and lane."""
        for b in batches:
            self.items[(b.provider, b.lane)] += b.count


@dataclass(slots=True)
class _PostRef:
    author_id: str
    created_at: str
    lane: str
    pending: int = 0


@dataclass(slots=True)
class FollowerColumn:
    """An author's followers in this shard as rows and edge flags, in follower-id order.

    The store's page order, so a job's cursor (the last follower id done) means the same in a
    column and in pages. Valid while the store's edge version is `version`.
    """

    rows: I32
    flags: U8
    version: int

    def position_after(self, users: UserTable, cursor: str | None) -> int:
        """Index of the first follower whose id sorts after `cursor`."""
        if cursor is None:
            return 0
        rows = self.rows
        return bisect.bisect_right(range(len(rows)), cursor, key=lambda i: users.uid(int(rows[i])))


class _Pending:
    """Devices a job decided in one activation, encoded into batches once at its end."""

    __slots__ = ("apns", "fcm", "job")

    def __init__(self, job: ShardJob) -> None:
        self.job = job
        self.apns: list[int] = []
        self.fcm: list[int] = []

    def add(self, decision: PageDecision) -> None:
        self.apns.extend(decision.apns)
        self.fcm.extend(decision.fcm)

    def flush(
        self, shard: FollowerShard, out: list[EncodedDispatchBatch], tally: FanoutTally
    ) -> None:
        j = self.job
        shard.emit(j.post_id, j.author_id, j.created_at, j.lane, self.apns, self.fcm, out, tally)


class FollowerShard:
    """The state and decisions of one follower shard."""

    def __init__(
        self,
        changelog_sources: Iterable[str],
        *,
        page_size: int = 2_000,
        batch_size: int = 500,
        settle_s: float = 0.1,
        celebrity_threshold: int | None = None,
        few: int = FEW,
        caps: CapRule | None = None,
        notify: NotifyShard | None = None,
        prefetch: ColumnPrefetch | None = None,
    ) -> None:
        self.changelog_sources = frozenset(changelog_sources)
        self.few = few
        self.page_size = page_size
        self.batch_size = batch_size
        self.settle_s = settle_s
        self.celebrity_threshold = celebrity_threshold
        self._lane_confirmed: set[str] = set()  # post_ids; not snapshotted: confirmed again
        self.users = UserTable()
        self.zone_hours = ZoneHours()
        self.positions: dict[str, Position] = {}
        self.changes_applied = 0  # changelog events applied since start (checkpoint pacing)
        self.columns: OrderedDict[str, FollowerColumn] = OrderedDict()
        self.caught_up: dict[str, float] = {}
        # Deferred pushes are released only against a complete user table: after a restore,
        # not before every changelog partition was read to its end again.
        self.ready_after = 0.0
        self._horizon: float | None = None
        self.jobs: dict[str, ShardJob] = {}
        self.recent: dict[str, float] = {}
        # Deferred notifications grouped by (release_ts, post_id): compact for big posts.
        self.deferred: dict[tuple[float, str], list[str]] = {}
        self.deferred_heap: list[tuple[float, str]] = []
        self.deferred_posts: dict[str, _PostRef] = {}
        # Posts' frequency cap over the user rows (None: no cap), and a snapshot's cap state
        # waiting for the user table it refers to (`resume_caps`).
        self.caps = FrequencyCap(caps) if caps is not None and caps.enabled else None
        self._caps_resume: dict[str, Any] | None = None
        self._notify_caps_resume: dict[str, Any] | None = None
        # Rows [0, n) are the same users in every table started from the last checkpoint
        # saved or loaded (rows are append-only): (n, digest of their ids).
        self._stable_rows: tuple[int, int] = (0, 0)
        # API notifications (`operators.fanout.notify`): channel addresses, category switches,
        # tier queues, scheduled holds.
        self.notify = notify if notify is not None else NotifyShard()
        # Bulk jobs' follower columns read ahead while the job waits at the gate (None: not).
        self.prefetch = prefetch

    # ---- changelogs -------------------------------------------------------------------------

    def apply(self, event: ChangelogEvent) -> bool:
        """Apply a preference or device event once, in partition order; False if skipped.

        An event below the partition's position was applied already (the changelog is read
        again from the oldest checkpoint's position after a restart). A new log id (the topic
        was re-created: its offsets start again) resets the position.
        """
        log, next_offset = self.positions.get(event.source, (None, 0))
        if event.offset < next_offset and (event.log is None or log is None or event.log == log):
            return False
        change = event.change
        if isinstance(change, PreferenceChange):
            self.users.apply_preference(change)
            self.notify.book.apply_preference(change)
        elif isinstance(change, CategorySwitch):
            self.notify.book.apply_switch(change)
        elif isinstance(change, DeviceChange) and change.provider not in PUSH_PROVIDERS:
            self.notify.book.apply_address(change)
        elif isinstance(change, DeviceChange):
            self.users.apply_device(change)
        else:
            raise TypeError(f"not a user changelog event: {type(change).__name__}")
        self.positions[event.source] = (event.log or log, event.offset + 1)
        self.changes_applied += 1
        return True

    def apply_preference(self, change: PreferenceChange) -> None:
        """Replace the user's preferences (a preference record is complete, not a patch)."""
        self.users.apply_preference(change)
        self.notify.book.apply_preference(change)

    def apply_device(self, change: DeviceChange) -> None:
        """Register, refresh or deactivate one device (or channel address) of the user."""
        if change.provider in PUSH_PROVIDERS:
            self.users.apply_device(change)
        else:
            self.notify.book.apply_address(change)

    def follows_changed(self, authors: Iterable[str]) -> None:
        """Forget the cached columns of authors whose edges this shard just changed."""
        for author in authors:
            self.columns.pop(author, None)

    def note_caught_up(self, marker: CaughtUp) -> None:
        """Record how far a changelog partition has been read (and so applied, here).

        Every event of the partition before the marker's offset reached this shard before the
        marker (one reader emits both, in order), so a shard none of whose users' events are in
        a partition still records a position in it, and a checkpoint covers every partition.
        """
        topic = marker.source.rpartition("/")[0]
        if marker.offset is not None and marker.log is not None and topic in USER_TOPICS:
            log, next_offset = self.positions.get(marker.source, (None, 0))
            if log in (None, marker.log) and marker.offset > next_offset:
                self.positions[marker.source] = (marker.log, marker.offset)
        if marker.as_of > self.caught_up.get(marker.source, float("-inf")):
            self.caught_up[marker.source] = marker.as_of
            self._horizon = None  # recomputed once, not for every job

    def gate_open_for(self, read_at: float) -> bool:
        """True when every changelog partition was read to its end after the post was read.

        This is the trust contract's "filter late" and start-up rule in one: a post never fans
        out against state older than what the changelogs held when the post was read.
        """
        if not self.changelog_sources:
            return True
        if self._horizon is None:
            if not self.changelog_sources <= self.caught_up.keys():
                return False
            self._horizon = min(self.caught_up[s] for s in self.changelog_sources) - self.settle_s
        return self._horizon >= read_at

    def probe_wanted(self, read_at: float) -> float | None:
        """When every changelog partition must be probed to open the gate for `read_at`.

        None when the gate is open already. A probe made then answers it (`ProbeDemand`).
        """
        return None if self.gate_open_for(read_at) else read_at + self.settle_s

    # ---- jobs ---------------------------------------------------------------------------------

    def add_job(self, job: ShardJob, now: float, tally: FanoutTally) -> bool:
        """Queue a job unless the same post is already queued or recently completed here."""
        self._forget_old_jobs(now)
        if job.post_id in self.jobs or job.post_id in self.recent:
            tally.deduped_jobs += 1
            return False
        self.jobs[job.post_id] = job
        if self.prefetch is not None and job.lane == "bulk" and job.cursor is None:
            cached = self.columns.get(job.author_id)
            self.prefetch.ask(
                job.author_id, job.shard_id, None if cached is None else cached.version
            )
        return True

    def _forget_old_jobs(self, now: float) -> None:
        # `recent` is in completion order with a fixed TTL, so expiries are ordered too:
        # drop from the front until one is still live (O(1) amortised per job).
        recent = self.recent
        while recent:
            post_id, until = next(iter(recent.items()))
            if until > now:
                break
            del recent[post_id]

    def releases_allowed(self) -> bool:
        """Whether the user table is complete enough to release deferred pushes."""
        return self.gate_open_for(self.ready_after)

    def has_runnable_jobs(self) -> bool:
        """Whether some queued job may expand now (its gate is open)."""
        return any(self.gate_open_for(j.read_at) for j in self.jobs.values())

    def expand(
        self,
        store: FollowerStore,
        now: datetime,
        budget: int,
        tally: FanoutTally,
        *,
        bulk_budget: int | None = None,
        bulk_until: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> list[EncodedDispatchBatch]:
        """Expand queued jobs, normal lane first, then bulk.

        Normal jobs read at most `budget` followers; bulk jobs at most `bulk_budget` (default
        `budget`), a page at a time from the store or the whole rest at once from a cached
        column, and stop once `clock()` passes `bulk_until`: a whole shard's portion of a
        celebrity post in one go when that is quick, normal posts waiting at most one time
        budget.
        """
        out: list[EncodedDispatchBatch] = []
        self._confirm_lanes(store)
        left = budget
        for job in [j for j in self.jobs.values() if j.lane == "normal"]:
            if left <= 0:
                return out
            if self.gate_open_for(job.read_at):
                acc = _Pending(job)
                while left > 0 and job.post_id in self.jobs:
                    left -= self._expand_job(job, store, now, left, acc, tally)
                acc.flush(self, out, tally)
        left = budget if bulk_budget is None else bulk_budget
        for job in [j for j in self.jobs.values() if j.lane == "bulk"]:
            if left <= 0 or (bulk_until is not None and clock() >= bulk_until):
                break
            if not self.gate_open_for(job.read_at):
                continue
            acc = _Pending(job)
            while left > 0 and job.post_id in self.jobs:
                left -= self._expand_job(job, store, now, left, acc, tally)
                if bulk_until is not None and clock() >= bulk_until:
                    break
            acc.flush(self, out, tally)
        return out

    def _confirm_lanes(self, store: FollowerStore) -> None:
        """Decide the lane of each job about to start, from the follower count now.

        The planner chose it when the post was read; on a cold start the follow changes were
        not applied yet, so a celebrity's post looked small and took the normal lanes. A job
        starts only once the changelogs were read to their end after the post, so the count is
        as current here as the edges the job expands. A started job keeps its lane.
        """
        if self.celebrity_threshold is None:
            return
        counts: dict[str, int] = {}
        for job in self.jobs.values():
            if (
                job.cursor is not None
                or job.post_id in self._lane_confirmed
                or not self.gate_open_for(job.read_at)
            ):
                continue
            if job.author_id not in counts:
                counts[job.author_id] = store.follower_count(job.author_id)
            job.lane = lane_for(counts[job.author_id], self.celebrity_threshold)
            self._lane_confirmed.add(job.post_id)

    def _expand_job(
        self,
        job: ShardJob,
        store: FollowerStore,
        now: datetime,
        budget: int,
        acc: _Pending,
        tally: FanoutTally,
    ) -> int:
        """One step of a job: a slice of its cached column, or one page from the store."""
        column = self._column(job, store) if job.lane == "bulk" else None
        if column is not None:
            start = column.position_after(self.users, job.cursor)
            stop = min(len(column.rows), start + max(budget, 1))
            rows, flags = column.rows[start:stop], column.flags[start:stop]
            read, done = stop - start, stop >= len(column.rows)
            column_last = self.users.uid(int(rows[-1])) if read else None
            if read:
                decision = self._decide(job.author_id, rows, flags, now, tally)
        else:
            limit = max(1, min(self.page_size, budget))
            page = store.follower_page(job.author_id, job.shard_id, job.cursor, limit)
            read, done = len(page), len(page) < limit  # a short page is the shard's end
            if read:
                decision = self._decide_rows(job.author_id, page, now, tally)
        if read:
            tally.candidates += read
            acc.add(decision)
            self._defer_decided(
                job.post_id, job.author_id, job.created_at, job.lane, decision, tally
            )
            job.cursor = column_last if column is not None else page[-1][0]
        if done:
            del self.jobs[job.post_id]
            self._lane_confirmed.discard(job.post_id)
            self.recent[job.post_id] = now.timestamp() + RECENT_JOB_TTL_S
            tally.jobs_completed += 1
        return max(read, 1)

    def build_columns_ahead(
        self, store: Callable[[], FollowerStore], *, build: bool = True
    ) -> bool:
        """Build the columns read ahead for bulk jobs still at the gate; True while one is read.

        The rows are looked up while the job waits rather than when its gate opens. A column
        built now is a cached column like any other: used only while the store's edge version
        stays the one it was built at (rows are never reused, so later changelog events change
        nothing in it). With `build` False (the worker's window for work that can wait is shut:
        a 1M-follower column takes 15-40 ms per shard to build), a column that is ready waits
        too, and the answer is True: look again soon.
        """
        if self.prefetch is None:
            return False
        reading = False
        for job in self.jobs.values():
            if job.lane != "bulk" or job.cursor is not None or self.gate_open_for(job.read_at):
                continue
            ready = self.prefetch.ready(job.author_id, job.shard_id)
            if ready is None:
                continue
            if ready and build:
                self._column(job, store())
            else:
                reading = True
        return reading

    def _column(self, job: ShardJob, store: FollowerStore) -> FollowerColumn | None:
        """The author's cached followers here, built or rebuilt when the edges changed."""
        version = store.follower_version(job.author_id, job.shard_id)
        if version is None:  # the store cannot tell when edges change: read pages
            if self.prefetch is not None:
                self.prefetch.discard(job.author_id, job.shard_id)
            return None
        col = self.columns.get(job.author_id)
        if col is not None and col.version == version:
            self.columns.move_to_end(job.author_id)
            if self.prefetch is not None:
                self.prefetch.discard(job.author_id, job.shard_id)
            return col
        followers = None
        if self.prefetch is not None:
            followers = self.prefetch.take(job.author_id, job.shard_id, version)
        if followers is None:
            followers = store.follower_column(job.author_id, job.shard_id)
        col = FollowerColumn(self.users.rows_of_packed(followers), followers.flags, version)
        self.columns[job.author_id] = col
        total = sum(len(c.rows) for c in self.columns.values())
        while total > MAX_COLUMN_EDGES and len(self.columns) > 1:
            _, old = self.columns.popitem(last=False)
            total -= len(old.rows)
        return col

    def _decide_rows(
        self, author_id: str, page: list[tuple[str, int]], now: datetime, tally: FanoutTally
    ) -> PageDecision:
        """Decide followers given by id (store pages, deferred releases)."""
        if len(page) >= self.few:
            rows = self.users.rows_of([f for f, _ in page])
            flags = np.fromiter((fl for _, fl in page), np.uint8, len(page))
            return self._decide(author_id, rows, flags, now, tally)
        users = self.users
        caps = self.caps
        admit_one: AdmitOne | None = None
        if caps is not None:
            now_ts = now.timestamp()

            def admit_one(row: int) -> bool:
                return caps.admit_one(row, author_id, now_ts)

        decision = decide_few(
            users,
            [users.ensure_row(f) for f, _ in page],
            [fl for _, fl in page],
            users.row_of(author_id),
            self.zone_hours.hours(users.zones, now),
            now,
            admit_one,
        )
        tally.suppressed.update(decision.suppressed)
        return decision

    def _decide(
        self, author_id: str, rows: I32, flags: U8, now: datetime, tally: FanoutTally
    ) -> PageDecision:
        users = self.users
        hours = self.zone_hours.hours(users.zones, now)
        caps = self.caps
        admit: Admit | None = None
        if caps is not None:
            now_ts = now.timestamp()

            def admit(kept: I32) -> tuple[I32, int]:
                return caps.admit(kept, author_id, now_ts)

        decision = decide_page(users, rows, flags, users.row_of(author_id), hours, now, admit)
        tally.suppressed.update(decision.suppressed)
        return decision

    def _defer_decided(
        self,
        post_id: str,
        author_id: str,
        created_at: str,
        lane: str,
        decision: PageDecision,
        tally: FanoutTally,
    ) -> None:
        if len(decision.deferred_rows):
            uid = self.users.uid
            entries = zip(
                decision.deferred_until.tolist(),
                [uid(r) for r in decision.deferred_rows.tolist()],
                strict=True,
            )
            tally.deferred += len(decision.deferred_rows)
            self._defer(post_id, author_id, created_at, lane, entries)

    def emit(
        self,
        post_id: str,
        author_id: str,
        created_at: str,
        lane: str,
        apns: list[int],
        fcm: list[int],
        out: list[EncodedDispatchBatch],
        tally: FanoutTally,
    ) -> None:
        """Dispatch batches for these devices, joined from their fragments."""
        frags = self.users.fragments
        providers: tuple[tuple[Provider, list[int]], ...] = (("apns", apns), ("fcm", fcm))
        for provider, devices in providers:
            if devices:
                batches = encode_batches(
                    post_id, author_id, created_at, provider, lane, frags, devices, self.batch_size
                )
                tally.add_items(batches)
                out.extend(batches)

    # ---- quiet hours --------------------------------------------------------------------------

    def _defer(
        self,
        post_id: str,
        author_id: str,
        created_at: str,
        lane: str,
        entries: Iterable[tuple[float, str]],
    ) -> None:
        ref = self.deferred_posts.get(post_id)
        if ref is None:
            ref = self.deferred_posts[post_id] = _PostRef(author_id, created_at, lane)
        for release, user_id in entries:
            key = (release, post_id)
            bucket = self.deferred.get(key)
            if bucket is None:
                bucket = self.deferred[key] = []
                heapq.heappush(self.deferred_heap, key)
            bucket.append(user_id)
            ref.pending += 1

    def next_release(self) -> float | None:
        """When the earliest deferred notification or bundle summary is due (epoch seconds)."""
        due = self.deferred_heap[0][0] if self.deferred_heap else None
        summary = None if self.caps is None else self.caps.next_due()
        if summary is None:
            return due
        return summary if due is None else min(due, summary)

    def release_due(self, store: FollowerStore, now: datetime, tally: FanoutTally) -> list[Batch]:
        """Release deferred notifications whose window ended, and the bundle summaries due.

        Everything is checked again at release (edge, preferences, devices).
        """
        out: list[EncodedDispatchBatch] = []
        now_ts = now.timestamp()
        if not self.releases_allowed():
            return []
        while self.deferred_heap and self.deferred_heap[0][0] <= now_ts:
            key = heapq.heappop(self.deferred_heap)
            user_ids = self.deferred.pop(key, [])
            post_id = key[1]
            ref = self.deferred_posts[post_id]
            ref.pending -= len(user_ids)
            # The edge may have changed while the notification waited: re-read it.
            followers: list[str] = []
            flags: list[int] = []
            for uid in user_ids:
                f = store.follow_flags(ref.author_id, uid)
                if f is None:
                    tally.suppressed[Suppressed.UNFOLLOWED] += 1
                else:
                    followers.append(uid)
                    flags.append(f)
            tally.released += len(user_ids)
            if followers:
                rows = self.users.rows_of(followers)
                decision = self._decide(ref.author_id, rows, np.array(flags, np.uint8), now, tally)
                self._defer_decided(
                    post_id, ref.author_id, ref.created_at, ref.lane, decision, tally
                )
                self.emit(
                    post_id,
                    ref.author_id,
                    ref.created_at,
                    ref.lane,
                    decision.apns,
                    decision.fcm,
                    out,
                    tally,
                )
            if ref.pending <= 0:
                self.deferred_posts.pop(post_id, None)
        return [*out, *self.send_summaries(now, tally)]

    # ---- bundle summaries -----------------------------------------------------------------------

    def send_summaries(self, now: datetime, tally: FanoutTally) -> list[DispatchBatch]:
        """One summary push per user whose bundle is due, to every active device of the user.

        A user in quiet hours gets it at the release; none when push is off or no device.
        """
        caps = self.caps
        if caps is None:
            return []
        due = caps.take_due(now.timestamp())
        if not due:
            return []
        users = self.users
        rows = np.fromiter(due, np.int32, len(due))
        rows = rows[users.push[rows] != 0]
        quiet = quiet_mask(users, rows, self.zone_hours.hours(users.zones, now))
        if quiet.any():
            later = rows[quiet]
            for row, until in zip(
                later.tolist(), release_times(users, later, now).tolist(), strict=True
            ):
                b = due[row]
                caps.put_back(row, Bundle(b.window, b.count, b.authors, until))
            rows = rows[~quiet]
        out: list[DispatchBatch] = []
        created_at = format_timestamp(now)
        category = caps.rule.category
        head, nxt, prov, frags = users.dev_head, users.dev_next, users.dev_provider, users.fragments
        windows: dict[int, tuple[str, bytes, str]] = {}  # per window: id, item prefix, its start
        for row in rows.tolist():
            bundle = due[row]
            user_id = users.uid(row)
            w = windows.get(bundle.window)
            if w is None:
                sid = summary_id(category, bundle.window)
                w = windows[bundle.window] = (
                    sid,
                    b'{"notification_id":"' + json_text(sid) + b":",
                    format_timestamp(float(bundle.window)),
                )
            sid, prefix, started = w
            by_provider: dict[Provider, list[DispatchItem]] = {}
            d = head.item(row)
            while d >= 0:
                item: DispatchItem = orjson.loads(prefix + frags[d])
                by_provider.setdefault(PROVIDERS[prov.item(d)], []).append(item)
                d = nxt.item(d)
            if not by_provider:
                continue
            message = summary_message(category, user_id, bundle, started)
            for provider, items in by_provider.items():
                for start in range(0, len(items), self.batch_size):
                    chunk = tuple(items[start : start + self.batch_size])
                    out.append(
                        DispatchBatch(
                            sid, bundle.authors[0], provider, created_at, "normal", chunk, message
                        )
                    )
                    tally.items[(provider, "normal")] += len(chunk)
            tally.summaries += 1
            tally.summarised += bundle.count
        return out

    # ---- recovery -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Jobs, deferrals and dedupe memory: everything but the user table and the gate.

        Users' preferences and devices are checkpointed apart (`checkpoint_state`), with the
        changelog positions they include, so a snapshot stays small whatever the number of
        users; Bytewax pickles it at once, so live containers are fine.
        """
        return {
            "v": 2,
            "jobs": [
                (j.post_id, j.author_id, j.created_at, j.lane, j.read_at, j.shard_id, j.cursor)
                for j in self.jobs.values()
            ],
            "recent": self.recent,
            "deferred": self.deferred,
            "deferred_posts": {
                p: (r.author_id, r.created_at, r.lane, r.pending)
                for p, r in self.deferred_posts.items()
            },
            "notify": self.notify.snapshot(),
            **({} if self.caps is None else {"caps": self._caps_state()}),
            "notify_caps": self._notify_caps_state(),
        }

    def _caps_state(self) -> dict[str, Any]:
        # A restored state not applied yet (no table loaded so far) is passed on as it is.
        return self._caps_resume if self._caps_resume is not None else self._caps_snapshot()

    def _notify_caps_state(self) -> dict[str, Any]:
        """The API categories' caps, as the posts' (a restored one not applied: as it is)."""
        if self._notify_caps_resume is not None:
            return self._notify_caps_resume
        return {
            c: {**self._caps_snapshot(cap), "rule": (cap.rule.limit, cap.rule.window_s)}
            for c, cap in self.notify.caps.items()
        }

    def _caps_snapshot(self, cap: FrequencyCap | None = None) -> dict[str, Any]:
        """The cap state with its rows made portable.

        A row the last checkpoint holds stays a row; a newer one (its row may differ after a
        restart: the changelog tail and follower pages create rows in another order) becomes
        -1 - its index in `tail`, a list of user ids.
        """
        cap = cap or self.caps
        assert cap is not None
        arrays = cap.to_arrays()
        stable, digest = self._stable_rows
        tail: list[str] = []
        index: dict[int, int] = {}
        for name in list(row_arrays(arrays)):
            rows = arrays[name].astype(np.int64)
            newer = np.flatnonzero(rows >= stable)
            if not len(newer):
                continue
            refs = rows.copy()
            for i in newer.tolist():
                r = int(rows[i])
                k = index.get(r)
                if k is None:
                    k = index[r] = len(tail)
                    tail.append(self.users.uid(r))
                refs[i] = -1 - k
            arrays[name] = refs
        return {"stable": (stable, digest), "tail": tail, "arrays": arrays}

    def resume_caps(self) -> None:
        """Apply a restored snapshot's cap state to the user table now loaded.

        Called after `load_checkpoint` (or when there is no checkpoint). Rows the snapshot says
        the checkpoint holds must be that checkpoint's: when the table loaded is another (a
        checkpoint lost), their counts are dropped, with a warning.
        """
        notify_snaps, self._notify_caps_resume = self._notify_caps_resume, None
        if notify_snaps:
            self.notify.caps = {}
            for c, s in notify_snaps.items():
                rule = self.notify.rule_of(c, *s.get("rule", (None, None)))
                if rule is not None:  # a snapshot from before per-category rules: the default
                    self.notify.caps[c] = FrequencyCap.from_arrays(rule, self._resumed_rows(s))
        snap, self._caps_resume = self._caps_resume, None
        if snap is None or self.caps is None:
            return
        self.caps = FrequencyCap.from_arrays(self.caps.rule, self._resumed_rows(snap))

    def _resumed_rows(self, snap: dict[str, Any]) -> dict[str, Any]:
        """A portable cap state's arrays over this table's rows (see `_caps_snapshot`)."""
        stable, digest = snap["stable"]
        same = stable == 0 or (self.users.rows >= stable and self.users.id_digest(stable) == digest)
        if stable and not same:
            log.warning(
                "the frequency-cap counts of %d users were dropped: the shard's checkpoint is "
                "not the one the snapshot was taken against",
                stable,
            )
        tail = self.users.rows_of(snap["tail"]).astype(np.int64)
        arrays = dict(snap["arrays"])
        for name in list(row_arrays(arrays)):
            refs = arrays[name].astype(np.int64)
            mapped = np.where(refs >= 0, refs if same else -1, 0)
            newer = refs < 0
            mapped[newer] = tail[-1 - refs[newer]]
            arrays[name] = mapped
        return arrays

    def restore(self, snap: dict[str, Any], now: float) -> None:
        """Load a snapshot; users come from a checkpoint and the changelogs, the gate closes."""
        if snap.get("v") != 2:
            raise ValueError(f"unknown follower shard snapshot version {snap.get('v')!r}")
        self.jobs = {j[0]: ShardJob(*j) for j in snap["jobs"]}
        self.recent = snap["recent"]
        self.deferred = snap["deferred"]
        self.deferred_heap = list(self.deferred)
        heapq.heapify(self.deferred_heap)
        self.deferred_posts = {p: _PostRef(*r) for p, r in snap["deferred_posts"].items()}
        if "notify" in snap:  # a snapshot from before API notifications has none
            self.notify.restore(snap["notify"])
        self._caps_resume = snap.get("caps")
        self._notify_caps_resume = snap.get("notify_caps")
        self.caught_up = {}
        self._horizon = None
        self.ready_after = now

    def checkpoint_state(self) -> tuple[Columns, dict[str, Position]]:
        """The user table's arrays and the changelog positions they include (a copy).

        The channel book's arrays and the cap state over the same rows (`cap_*`) ride along.
        """
        columns = {**self.users.to_columns(), **self.notify.book.to_columns()}
        if self.caps is not None:
            columns.update({f"cap_{k}": v for k, v in self.caps.to_arrays().items()})
        for category, cap in self.notify.caps.items():
            arrays = {
                **cap.to_arrays(),
                "rule": np.array([cap.rule.limit, cap.rule.window_s], np.int64),
            }
            columns.update({f"{NOTIFY_CAP}{category}:{k}": v for k, v in arrays.items()})
        self._stable_rows = (self.users.rows, self.users.id_digest(self.users.rows))
        return columns, dict(self.positions)

    def load_checkpoint(self, columns: Columns, positions: dict[str, Position]) -> None:
        """Start from a checkpoint: the changelogs' tail after `positions` completes it.

        Its cap state is used when no snapshot brought one (`resume_caps` replaces it: a
        snapshot matches the epoch the flow resumes from, a checkpoint may be later).
        """
        self.users = UserTable.from_columns(columns)
        self.notify.book = ChannelBook.from_columns(columns)
        self.positions = dict(positions)
        self.columns.clear()
        self._stable_rows = (self.users.rows, self.users.id_digest(self.users.rows))
        if self.caps is not None and "cap_window" in columns:
            cap_arrays = {k[4:]: v for k, v in columns.items() if k.startswith("cap_")}
            self.caps = FrequencyCap.from_arrays(self.caps.rule, cap_arrays)
        notify_caps: dict[str, dict[str, Any]] = {}
        for name, arr in columns.items():
            if name.startswith(NOTIFY_CAP):
                category, key = name[len(NOTIFY_CAP) :].split(":", 1)
                notify_caps.setdefault(category, {})[key] = arr
        self.notify.caps = {}
        for c, a in notify_caps.items():
            # A checkpoint from before per-category rules has no `rule`: the default applies.
            saved = a.pop("rule", None)
            rule = self.notify.rule_of(c, *([None, None] if saved is None else saved.tolist()))
            if rule is not None:
                self.notify.caps[c] = FrequencyCap.from_arrays(rule, a)


def summary_id(category: str, window: int) -> str:
    """A bundle summary's notification id before `:<user id>`.

    The same for a user, category and window whenever it is sent: the delivery ledger drops a
    summary sent again.
    """
    return f"bundle:{category}:{window}"


def summary_message(
    category: str, user_id: str, bundle: Bundle, window_start: str | None = None
) -> ChannelMessage:
    """What a summary says, for the `new_posts_bundle` template.

    The count, the first authors' ids (there is no name service), and a collapse key per user
    and category so a newer summary replaces the older one on the device. `window_start` is
    the window's start as written (computed once for many summaries).
    """
    named = bundle.authors[:2]
    collapse = f"bundle:{category}:{user_id}"
    if len(collapse.encode()) > MAX_COLLAPSE_KEY_BYTES:
        collapse = "bundle:" + hashlib.sha256(collapse.encode()).hexdigest()[:40]
    return ChannelMessage(
        category=category,
        template_id=BUNDLE_TEMPLATE,
        tier="social",
        data={
            "count": bundle.count,
            "names": ", ".join(named),
            "others": bundle.count - len(named),
            "author_ids": ",".join(bundle.authors),
            "window_start": window_start or format_timestamp(float(bundle.window)),
        },
        collapse_key=collapse,
    )


def utc_now() -> datetime:
    """The wall clock, aware (the Bytewax adapter passes it in so tests can fix time)."""
    return datetime.now(UTC)
