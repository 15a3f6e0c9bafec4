"""Publish from a request handler and wait for the broker's acknowledgement.

One producer per process, shared by every request thread (librdkafka producers are
thread-safe), with a background thread serving its delivery reports: a request waits for the
reports of its own messages only, never for a flush of everyone's. A message not acknowledged
within `timeout_s` fails the request (503), and nothing is reported as accepted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from operators.adapters.kafka.client_log import client_config
from operators.adapters.kafka.probes import KafkaConfig, read_partition_to_end
from operators.notify.ports import Publisher, PublishFailed


class _Pending:
    """The delivery reports one publish call waits for."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.positions: list[tuple[int, int]] = [(-1, -1)] * count
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        if count == 0:
            self.done.set()

    def report(self, index: int, err: KafkaError | None, msg: Any) -> None:
        with self.lock:
            if err is not None:
                self.errors.append(err.str())
            else:
                self.positions[index] = (int(msg.partition()), int(msg.offset()))
            self.left -= 1
            if self.left == 0:
                self.done.set()


class KafkaPublisher(Publisher):
    """Acknowledged publishes (`acks=all`), watermark marks and read-back for the scheduler."""

    def __init__(self, config: KafkaConfig, timeout_s: float = 10.0) -> None:
        self._config = config
        self._timeout_s = timeout_s
        self._producer = Producer(
            client_config(
                config,
                **{
                    "acks": "all",
                    "linger.ms": 2,
                    "message.timeout.ms": int(timeout_s * 1000),
                },
            )
        )
        self._stop = threading.Event()
        self._poller = threading.Thread(
            target=self._serve_reports, name="kafka-reports", daemon=True
        )
        self._poller.start()
        self._consumer: Consumer | None = None
        self._consumer_lock = threading.Lock()

    def _serve_reports(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    def publish(self, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> list[tuple[int, int]]:
        """Produce all; wait for each one's report."""
        pending = _Pending(len(messages))
        for index, (key, value) in enumerate(messages):

            def delivered(err: KafkaError | None, msg: Any, i: int = index) -> None:
                pending.report(i, err, msg)

            while True:
                try:
                    self._producer.produce(topic, value=value, key=key, on_delivery=delivered)
                    break
                except BufferError:
                    time.sleep(0.01)  # the local queue is full: the poller drains it
                except KafkaException as exc:
                    raise PublishFailed(f"{topic}: {exc}") from None
        if not pending.done.wait(self._timeout_s + 5):
            raise PublishFailed(f"{topic}: no acknowledgement within {self._timeout_s:g} s")
        if pending.errors:
            raise PublishFailed(f"{topic}: {pending.errors[0]}")
        return pending.positions

    def marks(self, topic: str) -> dict[int, int]:
        """High watermarks, per partition.

        Never past the true end (on the embedded broker they may trail it, which only makes a
        read-back start earlier).
        """
        with self._consumer_lock:
            if self._consumer is None:
                self._consumer = Consumer(
                    client_config(
                        self._config,
                        **{"group.id": "fanfare-api-marks", "enable.auto.commit": False},
                    )
                )
            meta = self._consumer.list_topics(topic, timeout=10)
            parts = sorted(meta.topics[topic].partitions)
            return {
                p: int(
                    self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                )
                for p in parts
            }

    def read_since(self, topic: str, marks: Mapping[int, int]) -> Iterator[bytes | None]:
        """Every value from the marks to each partition's true end."""
        for partition, start in sorted(marks.items()):
            for _, value in read_partition_to_end(self._config, topic, partition, start):
                yield value

    def check(self, topics: Sequence[str], timeout_s: float = 2.0) -> tuple[bool, str]:
        """Whether the broker answers and has the topics (for /health)."""
        try:
            meta = AdminClient(client_config(self._config)).list_topics(timeout=timeout_s)
        except KafkaException as exc:
            return False, f"no answer from the broker ({exc})"
        missing = [t for t in topics if t not in meta.topics]
        if missing:
            return False, f"topics missing: {', '.join(missing)} (run `fanfare topics create`)"
        return True, f"answers, {len(topics)} topics present"

    def close(self) -> None:
        """Deliver what is queued, stop the report thread."""
        self._producer.flush(self._timeout_s)
        self._stop.set()
        self._poller.join(timeout=2)
        with self._consumer_lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
