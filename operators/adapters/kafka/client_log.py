"""librdkafka's own log lines, through Python logging and without the flood.

librdkafka writes `%3|...|FAIL|...` lines straight to stderr, one per failed connection attempt
and client: with the broker down, a flow with a dozen clients printed about 16 a second. Every
client fanfare builds passes its lines to `KafkaClientLog` instead (`client_config`), which logs
them under `fanfare.kafka` and repeats the same line at most once a minute, with a count of the
ones it held back. Errors a flow must act on are raised by the client calls themselves.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("fanfare.kafka")

REPEAT_AFTER_S = 60.0
"""The same line is logged again at most this often (with how many were held back)."""
_VARYING = re.compile(r"\d+(?:\.\d+)?(?:ms|s)?")


class KafkaClientLog:
    """A `logger` for librdkafka clients (confluent-kafka calls `log(level, fmt, *args)`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}  # line (numbers blanked) -> (at, held)

    def log(self, level: int, msg: str, *args: object) -> None:
        """One librdkafka line: logged, or held back if the same one was logged lately."""
        text = msg % args if args else msg
        key = _VARYING.sub("#", text)
        now = self._clock()
        with self._lock:
            last, held = self._seen.get(key, (float("-inf"), 0))
            if now - last < REPEAT_AFTER_S:
                self._seen[key] = (last, held + 1)
                return
            self._seen[key] = (now, 0)
            if len(self._seen) > 1_000:  # distinct lines are few; never grow without bound
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < REPEAT_AFTER_S}
        suffix = f" (and {held} more like it in the last {REPEAT_AFTER_S:.0f} s)" if held else ""
        log.log(level, "librdkafka: %s%s", text, suffix)


_SHARED = KafkaClientLog()


def client_config(config: Mapping[str, object], **extra: object) -> dict[str, Any]:
    """A librdkafka configuration for a new client: `config`, `extra`, and the shared log."""
    return {"logger": _SHARED, **config, **extra}
