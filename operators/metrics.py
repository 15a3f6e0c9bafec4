"""The fan-out funnel as Prometheus metrics (served on /metrics: flows/runtime/flow_process.py).

Counters are per process; `fanfare demo` and `fanfare metrics` sum them across endpoints.
"""

from __future__ import annotations

import bisect
import functools
import math
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

# Which flow a process runs, for `fanfare metrics` (Bytewax's step metrics name it too, but
# only its own API server serves those).
FLOW_INFO = Gauge("fanfare_flow_info", "1 for the flow this process runs", ["flow"])
POSTS_READ = Counter("fanfare_posts_read_total", "post_created events decoded and valid")
POSTS_SUPPRESSED = Counter(
    "fanfare_posts_suppressed_total", "posts that notify nobody, by reason", ["reason"]
)
POSTS_FANNED_OUT = Counter(
    "fanfare_posts_fanned_out_total", "posts planned for fan-out, by lane", ["lane"]
)
CANDIDATES = Counter("fanfare_candidates_total", "follow edges examined for a post")
SUPPRESSED = Counter("fanfare_suppressed_total", "candidates not notified, by reason", ["reason"])
NOTIFY_READ_TO_RUN = Histogram(
    "fanfare_notify_read_to_run_seconds",
    "from an API request's read on its tier topic to a shard's first decision on its "
    "recipients, by tier (mostly the changelog gate: the changelogs read to their end after it)",
    ["tier"],
    buckets=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 2, 5, 10, 60),
)
NOTIFICATIONS_READ = Counter(
    "fanfare_notifications_read_total",
    "API notification requests and cancels decoded and valid, by tier topic",
    ["tier", "kind"],
)
NOTIFICATIONS_FELL_BACK = Counter(
    "fanfare_notifications_fell_back_total",
    "API notification recipients reached by a later channel of their category's fallback order",
    ["channel"],
)
NOTIFICATIONS_HELD = Counter(
    "fanfare_notifications_held_total", "API notification recipients held until their send_at"
)
DEFERRED = Counter("fanfare_deferred_total", "candidates deferred for quiet hours")
RELEASED = Counter("fanfare_released_total", "deferred candidates released after quiet hours")
BUNDLE_SUMMARIES = Counter(
    "fanfare_bundle_summaries_total",
    "summary pushes sent for users over the frequency cap (one per user and window)",
)
BUNDLED = Counter(
    "fanfare_bundled_total", "notifications over the frequency cap carried by summary pushes"
)
DEDUPED = Counter(
    "fanfare_deduped_total",
    "duplicates dropped, by stage (post_claim: posts; notification_claim: API requests; "
    "shard_job: jobs; replay: items)",
    ["stage"],
)
DISPATCHED = Counter(
    "fanfare_dispatched_total", "dispatch items written, by provider and lane", ["provider", "lane"]
)
DISPATCH_BATCHES = Counter(
    "fanfare_dispatch_batches_total", "dispatch batches written", ["provider", "lane"]
)
DEAD_LETTERS = Counter(
    "fanfare_dead_letters_total", "events sent to dead_letters", ["source_topic", "reason"]
)
CHANGES_APPLIED = Counter(
    "fanfare_changes_applied_total", "changelog events applied, by topic", ["topic"]
)
SHARD_CHECKPOINTS_SAVED = Counter(
    "fanfare_shard_checkpoints_saved_total", "follower shard user tables checkpointed"
)
SHARD_CHECKPOINTS_LOADED = Counter(
    "fanfare_shard_checkpoints_loaded_total", "follower shards started from a checkpoint"
)
SHARD_JOBS_CREATED = Counter("fanfare_shard_jobs_created_total", "(post, shard) jobs created")
SHARD_JOBS_COMPLETED = Counter("fanfare_shard_jobs_completed_total", "(post, shard) jobs done")
# Readiness (flows/runtime/readiness.py): the flow is caught up when the sum over every process
# equals FANFARE_SHARDS. A count, not a 0/1 per process: a process may host no shard at all.
CHANGELOGS_CAUGHT_UP_SHARDS = Gauge(
    "fanfare_changelogs_caught_up_shards",
    "follower shards in this process whose every changelog partition was read to its end "
    "since the process started",
    multiprocess_mode="sum",
)
MEMORY_TRIMS = Counter(
    "fanfare_memory_trims_total",
    "times the process handed freed memory back to the OS (once its shards caught up)",
)
MEMORY_TRIMMED_BYTES = Counter(
    "fanfare_memory_trimmed_bytes_total", "resident memory those hand-backs released"
)

