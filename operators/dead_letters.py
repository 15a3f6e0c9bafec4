"""`decode_or_dead_letter`: decode what an input read, with bad input as a branch of the graph.

Every flow starts the same way: a decoder turns each message into what the next step takes, or
into a `DeadLetter` that says why it could not. This composite operator runs the decoder and
splits its output, so the dead letters are a stream of their own that the flow wires to its
dead-letter sink (the shape of Bytewax's own `KafkaOpOut(oks, errs)`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import bytewax.operators as op
from bytewax.dataflow import Stream, operator

from schemas.records import DeadLetter

X = TypeVar("X")


@dataclass(frozen=True)
class Decoded(Generic[X]):
    """What a decoder made of its input: the good items and the dead letters."""

    oks: Stream[X]
    dead_letters: Stream[DeadLetter]


def _is_dead_letter(item: object) -> bool:
    return isinstance(item, DeadLetter)


@operator
def decode_or_dead_letter(
    step_id: str,
    up: Stream[Any],
    decode: Callable[[Any], Iterable[X | DeadLetter]],
) -> Decoded[X]:
    """Decode each item into zero or more items or dead letters, and split the two.

    `decode` returns a list (a decoder of one item per message wraps its answer in one).
    """
    decoded = op.flat_map("decode", up, decode)
    split = op.branch("split_dead_letters", decoded, _is_dead_letter)
    return Decoded(cast(Stream[X], split.falses), cast(Stream[DeadLetter], split.trues))


def one(decode: Callable[[Any], X | DeadLetter]) -> Callable[[Any], list[X | DeadLetter]]:
    """A decoder of one item per message, as `decode_or_dead_letter` takes it."""

    def decode_one(item: Any) -> list[X | DeadLetter]:
        return [decode(item)]

    return decode_one
