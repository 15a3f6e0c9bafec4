"""Dispatch batches: at most 500 items of one post for one provider and lane."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import orjson

from operators.fanout.columns import FragmentArena
from schemas.records import DispatchBatch, DispatchItem, EncodedDispatchBatch, Provider
from schemas.topics import MAX_DISPATCH_BATCH


def notification_id(post_id: str, user_id: str) -> str:
    """The follower-level notification of a post; every device push of it shares the id."""
    return f"{post_id}:{user_id}"


def dispatch_batches(
    post_id: str,
    author_id: str,
    created_at: str,
    provider: Provider,
    lane: str,
    items: Sequence[DispatchItem],
    batch_size: int = MAX_DISPATCH_BATCH,
) -> Iterator[DispatchBatch]:
    """Split items into batches of at most `batch_size` (never above 500)."""
    if not 1 <= batch_size <= MAX_DISPATCH_BATCH:
        raise ValueError(f"batch_size must be 1..{MAX_DISPATCH_BATCH}, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield DispatchBatch(
            post_id=post_id,
            author_id=author_id,
            provider=provider,
            created_at=created_at,
            lane=lane,
            items=tuple(items[start : start + batch_size]),
        )


def batch_head(post_id: str, author_id: str, provider: Provider, created_at: str) -> bytes:
    """The `dispatch_batch/v1` document up to its first item, as orjson writes it."""
    return (
        b'{"schema":"dispatch_batch/v1","post_id":'
        + orjson.dumps(post_id)
        + b',"author_id":'
        + orjson.dumps(author_id)
        + b',"provider":'
        + orjson.dumps(provider)
        + b',"created_at":'
        + orjson.dumps(created_at)
        + b',"items":['
    )


def encode_batches(
    post_id: str,
    author_id: str,
    created_at: str,
    provider: Provider,
    lane: str,
    fragments: FragmentArena | Sequence[bytes],
    devices: Sequence[int],
    batch_size: int = MAX_DISPATCH_BATCH,
) -> list[EncodedDispatchBatch]:
    """Batches of at most `batch_size` items joined from the devices' pre-encoded fragments.

    A fragment is an item after `{"notification_id":"<post_id>:` (see columns.device_fragment),
    so an item is that prefix and the fragment, and a batch one `join`: no object per item.
    """
    if not 1 <= batch_size <= MAX_DISPATCH_BATCH:
        raise ValueError(f"batch_size must be 1..{MAX_DISPATCH_BATCH}, got {batch_size}")
    if not len(devices):
        return []
    item_prefix = b'{"notification_id":"' + orjson.dumps(post_id)[1:-1] + b":"
    head = batch_head(post_id, author_id, provider, created_at) + item_prefix
    sep = b"," + item_prefix
    out = []
    for start in range(0, len(devices), batch_size):
        chunk = devices[start : start + batch_size]
        payload = (
            fragments.join(chunk, sep, head, b"]}")
            if isinstance(fragments, FragmentArena)
            else head + sep.join([fragments[d] for d in chunk]) + b"]}"
        )
        out.append(
            EncodedDispatchBatch(
                post_id, author_id, provider, created_at, lane, payload, len(chunk)
            )
        )
    return out


def merge_post_batches(
    batches: Sequence[DispatchBatch | EncodedDispatchBatch], max_items: int = MAX_DISPATCH_BATCH
) -> list[DispatchBatch | EncodedDispatchBatch]:
    """Join encoded batches of one post, provider and lane into as few as `max_items` allow.

    Each follower shard emits its own small batches of a post (a 200-follower post makes a few
    items per shard); joined, one post costs one message per provider topic instead of one per
    shard. Items keep their order; a joined batch takes its first part's place (the others only
    move earlier). Anything else (a batch with a message, one rebuilt without replayed items)
    passes unchanged: only encoded batches share the layout `encode_batches` writes.
    """
    if not 1 <= max_items <= MAX_DISPATCH_BATCH:
        raise ValueError(f"max_items must be 1..{MAX_DISPATCH_BATCH}, got {max_items}")
    slots: list[DispatchBatch | list[EncodedDispatchBatch]] = []
    open_by_key: dict[tuple[str, str, str, str, str], list[EncodedDispatchBatch]] = {}
    counts: dict[tuple[str, str, str, str, str], int] = {}
    for b in batches:
        if isinstance(b, DispatchBatch) or b.count >= max_items:
            slots.append(b if isinstance(b, DispatchBatch) else [b])
            continue
        key = (b.post_id, b.author_id, b.provider, b.created_at, b.lane)
        held = open_by_key.get(key)
        if held is None or counts[key] + b.count > max_items:
            held = open_by_key[key] = []
            counts[key] = 0
            slots.append(held)
        held.append(b)
        counts[key] += b.count
    return [s if isinstance(s, DispatchBatch) else _joined(s) for s in slots]


def _joined(parts: list[EncodedDispatchBatch]) -> EncodedDispatchBatch:
    first = parts[0]
    if len(parts) == 1:
        return first
    head = batch_head(first.post_id, first.author_id, first.provider, first.created_at)
    bodies = []
    for p in parts:
        if not (p.payload.startswith(head) and p.payload.endswith(b"]}")):
            raise ValueError(f"batch of {p.post_id} is not in the layout encode_batches writes")
        bodies.append(p.payload[len(head) : -2])
    return EncodedDispatchBatch(
        first.post_id,
        first.author_id,
        first.provider,
        first.created_at,
        first.lane,
        head + b",".join(bodies) + b"]}",
        sum(p.count for p in parts),
    )
