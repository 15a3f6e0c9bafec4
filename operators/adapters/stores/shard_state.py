"""Follower shards' checkpoints as files: one per shard, replaced whole, never torn.

`FileShardStateStore` implements `operators.fanout.ports.ShardStateStore`. A checkpoint file is

    b"FFSHARD1" | header length (4 bytes, little endian) | header (JSON) | arrays, 64-aligned

and the header names the arrays (dtype, length, where), the changelog positions the arrays
include, and the CRC-32 of the arrays. It is written to `shard-NNNNN.ckpt.tmp`, fsynced, renamed
over `shard-NNNNN.ckpt`, and the folder fsynced: a kill -9 at any moment leaves the previous
complete checkpoint or the new one, never a mix (a leftover `.tmp` is overwritten by the next
save). Saves run on a background thread, latest first: a shard's newer save replaces one not
started yet.

The changelog source starts each preference and device partition at `floor`: the lowest
position any shard's checkpoint holds for it, or the beginning when a shard has none (or one of
an older log). A checkpoint whose arrays fail their CRC is removed and the process stops with
an error: the restart finds no checkpoint for that shard and reads from the beginning.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING

from operators.fanout.columns import Columns
from operators.fanout.ports import Position, ShardStateStore

log = logging.getLogger(__name__)

MAGIC = b"FFSHARD1"
VERSION = 2
"""2: the users' channel addresses, category switches and locales are in it (`notify_book`).
A version-1 checkpoint's positions cover events whose addresses and switches it does not hold,
so it is not used: the shard reads its changelogs from the beginning, as with none."""
_ALIGN = 64

TopicId = Callable[[str], str | None]
"""A topic's current id (None when the broker does not say)."""


class CorruptCheckpoint(RuntimeError):
    """A checkpoint's arrays do not match their checksum (it was removed)."""


def checkpoint_path(folder: Path, shard_id: int) -> Path:
    """Where a shard's checkpoint lives."""
    return folder / f"shard-{shard_id:05d}.ckpt"


