"""The fan-out funnel as Prometheus metrics (served on /metrics by Bytewax's API server).

Counters are per process; `fanfare demo` and `fanfare metrics` sum them across endpoints.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

POSTS_READ = Counter("fanfare_posts_read_total", "post_created events decoded and valid")
POSTS_SUPPRESSED = Counter(
    "fanfare_posts_suppressed_total", "posts that notify nobody, by reason", ["reason"]
)
POSTS_FANNED_OUT = Counter(
    "fanfare_posts_fanned_out_total", "posts planned for fan-out, by lane", ["lane"]
)
CANDIDATES = Counter("fanfare_candidates_total", "follow edges examined for a post")
SUPPRESSED = Counter("fanfare_suppressed_total", "candidates not notified, by reason", ["reason"])
DEFERRED = Counter("fanfare_deferred_total", "candidates deferred for quiet hours")
RELEASED = Counter("fanfare_released_total", "deferred candidates released after quiet hours")
DEDUPED = Counter(
    "fanfare_deduped_total",
    "duplicates dropped, by stage (post_claim: posts; shard_job: jobs; replay: items)",
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
SHARD_JOBS_CREATED = Counter("fanfare_shard_jobs_created_total", "(post, shard) jobs created")
SHARD_JOBS_COMPLETED = Counter("fanfare_shard_jobs_completed_total", "(post, shard) jobs done")

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

ACKS = Counter(
    "fanfare_acks_total",
    "notification_acks applied or refused, by event and outcome",
    ["event", "outcome"],
)
