"""How fanfare's processes log: one format, FANFARE_LOG_LEVEL, libraries' chatter turned down.

At INFO (the default) a flow logs one line per notable event: starts and stops, restarts,
outages and recoveries, what a resumed writer skips. The client libraries log per request or
per connection (httpx one line per FCM request, aioapns per connection): they log warnings and
errors only, unless FANFARE_LOG_LEVEL=DEBUG asks for everything.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CHATTY_LIBRARIES = ("httpx", "httpcore", "h2", "hpack", "aioapns", "cassandra", "urllib3")
"""Loggers kept at WARNING unless FANFARE_LOG_LEVEL is DEBUG."""


def configure_logging(level: str) -> None:
    """Set up the root logger: the format once per process, the level every time."""
    logging.basicConfig(level=level, format=FORMAT)
    logging.getLogger().setLevel(level)
    floor = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(floor)
