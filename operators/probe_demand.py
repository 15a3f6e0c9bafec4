"""When the shards of this process want the changelog partitions probed for their end.

A follower shard runs a job only once every changelog partition was reported read to its end
by a probe made at or after `read_at + settle` (`FollowerShard.gate_open_for`). The changelog
readers probe an idle partition on an interval, so a job used to wait for the next probe of
each partition after that time, and then for its answer. A shard holding a job at its gate
asks here for a probe at that time; the readers in the same process probe then (once their
last probe was answered) instead of at their interval.

Only a hint: the gate still decides from the caught-up markers, and a reader in another process
(or an ask forgotten) leaves the interval probes to answer. One per process, shared by its
worker threads; built by the flow, never at import.
"""

from __future__ import annotations

import bisect
import threading

KEEP_S = 5.0
"""Seconds an ask is kept after a newer one: far longer than a probe takes to be answered;
an ask still open then is left to the interval probes."""


class ProbeDemand:
    """Times at which a caught-up report is wanted (epoch seconds), earliest first."""

    def __init__(self, keep_s: float = KEEP_S) -> None:
        self._keep_s = keep_s
        self._times: list[float] = []  # sorted, distinct
        self._lock = threading.Lock()

    def ask(self, at: float) -> None:
        """A probe made at or after `at` is wanted from every changelog partition."""
        with self._lock:
            times = self._times
            i = bisect.bisect_left(times, at)
            if i == len(times) or times[i] != at:
                times.insert(i, at)
            # Asks come in read order, so the old ones are at the front.
            old = bisect.bisect_left(times, times[-1] - self._keep_s)
            if old:
                del times[:old]

    def due_after(self, probed_at: float) -> float | None:
        """The earliest time asked for after `probed_at` (None: none).

        A probe made at `t` answers every ask up to `t`, so a reader whose last probe was at
        `probed_at` owes an answer only to the later ones.
        """
        with self._lock:
            times = self._times
            i = bisect.bisect_right(times, probed_at)
            return times[i] if i < len(times) else None
