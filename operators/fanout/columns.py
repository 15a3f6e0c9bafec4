"""One shard's users in columns: preferences and devices as arrays, not an object per user.

A row per user (append-only: a row is never reused, so a cached follower column of rows stays
valid), found from the user id through a sorted index of a stable hash of the id (`index_key`),
which a checkpoint saves so a restart need not hash every user again. Per row: push flag,
quiet hours start and end (-1: none), a time-zone index (resolved against `ZoneHours`' table of
local hours now) and the head of the user's device list. Per device: its owner, the next device of
the same owner, the provider, and the device's pre-encoded JSON fragment (in one bytes arena,
`FragmentArena`; the checkpoint's layout of it is unchanged): everything a
dispatch item holds but the post, so a dispatch batch is a join of fragments
(`operators.fanout.batching.encode_batches`).

The tokens are kept as the text the device registered (inside the fragment) rather than as raw
bytes: the fragment is what the hot path needs, and APNs documents device tokens as variable
length, so every token `device_changes` admits fits.

Changelog events update the columns in place; `to_columns` / `from_columns` give the arrays a
checkpoint writes and reads (`operators.fanout.checkpoint`).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import orjson

from operators.fanout.quiet_hours import quiet_until, zone
from schemas.records import DeviceChange, PreferenceChange, Provider

I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
Columns = dict[str, npt.NDArray[np.generic]]

PROVIDERS: tuple[Provider, Provider] = ("apns", "fcm")
_PROVIDER_CODE = {"apns": 0, "fcm": 1}
NO_HOUR = -1
_USER_KEYS = b'","user_id":"'
_DEVICE_KEYS = b'","device_id":"'
_TOKEN_KEYS = b'","token":"'
_FILLS = {"push": 1, "q_start": NO_HOUR, "q_end": NO_HOUR, "tz": 0, "dev_head": -1, "dev_next": -1}
_MERGE_MIN = 4_096  # index entries added before they are merged into the sorted arrays
INDEX_HASH = 1
"""Which `index_key` function a checkpoint's saved index was built with (change both together:
a checkpoint with another number has its index rebuilt, not trusted)."""


def index_key(encoded_id: bytes) -> int:
    """A user id's 64-bit index key, the same in every process (Python's str hash is not).

    CRC-32 alone carries little within a shard (`shard_of` is the CRC-32 modulo the shard
    count), so Adler-32 fills the low half; equal keys are told apart by the ids themselves.
    """
    return (zlib.crc32(encoded_id) << 32) | zlib.adler32(encoded_id)


def _crc_table() -> npt.NDArray[np.uint32]:
    """The CRC-32 byte table of `zlib.crc32` (reflected polynomial 0xEDB88320)."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0xEDB88320), table >> 1)
    return table.astype(np.uint32)


_CRC_TABLE = _crc_table()
_ADLER_MOD = 65_521
_VECTOR_ID_BYTES = 64  # longer ids are hashed one at a time (few; keeps the byte loop short)
_CHUNK = 65_536  # ids mapped to rows at once (bounds the temporary arrays of a big column)


@dataclass(frozen=True, slots=True)
class PackedIds:
    """User ids as one UTF-8 blob (id i is `blob[ends[i - 1]:ends[i]]`), a flags byte per id.

    How a follower column comes from the store: no Python object per follower.
    """

    blob: bytes
    ends: I64
    flags: U8

    def __len__(self) -> int:
        return len(self.ends)

    @classmethod
    def of(cls, ids: Sequence[str], flags: Sequence[int]) -> PackedIds:
        """Pack ids given one by one."""
        encoded = [u.encode() for u in ids]
        lens = np.fromiter(map(len, encoded), np.int64, len(encoded))
        return cls(b"".join(encoded), np.cumsum(lens), np.array(flags, np.uint8))

    @classmethod
    def join(cls, parts: Sequence[PackedIds]) -> PackedIds:
        """One run of ids from consecutive runs."""
        if len(parts) == 1:
            return parts[0]
        ends, offset = [], 0
        for p in parts:
            ends.append(p.ends + offset)
            offset += len(p.blob)
        return cls(
            b"".join(p.blob for p in parts),
            np.concatenate(ends) if ends else np.zeros(0, np.int64),
            np.concatenate([p.flags for p in parts]) if parts else np.zeros(0, np.uint8),
        )

    def starts(self) -> I64:
        """Where each id starts in `blob`."""
        starts = np.zeros(len(self.ends), np.int64)
        starts[1:] = self.ends[:-1]
        return starts

    def ids(self) -> list[str]:
        """The ids as strings (tests, small reads)."""
        blob = self.blob
        return [
            blob[a:b].decode()
            for a, b in zip(self.starts().tolist(), self.ends.tolist(), strict=True)
        ]


