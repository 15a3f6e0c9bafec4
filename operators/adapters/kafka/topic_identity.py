"""Notice a topic re-created under a running reader: its topic id changed.

Kafka gives every topic a UUID (KIP-516). A topic deleted and created again gets a new one,
and so does every topic of the embedded broker when it restarts (it keeps memory only). The
new log's offsets start again at 0, so a reader's position in the old log means nothing in
the new one: the position may lie beyond the new end (the fetch answers nothing) or, once new
messages arrive, inside it, and then the reader would skip the new log's first messages.
Offsets cannot tell the two logs apart; the topic id can.

`TopicIds` asks the broker for the ids of the topics its readers registered, every `every_s`
seconds for all of them (one metadata request per process, not per partition, from a
background thread), and the readers read that cache. A broker that does not answer, or a
topic it does not know (yet), gives None: "no news", never "changed".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from confluent_kafka import KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient

from operators.adapters.kafka.client_log import client_config

log = logging.getLogger(__name__)

Describe = Callable[[list[str]], dict[str, str]]
"""Topic names to their ids, for the topics the broker knows (the others are left out)."""

REFRESH_S = 2.0
"""Seconds between two metadata requests of one process."""


class TopicIds:
    """Topic ids of the registered topics, refreshed every `every_s` by a background thread.

    `current` never waits for the broker: the thread asks (a broker that is away makes a
    request wait for its timeout), the readers only read the cache. The thread starts with the
    first `register`, so nothing runs at import or for a process with no reader.
    """

    def __init__(
        self,
        describe: Describe,
        every_s: float = REFRESH_S,
        *,
        background: bool = True,
    ) -> None:
        self._describe = describe
        self._every_s = every_s
        self._background = background
        self._lock = threading.Lock()
        self._topics: set[str] = set()
        self._ids: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def register(self, topics: Iterable[str]) -> None:
        """Watch these topics too (asked for at once)."""
        with self._lock:
            new = set(topics) - self._topics
            if not new:
                return
            self._topics |= new
            if self._background and self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="fanfare-topic-ids", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def refresh(self) -> None:
        """Ask the broker now (the thread's step; tests call it directly)."""
        with self._lock:
            topics = sorted(self._topics)
        if not topics:
            return
        try:
            ids = dict(self._describe(topics))
        except Exception as exc:  # the broker is away or refuses: no news
            log.debug("describing topics failed: %s", exc)
            ids = {}
        with self._lock:
            self._ids = ids

    def current(self, topic: str) -> str | None:
        """The topic's id as last seen; None when not known (no answer, no such topic)."""
        with self._lock:
            return self._ids.get(topic)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._every_s)
            self._wake.clear()
            self.refresh()


def admin_describe(config: Mapping[str, object], timeout_s: float = 1.0) -> Describe:
    """A `Describe` through an AdminClient built on first use (never at import)."""
    admin: list[AdminClient] = []

    def describe(topics: list[str]) -> dict[str, str]:
        if not admin:
            admin.append(AdminClient(client_config(config)))
        futures = admin[0].describe_topics(TopicCollection(topics), request_timeout=timeout_s)
        out: dict[str, str] = {}
        for name, future in futures.items():
            try:
                out[name] = str(future.result(timeout=timeout_s * 2).topic_id)
            except (KafkaException, TimeoutError):
                continue  # unknown (not re-created yet) or not answered
        return out

    return describe


_SHARED: dict[str, TopicIds] = {}
_SHARED_LOCK = threading.Lock()


def shared_topic_ids(config: Mapping[str, object]) -> TopicIds:
    """The process' `TopicIds` for this cluster (its readers share one metadata request)."""
    key = str(config.get("bootstrap.servers", ""))
    with _SHARED_LOCK:
        ids = _SHARED.get(key)
        if ids is None:
            ids = _SHARED[key] = TopicIds(admin_describe(config))
        return ids


def topic_id_of(
    config: Mapping[str, object], attempts: int = 10, wait_s: float = 1.0
) -> Callable[[str], str | None]:
    """A topic's id asked now, trying a few times (None when the broker never says).

    For decisions taken once at start (is a checkpoint's log still the topic's log?), where
    "no news" must not be read as "the same".
    """
    describe = admin_describe(config)

    def topic_id(topic: str) -> str | None:
        for attempt in range(attempts):
            found = describe([topic]).get(topic)
            if found is not None:
                return found
            if attempt + 1 < attempts:
                time.sleep(wait_s)
        log.warning("the broker did not give %s's topic id: its checkpoints are not used", topic)
        return None

    return topic_id
