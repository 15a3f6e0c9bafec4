"""API notifications in a follower shard: recipients decided per channel, held, cancelled.

A notification request (`notify.<tier>`, from `fanfare api`) reaches the shards of its
recipients as one `RecipientJob` per shard. The shard decides each recipient on each channel the
request names (the request carries its category's channels, resolved at ingress); the channels
of its fallback order are tried in that order and the recipient gets the first that reaches them
(a login code: push, then SMS for a user without a device), the others each get their sends:

- the user's switch for the category on that channel (`CategorySwitch` events on
  `preference_changes`; no switch: on), kept here as two small bit masks per (user, category);
- push: `push_enabled` (the complete preference record, in the shard's `UserTable`), then every
  active push device (APNs, FCM from the user table; web push subscriptions from here);
- inbox: the in-app channel, addressed by the user id itself;
- email, sms, chat: the user's addresses of that kind (`device_changes`, kept here);
- quiet hours only when the request says they apply (a transactional category skips them): a
  recipient in quiet hours is deferred to the end of the window, never dropped;
- frequency caps only when the request says they apply and it is not transactional: a
  recipient with sends now is counted in the category's cap, and one over it gets nothing
  (`capped`: a campaign over the cap is dropped, not summarised).

A request whose `send_at` is in the future is held in the shard's state (snapshotted with it)
until then, and a `NotificationCancel` drops what is held of it. Due holds and quiet-hour
releases go back through the tier queues, so their work is budgeted like new requests:
transactional jobs run whole, first; social and marketing up to a budget of recipients per
activation each, so a marketing backlog never sits in front of a login code.

Plain Python: `FollowerShard` keeps a `NotifyShard`, the Bytewax adapter calls it.
"""

from __future__ import annotations

import heapq
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np
import orjson

from operators.fanout.caps import CapRule, FrequencyCap
from operators.fanout.columns import Columns, UserTable
from operators.fanout.quiet_hours import quiet_until
from schemas.codecs import (
    decode_notification_request,
    encode_notification_request,
    format_timestamp,
)
from schemas.records import (
    CHANNEL_OF_PROVIDER,
    CategorySwitch,
    Channel,
    ChannelMessage,
    DeviceChange,
    DispatchBatch,
    DispatchItem,
    NotificationRequest,
    PreferenceChange,
    Provider,
    Tier,
)
from schemas.topics import MAX_DISPATCH_BATCH, TIER_PUSH_LANES

CHANNEL_BITS: dict[Channel, int] = {"push": 1, "inbox": 2, "email": 4, "sms": 8, "chat": 16}
ALL_CHANNELS = 31
CHANNEL_OF: dict[str, Channel] = {p: c for p, c in CHANNEL_OF_PROVIDER.items() if p != "inapp"}
"""Which channel a device or address serves."""
INAPP_DEVICE = "inapp"
TIER_READ_BATCH: dict[str, int] = {"transactional": 1_000, "social": 100, "marketing": 20}
"""Messages a tier topic's partition gives per poll: a campaign's backlog comes in small bites
beside a login code, which is read on its own input. Every poll's messages are decoded,
claimed and routed before the worker polls again, so the bite is what a transactional request
waits behind upstream of the shards: at 100 a marketing message, a 200,000-message campaign
held transactional p99 at 1.3-1.5 s on the development machine; at 20, 0.6-0.7 s (the same
as with no campaign), at the same drain rate (scripts/bench/notify.py --broker)."""
TIER_CONSUMER: dict[str, str] = {
    "transactional": "transactional",
    "social": "bulk",
    "marketing": "bulk",
}
"""Which consumer a tier topic's partition is read through: one per name and partition index
(`ConsumerShares`). A consumer's partitions share its fetch requests: while a campaign drains,
the marketing partition's answers are the largest (up to librdkafka's 1 MB a partition, and
fetched again after each pause of its full buffer: librdkafka drops a paused partition's
prefetched messages), so a transactional message produced meanwhile can wait for the answer in
flight and the next fetch. Alone on its consumer it is fetched on its own, at the cost of one
more idle fetch loop per partition index; social and marketing still share theirs."""
CANCEL_MEMORY_S = 31 * 86_400.0
"""How long a cancel is remembered: longer than the API lets `send_at` lie ahead (30 days)."""

