"""When every follower shard of a process has read its changelogs to their end (the load)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class ShardsLoaded:
    """Per process: counts the shards built, caught up and settled; calls `on_loaded` when equal.

    Loading the changelogs builds and drops a lot of short-lived objects (decoded events, the
    user tables before `UserTable.compact`); the memory they freed stays with the allocator
    unless it is handed back, so the process would keep its load peak for its whole life. A
    shard compacts its table (settles) only once every shard of the process has caught up, so
    the catch-up of the last shard does not wait for the others' compactions; once every shard
    built has settled, `on_loaded` can hand the memory back. Shards built later (another
    worker's, late) settle later: it is called again when the counts meet again. Worker threads
    share it, hence the lock.
    """

    def __init__(self, on_loaded: Callable[[], object]) -> None:
        self._on_loaded = on_loaded
        self._lock = threading.Lock()
        self.built = 0
        self.caught_up = 0
        self.settled = 0

    def shard_built(self) -> None:
        """A shard was built (before it can catch up)."""
        with self._lock:
            self.built += 1

    def shard_caught_up(self) -> None:
        """A shard read every changelog partition to its end."""
        with self._lock:
            self.caught_up += 1

    def all_caught_up(self) -> bool:
        """Whether every shard built so far has caught up (they may settle now)."""
        with self._lock:
            return self.caught_up >= self.built

    def shard_settled(self) -> None:
        """A caught-up shard compacted its table; the last one calls `on_loaded`."""
        with self._lock:
            self.settled += 1
            loaded = self.settled == self.built
        if loaded:
            self._on_loaded()
