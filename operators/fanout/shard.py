"""One follower shard's fan-out: users' preferences and devices, jobs, deferrals, the gate.

A shard holds its users' preferences and devices, its expansion jobs, its deferred
(quiet-hours) notifications, and the changelog gate.

Everything a shard needs to decide who gets a push is local to it: users are bucketed into
shards by id (`operators.fanout.sharding`), follow edges are stored by the follower's shard, and the
preference and device changelogs are routed to the shard of their user. So expanding a page of
followers is a loop over dict lookups, with no per-candidate hop through the dataflow.

This module is plain Python: the Bytewax adapter (`operators.fanout.logic`) calls it, and the unit
tests drive it directly with an in-memory follower store.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from operators.events import CaughtUp
from operators.fanout.batching import dispatch_batches
from operators.fanout.eligibility import FLAG_NOTIFY_ON_POST, Suppressed, follower_suppression
from operators.fanout.ports import FollowerStore
from operators.fanout.quiet_hours import quiet_until
from schemas.records import DeviceChange, DispatchBatch, DispatchItem, PreferenceChange, Provider

# (push_enabled, quiet_hours_start, quiet_hours_end, timezone); None stands for the defaults.
Prefs = tuple[bool, int | None, int | None, str]
# A user's record: (prefs or None, device_id, provider, token, device_id, provider, token, ...).
# One flat tuple per user keeps the state near 300 bytes per user with one device.
UserRecord = tuple[Any, ...]

# Completed jobs are remembered this long so a duplicate job reaching the shard in the same
# execution is dropped; post-level dedupe (the post claim) covers longer windows.
RECENT_JOB_TTL_S = 600.0
_PROVIDER_NAMES = {"apns": "apns", "fcm": "fcm"}


def lane_for(follower_count: int, celebrity_threshold: int) -> str:
    """Celebrities (more followers than the threshold) use the bulk lanes."""
    return "bulk" if follower_count > celebrity_threshold else "normal"


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

    def add_items(self, batches: Iterable[DispatchBatch]) -> None:
        """Count dispatched items by provider and lane."""
        for b in batches:
            self.items[(b.provider, b.lane)] += len(b.items)


@dataclass(slots=True)
class _PostRef:
    author_id: str
    created_at: str
    lane: str
    pending: int = 0


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
    ) -> None:
        self.changelog_sources = frozenset(changelog_sources)
        self.page_size = page_size
        self.batch_size = batch_size
        self.settle_s = settle_s
        self.celebrity_threshold = celebrity_threshold
        self._lane_confirmed: set[str] = set()  # post_ids; not snapshotted: confirmed again
        self.users: dict[str, UserRecord] = {}
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
        self._prefs_pool: dict[Prefs, Prefs] = {}

    # ---- changelogs -------------------------------------------------------------------------

    def apply_preference(self, change: PreferenceChange) -> None:
        """Replace the user's preferences (a preference record is complete, not a patch)."""
        prefs: Prefs | None = None
        quiet = change.quiet_hours_start is not None and (
            change.quiet_hours_start != change.quiet_hours_end
        )
        if not change.push_enabled or quiet:
            key: Prefs = (
                change.push_enabled,
                change.quiet_hours_start,
                change.quiet_hours_end,
                change.timezone,
            )
            prefs = self._prefs_pool.setdefault(key, key)
        rec = self.users.get(change.user_id)
        devices = rec[1:] if rec is not None else ()
        self._store_user(change.user_id, prefs, devices)

    def apply_device(self, change: DeviceChange) -> None:
        """Register, refresh or deactivate one device of the user."""
        rec = self.users.get(change.user_id)
        prefs = rec[0] if rec is not None else None
        old = rec[1:] if rec is not None else ()
        devices: list[Any] = []
        for i in range(0, len(old), 3):
            if old[i] != change.device_id:
                devices.extend(old[i : i + 3])
        if change.active and change.token:
            # One shared "apns"/"fcm" object, not a fresh string per user (~50 B each).
            provider = _PROVIDER_NAMES[change.provider]
            devices.extend((change.device_id, provider, change.token))
        self._store_user(change.user_id, prefs, tuple(devices))

    def _store_user(self, user_id: str, prefs: Prefs | None, devices: tuple[Any, ...]) -> None:
        if prefs is None and not devices:
            self.users.pop(user_id, None)
        else:
            self.users[user_id] = (prefs, *devices)

    def note_caught_up(self, marker: CaughtUp) -> None:
        """Record how far a changelog partition has been read."""
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

    # ---- jobs ---------------------------------------------------------------------------------

    def add_job(self, job: ShardJob, now: float, tally: FanoutTally) -> bool:
        """Queue a job unless the same post is already queued or recently completed here."""
        self._forget_old_jobs(now)
        if job.post_id in self.jobs or job.post_id in self.recent:
            tally.deduped_jobs += 1
            return False
        self.jobs[job.post_id] = job
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
        self, store: FollowerStore, now: datetime, budget: int, tally: FanoutTally
    ) -> list[DispatchBatch]:
        """Expand queued jobs, normal lane before bulk, until `budget` followers are read."""
        out: list[DispatchBatch] = []
        now_ts = now.timestamp()
        quiet_cache: dict[Prefs, float] = {}
        self._confirm_lanes(store)
        for lane in ("normal", "bulk"):
            for job in [j for j in self.jobs.values() if j.lane == lane]:
                if budget <= 0:
                    return out
                if not self.gate_open_for(job.read_at):
                    continue
                budget -= self._expand_job(job, store, now, now_ts, budget, quiet_cache, out, tally)
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
        now_ts: float,
        budget: int,
        quiet_cache: dict[Prefs, float],
        out: list[DispatchBatch],
        tally: FanoutTally,
    ) -> int:
        read = 0
        apns: list[DispatchItem] = []
        fcm: list[DispatchItem] = []
        while read < budget:
            limit = min(self.page_size, budget - read)
            rows = store.follower_page(job.author_id, job.shard_id, job.cursor, limit)
            read += len(rows)
            if rows:
                self._decide_page(job, rows, now, now_ts, quiet_cache, apns, fcm, tally)
                job.cursor = rows[-1][0]
            if len(rows) < limit:  # a short page is the shard's end
                del self.jobs[job.post_id]
                self._lane_confirmed.discard(job.post_id)
                self.recent[job.post_id] = now_ts + RECENT_JOB_TTL_S
                tally.jobs_completed += 1
                break
        self._emit(job.post_id, job.author_id, job.created_at, job.lane, apns, fcm, out, tally)
        return read

    def _decide_page(
        self,
        job: ShardJob,
        rows: list[tuple[str, int]],
        now: datetime,
        now_ts: float,
        quiet_cache: dict[Prefs, float],
        apns: list[DispatchItem],
        fcm: list[DispatchItem],
        tally: FanoutTally,
    ) -> None:
        # The hot loop of the whole system: locals only, no calls for the common case.
        users_get = self.users.get
        author = job.author_id
        prefix = job.post_id + ":"
        suppressed = tally.suppressed
        no_device = push_disabled = 0
        deferred: list[tuple[float, str]] = []
        for fid, flags in rows:
            if flags != FLAG_NOTIFY_ON_POST or fid == author:
                reason = follower_suppression(author, fid, flags)
                if reason is not None:
                    suppressed[reason] += 1
                    continue
            rec = users_get(fid)
            if rec is None:
                no_device += 1
                continue
            prefs = rec[0]
            if prefs is not None:
                if not prefs[0]:
                    push_disabled += 1
                    continue
                release = quiet_cache.get(prefs)
                if release is None:
                    until = quiet_until(now, prefs[1], prefs[2], prefs[3])
                    release = until.timestamp() if until is not None else 0.0
                    quiet_cache[prefs] = release
                if release:
                    deferred.append((release, fid))
                    continue
            n = len(rec)
            if n == 1:
                no_device += 1
                continue
            nid = prefix + fid
            for i in range(1, n, 3):
                item: DispatchItem = {
                    "notification_id": nid,
                    "user_id": fid,
                    "device_id": rec[i],
                    "token": rec[i + 2],
                }
                (apns if rec[i + 1] == "apns" else fcm).append(item)
        tally.candidates += len(rows)
        if no_device:
            suppressed[Suppressed.NO_DEVICE] += no_device
        if push_disabled:
            suppressed[Suppressed.PUSH_DISABLED] += push_disabled
        if deferred:
            tally.deferred += len(deferred)
            self._defer(job.post_id, job.author_id, job.created_at, job.lane, deferred)

    def _emit(
        self,
        post_id: str,
        author_id: str,
        created_at: str,
        lane: str,
        apns: list[DispatchItem],
        fcm: list[DispatchItem],
        out: list[DispatchBatch],
        tally: FanoutTally,
    ) -> None:
        providers: tuple[tuple[Provider, list[DispatchItem]], ...] = (("apns", apns), ("fcm", fcm))
        for provider, items in providers:
            if items:
                batches = list(
                    dispatch_batches(
                        post_id, author_id, created_at, provider, lane, items, self.batch_size
                    )
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
        entries: list[tuple[float, str]],
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
        """When the earliest deferred notification is due (epoch seconds)."""
        return self.deferred_heap[0][0] if self.deferred_heap else None

    def release_due(
        self, store: FollowerStore, now: datetime, tally: FanoutTally
    ) -> list[DispatchBatch]:
        """Release deferred notifications whose window ended, checking everything again."""
        out: list[DispatchBatch] = []
        now_ts = now.timestamp()
        if not self.releases_allowed():
            return out
        while self.deferred_heap and self.deferred_heap[0][0] <= now_ts:
            key = heapq.heappop(self.deferred_heap)
            user_ids = self.deferred.pop(key, [])
            post_id = key[1]
            ref = self.deferred_posts[post_id]
            ref.pending -= len(user_ids)
            job = ShardJob(post_id, ref.author_id, ref.created_at, ref.lane, 0.0, -1)
            # The edge may have changed while the notification waited: re-read it.
            rows = []
            for uid in user_ids:
                flags = store.follow_flags(ref.author_id, uid)
                if flags is None:
                    tally.suppressed[Suppressed.UNFOLLOWED] += 1
                else:
                    rows.append((uid, flags))
            apns: list[DispatchItem] = []
            fcm: list[DispatchItem] = []
            tally.released += len(user_ids)
            candidates_before = tally.candidates
            self._decide_page(job, rows, now, now_ts, {}, apns, fcm, tally)
            tally.candidates = candidates_before  # they were counted when first expanded
            self._emit(post_id, ref.author_id, ref.created_at, ref.lane, apns, fcm, out, tally)
            if ref.pending <= 0:
                self.deferred_posts.pop(post_id, None)
        return out

    # ---- recovery -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Jobs, deferrals and dedupe memory: everything but the user table and the gate.

        Users' preferences and devices are rebuilt by replaying their changelogs from the
        beginning on every start (as Kafka Streams restores a store), so a snapshot stays small
        whatever the number of users; Bytewax pickles it at once, so live containers are fine.
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
        }

    def restore(self, snap: dict[str, Any], now: float) -> None:
        """Load a snapshot; users arrive again from the changelogs, the gate closes until then."""
        if snap.get("v") != 2:
            raise ValueError(f"unknown follower shard snapshot version {snap.get('v')!r}")
        self.jobs = {j[0]: ShardJob(*j) for j in snap["jobs"]}
        self.recent = snap["recent"]
        self.deferred = snap["deferred"]
        self.deferred_heap = list(self.deferred)
        heapq.heapify(self.deferred_heap)
        self.deferred_posts = {p: _PostRef(*r) for p, r in snap["deferred_posts"].items()}
        self.caught_up = {}
        self._horizon = None
        self.ready_after = now


def utc_now() -> datetime:
    """The wall clock, aware (the Bytewax adapter passes it in so tests can fix time)."""
    return datetime.now(UTC)
