"""Faster HPACK Huffman coding for `hpack` (which `h2`, hence aioapns and the local APNs, use).

Profiling the local APNs showed a third of its CPU in `hpack`'s pure-Python Huffman decoder,
which walks the input a nibble at a time: every request carries a ~200-byte provider token that
HTTP/2 clients never index (h2 sends `authorization` as never-indexed), so it is decoded again
on every request. `install()` swaps in a decoder driven by a byte-at-a-time state table (three
times faster) that also remembers long strings, plus an encoder that remembers long strings (the
client side encodes that same token on every request). The results are byte-for-byte those
of hpack's own coder; tests/unit/test_local_providers_parts.py checks that on random input.
The swap is process-wide and idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import hpack.hpack
import hpack.huffman
from hpack.exceptions import HPACKDecodingError
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

_EOS = 256
_MEMO_MIN = 96  # bytes; shorter strings (ids, paths) are unique per request: not worth a slot
_MEMO_MAX = 1024  # entries, cleared when full

# state * 256 + input byte -> (next state * 256, bytes emitted), or None where the input is bad
_Table = list[tuple[int, bytes] | None]


def _build() -> tuple[_Table, frozenset[int]]:
    """The Huffman tree as a DFA over whole bytes.

    States are the tree's internal nodes (0 is the root). A string may end only where the
    padding is a prefix of EOS (all ones) shorter than 8 bits: in a node reached from the root
    by at most seven 1-bits.
    """
    children: list[list[int]] = [[-1, -1]]  # >= 0: internal node; < 0: -(symbol + 1)
    for symbol, (code, length) in enumerate(zip(REQUEST_CODES, REQUEST_CODES_LENGTH, strict=True)):
        node = 0
        for shift in range(length - 1, -1, -1):
            bit = (code >> shift) & 1
            if shift == 0:
                children[node][bit] = -(symbol + 1)
            else:
                if children[node][bit] == -1:
                    children.append([-1, -1])
                    children[node][bit] = len(children) - 1
                node = children[node][bit]
    table: _Table = []
    for state in range(len(children)):
        for byte in range(256):
            node, out, bad = state, bytearray(), False
            for shift in range(7, -1, -1):
                child = children[node][(byte >> shift) & 1]
                if child >= 0:
                    node = child
                    continue
                symbol = -child - 1
                if symbol == _EOS:
                    bad = True
                    break
                out.append(symbol)
                node = 0
            table.append(None if bad else (node * 256, bytes(out)))
    accepting, node = {0}, 0
    for _ in range(7):
        node = children[node][1]
        accepting.add(node * 256)
    return table, frozenset(accepting)


def _make_decoder(table: _Table, accepting: frozenset[int]) -> Callable[..., bytes]:
    memo: dict[bytes, bytes] = {}

    def decode_huffman(huffman_string: bytes | bytearray | memoryview | None) -> bytes:
        if not huffman_string:
            return b""
        data = bytes(huffman_string)
        if len(data) >= _MEMO_MIN:
            hit = memo.get(data)
            if hit is not None:
                return hit
        state, out = 0, bytearray()
        for byte in data:
            entry = table[state + byte]
            if entry is None:
                raise HPACKDecodingError("Invalid Huffman string")
            state, emitted = entry
            out += emitted
        if state not in accepting:
            raise HPACKDecodingError("Invalid Huffman string")
        result = bytes(out)
        if len(data) >= _MEMO_MIN:
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            memo[data] = result
        return result

    decode_huffman.fanfare_speedup = True  # type: ignore[attr-defined]
    return decode_huffman


def _memo_encoder(
    encode: Callable[[hpack.huffman.HuffmanEncoder, bytes | None], bytes],
) -> Callable[[hpack.huffman.HuffmanEncoder, bytes | None], bytes]:
    memo: dict[bytes, bytes] = {}

    def memo_encode(self: hpack.huffman.HuffmanEncoder, bytes_to_encode: bytes | None) -> bytes:
        if not bytes_to_encode or len(bytes_to_encode) < _MEMO_MIN:
            return encode(self, bytes_to_encode)
        key = bytes(bytes_to_encode)
        hit = memo.get(key)
        if hit is None:
            hit = encode(self, key)
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            memo[key] = hit
        return hit

    memo_encode.fanfare_speedup = True  # type: ignore[attr-defined]
    return memo_encode


class _Quiet(logging.Logger):
    """hpack logs at DEBUG several times per header; even disabled, that is a call each."""

    def debug(self, *args: object, **kwargs: object) -> None:
        """Drop it."""


def fast_decode_huffman() -> Callable[..., bytes]:
    """A standalone instance of the fast decoder (for comparison with hpack's)."""
    return _make_decoder(*_build())


def install() -> None:
    """Swap the faster coders into hpack for this whole process (once)."""
    module: Any = hpack.hpack  # the decoder calls its module-level name, so replace that
    if getattr(module.decode_huffman, "fanfare_speedup", False):
        return
    module.decode_huffman = fast_decode_huffman()
    module.log = _Quiet("hpack.hpack")
    encoder: Any = hpack.huffman.HuffmanEncoder
    encoder.encode = _memo_encoder(encoder.encode)
