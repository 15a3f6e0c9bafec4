"""Seed the fan-out's user state as shard checkpoints instead of changelog messages.

`scripts.bench.fanout --seed-state checkpoints` uses this to reach 10M users: 20M changelog
messages through the embedded broker take ~11 min to load and Tansu stopped answering at that
size. The messages the benchmark would publish are decoded by the flow's own changelog router,
applied to the flow's own `FollowerShard`, and checkpointed by `ShardCheckpointer` into a
`FileShardStateStore`, exactly as the flow writes them. Every preference and device partition's
position is the changelog's current end (the messages are never published), so a flow started
on these files reads only what is published after them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from operators.adapters.stores.shard_state import FileShardStateStore
from operators.events import RawEvent
from operators.fanout.checkpoint import ShardCheckpointer
from operators.fanout.shard import ChangelogEvent, FollowerShard
from operators.fanout.steps import ChangelogRouter

Message = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class SeededState:
    """What `seed_checkpoints` wrote."""

    events: int
    users: int
    checkpoint_bytes: int
    apply_s: float
    write_s: float


def seed_checkpoints(
    folder: Path,
    new_shard: Callable[[], FollowerShard],
    shard_count: int,
    topic_id: Callable[[str], str | None],
    messages: Mapping[str, Iterable[Message]],
    ends: Mapping[str, int],
) -> SeededState:
    """Write every shard's checkpoint as if the flow had applied `messages` from the changelogs.

    `messages` maps a changelog topic to its messages (key, value), in the order a reader would
    meet them; `ends` maps each "topic/partition" source the checkpoints cover to the offset
    its partition ends at now, which becomes the position (nothing before it is read again).
    A message that the flow would dead-letter raises ValueError: the seed must be valid.
    """
    router = ChangelogRouter(shard_count)
    shards = [new_shard() for _ in range(shard_count)]
    started = time.perf_counter()
    events = 0
    for topic, stream in messages.items():
        for offset, (key, value) in enumerate(stream):
            # Partition 0 with no log: the positions are set from `ends` below, not from these.
            raw = RawEvent(topic, 0, offset, key, value, 0.0)
            for routed in router.route(raw):
                item = routed[1] if isinstance(routed, tuple) else routed
                if not isinstance(item, ChangelogEvent):
                    raise ValueError(f"the seed holds a message the flow rejects: {item!r}")
                shard = shards[item.shard_id]
                if not shard.apply(item):
                    raise ValueError(f"the seed's event was skipped: {item!r}")
                events += 1
    positions: dict[str, tuple[str | None, int]] = {}
    for source, end in ends.items():
        log_id = topic_id(source.rpartition("/")[0])
        if log_id is None:
            raise RuntimeError(f"the broker gives no topic id for {source}: no checkpoint")
        positions[source] = (log_id, end)
    applied = time.perf_counter()
    store = FileShardStateStore(folder, shard_count, topic_id)
    users = 0
    for shard_id, shard in enumerate(shards):
        shard.users.compact()  # what the flow does at its catch-up, before that first save
        shard.positions = dict(positions)
        users += shard.users.rows
        ShardCheckpointer(store, shard_id, 60).save(shard)
        store.flush()
        shards[shard_id] = new_shard()  # its table is on disk: free it before the next
    written = time.perf_counter()
    size = sum(p.stat().st_size for p in Path(folder).glob("shard-*.ckpt"))
    return SeededState(events, users, size, applied - started, written - applied)


def changelog_sources(topics: Sequence[str], partitions: int) -> dict[str, int]:
    """Every "topic/partition" of `topics` at offset 0: an empty changelog's ends."""
    return {f"{t}/{p}": 0 for t in topics for p in range(partitions)}
