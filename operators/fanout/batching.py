"""Dispatch batches: at most 500 items of one post for one provider and lane."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from schemas.records import DispatchBatch, DispatchItem, Provider
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
