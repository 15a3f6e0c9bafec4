"""A relay that stops at a chosen point of its first batch and waits there to be killed -9.

    python -m tests.integration.outbox_stop_at before|during|after MARKER_FILE

`before`: the batch is claimed (its rows locked), nothing published; `during`: the first half
of the batch is published and acknowledged; `after`: all of it is, the delete not committed.
The marker file is written at that point; the process then sleeps until it is killed. The
real relay's classes run it, from the same settings as `fanfare outbox relay`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from operators.config import load_settings
from operators.outbox.model import OutboxRow
from operators.outbox.ports import RowPublisher
from operators.outbox.relay import OutboxRelay, RelaySettings
from schemas.records import DeadLetter
from scripts.commands.outbox import build_relay


class StopAt(RowPublisher):
    """The real publisher, until the stop point."""

    def __init__(self, inner: RowPublisher, stage: str, marker: Path) -> None:
        self._inner, self._stage, self._marker = inner, stage, marker

    def publish(self, rows: Sequence[OutboxRow]) -> None:
        if self._stage == "during":
            self._inner.publish(rows[: len(rows) // 2])
        elif self._stage == "after":
            self._inner.publish(rows)
        self._marker.write_text(",".join(str(r.id) for r in rows))
        while True:
            time.sleep(60)  # killed here

    def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        self._inner.dead_letter(letters)


def main() -> None:
    stage, marker = sys.argv[1], Path(sys.argv[2])
    settings = load_settings()
    built = build_relay(settings, threading.Event())
    relay = OutboxRelay(
        built.outbox, StopAt(built.publisher, stage, marker), RelaySettings(batch_size=500)
    )
    while True:
        if not relay.relay_batch():
            time.sleep(0.05)


if __name__ == "__main__":
    main()
