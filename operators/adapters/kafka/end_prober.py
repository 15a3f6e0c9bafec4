"""Whether changelog partitions end where their readers are, asked on a consumer of its own.

A shard's changelog gate opens once every changelog partition was found read to its end by a
probe made after the job's read time plus the settle margin (`FollowerShard.gate_open_for`).
A reader probing its own consumer seeks, which waits for the fetch in flight (held at the end
for up to `FETCH_WAIT_MS`) and then for a new fetch held as long: about 0.1 s per probe, and
asks coming faster than that waited for the probe out before their own. Measured on the 1M
fan-out benchmark, a normal post's jobs waited 0.30 s at the gate (p50) and 1.1 s (p99).

Here one consumer per process, idle between asks, is assigned the asked partitions at the
readers' offsets, with no fetch in flight to wait for and a fetch the broker answers at once
(`fetch.wait.max.ms` 1): end-of-partition at the asked offset means the partition ended there
when the round began; a message at or after it means it did not. A round takes a few
milliseconds and answers every ask that came before it; rounds start at most every
`ROUND_EVERY_S`. Built by the flow per process, its
consumer and thread on the first ask, never at import.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from operators.adapters.kafka.client_log import client_config
from operators.adapters.kafka.probes import KafkaConfig

ANSWER_TIMEOUT_S = 1.0
"""A round gives up on the partitions not answered by then (answered "not at the end": the
reader asks again once idle)."""

ROUND_EVERY_S = 0.05
"""The shortest time between two rounds' starts. Each round assigns and releases every asked
partition; made for every post at 50 posts/s, rounds cost the flow 0.17-0.28 of a core and the
broker 0.13 in the 1M fan-out benchmark. Asks in between wait for the next round: at most this
long, 25 ms on average."""

IDLE_CLOSE_S = 10.0
"""Seconds without an ask after which the consumer is closed (its connection and threads)."""


@dataclass(frozen=True, slots=True)
class EndAnswer:
    """The answer to one ask: whether the partition ended at the asked offset at `as_of`."""

    as_of: float
    """Epoch seconds when the round began: the broker was asked after it."""
    at_end: bool
    offset: int
    """The asked offset."""


Key = tuple[str, int]


class EndProber:
    """Asks whether partitions end at given offsets, in rounds on one consumer of its own."""

    def __init__(
        self,
        config: KafkaConfig,
        *,
        consumer_factory: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.time,
        answer_timeout_s: float = ANSWER_TIMEOUT_S,
        idle_close_s: float = IDLE_CLOSE_S,
        round_every_s: float = ROUND_EVERY_S,
    ) -> None:
        self._round_every_s = round_every_s
        self._config = config
        self._consumer_factory = consumer_factory or self._new_consumer
        self._clock = clock
        self._answer_timeout_s = answer_timeout_s
        self._idle_close_s = idle_close_s
        self._asks: dict[Key, int] = {}
        self._answers: dict[Key, EndAnswer] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.rounds = 0  # rounds made (tests, logs)

    def _new_consumer(self) -> Any:
        conf: dict[str, object] = dict(self._config)
        conf.update(
            {
                "group.id": "fanfare-end-prober",  # no group is joined: partitions are assigned
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 1,  # an end is answered at once, not held for data
                # An offset past the end reads from the start: messages below the asked offset
                # are ignored, and the round gives up on the partition (not at its end).
                "auto.offset.reset": "earliest",
                "queued.max.messages.kbytes": 1_024,  # it reads one message a partition
            }
        )
        return Consumer(client_config(conf))

    def ask(self, topic: str, partition: int, offset: int) -> None:
        """Ask whether the partition ends at `offset` (a later ask replaces an unanswered one)."""
        with self._cond:
            if self._stopped:
                return
            self._asks[(topic, partition)] = offset
            self._answers.pop((topic, partition), None)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="end-prober", daemon=True)
                self._thread.start()
            self._cond.notify()

    def answer(self, topic: str, partition: int) -> EndAnswer | None:
        """The answer to the partition's last ask, once (None while it is out)."""
        with self._cond:
            return self._answers.pop((topic, partition), None)

    def close(self) -> None:
        """Stop the thread (it closes the consumer); asks after this are ignored."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(self._answer_timeout_s + 5)

    def _run(self) -> None:
        consumer: Any = None
        last_round = float("-inf")
        try:
            while True:
                pause = last_round + self._round_every_s - time.monotonic()
                if pause > 0:  # asks that come meanwhile join the next round
                    time.sleep(pause)
                with self._cond:
                    if not self._asks and not self._stopped:
                        self._cond.wait(self._idle_close_s)
                    if self._stopped:
                        return
                    asks, self._asks = self._asks, {}
                if not asks:  # idle for a while: give the connection back
                    if consumer is not None:
                        consumer.close()
                        consumer = None
                    continue
                if consumer is None:
                    consumer = self._consumer_factory()
                last_round = time.monotonic()
                answers = self._round(consumer, asks)
                with self._cond:
                    for key, answer in answers.items():
                        if key not in self._asks:  # else a newer ask replaced this one
                            self._answers[key] = answer
        finally:
            if consumer is not None:
                consumer.close()

    def _round(self, consumer: Any, asks: dict[Key, int]) -> dict[Key, EndAnswer]:
        """Assign the asked partitions at their offsets; read the first event of each."""
        self.rounds += 1
        as_of = self._clock()
        consumer.assign([TopicPartition(t, p, offset) for (t, p), offset in asks.items()])
        left = dict(asks)
        answers: dict[Key, EndAnswer] = {}
        deadline = time.monotonic() + self._answer_timeout_s
        try:
            while left and time.monotonic() < deadline:
                for m in consumer.consume(500, 0.005):
                    key = (m.topic(), m.partition())
                    offset = left.get(key)
                    if offset is None:
                        continue
                    err = m.error()
                    at = m.offset()
                    if err is None:
                        if at is not None and at >= offset:  # a message there: not the end
                            answers[key] = EndAnswer(as_of, False, offset)
                            del left[key]
                    elif err.code() == KafkaError._PARTITION_EOF:
                        if at == offset:
                            answers[key] = EndAnswer(as_of, True, offset)
                            del left[key]
                    else:  # out of range (the log is gone or shorter), or another error
                        answers[key] = EndAnswer(as_of, False, offset)
                        del left[key]
        finally:
            consumer.unassign()
        for key, offset in left.items():  # no answer in time: the reader asks again
            answers[key] = EndAnswer(as_of, False, offset)
        return answers
