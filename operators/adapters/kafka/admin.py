"""Topic administration against the Kafka-protocol broker: create, list, wait for it.

Only the whole-cluster metadata request is used to look at topics: on Tansu a metadata request
that names a topic creates it (auto-create), so asking "does X exist?" would make it exist.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Any, cast

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # the stubs only export it from here

from operators.config import ConfigError, Settings
from schemas.topics import ALL_TOPICS, DEVICE_CHANGES, PREFERENCE_CHANGES

_log = logging.getLogger(__name__)

# Seconds for a metadata request: a broker answers in milliseconds, and librdkafka waits out the
# whole timeout when nothing listens, so this is how long "no broker" takes to say.
METADATA_TIMEOUT_S = 5.0
# Seconds for a CreateTopics request (the broker may wait for the new partitions' leaders).
REQUEST_TIMEOUT_S = 10.0

CREATED = "created"
EXISTS = "exists"


class BrokerUnavailable(RuntimeError):
    """No Kafka broker answered at FANFARE_KAFKA_BROKERS."""

    def __init__(self, brokers: str, cause: object | None = None) -> None:
        if isinstance(cause, KafkaError):
            cause = cause.str()  # the text, not KafkaError{code=...,val=...}
        why = f" ({cause})" if cause is not None else ""
        super().__init__(
            f"no Kafka broker answers at {brokers}{why}. Check FANFARE_KAFKA_BROKERS, "
            "or start the embedded broker with `fanfare dev up`."
        )
        self.brokers = brokers


class TopicAdminError(RuntimeError):
    """The broker answered but refused a topic operation; the message says which and why."""


class _DebugLogger:
    """Sends librdkafka's own log lines to DEBUG.

    Connection-refused noise would otherwise be logged while we probe a broker that is not up
    yet, and BrokerUnavailable says it plainly instead.
    """

    def log(self, level: int, msg: str, *args: object) -> None:
        _log.debug(msg, *args)


def _admin(settings: Settings) -> AdminClient:
    conf = settings.kafka_config(logger=_DebugLogger())
    try:
        # librdkafka takes a logger object here; the stubs only know scalar values.
        return AdminClient(cast(dict[str, Any], conf))
    except KafkaException as exc:
        # Construction only fails on configuration, which comes from FANFARE_KAFKA_OPTIONS.
        raise ConfigError(
            f"FANFARE_KAFKA_OPTIONS: librdkafka rejected the client configuration: {exc}"
        ) from None


def _partition_counts(admin: AdminClient, settings: Settings, timeout_s: float) -> dict[str, int]:
    """Every topic on the cluster with its partition count (no per-topic request: see above)."""
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise BrokerUnavailable(settings.kafka_brokers, exc.args[0]) from None
    return {name: len(topic.partitions) for name, topic in metadata.topics.items()}


def list_topics(settings: Settings) -> dict[str, int]:
    """The fanfare topics that exist on the broker, with their partition counts."""
    counts = _partition_counts(_admin(settings), settings, METADATA_TIMEOUT_S)
    return {topic: counts[topic] for topic in ALL_TOPICS if topic in counts}


def wait_for_broker(settings: Settings, timeout_s: float) -> bool:
    """True once a broker answers a metadata request, False if none does within timeout_s."""
    admin = _admin(settings)
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            # Short attempts so a broker that comes up mid-wait is noticed quickly.
            _partition_counts(admin, settings, max(0.1, min(remaining, 1.0)))
            return True
        except BrokerUnavailable:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def create_topics(settings: Settings, partitions: int | None = None) -> dict[str, str]:
    """Create every topic in ALL_TOPICS that is missing; safe to run again.

    Returns topic -> "created" or "exists". An existing topic with fewer partitions than asked
    is reported as "exists (N partitions, fewer than the M asked)" and left as it is: adding
    partitions would move keys to other partitions, which is the operator's call, not ours.
    """
    if partitions is not None and partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    admin = _admin(settings)
    existing = _partition_counts(admin, settings, METADATA_TIMEOUT_S)
    wanted = {
        topic: partitions if partitions is not None else settings.partitions_for(topic)
        for topic in ALL_TOPICS
    }
    result: dict[str, str] = {}
    for topic, count in existing.items():
        if topic in wanted:
            result[topic] = _describe_existing(count, wanted[topic])
    missing = [topic for topic in ALL_TOPICS if topic not in existing]
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(
                    t, wanted[t], settings.replication_factor, config=topic_config(t, settings)
                )
                for t in missing
            ],
            request_timeout=REQUEST_TIMEOUT_S,
        )
        for topic, future in futures.items():
            result[topic] = _creation_outcome(topic, future, settings)
        raced = [t for t in missing if result[t] == EXISTS]
        if raced:
            # Someone else created these between our look and our create: check their size too.
            counts = _partition_counts(admin, settings, METADATA_TIMEOUT_S)
            for topic in raced:
                if topic in counts:
                    result[topic] = _describe_existing(counts[topic], wanted[topic])
    return {topic: result[topic] for topic in ALL_TOPICS}


def topic_config(topic: str, settings: Settings) -> dict[str, str]:
    """Topic settings fanfare relies on: the retention of the checkpointed changelogs.

    The follower shards checkpoint their users with the changelog positions they include and
    read only the tail after them on start (README, "Restarts and changelog retention"), so
    `preference_changes` and `device_changes` need the tail since the oldest checkpoint, not
    their whole history. Other topics keep the broker's defaults.
    """
    if topic not in (PREFERENCE_CHANGES, DEVICE_CHANGES):
        return {}
    hours = settings.changelog_retention_hours
    return {"retention.ms": str(hours * 3_600_000 if hours else -1)}


def _describe_existing(have: int, asked: int) -> str:
    if have < asked:
        return f"{EXISTS} ({have} partitions, fewer than the {asked} asked; left as is)"
    return EXISTS


def _creation_outcome(topic: str, future: Future[Any], settings: Settings) -> str:
    try:
        future.result()
    except KafkaException as exc:
        error = exc.args[0]
        code = error.code() if isinstance(error, KafkaError) else None
        if code == KafkaError.TOPIC_ALREADY_EXISTS:
            return EXISTS
        if code in (KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN):
            raise BrokerUnavailable(settings.kafka_brokers, error) from None
        if code == KafkaError.INVALID_REPLICATION_FACTOR:
            raise TopicAdminError(
                f"cannot create {topic}: FANFARE_REPLICATION_FACTOR="
                f"{settings.replication_factor} is more than the cluster's brokers ({error})"
            ) from None
        raise TopicAdminError(f"cannot create {topic}: {error}") from None
    return CREATED