Address = tuple[str, str, str]
"""A channel address: (device_id, provider, token)."""
Send = tuple[str, Provider, str, str]
"""One dispatch item to make: (user_id, provider, device_id, token)."""
GateCheck = Callable[[float], bool]
"""Whether the changelogs were read to their end after a time (`FollowerShard.gate_open_for`)."""
_TIERS: tuple[Tier, ...] = ("transactional", "social", "marketing")


# ---- the per-user book: channel addresses and category switches --------------------------------


def apply_switch(packed: int, channel: Channel | None, enabled: bool) -> int:
    """A switch over a (user, category)'s masks: low byte the values, next byte which are set."""
    bits = ALL_CHANNELS if channel is None else CHANNEL_BITS[channel]
    set_mask = (packed >> 8) | bits
    values = (packed & 0xFF & ~bits) | (bits if enabled else 0)
    return (set_mask << 8) | values


def switch_on(packed: int | None, channel: Channel) -> bool:
    """Whether the user keeps this channel of the category on (the default: on)."""
    if packed is None:
        return True
    bit = CHANNEL_BITS[channel]
    return not (packed >> 8) & bit or bool(packed & bit)


class ChannelBook:
    """Per user: channel addresses, category switches and the locale.

    Addresses come from `device_changes` beyond APNs/FCM, the locale from the complete
    preference record. Dicts of tuples, ints and interned strings, not objects: most users
    have no address and no switch, and the ones who do have a handful. Checkpointed with the
    shard's user table (`to_columns`).
    """

    def __init__(self) -> None:
        self.addresses: dict[str, tuple[Address, ...]] = {}
        self.switches: dict[str, dict[str, int]] = {}
        self.locales: dict[str, str] = {}

    def apply_preference(self, change: PreferenceChange) -> None:
        """Keep the user's locale from a complete preference record (absent: none)."""
        if change.locale is None:
            self.locales.pop(change.user_id, None)
        else:
            # Interned: a few dozen locales shared by every user of the shard.
            self.locales[change.user_id] = sys.intern(change.locale)

    def apply_address(self, change: DeviceChange) -> None:
        """Register, refresh (to the end of the list) or deactivate one channel address."""
        kept = tuple(a for a in self.addresses.get(change.user_id, ()) if a[0] != change.device_id)
        if change.active and change.token:
            kept += ((change.device_id, change.provider, change.token),)
        if kept:
            self.addresses[change.user_id] = kept
        else:
            self.addresses.pop(change.user_id, None)

    def apply_switch(self, switch: CategorySwitch) -> None:
        """Turn a category on or off for the user, on one channel or on all of them."""
        cats = self.switches.setdefault(switch.user_id, {})
        cats[switch.category] = apply_switch(
            cats.get(switch.category, 0), switch.channel, switch.enabled
        )

    def switch(self, user_id: str, category: str) -> int | None:
        """The user's packed switches for a category (None: never switched)."""
        cats = self.switches.get(user_id)
        return None if cats is None else cats.get(category)

    def to_columns(self) -> Columns:
        """The book as one array of JSON bytes, beside the user table's columns."""
        doc = orjson.dumps({"a": self.addresses, "s": self.switches, "l": self.locales})
        return {"notify_book": np.frombuffer(doc, np.uint8)}

    @classmethod
    def from_columns(cls, cols: Columns) -> ChannelBook:
        """A book from `to_columns` (a checkpoint written before the book: empty)."""
        book = cls()
        arr = cols.get("notify_book")
        if arr is not None and len(arr):
            doc = orjson.loads(arr.tobytes())
            book.addresses = {u: tuple((d, p, t) for d, p, t in a) for u, a in doc["a"].items()}
            book.switches = doc["s"]
            book.locales = doc.get("l", {})
        return book


# ---- one recipient ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recipient:
    """What the shard knows of a user for one decision."""

    user_id: str
    push_enabled: bool
    quiet: tuple[int, int, str] | None
    devices: tuple[Address, ...]
    """Push devices (APNs, FCM) and channel addresses, as (device_id, provider, token)."""
    switches: int | None


@dataclass(slots=True)
class RecipientDecision:
    """The sends for one recipient now, or when to decide again, and why channels got none."""

    sends: list[Send] = field(default_factory=list)
    defer_until: float | None = None
    suppressed: dict[str, int] = field(default_factory=dict)
    fell_back: Channel | None = None
    """The fallback channel used when an earlier one of the order could not reach them."""


