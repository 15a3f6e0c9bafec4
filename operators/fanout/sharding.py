"""Which follower shard a user belongs to.

Users are bucketed into a fixed number of shards by a stable hash of their id. The follower store
keys edges by (author_id, shard_id) of the *follower*, and the fan-out keeps each shard's
preferences and devices in one keyed state, so expanding a shard joins locally.
"""

from __future__ import annotations

from zlib import crc32


def shard_of(user_id: str, shard_count: int) -> int:
    """Stable shard of a user (crc32; Python's hash() differs between processes)."""
    return crc32(user_id.encode("utf-8")) % shard_count


def shard_key(shard_id: int) -> str:
    """The Bytewax state key of a shard; part of the saved state, so never reformat it."""
    return f"shard-{shard_id:05d}"


def all_shard_keys(shard_count: int) -> list[str]:
    """Every shard's key, in shard order."""
    return [shard_key(s) for s in range(shard_count)]
