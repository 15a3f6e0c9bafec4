"""Dispatch batches: at most 500 items of one post for one provider and lane."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import orjson

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
    fragments: Sequence[bytes],
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
        picked = [fragments[d] for d in chunk]
        out.append(
            EncodedDispatchBatch(
                post_id,
                author_id,
                provider,
                created_at,
                lane,
                head + sep.join(picked) + b"]}",
                len(picked),
            )
        )
    return out