def write_checkpoint(
    path: Path, shard_id: int, columns: Columns, positions: Mapping[str, Position]
) -> int:
    """Write a checkpoint file atomically (temp file, fsync, rename, fsync folder); its size."""
    entries = []
    offset = 0
    crc = 0
    arrays = []
    for name, arr in columns.items():
        arr = np.ascontiguousarray(arr)
        data = arr.data.cast("B") if arr.nbytes else memoryview(b"")
        entries.append({"name": name, "dtype": arr.dtype.str, "length": len(arr), "offset": offset})
        crc = zlib.crc32(data, crc)
        arrays.append(data)
        offset += -(-arr.nbytes // _ALIGN) * _ALIGN
    header = json.dumps(
        {
            "v": VERSION,
            "shard": shard_id,
            "positions": {s: list(p) for s, p in positions.items()},
            "arrays": entries,
            "crc32": crc,
            "written_at": time.time(),
        }
    ).encode()
    head_len = len(MAGIC) + 4 + len(header)
    pad_head = -head_len % _ALIGN
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(MAGIC + len(header).to_bytes(4, "little") + header + b"\0" * pad_head)
        for data in arrays:
            f.write(data)
            f.write(b"\0" * (-len(data) % _ALIGN))
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return size


def read_header(path: Path) -> tuple[dict[str, Any], int] | None:
    """(header, where the arrays start) of a checkpoint file, or None when there is none."""
    try:
        with open(path, "rb") as f:
            start = f.read(len(MAGIC) + 4)
            if len(start) < len(MAGIC) + 4 or start[: len(MAGIC)] != MAGIC:
                return None
            n = int.from_bytes(start[len(MAGIC) :], "little")
            header: dict[str, Any] = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    if header.get("v") != VERSION:
        return None
    head_len = len(MAGIC) + 4 + n
    return header, head_len + (-head_len % _ALIGN)


def read_checkpoint(path: Path) -> tuple[dict[str, Any], Columns] | None:
    """A checkpoint's header and arrays; None when absent; CorruptCheckpoint on a bad CRC."""
    found = read_header(path)
    if found is None:
        return None
    header, body_at = found
    # Mapped, not read: the loaders copy every array into their own (growable) ones, so a
    # read would copy the whole file once more (2.3 GB at 10M users) for nothing. The views
    # are read-only; the mapping lives as long as they do, and a later save replaces the
    # file by rename, which leaves this mapping's pages as they were.
    try:
        raw = np.memmap(path, np.uint8, mode="r")
    except (OSError, ValueError):
        return None  # gone or emptied since its header was read: as if there were none
    columns: Columns = {}
    crc = 0
    for e in header["arrays"]:
        dtype = np.dtype(e["dtype"])
        start = body_at + e["offset"]
        nbytes = e["length"] * dtype.itemsize
        chunk = raw[start : start + nbytes]
        if len(chunk) != nbytes:
            raise CorruptCheckpoint(f"{path}: array {e['name']} is cut short")
        crc = zlib.crc32(chunk.data, crc)
        columns[e["name"]] = chunk.view(dtype)
    if crc != header["crc32"]:
        raise CorruptCheckpoint(f"{path}: the arrays do not match their checksum")
    return header, columns


class FileShardStateStore(ShardStateStore):
    """Checkpoints in a folder, one file per shard (see the module docstring)."""

    def __init__(self, folder: Path, shard_count: int, topic_id: TopicId) -> None:
        self.folder = Path(folder)
        self.shard_count = shard_count
        self._topic_id = topic_id
        self._ids: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[Columns, dict[str, Position]]] = {}
        self._writer = concurrent.futures.ThreadPoolExecutor(1, "fanfare-checkpoints")
        self._futures: list[concurrent.futures.Future[None]] = []
        self.errors: list[str] = []

    def current_id(self, topic: str) -> str | None:
        """The topic's id, asked once per process (the readers and the shards agree on it)."""
        with self._lock:
            if topic not in self._ids:
                self._ids[topic] = self._topic_id(topic)
            return self._ids[topic]

    def _valid_positions(self, header: Mapping[str, Any]) -> dict[str, Position] | None:
        positions: dict[str, Position] = {}
        for source, (log_id, offset) in header["positions"].items():
            topic = source.rpartition("/")[0]
            if log_id is None or log_id != self.current_id(topic):
                return None  # applied from a log that is gone (or unknown): start over
            positions[source] = (log_id, int(offset))
        return positions

    def floor(self, topic: str, partition: int) -> tuple[int, str | None]:
        """Where the changelog source starts a partition: every shard has applied before it."""
        current = self.current_id(topic)
        if current is None:
            return OFFSET_BEGINNING, None
        source = f"{topic}/{partition}"
        lowest: int | None = None
        for shard_id in range(self.shard_count):
            found = read_header(checkpoint_path(self.folder, shard_id))
            positions = None if found is None else self._valid_positions(found[0])
            if positions is None or source not in positions:
                return OFFSET_BEGINNING, current
            offset = positions[source][1]
            lowest = offset if lowest is None else min(lowest, offset)
        return (OFFSET_BEGINNING if lowest is None else lowest), current

    def load(self, shard_id: int) -> tuple[Columns, dict[str, Position]] | None:
        """The shard's checkpoint if its logs are the topics' logs now."""
        path = checkpoint_path(self.folder, shard_id)
        try:
            found = read_checkpoint(path)
        except CorruptCheckpoint:
            path.unlink(missing_ok=True)
            raise
        if found is None:
            return None
        header, columns = found
        positions = self._valid_positions(header)
        if positions is None:
            log.warning("%s: written from logs that no longer exist; not used", path)
            return None
        return columns, positions

    def busy(self) -> bool:
        """Whether a save is still being written (callers wait: each copy costs memory)."""
        with self._lock:
            return any(not f.done() for f in self._futures)

    def save(self, shard_id: int, columns: Columns, positions: dict[str, Position]) -> None:
        """Queue the write (latest wins for a shard whose previous save has not started)."""
        with self._lock:
            queued = shard_id in self._pending
            self._pending[shard_id] = (columns, positions)
            if queued:
                return
            self._futures = [f for f in self._futures if not f.done()]
            self._futures.append(self._writer.submit(self._write, shard_id))

    def _write(self, shard_id: int) -> None:
        with self._lock:
            columns, positions = self._pending.pop(shard_id)
        try:
            write_checkpoint(checkpoint_path(self.folder, shard_id), shard_id, columns, positions)
        except OSError as exc:  # the previous checkpoint stays; the next save tries again
            log.error("checkpoint of shard %d not written: %s", shard_id, exc)
            self.errors.append(str(exc))

    def flush(self) -> None:
        """Wait for the queued writes."""
        with self._lock:
            futures = list(self._futures)
        concurrent.futures.wait(futures)