# Delivery (flows/delivery.py).
SENDS = Counter(
    "fanfare_provider_sends_total", "sends made to a provider, by lane", ["provider", "lane"]
)
OUTCOMES = Counter(
    "fanfare_delivery_outcomes_total",
    "outcomes recorded in delivery_events, by provider and outcome",
    ["provider", "outcome"],
)
PROVIDER_ERRORS = Counter(
    "fanfare_provider_errors_total",
    "provider answers other than accepted, by reason",
    ["provider", "reason"],
)
DELIVERY_DEDUPED = Counter(
    "fanfare_delivery_deduped_total",
    "sends not made because another message owns them (edge: Redis claim; store: unique key)",
    ["stage"],
)
RESENDS = Counter(
    "fanfare_delivery_resends_total",
    "sends repeated after a restart interrupted them",
    ["provider"],
)
HELD = Counter(
    "fanfare_delivery_held_total", "sends held for later, by cause", ["provider", "cause"]
)
TOKENS_DEACTIVATED = Counter(
    "fanfare_tokens_deactivated_total",
    "devices deactivated after a permanent token error",
    ["provider"],
)
RATE_LIMIT_WAIT = Counter(
    "fanfare_rate_limit_wait_seconds_total",
    "seconds spent waiting for rate-limit tokens",
    ["provider"],
)
IN_FLIGHT = Gauge(
    "fanfare_delivery_in_flight",
    "pushes a delivery process has handed to its providers' send tasks and not yet judged",
    multiprocess_mode="sum",
)
BREAKER_STATE = Gauge(
    "fanfare_circuit_state",
    "circuit breaker per provider: 0 closed, 1 half-open, 2 open",
    ["provider"],
    multiprocess_mode="max",
)
ACCEPT_LATENCY = Histogram(
    "fanfare_post_to_accepted_seconds",
    "from post created_at to provider acceptance",
    ["provider", "lane"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
)

# Channels beyond push (operators/adapters/channels/).
CHANNEL_PACED = Counter(
    "fanfare_channel_paced_total",
    "channel sends a sender held before they left because a per-address bucket was empty "
    "(email: the recipient's domain; chat: the webhook)",
    ["provider"],
)
SMS_SEGMENTS = Counter("fanfare_sms_segments_total", "SMS segments the provider accepted")
SMS_COST = Counter(
    "fanfare_sms_cost_micros_total",
    "what accepted SMS cost, in millionths of the currency (segments x FANFARE_SMS_COST_MICROS)",
    ["currency"],
)
SMS_BUDGET_REFUSED = Counter(
    "fanfare_sms_budget_refused_total",
    "SMS not sent because a daily budget was spent, by budget (user, global)",
    ["budget"],
)
INAPP_PUBLISHED = Counter(
    "fanfare_inapp_published_total", "in-app notifications published to users' live streams"
)
INAPP_REPEATS = Counter(
    "fanfare_inapp_repeats_total",
    "in-app sends found already published (a send repeated after a crash): not appended again",
)


def observe_many(histogram: Any, values: Sequence[float]) -> None:
    """`histogram.observe(v)` for each value, with one update per bucket (not two per value).

    A labelled Histogram child keeps its bucket counters and sum as attributes; if a
    prometheus_client version keeps them otherwise, each value is observed on its own.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:
            histogram.observe(max(0.0, v))
        return
    counts = [0] * len(bounds)
    for v in values:
        counts[bisect.bisect_left(bounds, v)] += 1  # the first bound >= v, as observe does
    total.inc(sum(max(0.0, v) for v in values))
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)


ACKS = Counter(
    "fanfare_acks_total",
    "notification_acks applied or refused, by event and outcome",
    ["event", "outcome"],
)

DEAD_LETTERS_WRITTEN = Counter(
    "fanfare_dead_letters_written_total",
    "dead letters written to the dead_letters topic by any flow (fan-out, delivery, acks), "
    "by source topic and reason (the error's first word: invalid_json, schema, failed, ...)",
    ["source_topic", "reason"],
)
CONSUMER_LAG = Gauge(
    "fanfare_consumer_lag_messages",
    "messages between a source partition's high watermark and the reader's position, sampled "
    "at most every LAG_SAMPLE_S by the reader (the watermark the client last saw; 0 at the end)",
    ["topic", "partition"],
)
LAG_SAMPLE_S = 2.0

# The outbox relay (`fanfare outbox relay`, operators/outbox/relay.py); published/s is the rate
# of the counter.
OUTBOX_PUBLISHED = Counter(
    "fanfare_outbox_published_total", "outbox rows published and deleted, by topic", ["topic"]
)
# Labelled by table, so only a relay's /metrics has these series (the flows declare them).
OUTBOX_PENDING = Gauge(
    "fanfare_outbox_rows_pending",
    "rows in the outbox table waiting to be published (sampled every 2 s by each relay)",
    ["table"],
    multiprocess_mode="max",
)
OUTBOX_OLDEST_AGE = Gauge(
    "fanfare_outbox_oldest_pending_age_seconds",
    "age of the oldest row waiting in the outbox table, on the database's clock (0: none)",
    ["table"],
    multiprocess_mode="max",
)
OUTBOX_PUBLISH_DELAY = Histogram(
    "fanfare_outbox_publish_delay_seconds",
    "from a row's insert to the broker's acknowledgement of its message",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
OUTBOX_RELAY_FAILURES = Counter(
    "fanfare_outbox_relay_failures_total",
    "batches released unpublished (published again later), by cause: broker or database",
    ["cause"],
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800)


class WeightedHistogram:
    """A Prometheus histogram where one observation can stand for n equal ones.

    A dispatch batch carries up to 500 items of one post, so they share one created -> written
    latency: one call per batch (a lock, a bisect, two additions) counts them all, where
    prometheus_client's Histogram would need a call per item on the fan-out's hot path.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self.name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = (*(float(b) for b in buckets if b != math.inf), math.inf)
        self._les = ["+Inf" if b == math.inf else repr(b) for b in self._bounds]
        self._lock = threading.Lock()
        # per label values: a count per bucket (not cumulative), then the sum
        self._series: dict[tuple[str, ...], list[float]] = {}
        if registry is not None:
            registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float, n: int = 1) -> None:
        """Count `n` observations of `value` (seconds)."""
        i = bisect.bisect_left(self._bounds, value)
        with self._lock:
            series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = [0.0] * (len(self._bounds) + 1)
            series[i] += n
            series[-1] += value * n

    def describe(self) -> Iterable[Metric]:
        """The family, so the registry knows the names without collecting."""
        return [HistogramMetricFamily(self.name, self._doc, labels=self._labelnames)]

    def collect(self) -> Iterable[Metric]:
        """Cumulative buckets, sum and count per label set."""
        family = HistogramMetricFamily(self.name, self._doc, labels=self._labelnames)
        with self._lock:
            copied = {k: list(v) for k, v in self._series.items()}
        for labels, series in sorted(copied.items()):
            running = 0.0
            buckets: list[tuple[str, float]] = []
            for le, count in zip(self._les, series[:-1], strict=True):
                running += count
                buckets.append((le, running))
            family.add_metric(list(labels), buckets, series[-1])
        return [family]


DISPATCH_LATENCY = WeightedHistogram(
    "fanfare_post_to_dispatched_seconds",
    "from post created_at to its dispatch item being written to a channel topic, per item "
    "(quiet-hours releases land in the top buckets)",
    ["provider", "lane"],
    buckets=(*LATENCY_BUCKETS, 3600, 21600, 86400),
)


@functools.lru_cache(maxsize=4096)
def _epoch(created_at: str) -> float:
    return datetime.fromisoformat(created_at).timestamp()


def observe_dispatched(
    provider: str, lane: str, created_at: str, items: int, now: float | None = None
) -> None:
    """A dispatch batch of `items` for a post created at `created_at` (RFC 3339) was written."""
    try:
        created = _epoch(created_at)
    except ValueError:
        return
    latency = max(0.0, (time.time() if now is None else now) - created)
    DISPATCH_LATENCY.observe((provider, lane), latency, items)


def dead_letter_reason(error: str) -> str:
    """A bounded label for a dead letter's error: its first word when it is one, else other."""
    word = error.partition(":")[0].strip()
    if 0 < len(word) <= 32 and word.replace("_", "").isalpha() and word.islower():
        return word
    return "other"
