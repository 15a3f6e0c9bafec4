"""The Redis client code every Redis adapter shares, and how it rides out an outage.

The per-thread client; the options of a client that fails fast (a 1 s connect timeout, and one
immediate retry, which reconnects a pooled connection that a Redis restart closed: without it
the first command after the restart fails); the bounded retry; and `RedisOutage`, which lets a
fast path skip Redis for a moment after a connection error instead of paying for it on every
call.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from operators.worker_local import WorkerLocal

log = logging.getLogger(__name__)

T = TypeVar("T")


REDIS_DOWN_ERRORS: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)
"""What an unreachable, restarting or loading Redis raises (BusyLoadingError is a
ConnectionError); anything else (a script error, a wrong type) is a bug and is not retried."""


def fail_fast_options(socket_timeout: float = 2.0, connect_timeout: float = 1.0) -> dict[str, Any]:
    """Options for a client that fails fast: short socket timeouts, one immediate retry.

    The retry reconnects a pooled connection that a Redis restart closed; a second error is
    raised at once.
    """
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": Retry(NoBackoff(), 1),
    }


class RedisUnavailable(RuntimeError):
    """Redis did not answer within the bounded retry: the caller cannot go on safely."""


def retry_while_down(
    call: Callable[[], T],
    *,
    what: str,
    retry_for_s: float,
    base_s: float = 0.05,
    cap_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] = random.random,
) -> T:
    """`call()`, retried on connection errors for at most `retry_for_s` seconds.

    The backoff is exponential from `base_s`, jittered, capped at `cap_s`; past the bound,
    RedisUnavailable. `call` must be idempotent.
    """
    started = clock()
    attempt = 0
    while True:
        try:
            result = call()
        except REDIS_DOWN_ERRORS as exc:
            waited = clock() - started
            if waited >= retry_for_s:
                raise RedisUnavailable(
                    f"{what}: Redis did not answer for {waited:.1f} s ({exc}); giving up so "
                    "that the supervisor restarts the flow from its last snapshot"
                ) from exc
            if attempt == 0:
                log.warning(
                    "%s: Redis unreachable (%s); retrying for up to %.0f s", what, exc, retry_for_s
                )
            pause = min(cap_s, base_s * 2**attempt) * (0.5 + rand() / 2)
            sleep(max(0.0, min(pause, retry_for_s - waited)))
            attempt += 1
            continue
        if attempt:
            log.warning(
                "%s: Redis answers again after %.1f s (%d retries)",
                what,
                clock() - started,
                attempt,
            )
        return result


class RedisOutage:
    """For a fast path: after a connection error, skip Redis for `probe_s` seconds.

    While Redis is down every call would pay a connection attempt (or a timeout, when the
    network drops packets); with this, one call per `probe_s` tries Redis and the others go
    straight to the fallback. Logs once when an outage starts and once when it ends.
    """

    def __init__(
        self, what: str, probe_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._what = what
        self._probe_s = probe_s
        self._clock = clock
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self.down_since: float | None = None
        self.failures = 0  # calls that met an error
        self.skipped = 0  # calls that did not try Redis because of a recent error

    def skip(self) -> bool:
        """True when the fast path should not try Redis now."""
        with self._lock:
            if self.down_since is not None and self._clock() < self._retry_at:
                self.skipped += 1
                return True
            return False

    def started(self) -> float:
        """The clock now: pass it to `failed` so that a slow failure waits longer."""
        return self._clock()

    def failed(self, exc: Exception, started: float | None = None) -> None:
        """A call met a connection error; `started` is when the call began.

        The next try waits `probe_s`, or four times what the failed call took when that is
        longer (a timeout, when the network drops packets), so a caller is never held by
        Redis more than a fifth of the time.
        """
        with self._lock:
            now = self._clock()
            took = 0.0 if started is None else max(0.0, now - started)
            self.failures += 1
            self._retry_at = now + max(self._probe_s, 4 * took)
            if self.down_since is None:
                self.down_since = now
                log.warning("%s: Redis unreachable (%s)", self._what, exc)

    def answered(self) -> None:
        """A call succeeded."""
        if self.down_since is None:  # the common case: no lock
            return
        with self._lock:
            if self.down_since is not None:
                log.warning(
                    "%s: Redis answers again after %.1f s",
                    self._what,
                    self._clock() - self.down_since,
                )
                self.down_since = None


class PerThreadRedis:
    """A Redis client per thread (each Bytewax worker), made on first use, never at import.

    `script` registers a Lua script once per thread and returns it with that thread's client.
    """

    def __init__(self, url: str, **options: Any) -> None:
        self._url = url
        self._options = options
        self._local = WorkerLocal()

    def __call__(self) -> redis.Redis:
        """The calling thread's client."""
        client: redis.Redis | None = getattr(self._local, "client", None)
        if client is None:
            client = redis.Redis.from_url(self._url, **self._options)
            self._local.client = client
            self._local.scripts = {}
        return client

    def script(self, text: str) -> Script:
        """The calling thread's registered copy of a Lua script."""
        client = self()
        scripts: dict[str, Script] = self._local.scripts
        if text not in scripts:
            scripts[text] = client.register_script(text)
        return scripts[text]