def decide_recipient(
    request: NotificationRequest, r: Recipient, now: datetime
) -> RecipientDecision:
    """The per-channel rules for one recipient of a request (see the module docstring)."""
    out = RecipientDecision()
    for channel in request.channels:
        if channel not in request.fallback:
            out.sends.extend(_channel_sends(request, r, channel, out.suppressed))
    for tried, channel in enumerate(request.fallback):
        found = _channel_sends(request, r, channel, out.suppressed)
        if found:
            out.sends.extend(found)
            if tried:
                out.fell_back = channel
            break
    if out.sends and request.quiet_hours and r.quiet is not None:
        until = quiet_until(now, *r.quiet)
        if until is not None:
            return RecipientDecision(defer_until=until.timestamp())
    return out


def _channel_sends(
    request: NotificationRequest, r: Recipient, channel: Channel, suppressed: dict[str, int]
) -> list[Send]:
    """A recipient's sends on one channel; none counts why in `suppressed`."""
    if not switch_on(r.switches, channel):
        _count(suppressed, "category_off")
        return []
    if channel == "inbox":
        return [(r.user_id, "inapp", INAPP_DEVICE, r.user_id)]
    if channel == "push" and not r.push_enabled:
        _count(suppressed, "push_disabled")
        return []
    found: list[Send] = [
        (r.user_id, provider, device_id, token)  # type: ignore[misc]
        for device_id, provider, token in r.devices
        if CHANNEL_OF.get(provider) == channel
    ]
    if not found:
        _count(suppressed, "no_device" if channel == "push" else "no_address")
    return found


