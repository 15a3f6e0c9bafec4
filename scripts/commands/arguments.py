"""Argument types for `fanfare` and the development scripts.

A bad value gets a message that says what to use instead, and argparse exits 2 with it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` (to `high`); `1_000_000` is accepted."""

    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {low} to {high}")
        if value < low:
            wanted = {0: "0 or more", 1: "at least 1"}.get(low, f"at least {low}")
            raise argparse.ArgumentTypeError(f"{value} must be {wanted}")
        return value

    return parse


def number_in(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number from `low` to `high`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {low} to {high}")
        return value

    return parse


positive_int = whole_number(1)
"""An argparse type: 1 or more."""
non_negative_int = whole_number(0)
"""An argparse type: 0 or more."""


def positive_seconds(text: str) -> float:
    """An argparse type: seconds, more than 0 (and finite)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value
