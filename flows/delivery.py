"""The delivery dataflow: dispatch batches on push.* and the channel topics -> senders -> events.

Push goes to APNs and FCM; `email.*`, `sms.*`, `webpush.*`, `chat.*` and `inapp.*` to their
channel senders, each provider's lanes read transactional first.

    read_channel_lanes ─────┐  (each source reads, hands the requests to   ┌─► delivery_events
      (transactional, normal├─► the worker's engine and emits what is ─────┼─► device_changes
       then bulk)           │   judged: ledger, limits, breaker, sends)    ├─► push.retry
    read_due_retries ───────┘                                              └─► dead_letters
      (held until due)

The sources send (pipelined: thousands in flight, the worker never waits for a provider) and
snapshot only what is judged: `operators/adapters/kafka/channel_lanes.py`, `retry_source.py`,
`operators/delivery/pipeline.py`; their step ids are the reading steps' of earlier versions,
so a recovery directory keeps its positions. Run it with `fanfare run delivery`. Everything
here is wiring; decisions live in `operators/`.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink

from flows.runtime.logs import configure_logging
from flows.runtime.recovery_marker import recovery_lineage
from flows.runtime.step_errors import FlowGuard
from operators.adapters.catalog_files import load_catalog
from operators.adapters.channels.factory import build_channel_senders
from operators.adapters.kafka.channel_lanes import BulkPacer, ChannelLanesSource
from operators.adapters.kafka.dead_letter_sink import DeadLetterSink, source_topic_of
from operators.adapters.kafka.delivery_events_sink import DeliveryEventsSink
from operators.adapters.kafka.retry_source import RetryTopicSource
from operators.adapters.kafka.writer import FlushingTopicSink
from operators.adapters.providers.apns import ApnsSender
from operators.adapters.providers.apns_curl import ApnsCurlSender
from operators.adapters.providers.config import ProviderConfigError, apns_config, fcm_config
from operators.adapters.providers.event_loop import EventLoopThread
from operators.adapters.providers.fcm import FcmSender
from operators.adapters.providers.fcm_curl import FcmCurlSender
from operators.adapters.providers.push_texts import TemplatePushRenderer
from operators.adapters.redis.edge_claims import RedisEdgeClaims
from operators.adapters.redis.rate_limiter import RedisRateLimiter
from operators.adapters.redis.writer_marks import RedisWriterStartMarks
from operators.adapters.stores.by_url import open_notification_store
from operators.config import (
    Settings,
    cassandra_credentials,
    delivery_providers,
    load_settings,
)
from operators.delivery.engine import DeliveryEngine, DeliverySettings
from operators.delivery.model import RetryPolicy
from operators.delivery.payloads import PushSource, PushTemplate
from operators.delivery.pipeline import DeliveryPump
from operators.delivery.ports import PushSender
from operators.delivery.steps import retry_due_at, retry_lane
from operators.delivery.token_bucket import BucketSpec
from schemas.codecs import encode_device_change, encode_retry_record
from schemas.records import DeadLetter, DeliveryEvent, DeviceChange, RetryRecord
from schemas.topics import DEVICE_CHANGES, PUSH_RETRY

log = logging.getLogger(__name__)
T = TypeVar("T")
SWITCH_INTERVAL_S = 0.001


def _only(kind: type[T]) -> Callable[[object], T | None]:
    return lambda x: x if isinstance(x, kind) else None


def build_delivery_flow(
    *,
    channel_source: Source[Any],
    retry_source: Source[Any],
    events_sink: Sink[Any],
    route_event: Callable[[DeliveryEvent], str],
    device_changes_sink: Sink[Any],
    retry_sink: Sink[Any],
    dead_letter_sink: Sink[Any],
) -> Dataflow:
    """Wire the graph from its ports (tests pass in-memory readers, TestingSinks and fakes)."""
    flow = Dataflow("delivery")
    # Whatever Bytewax calls logs its error once, with the traceback (flows/runtime/step_errors.py).
    g = FlowGuard(flow.flow_id)

    # The source holds each retry until its due time (see RetryTopicSource).
    # Declared first, so it starts its epochs first: Bytewax's inputs each close an epoch on
    # their own clock, started when they build their partitions, and an input that closed one
    # reads nothing more until every input has closed it. Built after the lane source (28
    # partitions, about 1.4 s to build), the retry source kept the lanes from reading for that
    # long every snapshot interval (README, Delivery regression).
    due = op.input("read_due_retries", flow, g.source("read_due_retries", retry_source))
    fresh = op.input("read_channel_lanes", flow, g.source("read_channel_lanes", channel_source))
    outputs = op.merge("merge_outputs", fresh, due)

    # Most outputs are delivery events: one test each sends them on; the rest are sorted after.
    split = op.branch("split_events", outputs, lambda x: isinstance(x, DeliveryEvent))
    keyed = op.map("route_event", split.trues, g.step("route_event", lambda e: (route_event(e), e)))
    op.output("write_delivery_events", keyed, g.sink("write_delivery_events", events_sink))
    others = split.falses
    op.output(
        "write_device_changes",
        op.filter_map("deactivations", others, _only(DeviceChange)),
        g.sink("write_device_changes", device_changes_sink),
    )
    op.output(
        "write_retries",
        op.filter_map("retries", others, _only(RetryRecord)),
        g.sink("write_retries", retry_sink),
    )
    dead = op.filter_map("dead_letters", others, _only(DeadLetter))
    keyed_dead = op.key_on("key_by_source_topic", dead, source_topic_of)
    op.output("write_dead_letters", keyed_dead, g.sink("write_dead_letters", dead_letter_sink))
    return flow


def _device_change_message(change: DeviceChange) -> tuple[bytes, bytes]:
    return change.user_id.encode(), encode_device_change(change)


def _retry_message(record: RetryRecord) -> tuple[bytes, bytes]:
    return record.item["notification_id"].encode(), encode_retry_record(record)


def retry_policy(settings: Settings) -> RetryPolicy:
    """The retry caps and backoff from settings."""
    return RetryPolicy(
        max_attempts=settings.retry_max_attempts,
        base_s=settings.retry_base_ms / 1000,
        max_backoff_s=settings.retry_max_backoff_s,
        max_age_s=settings.notification_max_age_s,
    )


def _senders_for(
    settings: Settings, template: PushSource, policy: RetryPolicy
) -> dict[str, PushSender]:
    """The configured providers' senders (FANFARE_APNS_CLIENT / FANFARE_FCM_CLIENT)."""
    timeout = settings.send_timeout_ms / 1000
    reserve = settings.bulk_reserve_pct / 100
    burst = settings.rate_burst_ms / 1000
    slack = settings.rate_send_slack_ms / 1000
    apns, fcm = apns_config(settings), fcm_config(settings)
    if apns is None and fcm is None:
        raise ProviderConfigError(
            "no push provider is configured: set FANFARE_APNS_KEY_FILE (and _KEY_ID, _TEAM_ID, "
            "_TOPIC) and/or FANFARE_FCM_CREDENTIALS_FILE, or run `fanfare dev up` to start "
            "the local provider servers"
        )
    senders: dict[str, PushSender] = {}
    if apns is not None:
        bucket = BucketSpec(f"apns:{apns.topic}", settings.apns_rate_per_min, burst, reserve, slack)
        connections = settings.apns_connections
        senders["apns"] = (
            ApnsSender(apns, template, bucket, policy, timeout)
            if settings.apns_client == "aioapns"
            else ApnsCurlSender(
                apns,
                template,
                bucket,
                policy,
                timeout,
                connections=connections,
                streams_per_connection=_streams(settings.delivery_in_flight, connections),
            )
        )
    if fcm is not None:
        bucket = BucketSpec(
            f"fcm:{fcm.project_id}", settings.fcm_rate_per_min, burst, reserve, slack
        )
        connections = settings.fcm_connections
        senders["fcm"] = (
            FcmSender(fcm, template, bucket, policy, timeout)
            if settings.fcm_client == "firebase-admin"
            else FcmCurlSender(
                fcm,
                template,
                bucket,
                policy,
                timeout,
                connections=connections,
                streams_per_connection=_streams(settings.delivery_in_flight, connections),
            )
        )
    return senders


