"""Keeps the segment index from the changelogs: read, decode, apply, then save positions.

Run by `fanfare api scheduler` beside its campaigns. A record that does not decode (the
fan-out dead-letters it with its reason) or that says nothing about locales and mobile
devices (a category switch, an email address) is skipped here, counted in `skipped`.
"""

from __future__ import annotations

from operators.notify.ports import ChangelogFeed, SegmentIndex
from operators.notify.segments import IndexUpdate, index_update
from schemas.codecs import InvalidEvent, decode_device_change, decode_preference_event
from schemas.topics import DEVICE_CHANGES, PREFERENCE_CHANGES

SEGMENT_TOPICS = (PREFERENCE_CHANGES, DEVICE_CHANGES)
"""The changelogs a segment is made from."""


def decode_index_event(topic: str, raw: bytes | None) -> IndexUpdate | None:
    """The index update of one changelog record (None: nothing to change, or malformed)."""
    try:
        if topic == PREFERENCE_CHANGES:
            return index_update(decode_preference_event(raw))
        if topic == DEVICE_CHANGES:
            return index_update(decode_device_change(raw))
    except InvalidEvent:
        return None
    return None


class SegmentIndexer:
    """One `step` reads a batch of the changelogs into the index."""

    def __init__(self, feed: ChangelogFeed, index: SegmentIndex, batch: int = 1_000) -> None:
        self._feed = feed
        self._index = index
        self._batch = batch
        self.applied = 0
        self.skipped = 0

    def step(self, timeout_s: float = 0.5) -> int:
        """Read up to a batch and apply it; how many records were read."""
        records = self._feed.poll(self._batch, timeout_s)
        if not records:
            return 0
        updates = []
        positions: dict[tuple[str, int], int] = {}
        for topic, partition, offset, raw in records:
            update = decode_index_event(topic, raw)
            if update is None:
                self.skipped += 1
            else:
                updates.append(update)
            positions[(topic, partition)] = max(positions.get((topic, partition), 0), offset + 1)
        self.applied += self._index.apply(updates)
        self._index.save_positions(positions)  # after the updates: a crash between replays them
        return len(records)