def _count(counts: dict[str, int], reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1


def recipient_of(users: UserTable, book: ChannelBook, user_id: str, category: str) -> Recipient:
    """A user as the shard knows them: preferences and devices from the table, the rest here."""
    row = users.row_of(user_id)
    devices: list[Address] = []
    push, quiet = True, None
    if row >= 0:
        # `.item()`: one Python scalar per read, without a numpy scalar in between.
        push = bool(users.push.item(row))
        qs, qe = users.quiet_start.item(row), users.quiet_end.item(row)
        if qs >= 0 and qe >= 0:
            quiet = (qs, qe, users.zones[users.tz.item(row)])
        d = users.dev_head.item(row)
        while d >= 0:
            # The fragment is a dispatch item after `{"notification_id":"<post_id>:`.
            item = orjson.loads(b'{"n":"' + users.fragments[d])
            provider = "apns" if users.dev_provider.item(d) == 0 else "fcm"
            devices.append((item["device_id"], provider, item["token"]))
            d = users.dev_next.item(d)
    devices.extend(book.addresses.get(user_id, ()))
    return Recipient(user_id, push, quiet, tuple(devices), book.switch(user_id, category))


# ---- batches ------------------------------------------------------------------------------------


def channel_message(request: NotificationRequest) -> ChannelMessage:
    """What the senders render, in each item's locale."""
    message = ChannelMessage(
        category=request.category,
        template_id=request.template_id,
        tier=request.tier,
        data=request.data,
    )
    if request.collapse_key is not None:
        message["collapse_key"] = request.collapse_key
    return message


def notification_batches(
    request: NotificationRequest,
    sends: Sequence[Send],
    batch_size: int = MAX_DISPATCH_BATCH,
    locales: Mapping[str, str] | None = None,
) -> list[DispatchBatch]:
    """Dispatch batches of a request's sends: per provider, at most `batch_size` items each.

    Push goes to the tier's push lane (`TIER_PUSH_LANES`); the other providers' topic is
    `{provider}.{tier}` (the batch's `message` says the tier). Item ids are `<id>:<user id>`;
    an item carries its user's locale when `locales` knows it.
    """
    locales = locales or {}
    by_provider: dict[Provider, list[DispatchItem]] = {}
    nid = request.notification_id
    for user_id, provider, device_id, token in sends:
        item = DispatchItem(
            notification_id=f"{nid}:{user_id}", user_id=user_id, device_id=device_id, token=token
        )
        locale = locales.get(user_id)
        if locale is not None:
            item["locale"] = locale
        by_provider.setdefault(provider, []).append(item)
    lane = TIER_PUSH_LANES[request.tier]
    message = channel_message(request)
    created = format_timestamp(request.created_at)
    size = max(1, min(batch_size, MAX_DISPATCH_BATCH))
    return [
        DispatchBatch(
            post_id=nid,
            author_id=f"api:{request.api_key_id}",
            provider=provider,
            created_at=created,
            lane=lane,
            items=tuple(items[i : i + size]),
            message=message,
        )
        for provider, items in by_provider.items()
        for i in range(0, len(items), size)
    ]


# ---- jobs, holds and cancels in a shard ---------------------------------------------------------


@dataclass(slots=True)
class RecipientJob:
    """A request's recipients in one shard; `cursor` counts the ones decided."""

    request: NotificationRequest
    users: tuple[str, ...]
    shard_id: int
    read_at: float
    cursor: int = 0


@dataclass(frozen=True, slots=True)
class CancelNotice:
    """A cancel on its way to one shard (every shard gets one)."""

    notification_id: str
    shard_id: int


@dataclass(slots=True)
class NotifyTally:
    """What one call decided, for the funnel metrics."""

    candidates: int = 0
    suppressed: Counter[str] = field(default_factory=Counter)
    deferred: int = 0
    held: int = 0
    cancelled: int = 0
    fell_back: Counter[str] = field(default_factory=Counter)
    """Recipients reached by a later channel of their category's fallback, by that channel."""
    read_to_run: list[tuple[Tier, float]] = field(default_factory=list)
    """Seconds from each job's read to its first run in this call, by tier."""


class NotifyShard:
    """A shard's API-notification work: the tier queues, the holds, the cancels, the book.

    `cap` is the default (limit, window_s) of the frequency cap of each category whose requests
    say `caps` (never transactional; a request may carry its category's own limit and window):
    one `FrequencyCap` per such category over the shard's user rows, made when its first
    request arrives; a recipient over it is dropped, counted `capped`.
    """

    def __init__(
        self, budgets: dict[Tier, int | None] | None = None, cap: tuple[int, int] = (0, 0)
    ) -> None:
        self.book = ChannelBook()
        self.cap = cap
        self.caps: dict[str, FrequencyCap] = {}
        self.budgets: dict[Tier, int | None] = budgets or {}
        self.queues: dict[Tier, deque[RecipientJob]] = {t: deque() for t in _TIERS}
        # Held users grouped by (due, request key); the requests they belong to, by key.
        self.held: dict[tuple[float, str], list[str]] = {}
        self.heap: list[tuple[float, str]] = []
        self.requests: dict[str, tuple[NotificationRequest, int]] = {}
        self.cancelled: dict[str, float] = {}
        # Requests' wire forms for snapshots, encoded once each (a backlog is snapshotted often).
        self._wire: dict[str, bytes] = {}

    # ---- input ----------------------------------------------------------------------------------

    def add_job(self, job: RecipientJob) -> None:
        """Queue a request's recipients in its tier."""
        self.queues[job.request.tier].append(job)

    def cancel(self, notification_id: str, now: float, tally: NotifyTally) -> None:
        """Drop what is held of a notification, and any request of it that comes later."""
        self._forget_cancels(now)
        self.cancelled.pop(notification_id, None)  # to the end: expiries stay in order
        self.cancelled[notification_id] = now + CANCEL_MEMORY_S
        for key in [
            k for k, (r, _) in self.requests.items() if r.notification_id == notification_id
        ]:
            _, pending = self.requests.pop(key)
            tally.cancelled += pending
        for tier_jobs in self.queues.values():
            for job in [j for j in tier_jobs if j.request.notification_id == notification_id]:
                tier_jobs.remove(job)
                tally.cancelled += len(job.users) - job.cursor

    def _forget_cancels(self, now: float) -> None:
        # In insertion order with one memory span, so expiries are ordered too.
        while self.cancelled:
            nid, until = next(iter(self.cancelled.items()))
            if until > now:
                break
            del self.cancelled[nid]

    # ---- work -----------------------------------------------------------------------------------

    def next_due(self) -> float | None:
        """When the earliest held recipient is due (epoch seconds)."""
        while self.heap and self.heap[0] not in self.held:
            heapq.heappop(self.heap)
        return self.heap[0][0] if self.heap else None

    def runnable(self, gate_open: GateCheck) -> bool:
        """Whether a queued job may run now (a queue runs from its head, in read order)."""
        return any(q and gate_open(q[0].read_at) for q in self.queues.values())

    def work(
        self,
        users: UserTable,
        now: datetime,
        gate_open: GateCheck,
        tally: NotifyTally,
        *,
        releases_allowed: bool = True,
        batch_size: int = MAX_DISPATCH_BATCH,
        until: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> list[DispatchBatch]:
        """Move due holds to their queues, then run the queues: transactional first.

        Social and marketing work also stops once `clock()` reaches `until` (the worker's
        step budget, `operators.fanout.step_budget`); transactional work runs whole.
        """
        if releases_allowed:
            self._release_due(now.timestamp())
        out: list[DispatchBatch] = []
        for tier in _TIERS:
            left = self.budgets.get(tier)
            queue = self.queues[tier]
            deadline = None if tier == "transactional" else until
            if deadline is not None and queue and clock() >= deadline:
                continue
            # A campaign's one-recipient messages share their notification id and message:
            # their sends are joined into batches of up to `batch_size` items, not one each.
            sends: dict[str, tuple[NotificationRequest, list[Send]]] = {}
            # From the head: jobs were read in order, so one whose gate is closed has only
            # later ones behind it (a campaign queues many one-recipient jobs: no scans).
            while queue and (left is None or left > 0) and gate_open(queue[0].read_at):
                job = queue[0]
                if job.cursor == 0 and job.read_at > 0:  # a released hold's read_at is 0
                    tally.read_to_run.append((tier, now.timestamp() - job.read_at))
                done = self._run(job, users, now, left, sends, tally)
                if left is not None:
                    left -= done
                if job.cursor >= len(job.users):
                    queue.popleft()
                if deadline is not None and clock() >= deadline:
                    break
            for request, decided in sends.values():
                out.extend(notification_batches(request, decided, batch_size, self.book.locales))
        return out

    def _run(
        self,
        job: RecipientJob,
        users: UserTable,
        now: datetime,
        budget: int | None,
        sends: dict[str, tuple[NotificationRequest, list[Send]]],
        tally: NotifyTally,
    ) -> int:
        request = job.request
        now_ts = now.timestamp()
        if request.notification_id in self.cancelled:
            tally.cancelled += len(job.users) - job.cursor
            job.cursor = len(job.users)
            return 1
        if request.send_at is not None and request.send_at.timestamp() > now_ts:
            users_left = job.users[job.cursor :]
            self._hold(request, request.send_at.timestamp(), users_left)
            tally.held += len(users_left)
            job.cursor = len(job.users)
            return 1
        stop = len(job.users) if budget is None else min(len(job.users), job.cursor + budget)
        decided = sends.setdefault(request.notification_id, (request, []))[1]
        cap = self.cap_of(request)
        for user_id in job.users[job.cursor : stop]:
            decision = decide_recipient(
                request, recipient_of(users, self.book, user_id, request.category), now
            )
            if decision.suppressed:
                tally.suppressed.update(decision.suppressed)
            if decision.defer_until is not None:
                self._hold(request, decision.defer_until, (user_id,))
                tally.deferred += 1
                continue
            # Counted when it would go now, like a post: a deferred one when it is released.
            over = (
                cap is not None
                and bool(decision.sends)
                and not cap.count_one(users.ensure_row(user_id), now_ts)
            )
            if over:
                tally.suppressed["capped"] += 1
                continue
            if decision.fell_back is not None:
                tally.fell_back[decision.fell_back] += 1
            decided.extend(decision.sends)
        tally.candidates += stop - job.cursor
        done = stop - job.cursor
        job.cursor = stop
        return max(done, 1)

    def cap_of(self, request: NotificationRequest) -> FrequencyCap | None:
        """The frequency cap of the request's category (None: not capped).

        A transactional request is never capped, whatever it says: a login code must go. The
        category's own limit and window (the categories file's `cap`, `cap_window_s`, carried
        by the request) replace the shard's default (`cap`).
        """
        if not request.caps or request.tier == "transactional":
            return None
        rule = self.rule_of(request.category, request.cap_limit, request.cap_window_s)
        if rule is None:
            return None
        cap = self.caps.get(request.category)
        if cap is None or cap.rule.window_s != rule.window_s:
            # Counts of another window length mean nothing in this one: start afresh.
            cap = self.caps[request.category] = FrequencyCap(rule)
        elif cap.rule != rule:
            cap.rule = rule  # a new limit applies to this window's counts
        return cap

    def rule_of(
        self, category: str, limit: int | None = None, window_s: int | None = None
    ) -> CapRule | None:
        """A category's cap rule: its own limit and window, else the default (None: off)."""
        rule = CapRule(
            category,
            self.cap[0] if limit is None else limit,
            self.cap[1] if window_s is None else window_s,
        )
        return rule if rule.enabled else None

    def _hold(self, request: NotificationRequest, due: float, user_ids: Iterable[str]) -> None:
        key = (due, request.key)
        bucket = self.held.get(key)
        if bucket is None:
            bucket = self.held[key] = []
            heapq.heappush(self.heap, key)
        before = len(bucket)
        bucket.extend(user_ids)
        _, pending = self.requests.get(request.key, (request, 0))
        self.requests[request.key] = (request, pending + len(bucket) - before)

    def _release_due(self, now_ts: float) -> None:
        while self.heap and self.heap[0][0] <= now_ts:
            key = heapq.heappop(self.heap)
            user_ids = self.held.pop(key, None)
            if not user_ids or key[1] not in self.requests:
                continue  # cancelled while held
            request, pending = self.requests[key[1]]
            if pending <= len(user_ids):
                del self.requests[key[1]]
            else:
                self.requests[key[1]] = (request, pending - len(user_ids))
            # Released recipients are decided again, as new: their gate is already open.
            self.add_job(RecipientJob(request, tuple(user_ids), -1, 0.0))

    # ---- recovery -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """Queues, holds and cancels; requests in their wire form (stable across versions).

        A campaign queues one request per user that differ only in their recipient: the wire
        form is kept once per distinct rest (`templates`, recipients `*`) and each request is a
        template's index and its recipients. Snapshotted every epoch with a 200,000-user
        backlog, one wire form each took 13-20 ms a shard, and a whole worker's shards held
        its transactional work up for half a second every epoch.
        """
        templates: dict[bytes, int] = {}
        refs: dict[str, tuple[int, tuple[str, ...]]] = {}
        wire: dict[str, bytes] = {}

        def ref(request: NotificationRequest) -> str:
            key = request.key
            if key not in refs:
                raw = self._wire.get(key)
                if raw is None:
                    raw = encode_notification_request(replace(request, recipients=_TEMPLATE))
                wire[key] = raw
                refs[key] = (templates.setdefault(raw, len(templates)), request.recipients)
            return key

        snap: dict[str, object] = {
            "queues": [
                (ref(j.request), j.users, j.shard_id, j.read_at, j.cursor)
                for q in self.queues.values()
                for j in q
            ],
            "held": [(due, key, users) for (due, key), users in self.held.items()],
            "pending": {ref(r): n for r, n in self.requests.values()},
            "cancelled": self.cancelled,
            "templates": list(templates),
            "request_refs": refs,
        }
        self._wire = wire  # what the next snapshot may reuse; the rest is done
        return snap

    def restore(self, snap: dict[str, object]) -> None:
        """Load `snapshot()`'s state (the book comes from the shard's checkpoint)."""
        requests = _restored_requests(snap)
        for q in self.queues.values():
            q.clear()
        for key, users, shard_id, read_at, cursor in _rows(snap["queues"]):
            self.add_job(RecipientJob(requests[key], tuple(users), shard_id, read_at, cursor))
        pending = snap["pending"]
        assert isinstance(pending, dict)
        self.requests = {k: (requests[k], n) for k, n in pending.items()}
        self.held = {(due, key): list(users) for due, key, users in _rows(snap["held"])}
        self.heap = list(self.held)
        heapq.heapify(self.heap)
        cancelled = snap["cancelled"]
        assert isinstance(cancelled, dict)
        self.cancelled = dict(cancelled)


_TEMPLATE = ("*",)  # a template's recipients (the schema wants one): each ref gives its own


def _restored_requests(snap: dict[str, object]) -> dict[str, NotificationRequest]:
    """The requests of a snapshot, by key: templates and refs, or (older) one wire form each."""
    if "templates" not in snap:
        raw = snap["requests"]
        assert isinstance(raw, dict)
        return {k: decode_notification_request(v) for k, v in raw.items()}
    raw_templates, refs = snap["templates"], snap["request_refs"]
    assert isinstance(raw_templates, list) and isinstance(refs, dict)
    templates = [decode_notification_request(t) for t in raw_templates]
    return {
        key: replace(templates[index], recipients=tuple(recipients))
        for key, (index, recipients) in refs.items()
    }


def _rows(value: object) -> Iterator[tuple[Any, ...]]:
    assert isinstance(value, list)
    for row in value:
        yield tuple(row)
