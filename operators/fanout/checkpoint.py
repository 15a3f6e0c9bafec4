"""When a follower shard checkpoints its user table (the writing is a `ShardStateStore`'s).

Exactness: a checkpoint is taken between two activations of the shard, so its arrays hold
exactly the preference and device events before its positions (the shard applies each
partition's events once, in offset order: `FollowerShard.apply`). On start the shard loads
it, and the changelog source reads each partition from the lowest position any shard's
checkpoint holds (`floor`), so every event after a shard's positions reaches it again and the
ones before are skipped: the state after the tail equals the state rebuilt from the whole
changelog. Bytewax's at-least-once replays change nothing: a replayed event is below the
position and skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from operators.fanout.ports import ShardStateStore
from operators.fanout.shard import FollowerShard


class ShardCheckpointer:
    """Saves a shard's table when it first catches up after a start, then every interval."""

    def __init__(
        self,
        store: ShardStateStore,
        shard_id: int,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.shard_id = shard_id
        self.interval_s = interval_s
        self._clock = clock
        # Shards are spread over the interval so they do not all write at once.
        self._due = clock() + interval_s * (1 + (shard_id % 16) / 16)
        self._saved_count = 0
        self._saved_positions: dict[str, object] = {}
        self._saved_caught_up = False
        self.saves = 0

    def load_into(self, shard: FollowerShard) -> bool:
        """Start the shard from its checkpoint, if there is one."""
        saved = self.store.load(self.shard_id)
        if saved is None:
            return False
        shard.load_checkpoint(*saved)
        return True

    def maybe_save(self, shard: FollowerShard, *, caught_up: bool) -> bool:
        """Checkpoint when something changed: at the first catch-up, then every interval."""
        if shard.changes_applied == self._saved_count and shard.positions == self._saved_positions:
            return False
        first = caught_up and not self._saved_caught_up
        if not first and self._clock() < self._due:
            return False
        if self.store.busy():  # another shard's copy is being written: next activation
            return False
        self.save(shard)
        self._saved_caught_up = self._saved_caught_up or caught_up
        return True

    def save(self, shard: FollowerShard) -> None:
        """Checkpoint now."""
        columns, positions = shard.checkpoint_state()
        self.store.save(self.shard_id, columns, positions)
        self._saved_count = shard.changes_applied
        self._saved_positions = dict(positions)
        self._due = self._clock() + self.interval_s
        self.saves += 1
