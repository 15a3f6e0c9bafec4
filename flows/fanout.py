"""The fan-out dataflow: posts and API notifications -> dispatch batches on the channel topics.

    read_posts ─► decode_post ─► claim_post ─► plan_shard_jobs ──────────────┐
                      └─► dead letters                                        ▼
    read_notify_<tier> ─► decode_notification ─► claim_notification ─► route_notification
                      └─► dead letters                                        ▼
    read_changelogs ─► route_changelog (+ caught-up markers to all shards) ─► expand_follower_shards
                      └─► dead letters                                        │  (keyed by shard:
                                                                              │   prefs, devices,
    dead letters ─► write_dead_letters          write_channel_topics ◄────────┘   jobs, deferred)

Run it with `fanfare run fanout` (which calls `python -m bytewax.run flows.fanout:get_flow`).
Everything here is wiring; decisions live in `operators/`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink

from flows.runtime.logs import configure_logging, log_started
from flows.runtime.recovery_marker import recovery_lineage
from flows.runtime.step_errors import FlowGuard
from operators import metrics
from operators.adapters.kafka.channel_sink import ChannelTopicsSink
from operators.adapters.kafka.dead_letter_sink import DeadLetterSink, source_topic_of
from operators.adapters.kafka.end_prober import EndProber
from operators.adapters.kafka.probes import KafkaConfig, topic_partitions
from operators.adapters.kafka.reader import ConsumerShares, KafkaTopicsSource
from operators.adapters.kafka.topic_identity import topic_id_of
from operators.adapters.memory import release_freed_memory
from operators.adapters.redis.post_claims import RedisPostClaims
from operators.adapters.redis.writer_marks import RedisWriterStartMarks
from operators.adapters.stores.by_url import open_follower_store
from operators.adapters.stores.shard_state import FileShardStateStore
from operators.config import Settings, cassandra_credentials, load_settings
from operators.dead_letters import Decoded, decode_or_dead_letter, one
from operators.fanout.caps import CapRule
from operators.fanout.checkpoint import ShardCheckpointer
from operators.fanout.loaded import ShardsLoaded
from operators.fanout.logic import ExpandFollowerShardLogic
from operators.fanout.notify import TIER_CONSUMER, TIER_READ_BATCH, NotifyShard
from operators.fanout.ports import FollowerStore, PostClaims, ShardStateStore
from operators.fanout.prefetch import ColumnPrefetch
from operators.fanout.shard import POST_CATEGORY, FollowerShard, utc_now
from operators.fanout.step_budget import WorkerStepBudgets
from operators.fanout.steps import (
    ChangelogRouter,
    NotificationClaimer,
    NotificationRouter,
    PostClaimer,
    ReadNotification,
    ReadPost,
    ShardJobPlanner,
    decode_notification,
    decode_post,
)
from operators.probe_demand import ProbeDemand
from schemas.addresses import CHANNEL_PROVIDERS
from schemas.records import DispatchBatch, EncodedDispatchBatch
from schemas.topics import (
    CHANGELOG_TOPICS,
    CHANNEL_TIER_TOPICS,
    CHANNEL_TOPICS,
    CHANNEL_TOPICS_BULK,
    DEVICE_CHANGES,
    POST_CREATED,
    POST_CREATED_BACKFILL,
    PREFERENCE_CHANGES,
    PUSH_TRANSACTIONAL_TOPICS,
    TIERS,
    channel_tier_topic,
    tier_topic,
)

TRANSACTIONAL_WRITE_TOPICS = (
    *PUSH_TRANSACTIONAL_TOPICS,
    *(channel_tier_topic(p, "transactional") for p in CHANNEL_PROVIDERS),
)
"""The channel topics of the transactional tier, whose writers are started at the load."""


def _count_written(batch: DispatchBatch | EncodedDispatchBatch, dropped: int) -> None:
    if dropped:
        metrics.DEDUPED.labels("replay").inc(dropped)
    else:
        count = batch.count if isinstance(batch, EncodedDispatchBatch) else len(batch.items)
        metrics.DISPATCHED.labels(batch.provider, batch.lane).inc(count)
        metrics.DISPATCH_BATCHES.labels(batch.provider, batch.lane).inc()


def build_fanout_flow(
    settings: Settings,
    *,
    post_source: Source[Any],
    changelog_source: Source[Any],
    changelog_parts: list[str],
    channel_sink: Sink[Any],
    route_batch: Callable[[DispatchBatch | EncodedDispatchBatch], str],
    dead_letter_sink: Sink[Any],
    store: Callable[[], FollowerStore],
    claims: Callable[[], PostClaims],
    clock: Callable[[], datetime] = utc_now,
    shard_states: ShardStateStore | None = None,
    notify_sources: Sequence[tuple[str, Source[Any]]] = (),
    notification_claims: Callable[[], PostClaims] | None = None,
    on_loaded: Callable[[], object] | None = None,
    probe_demand: ProbeDemand | None = None,
    on_bulk_post: Callable[[], object] | None = None,
) -> Dataflow:
    """Wire the graph from its ports (tests pass TestingSource/TestingSink and fakes).

    `notify_sources` are (tier, source) pairs of the API's tier topics, one input each.
    `on_loaded` is called once every shard the process built has caught up (`ShardsLoaded`).
    `probe_demand` is where the shards ask the changelog source (built with the same one)
    to probe when a job waits at the gate. `on_bulk_post` is called as each bulk-lane post is
    planned.
    """
    flow = Dataflow("fanout")
    # Whatever Bytewax calls logs its error once, with the traceback (flows/runtime/step_errors.py).
    g = FlowGuard(flow.flow_id)

    posts = op.input("read_posts", flow, g.source("read_posts", post_source))
    decoded: Decoded[ReadPost] = decode_or_dead_letter(
        "decode_post", posts, g.step("decode_post", one(decode_post))
    )
    owned = op.flat_map_batch(
        "claim_post", decoded.oks, g.step("claim_post", PostClaimer(claims).claim_batch)
    )
    planner = ShardJobPlanner(
        store, settings.shard_count, settings.celebrity_threshold, on_bulk=on_bulk_post
    )
    jobs = op.flat_map("plan_shard_jobs", owned, g.step("plan_shard_jobs", planner.plan))

    changes = op.input("read_changelogs", flow, g.source("read_changelogs", changelog_source))
    router = ChangelogRouter(settings.shard_count, allow_dev_addresses=settings.dev_mode)
    routed: Decoded[tuple[str, Any]] = decode_or_dead_letter(
        "route_changelog", changes, g.step("route_changelog", router.route)
    )
    shard_streams = [jobs, routed.oks]
    dead_streams = [decoded.dead_letters, routed.dead_letters]

    if notify_sources:
        # One input per tier: a marketing backlog is read in its own small bites and never
        # in front of a transactional request; the shards run the tiers in order.
        tier_inputs = [
            op.input(f"read_notify_{tier}", flow, g.source(f"read_notify_{tier}", source))
            for tier, source in notify_sources
        ]
        requests = op.merge("merge_notify_tiers", *tier_inputs)
        notes: Decoded[ReadNotification] = decode_or_dead_letter(
            "decode_notification",
            requests,
            g.step("decode_notification", one(decode_notification)),
        )
        claimer = NotificationClaimer(notification_claims or claims)
        owned_notes = op.flat_map_batch(
            "claim_notification", notes.oks, g.step("claim_notification", claimer.claim_batch)
        )
        note_router = NotificationRouter(settings.shard_count)
        shard_streams.append(
            op.flat_map(
                "route_notification",
                owned_notes,
                g.step("route_notification", note_router.route),
            )
        )
        dead_streams.append(notes.dead_letters)

    shard_inputs = op.merge("merge_shard_inputs", *shard_streams)

    checkpointer = (
        None
        if shard_states is None
        else functools.partial(
            ShardCheckpointer, shard_states, interval_s=settings.checkpoint_interval_s
        )
    )

    loaded = ShardsLoaded(on_loaded) if on_loaded is not None else None
    # One pool of column readers for the process's shards (its threads start at the first ask).
    prefetch = ColumnPrefetch(store)
    # One window per worker for what can wait: every shard of a worker runs in one activation.
    step_budgets = WorkerStepBudgets(settings.step_budget_ms / 1000)

    def build_shard(resume: dict[str, Any] | None) -> ExpandFollowerShardLogic:
        shard = new_follower_shard(settings, changelog_parts, prefetch)
        if resume is not None:
            shard.restore(resume, clock().timestamp())
        return ExpandFollowerShardLogic(
            shard,
            store,
            settings.expand_budget,
            clock,
            bulk_budget=settings.bulk_expand_budget,
            bulk_time_s=settings.bulk_expand_ms / 1000,
            checkpoints=checkpointer,
            loaded=loaded,
            demand=probe_demand,
            step_budget=step_budgets,
        )

    batches = op.stateful_batch(
        "expand_follower_shards", shard_inputs, g.stateful("expand_follower_shards", build_shard)
    )
    to_partitions = op.map(
        "route_to_channel_partition",
        batches,
        g.step("route_to_channel_partition", lambda kv: (route_batch(kv[1]), kv[1])),
    )
    op.output("write_channel_topics", to_partitions, g.sink("write_channel_topics", channel_sink))

    dead = op.merge("merge_dead_letters", *dead_streams)
    keyed_dead = op.key_on("key_by_source_topic", dead, source_topic_of)
    op.output("write_dead_letters", keyed_dead, g.sink("write_dead_letters", dead_letter_sink))
    return flow


def new_follower_shard(
    settings: Settings, changelog_parts: Sequence[str], prefetch: ColumnPrefetch | None = None
) -> FollowerShard:
    """A follower shard as the flow builds it (the seeded benchmark state uses it too)."""
    return FollowerShard(
        changelog_parts,
        page_size=settings.follower_page_size,
        batch_size=settings.dispatch_batch_size,
        settle_s=settings.changelog_settle_ms / 1000,
        celebrity_threshold=settings.celebrity_threshold,
        caps=CapRule(POST_CATEGORY, settings.post_cap, settings.cap_window_s),
        # Transactional runs whole; social and marketing a budget of recipients each.
        notify=NotifyShard(
            {"social": settings.expand_budget, "marketing": settings.expand_budget},
            cap=(settings.notify_cap, settings.notify_cap_window_s),
        ),
        prefetch=prefetch,
    )


def when_loaded(
    release_memory: Callable[[], object], prepare_writers: Callable[[Sequence[str]], object]
) -> Callable[[], None]:
    """What a process does once its shards have loaded their changelogs (`ShardsLoaded`).

    Hands the load's freed memory back, and starts the transactional tier's channel writers
    (`PartitionedTopicsSink.prepare`): a partition's first write otherwise waits for its
    writer's start mark and read-back (0.6-0.7 s measured), and the tier's requests are few
    and spread over many partitions, so after a start many of them were their partition's
    first write; they made the tier's p99 on an idle flow. An idle prepared writer costs a
    producer (threads, a connection) and no polling.
    """

    def loaded() -> None:
        release_memory()
        prepare_writers(TRANSACTIONAL_WRITE_TOPICS)

    return loaded


def tier_sources(
    kafka: KafkaConfig, shares: Callable[[str, int], ConsumerShares]
) -> list[tuple[str, KafkaTopicsSource]]:
    """The tier topics' sources, each on the consumer shares `TIER_CONSUMER` names for it.

    `shares(name, read_size)` makes the shares of one name, once; `read_size` is the largest
    poll of its tiers (`TIER_READ_BATCH`).
    """
    made: dict[str, ConsumerShares] = {}
    for name in dict.fromkeys(TIER_CONSUMER.values()):
        size = max(TIER_READ_BATCH[t] for t in TIERS if TIER_CONSUMER[t] == name)
        made[name] = shares(name, size)
    return [
        (
            tier,
            KafkaTopicsSource(
                kafka,
                [tier_topic(tier)],
                batch_size=TIER_READ_BATCH[tier],
                consumers=made[TIER_CONSUMER[tier]],
            ),
        )
        for tier in TIERS
    ]


def get_flow(settings: Settings | None = None) -> Dataflow:
    """The production flow on Kafka, Redis and the configured follower store."""
    settings = settings or load_settings()
    configure_logging(settings.log_level)
    kafka = settings.kafka_config()
    marks = functools.cache(
        lambda: RedisWriterStartMarks(
            settings.redis_url,
            settings.redis_prefix,
            recovery_lineage(settings.recovery_dir("fanout")),
        )
    )
    # This process's shards ask its changelog readers for a probe when a job waits at the gate;
    # without asks an idle changelog partition is probed about once a second (QUIET_PROBE_S).
    demand = ProbeDemand()
    # And answers the asks on a consumer of its own, in milliseconds, not with a seek.
    prober = EndProber(kafka)
    shard_states = FileShardStateStore(
        settings.shard_state_dir, settings.shard_count, topic_id_of(kafka)
    )
    sink = ChannelTopicsSink(
        kafka,
        [*CHANNEL_TOPICS, *PUSH_TRANSACTIONAL_TOPICS, *CHANNEL_TIER_TOPICS],
        on_written=_count_written,
        marks=marks,
        max_batch_items=settings.dispatch_batch_size,
    )
    # Partition p of the topics read side by side shares one consumer per worker (its
    # librdkafka threads and idle fetch loop): posts with backfill, social with marketing, the
    # three changelogs. Each group gets its own, so a changelog load never sits in a post's way
    # and a campaign's fetches never in a login code's (`TIER_CONSUMER`).
    flow = build_fanout_flow(
        settings,
        # The live topic and the backfill lane `fanfare replay` writes: one path, one claim
        # per post_id, so a replayed post that was already fanned out is dropped.
        post_source=KafkaTopicsSource(
            kafka,
            [POST_CREATED, POST_CREATED_BACKFILL],
            consumers=ConsumerShares.on_broker(kafka, "fanfare-reader-posts"),
        ),
        changelog_source=KafkaTopicsSource(
            kafka,
            CHANGELOG_TOPICS,
            report_caught_up=True,
            # A load reads 5,000 a poll (the source's batch): the consumer reads that much too.
            consumers=ConsumerShares.on_broker(
                kafka, "fanfare-reader-changelogs", read_size=5_000, buffered_max=10_000
            ),
            # Preferences and devices are checkpointed by the shards: each partition starts at
            # the oldest checkpoint's position; follow changes go to the follower store and
            # resume from the snapshot.
            start_at=lambda topic, partition: (
                shard_states.floor(topic, partition)
                if topic in (PREFERENCE_CHANGES, DEVICE_CHANGES)
                else None
            ),
            demand=demand,
            prober=prober,
        ),
        changelog_parts=topic_partitions(kafka, CHANGELOG_TOPICS),
        channel_sink=sink,
        route_batch=sink.route_key,
        dead_letter_sink=DeadLetterSink(kafka, marks=marks),
        # Built on first use in each worker process, never at import.
        store=functools.cache(
            lambda: open_follower_store(
                settings.resolved_store_url,
                settings.shard_count,
                **cassandra_credentials(settings),
            )
        ),
        shard_states=shard_states,
        # Once this process's shards caught up: the load's freed memory back to the OS, and
        # the transactional writers started before the tier's first request.
        on_loaded=when_loaded(release_freed_memory, sink.prepare),
        probe_demand=demand,
        # A celebrity post's bulk lanes get their writers (start marks, read-backs) ahead.
        on_bulk_post=functools.partial(sink.prepare, CHANNEL_TOPICS_BULK),
        notify_sources=tier_sources(
            kafka,
            lambda name, read_size: ConsumerShares.on_broker(
                kafka, f"fanfare-reader-notify-{name}", read_size=read_size
            ),
        ),
        notification_claims=functools.cache(
            lambda: RedisPostClaims(
                settings.redis_url,
                settings.redis_prefix,
                settings.post_claim_ttl_s,
                kind="notification",
            )
        ),
        claims=functools.cache(
            lambda: RedisPostClaims(
                settings.redis_url, settings.redis_prefix, settings.post_claim_ttl_s
            )
        ),
    )
    log_started(logging.getLogger("fanfare.fanout"), "fanout: flow built (imports and wiring)")
    return flow