def index_keys(data: U8, starts: I64, ends: I64) -> npt.NDArray[np.uint64]:
    """`index_key` of every id `data[starts[i]:ends[i]]`, vectorised over the ids.

    CRC-32 and Adler-32 both walk an id byte by byte, so the loop runs over byte positions
    (longest ids first: those still going at position j are a prefix) and each step is one
    array operation over the ids that long. The few ids longer than `_VECTOR_ID_BYTES` are
    hashed one at a time.
    """
    n = len(starts)
    lens = ends - starts
    keys = np.empty(n, np.uint64)
    long = lens > _VECTOR_ID_BYTES
    if long.any():
        for i in np.flatnonzero(long).tolist():
            keys[i] = index_key(data[starts[i] : ends[i]].tobytes())
    short = np.flatnonzero(~long)
    order = short[np.argsort(-lens[short], kind="stable")]
    first, size = starts[order], lens[order]
    m = len(order)
    crc = np.full(m, 0xFFFFFFFF, np.uint32)
    a = np.ones(m, np.int64)
    b = np.zeros(m, np.int64)
    going = m
    neg = -size  # ascending
    for j in range(int(size[0]) if m else 0):
        going = int(np.searchsorted(neg, -j, side="left"))  # ids longer than j
        byte = data[first[:going] + j]
        c = crc[:going]
        crc[:going] = _CRC_TABLE[(c ^ byte) & 0xFF] ^ (c >> 8)
        a[:going] += byte
        b[:going] += (size[:going] - j) * byte
    crc ^= np.uint32(0xFFFFFFFF)
    adler = ((b + size) % _ADLER_MOD) << 16 | (a % _ADLER_MOD)
    keys[order] = (crc.astype(np.uint64) << np.uint64(32)) | adler.astype(np.uint64)
    return keys


def json_text(value: str) -> bytes:
    """A string's JSON form without its quotes, exactly as orjson writes it inside a document."""
    return orjson.dumps(value)[1:-1]


def device_fragment(user_id: str, device_id: str, token: str) -> bytes:
    """A dispatch item after `{"notification_id":"<post_id>:` (see batching.encode_batches)."""
    uid = json_text(user_id)
    return (
        b"".join(
            (
                uid,
                _USER_KEYS,
                uid,
                _DEVICE_KEYS,
                json_text(device_id),
                _TOKEN_KEYS,
                json_text(token),
            )
        )
        + b'"}'
    )


def _fragment_prefix(user_id: str, device_id: str) -> bytes:
    uid = json_text(user_id)
    return b"".join((uid, _USER_KEYS, uid, _DEVICE_KEYS, json_text(device_id), _TOKEN_KEYS))