def _streams(in_flight: int, connections: int) -> int:
    """HTTP/2 streams per connection before another connection opens (at least 100)."""
    return max(100, -(-in_flight // connections))


def build_engine(settings: Settings, pacer: BulkPacer) -> DeliveryEngine:
    """One worker's engine: its event loop, clients, Redis and store connections.

    Its senders: APNs and FCM as configured, and the channels' (`build_channel_senders`), all
    rendering API notifications from the catalog's templates.
    """
    policy = retry_policy(settings)
    catalog = load_catalog(settings.categories_file, settings.templates_dir)
    template = TemplatePushRenderer(
        PushTemplate(settings.push_title, settings.push_body, settings.push_link),
        catalog.templates,
    )
    limiter = RedisRateLimiter(settings.redis_url, settings.redis_prefix)
    # The worker's thread and its event loop's share the GIL: a thread that wants it waits up
    # to the switch interval (5 ms by default) for the other, at every socket event. 1 ms
    # keeps a send's way through the loop short while the worker judges and claims.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    loop = EventLoopThread()

    async def make_senders() -> dict[str, PushSender]:
        senders = _senders_for(settings, template, policy)
        senders.update(await build_channel_senders(settings, catalog, True, policy))
        for name, sender in senders.items():
            try:
                await sender.warm_up()
            except Exception as exc:  # not fatal: the first send connects
                log.warning(
                    "%s: could not connect before the first send (%s: %s); the first sends "
                    "will, and may reach it late",
                    name,
                    type(exc).__name__,
                    exc,
                )
        return senders

    return DeliveryEngine(
        claims=RedisEdgeClaims(
            settings.redis_url, settings.redis_prefix, settings.edge_claim_ttl_s
        ),
        store=open_notification_store(
            settings.resolved_notification_store_url,
            settings.store_ttl_s,
            **cassandra_credentials(settings),
        ),
        limiter=limiter,
        senders=loop.run(make_senders()),
        loop=loop,
        settings=DeliverySettings(
            retry=policy,
            rate_wait_max_s=settings.rate_wait_max_ms / 1000,
            breaker_failures=settings.breaker_failures,
            breaker_cooldown_s=settings.breaker_cooldown_s,
            in_flight=settings.delivery_in_flight,
        ),
        on_bulk_pause=pacer.pause,
    )


def get_flow(settings: Settings | None = None) -> Dataflow:
    """The production flow on Kafka, Redis, the notification store and the providers."""
    settings = settings or load_settings()
    configure_logging(settings.log_level)
    kafka = settings.kafka_config()
    pacer = BulkPacer()
    marks = functools.cache(
        lambda: RedisWriterStartMarks(
            settings.redis_url,
            settings.redis_prefix,
            recovery_lineage(settings.recovery_dir("delivery")),
        )
    )
    events = DeliveryEventsSink(kafka, marks=marks)
    # Per worker: one engine, shared by its channel and retry partitions, built on first use.
    pump = DeliveryPump(lambda: build_engine(settings, pacer))
    return build_delivery_flow(
        channel_source=ChannelLanesSource(
            kafka,
            pacer,
            pump,
            providers=delivery_providers(settings),
            bulk_items_per_poll=settings.bulk_items_per_poll,
        ),
        retry_source=RetryTopicSource(kafka, retry_due_at, pump, PUSH_RETRY, lane_of=retry_lane),
        events_sink=events,
        route_event=events.route_key,
        device_changes_sink=FlushingTopicSink(kafka, DEVICE_CHANGES, _device_change_message),
        retry_sink=FlushingTopicSink(kafka, PUSH_RETRY, _retry_message),
        dead_letter_sink=DeadLetterSink(kafka, marks=marks),
    )
