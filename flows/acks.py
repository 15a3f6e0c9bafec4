"""The acks dataflow: notification_acks -> the notification store (delivered / opened).

    read_acks ─► decode_ack ─► apply_acks (store, forward only) ─► dead letters (unknown ones)
               └─► dead letters (malformed)

Run it with `fanfare run acks`. Everything here is wiring; decisions live in `operators/`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink

from flows.runtime.logs import configure_logging
from flows.runtime.recovery_marker import recovery_lineage
from flows.runtime.step_errors import FlowGuard
from operators.acks.steps import ApplyAcks, ReadAck, decode_ack
from operators.adapters.kafka.dead_letter_sink import DeadLetterSink, source_topic_of
from operators.adapters.kafka.reader import KafkaTopicsSource
from operators.adapters.redis.writer_marks import RedisWriterStartMarks
from operators.adapters.stores.by_url import open_notification_store
from operators.config import Settings, cassandra_credentials, load_settings
from operators.dead_letters import Decoded, decode_or_dead_letter, one
from schemas.records import DeadLetter
from schemas.topics import NOTIFICATION_ACKS


def build_acks_flow(
    *,
    source: Source[Any],
    apply_acks: Callable[[list[ReadAck]], list[DeadLetter]],
    dead_letter_sink: Sink[Any],
) -> Dataflow:
    """Wire the graph from its ports (tests pass TestingSource/TestingSink)."""
    flow = Dataflow("acks")
    # Whatever Bytewax calls logs its error once, with the traceback (flows/runtime/step_errors.py).
    g = FlowGuard(flow.flow_id)
    raw = op.input("read_acks", flow, g.source("read_acks", source))
    decoded: Decoded[ReadAck] = decode_or_dead_letter(
        "decode_ack", raw, g.step("decode_ack", one(decode_ack))
    )
    unknown = op.flat_map_batch("apply_acks", decoded.oks, g.step("apply_acks", apply_acks))
    dead = op.merge("merge_dead_letters", decoded.dead_letters, unknown)
    keyed_dead = op.key_on("key_by_source_topic", dead, source_topic_of)
    op.output("write_dead_letters", keyed_dead, g.sink("write_dead_letters", dead_letter_sink))
    return flow


def get_flow(settings: Settings | None = None) -> Dataflow:
    """The production flow on Kafka and the notification store."""
    settings = settings or load_settings()
    configure_logging(settings.log_level)
    url, ttl = settings.resolved_notification_store_url, settings.store_ttl_s
    marks = functools.cache(
        lambda: RedisWriterStartMarks(
            settings.redis_url,
            settings.redis_prefix,
            recovery_lineage(settings.recovery_dir("acks")),
        )
    )
    return build_acks_flow(
        source=KafkaTopicsSource(settings.kafka_config(), [NOTIFICATION_ACKS], batch_size=1_000),
        apply_acks=ApplyAcks(
            lambda: open_notification_store(url, ttl, **cassandra_credentials(settings))
        ),
        dead_letter_sink=DeadLetterSink(settings.kafka_config(), marks=marks),
    )