class _Growable:
    """A 1-d numpy array with spare capacity (amortised O(1) appends), spare slots `fill`."""

    __slots__ = ("a", "fill", "n")

    def __init__(
        self,
        dtype: type[np.generic],
        data: npt.NDArray[np.generic] | None = None,
        fill: int = 0,
    ):
        self.fill = fill
        # A copy: a checkpoint's arrays are views into the file it was read from.
        self.a: npt.NDArray[np.generic] = (
            np.full(16, fill, dtype) if data is None else np.array(data, dtype, copy=True)
        )
        self.n = 0 if data is None else len(data)

    def append(self, value: int) -> None:
        if self.n == len(self.a):
            self._grow(self.n + 1)
        self.a[self.n] = value
        self.n += 1

    def add_default(self) -> None:
        """Append one `fill` value (the spare slots already hold it)."""
        if self.n == len(self.a):
            self._grow(self.n + 1)
        self.n += 1

    def _grow(self, need: int) -> None:
        bigger = np.full(max(need, len(self.a) + len(self.a) // 2, 16), self.fill, self.a.dtype)
        bigger[: self.n] = self.a[: self.n]
        self.a = bigger

    def view(self) -> npt.NDArray[np.generic]:
        return self.a[: self.n]

    def trim(self) -> None:
        self.a = self.a[: self.n].copy()


class FragmentArena:
    """Every device slot's pre-encoded fragment in one bytearray: a start and a length per slot.

    A bytes object per device carried about 41 bytes of overhead (object header and list slot)
    beside a fragment of ~100-200; here a slot costs 12 bytes. A replaced or removed fragment
    leaves its bytes behind until more than half the arena is such garbage, then it is packed.
    """

    __slots__ = ("_arena", "_len", "_start", "garbage")

    def __init__(self, blob: bytes = b"", lens: npt.NDArray[np.generic] | None = None) -> None:
        self._arena = bytearray(blob)
        lengths: I64 = np.zeros(0, np.int64) if lens is None else np.asarray(lens, np.int64)
        ends = np.cumsum(lengths)
        n = len(lengths)
        self._start = _Growable(np.int64, ends - lengths if n else None)
        self._len = _Growable(np.uint32, lengths if n else None)
        self.garbage = len(self._arena) - (int(ends[-1]) if n else 0)

    def __len__(self) -> int:
        return self._len.n

    def __getitem__(self, d: int) -> bytes:
        start = int(self._start.a[d])
        return bytes(self._arena[start : start + int(self._len.a[d])])

    def __setitem__(self, d: int, frag: bytes) -> None:
        self.garbage += int(self._len.a[d])
        self._start.a[d] = len(self._arena)
        self._len.a[d] = len(frag)
        self._arena += frag
        if self.garbage > max(1 << 20, len(self._arena) // 2):
            self.pack()

    def append(self, frag: bytes) -> None:
        """A new slot holding `frag`."""
        self._start.append(len(self._arena))
        self._len.append(len(frag))
        self._arena += frag

    def starts_with(self, d: int, prefix: bytes) -> bool:
        """Whether slot d's fragment begins with `prefix` (no copy of the rest)."""
        start = int(self._start.a[d])
        return int(self._len.a[d]) >= len(prefix) and self._arena.startswith(prefix, start)

    def pick(self, devices: Sequence[int]) -> list[bytearray]:
        """The fragments of these slots, in order (what a batch's `join` takes)."""
        idx = np.asarray(devices, np.int64)
        starts: I64 = self._start.a[idx].astype(np.int64)
        ends = starts + self._len.a[idx].astype(np.int64)
        arena = self._arena
        return [arena[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]

    def join(self, devices: Sequence[int], sep: bytes, head: bytes, tail: bytes) -> bytes:
        """`head + sep.join(fragments of these slots) + tail`, copied once.

        The fragments are views of the arena, not a copy each (the join copies them anyway);
        every view is gone before this returns, so the arena can grow again.
        """
        idx = np.asarray(devices, np.int64)
        if not len(idx):
            return head + tail
        starts: I64 = self._start.a[idx].astype(np.int64)
        ends = starts + self._len.a[idx].astype(np.int64)
        view = memoryview(self._arena)
        try:
            parts: list[bytes | memoryview] = [
                view[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)
            ]
            # Head and tail ride on the first and last fragment: the join is the only big copy.
            if len(parts) == 1:
                return head + parts[0] + tail
            parts[0] = head + parts[0]
            parts[-1] = bytes(parts[-1]) + tail
            return sep.join(parts)
        finally:
            parts = []
            view.release()

    def lens(self) -> npt.NDArray[np.int64]:
        """Each slot's length (a copy)."""
        return self._len.view().astype(np.int64)

    def blob(self) -> bytes:
        """Every slot's fragment, in slot order, no garbage."""
        n = len(self)
        if not n:
            return b""
        starts = self._start.view().astype(np.int64)
        ends = starts + self._len.view().astype(np.int64)
        # Slots appended one after another (a load, a packed arena) lie back to back: a run of
        # them is one slice, so a checkpoint copies a few runs, not an object per device.
        breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1
        firsts = np.concatenate(([0], breaks))
        lasts = np.concatenate((breaks, [n])) - 1
        view = memoryview(self._arena)
        try:
            return b"".join(
                [
                    view[a:b]
                    for a, b in zip(starts[firsts].tolist(), ends[lasts].tolist(), strict=True)
                ]
            )
        finally:
            view.release()

    def pack(self) -> None:
        """Drop the garbage and any spare capacity."""
        lens = self.lens()
        packed = FragmentArena(self.blob(), lens)
        self._arena, self._start, self._len = packed._arena, packed._start, packed._len
        self.garbage = 0


class UserTable:
    """The users of one follower shard, their preferences and devices, in columns."""

    def __init__(self) -> None:
        # users
        # Row r's id is uid_arena[start[r]:start[r + 1]] (a shard's ids stay far below 4 GB).
        self._uid_start = _Growable(np.uint32, np.zeros(1, np.uint32))
        self._uid_arena = bytearray()
        self._push = _Growable(np.uint8, fill=1)
        self._q_start = _Growable(np.int8, fill=NO_HOUR)
        self._q_end = _Growable(np.int8, fill=NO_HOUR)
        self._tz = _Growable(np.uint16)
        self._dev_head = _Growable(np.int32, fill=-1)
        # devices
        self._dev_owner = _Growable(np.int32)
        self._dev_next = _Growable(np.int32, fill=-1)
        self._dev_provider = _Growable(np.uint8)
        self.fragments = FragmentArena()
        self._free_devices: list[int] = []
        # index: sorted (hash, row) plus recent additions not merged yet
        self._keys: npt.NDArray[np.uint64] = np.zeros(0, np.uint64)
        self._key_rows: I32 = np.zeros(0, np.int32)
        self._recent: dict[int, list[int]] = {}
        # time zones
        self.zones: list[str] = ["UTC"]
        self._zone_index: dict[str, int] = {"UTC": 0}

    # ---- rows ---------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """How many user rows exist."""
        return self._push.n

    def uid(self, row: int) -> str:
        """The user id of a row."""
        s = self._uid_start.a
        return self._uid_arena[int(s[row]) : int(s[row + 1])].decode()

    def row_of(self, user_id: str) -> int:
        """The user's row, or -1 when the shard has never seen the user."""
        return self._row_of(user_id.encode())

    def _row_of(self, encoded: bytes) -> int:
        h = index_key(encoded)
        start, arena = self._uid_start.a, self._uid_arena
        recent = self._recent.get(h)
        if recent is not None:
            for row in recent:
                if arena[start.item(row) : start.item(row + 1)] == encoded:
                    return row
        keys = self._keys
        i = int(keys.searchsorted(np.uint64(h)))
        n = len(keys)
        if i < n and keys.item(i) == h:
            key_rows = self._key_rows
            while i < n and keys.item(i) == h:
                row = key_rows.item(i)
                if arena[start.item(row) : start.item(row + 1)] == encoded:
                    return int(row)
                i += 1
        return -1

    def ensure_row(self, user_id: str) -> int:
        """The user's row, created (defaults, no device) when new."""
        return self._row_or_new(user_id.encode())

    def _row_or_new(self, encoded: bytes) -> int:
        row = self._row_of(encoded)
        return row if row >= 0 else self._add_row(encoded)

    def rows_of(self, user_ids: Sequence[str]) -> I32:
        """Rows of many users at once (created when new), in the same order."""
        out = np.empty(len(user_ids), np.int32)
        if not len(user_ids):
            return out
        encoded = [u.encode() for u in user_ids]
        hashes = np.fromiter(map(index_key, encoded), np.uint64, len(encoded))
        keys = self._keys
        pos = np.searchsorted(keys, hashes)
        pos_c = np.minimum(pos, max(len(keys) - 1, 0))
        hit = (keys[pos_c] == hashes) if len(keys) else np.zeros(len(user_ids), np.bool_)
        cand = self._key_rows[pos_c] if len(keys) else np.zeros(len(user_ids), np.int32)
        start = self._uid_start.a
        arena = self._uid_arena
        hit_l = hit.tolist()
        cand_l = cand.tolist()
        for i, enc in enumerate(encoded):
            if hit_l[i]:
                row = cand_l[i]
                if arena[int(start[row]) : int(start[row + 1])] == enc:
                    out[i] = row
                    continue
            out[i] = self._row_or_new(enc)
        return out

    def rows_of_packed(self, ids: PackedIds) -> I32:
        """`rows_of` for packed ids: hashed, looked up and compared as arrays, not one by one.

        Only ids the sorted index does not answer at its first entry for their key (new users,
        users added since the last index merge, key collisions) take `rows_of`' path, in order,
        so new users get the same rows as there.
        """
        n = len(ids)
        out = np.full(n, -1, np.int32)
        data = np.frombuffer(ids.blob, np.uint8)
        starts, ends = ids.starts(), ids.ends
        for lo in range(0, n, _CHUNK):
            hi = min(n, lo + _CHUNK)
            out[lo:hi] = self._indexed_rows(data, starts[lo:hi], ends[lo:hi])
        blob, start_l, end_l = ids.blob, starts.tolist(), ends.tolist()
        for i in np.flatnonzero(out < 0).tolist():
            out[i] = self._row_or_new(blob[start_l[i] : end_l[i]])
        return out

    def _indexed_rows(self, data: U8, starts: I64, ends: I64) -> I32:
        """Rows of these ids found at the first index entry of their key, else -1."""
        out = np.full(len(starts), -1, np.int32)
        keys = self._keys
        if not len(keys) or not len(starts):
            return out
        hashes = index_keys(data, starts, ends)
        # Sorted needles: numpy's binary search starts from the previous answer (3x faster).
        order = np.argsort(hashes)
        pos = np.empty(len(hashes), np.int64)
        pos[order] = np.minimum(np.searchsorted(keys, hashes[order]), len(keys) - 1)
        found = np.flatnonzero(keys[pos] == hashes)
        rows = self._key_rows[pos[found]].astype(np.int64)
        # The same key is not the same id: compare the bytes, all of them at once.
        uid_start = self._uid_start.a
        r_start = uid_start[rows].astype(np.int64)
        size = uid_start[rows + 1].astype(np.int64) - r_start
        p_start = starts[found]
        same = size == ends[found] - p_start
        sel = np.flatnonzero(same)
        lens = size[sel]
        total = int(lens.sum())
        if total:
            seg = np.repeat(np.arange(len(sel)), lens)
            offset = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
            arena = np.frombuffer(self._uid_arena, np.uint8)
            theirs = arena[np.repeat(r_start[sel], lens) + offset]
            del arena  # a view pins the bytearray's size; rows are added after this
            mine = data[np.repeat(p_start[sel], lens) + offset]
            differs = np.bincount(seg, theirs != mine, len(sel)) > 0
            same[sel[differs]] = False
        out[found[same]] = rows[same]
        return out

    def id_digest(self, rows: int) -> int:
        """CRC-32 of the first `rows` rows' ids.

        Equal for two tables that start with the same users in the same rows (state kept by
        row, such as frequency caps, checks it).
        """
        starts = self._uid_start.a[: rows + 1]
        arena = memoryview(self._uid_arena)[: int(starts[-1])]
        return zlib.crc32(arena, zlib.crc32(starts.tobytes()))

    def _add_row(self, encoded: bytes) -> int:
        row = self.rows
        self._uid_arena += encoded
        self._uid_start.append(len(self._uid_arena))
        for column in (self._push, self._q_start, self._q_end, self._tz, self._dev_head):
            column.add_default()
        self._recent.setdefault(index_key(encoded), []).append(row)
        if len(self._recent) >= max(_MERGE_MIN, len(self._keys) // 4):
            self._merge_index()
        return row

    def _merge_index(self) -> None:
        added = [(h, r) for h, rows in self._recent.items() for r in rows]
        keys = np.concatenate(
            [self._keys, np.fromiter((h for h, _ in added), np.uint64, len(added))]
        )
        rows = np.concatenate(
            [self._key_rows, np.fromiter((r for _, r in added), np.int32, len(added))]
        )
        order = np.argsort(keys, kind="stable")
        self._keys, self._key_rows = keys[order], rows[order]
        self._recent = {}

    # ---- changelogs ---------------------------------------------------------------------------

    def apply_preference(self, change: PreferenceChange) -> None:
        """Replace the user's preferences (a record is complete, not a patch)."""
        row = self.ensure_row(change.user_id)
        self._push.a[row] = 1 if change.push_enabled else 0
        start, end = change.quiet_hours_start, change.quiet_hours_end
        if start is None or end is None or start == end:
            self._q_start.a[row] = self._q_end.a[row] = NO_HOUR
            self._tz.a[row] = 0
        else:
            self._q_start.a[row] = start
            self._q_end.a[row] = end
            self._tz.a[row] = self.zone_index(change.timezone)

    def zone_index(self, name: str) -> int:
        """The index of a time zone in `zones` (added when new)."""
        i = self._zone_index.get(name)
        if i is None:
            i = self._zone_index[name] = len(self.zones)
            self.zones.append(name)
        return i

    def apply_device(self, change: DeviceChange) -> None:
        """Register, refresh (to the end of the user's list) or deactivate one device."""
        row = self.ensure_row(change.user_id)
        prefix = _fragment_prefix(change.user_id, change.device_id)
        self._remove_device(row, prefix)
        if change.active and change.token:
            frag = prefix + json_text(change.token) + b'"}'
            self._add_device(row, _PROVIDER_CODE[change.provider], frag)

    def _remove_device(self, row: int, prefix: bytes) -> None:
        nxt, frags = self._dev_next.a, self.fragments
        prev, d = -1, int(self._dev_head.a[row])
        while d >= 0:
            if frags.starts_with(d, prefix):
                after = int(nxt[d])
                if prev < 0:
                    self._dev_head.a[row] = after
                else:
                    nxt[prev] = after
                frags[d] = b""
                self._dev_owner.a[d] = -1
                self._free_devices.append(d)
                return
            prev, d = d, int(nxt[d])

    def _add_device(self, row: int, provider: int, frag: bytes) -> None:
        if self._free_devices:
            d = self._free_devices.pop()
            self._dev_owner.a[d] = row
            self._dev_next.a[d] = -1
            self._dev_provider.a[d] = provider
            self.fragments[d] = frag
        else:
            d = self._dev_owner.n
            self._dev_owner.append(row)
            self._dev_next.add_default()
            self._dev_provider.append(provider)
            self.fragments.append(frag)
        # Append at the end of the user's list (a user has a handful of devices).
        last = int(self._dev_head.a[row])
        if last < 0:
            self._dev_head.a[row] = d
            return
        nxt = self._dev_next.a
        while nxt[last] >= 0:
            last = int(nxt[last])
        nxt[last] = d

    # ---- what decisions read ----------------------------------------------------------------

    @property
    def push(self) -> U8:
        """1 where push is enabled (the default), per row."""
        return self._push.a  # type: ignore[return-value]

    @property
    def quiet_start(self) -> npt.NDArray[np.int8]:
        """Quiet hours' first local hour per row (-1: none)."""
        return self._q_start.a  # type: ignore[return-value]

    @property
    def quiet_end(self) -> npt.NDArray[np.int8]:
        """Quiet hours' end (exclusive) per row (-1: none)."""
        return self._q_end.a  # type: ignore[return-value]

    @property
    def tz(self) -> npt.NDArray[np.uint16]:
        """Index into `zones` per row (meaningful only with quiet hours)."""
        return self._tz.a  # type: ignore[return-value]

    @property
    def dev_head(self) -> I32:
        """First device per row (-1: none)."""
        return self._dev_head.a  # type: ignore[return-value]

    @property
    def dev_next(self) -> I32:
        """Next device of the same user per device (-1: last)."""
        return self._dev_next.a  # type: ignore[return-value]

    @property
    def dev_provider(self) -> U8:
        """0 for APNs, 1 for FCM, per device."""
        return self._dev_provider.a  # type: ignore[return-value]

    def devices_of_rows(self, rows: I32) -> tuple[I32, I32]:
        """(devices, how many of `rows` have none): every device of the rows, vectorised."""
        heads = self.dev_head[rows]
        has = heads >= 0
        cur = heads[has]
        out = [cur]
        nxt = self.dev_next
        while len(cur):
            cur = nxt[cur]
            cur = cur[cur >= 0]
            if len(cur):
                out.append(cur)
        devices = out[0] if len(out) == 1 else np.concatenate(out)
        return devices.astype(np.int32, copy=False), np.int32(len(rows) - int(has.sum()))  # type: ignore[return-value]

    # ---- inspection (tests, state comparisons) ------------------------------------------------

    def record(self, user_id: str) -> tuple[tuple[bool, int | None, int | None, str], list[bytes]]:
        """(push, quiet start, quiet end, zone or "" without quiet hours) and device fragments."""
        row = self.row_of(user_id)
        if row < 0:
            return (True, None, None, ""), []
        return self._row_record(row)

    def _row_record(self, row: int) -> tuple[tuple[bool, int | None, int | None, str], list[bytes]]:
        qs, qe = int(self.quiet_start[row]), int(self.quiet_end[row])
        prefs = (
            bool(self.push[row]),
            None if qs < 0 else qs,
            None if qe < 0 else qe,
            "" if qs < 0 else self.zones[int(self.tz[row])],
        )
        frags, d = [], int(self.dev_head[row])
        while d >= 0:
            frags.append(self.fragments[d])
            d = int(self.dev_next[d])
        return prefs, frags

    def state(self) -> dict[str, tuple[tuple[bool, int | None, int | None, str], list[bytes]]]:
        """Every user with something to remember, by id (row numbers left out)."""
        out = {}
        for row in range(self.rows):
            rec = self._row_record(row)
            if rec != ((True, None, None, ""), []):
                out[self.uid(row)] = rec
        return out

    # ---- checkpoints --------------------------------------------------------------------------

    def to_columns(self) -> Columns:
        """The table as arrays (a copy that later changes do not touch)."""
        frag_lens = self.fragments.lens()
        if self._recent:
            self._merge_index()
        return {
            # Never changed in place (a merge makes new arrays), so no copy is needed.
            "index_keys": self._keys,
            "index_rows": self._key_rows,
            "index_hash": np.array([INDEX_HASH], np.uint8),
            "uid_start": self._uid_start.view().copy(),
            "uid_arena": np.frombuffer(bytes(self._uid_arena), np.uint8),
            "push": self._push.view().copy(),
            "q_start": self._q_start.view().copy(),
            "q_end": self._q_end.view().copy(),
            "tz": self._tz.view().copy(),
            "dev_head": self._dev_head.view().copy(),
            "dev_owner": self._dev_owner.view().copy(),
            "dev_next": self._dev_next.view().copy(),
            "dev_provider": self._dev_provider.view().copy(),
            "frag_lens": frag_lens,
            "frag_arena": np.frombuffer(self.fragments.blob(), np.uint8),
            "zones": np.frombuffer("\n".join(self.zones).encode(), np.uint8),
        }

    @classmethod
    def from_columns(cls, cols: Columns) -> UserTable:
        """A table from `to_columns`' arrays."""
        t = cls()
        t._uid_start = _Growable(np.uint32, cols["uid_start"])
        t._uid_arena = bytearray(cols["uid_arena"].tobytes())
        for name in (*_FILLS, "dev_owner", "dev_provider"):
            setattr(
                t, f"_{name}", _Growable(cols[name].dtype.type, cols[name], _FILLS.get(name, 0))
            )
        t.fragments = FragmentArena(cols["frag_arena"].tobytes(), cols["frag_lens"])
        owners: I32 = t._dev_owner.view()  # type: ignore[assignment]
        t._free_devices = np.flatnonzero(owners < 0).tolist()
        t.zones = cols["zones"].tobytes().decode().split("\n")
        t._zone_index = {z: i for i, z in enumerate(t.zones)}
        saved = cols.get("index_hash")
        if (
            saved is not None
            and saved.tolist() == [INDEX_HASH]
            and len(cols["index_keys"]) == len(cols["index_rows"]) == t.rows
        ):
            # Copies: a checkpoint's arrays are views that would keep the whole file alive.
            t._keys = np.array(cols["index_keys"], np.uint64, copy=True)
            t._key_rows = np.array(cols["index_rows"], np.int32, copy=True)
        else:  # a checkpoint from before the index was saved, or of another hash
            t._rebuild_index()
        return t

    def _rebuild_index(self) -> None:
        n = self.rows
        start = self._uid_start.a.tolist()
        arena = bytes(self._uid_arena)
        keys = np.fromiter(
            (index_key(arena[start[r] : start[r + 1]]) for r in range(n)), np.uint64, n
        )
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._key_rows = order.astype(np.int32)
        self._recent = {}

    def compact(self) -> None:
        """Pack the table after a bulk load (index merged, no spare capacity, fragments copied).

        A load from the changelogs allocates each fragment between millions of short-lived
        objects (decoded events), whose freed memory the allocator cannot return while one
        fragment still lives among it; copying the fragments all at once frees those pages.
        """
        if self._recent:
            self._merge_index()
        for g in (
            self._uid_start,
            self._push,
            self._q_start,
            self._q_end,
            self._tz,
            self._dev_head,
            self._dev_owner,
            self._dev_next,
            self._dev_provider,
        ):
            g.trim()
        self._uid_arena = bytearray(bytes(self._uid_arena))
        self.fragments.pack()


class ZoneHours:
    """Local hour now per time zone (DST-aware via zoneinfo), recomputed when it may change.

    Offsets are whole quarter hours in every zone in use today, so a local hour can only change
    at a UTC quarter hour; the table is also recomputed when zones are added or the clock moves
    back (tests drive time).
    """

    def __init__(self) -> None:
        self._hours: npt.NDArray[np.int8] = np.zeros(0, np.int8)
        self._from = self._until = 0.0

    def hours(self, zones: Sequence[str], now: datetime) -> npt.NDArray[np.int8]:
        """Local hour at `now` in each zone, indexed like `zones`."""
        ts = now.timestamp()
        if len(self._hours) != len(zones) or not self._from <= ts < self._until:
            self._hours = np.fromiter(
                (now.astimezone(zone(z)).hour for z in zones), np.int8, len(zones)
            )
            quarter = 900.0
            self._from = ts
            self._until = (ts // quarter + 1) * quarter
        return self._hours


@functools.lru_cache(maxsize=4096)
def _release_ts(now_ts: float, start: int, end: int, zone_name: str) -> float:
    until = quiet_until(datetime.fromtimestamp(now_ts, UTC), start, end, zone_name)
    return 0.0 if until is None else until.timestamp()


def release_times(table: UserTable, rows: I32, now: datetime) -> npt.NDArray[np.float64]:
    """When each row's quiet window (which `now` falls in) ends, epoch seconds."""
    qs = table.quiet_start[rows].astype(np.int64)
    qe = table.quiet_end[rows].astype(np.int64)
    tz = table.tz[rows].astype(np.int64)
    combo = (qs * 24 + qe) * 65_536 + tz
    uniq, inverse = np.unique(combo, return_inverse=True)
    ts = now.timestamp()
    out = np.empty(len(uniq), np.float64)
    for i, c in enumerate(uniq.tolist()):
        z = c % 65_536
        s, e = divmod(c // 65_536, 24)
        out[i] = _release_ts(ts, s, e, table.zones[z])
    released: npt.NDArray[np.float64] = out[inverse.reshape(-1)]
    return released


def quiet_mask(table: UserTable, rows: I32, hours: npt.NDArray[np.int8]) -> npt.NDArray[np.bool_]:
    """Whether each row is inside its quiet hours now ([start, end), wrapping midnight)."""
    qs = table.quiet_start[rows]
    qe = table.quiet_end[rows]
    h = hours[table.tz[rows]]
    plain = (qs <= h) & (h < qe)
    wrapped = (h >= qs) | (h < qe)
    quiet: npt.NDArray[np.bool_] = (qs >= 0) & (qs != qe) & np.where(qs < qe, plain, wrapped)
    return quiet
