"""Seed the fan-out's user state as shard checkpoints instead of changelog messages.

`scripts.bench.fanout --seed-state checkpoints` uses this to reach 10M users: 20M changelog
messages through the embedded broker take ~11 min to load and Tansu stopped answering at that
size. The messages the benchmark would publish are routed as the flow's changelog router routes
them (decoded by it, or given with their changes, a sample of which it decodes to check),
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
from operators.fanout.sharding import shard_of
from operators.fanout.steps import ChangelogRouter
from schemas.records import DeviceChange, PreferenceChange

UserChange = PreferenceChange | DeviceChange
Message = tuple[bytes, bytes] | tuple[bytes, bytes, UserChange]
"""(key, value), or (key, value, the change it decodes to): see `seed_checkpoints`."""


@dataclass(frozen=True, slots=True)
class SeededState:
    """What `seed_checkpoints` wrote."""

    events: int
    users: int
    checkpoint_bytes: int
    apply_s: float
    write_s: float
    decoded: int
    """Messages decoded by the flow's router (all those given without their change, and the
    sample of the others checked against it)."""


def seed_checkpoints(
    folder: Path,
    new_shard: Callable[[], FollowerShard],
    shard_count: int,
    topic_id: Callable[[str], str | None],
    messages: Mapping[str, Iterable[Message]],
    ends: Mapping[str, int],
    *,
    check_every: int = 1_000,
) -> SeededState:
    """Write every shard's checkpoint as if the flow had applied `messages` from the changelogs.

    `messages` maps a changelog topic to its messages, in the order a reader would meet them;
    `ends` maps each "topic/partition" source the checkpoints cover to the offset its partition
    ends at now, which becomes the position (nothing before it is read again). A message is
    decoded by the flow's changelog router; one given with its change is applied as that
    change (the flow's decoding validates every field: ~23 us a message, 8 of 10 minutes at
    10M users), and every `check_every`-th of those is decoded too and must equal it. A message
    the flow would dead-letter, or a change that differs from its message, raises ValueError.
    """
    router = ChangelogRouter(shard_count)
    shards = [new_shard() for _ in range(shard_count)]
    started = time.perf_counter()
    events = decoded = 0
    for topic, stream in messages.items():
        for offset, message in enumerate(stream):
            # Partition 0, no log: the positions are set from `ends` below, not from these.
            raw = RawEvent(topic, 0, offset, message[0], message[1], 0.0)
            given = message[2] if len(message) == 3 else None
            if given is None or offset % check_every == 0:
                decoded += 1
                routed = list(router.route(raw))
                item = routed[0][1] if len(routed) == 1 and isinstance(routed[0], tuple) else None
                if not isinstance(item, ChangelogEvent):
                    raise ValueError(f"the seed holds a message the flow rejects: {routed!r}")
                if given is not None and item.change != given:
                    raise ValueError(f"{topic} @{offset}: {given!r} is not its message's change")
            else:
                shard_id = shard_of(given.user_id, shard_count)
                item = ChangelogEvent(given, shard_id, f"{topic}/0", offset, None)
            if not shards[item.shard_id].apply(item):
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
    return SeededState(events, users, size, applied - started, written - applied, decoded)


def changelog_sources(topics: Sequence[str], partitions: int) -> dict[str, int]:
    """Every "topic/partition" of `topics` at offset 0: an empty changelog's ends."""
    return {f"{t}/{p}": 0 for t in topics for p in range(partitions)}
