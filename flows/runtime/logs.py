"""How fanfare's processes log: one format, FANFARE_LOG_LEVEL, libraries' chatter turned down.

At INFO (the default) a flow logs one line per notable event: starts and stops, restarts,
outages and recoveries, what a resumed writer skips. The client libraries log per request or
per connection (httpx one line per FCM request, aioapns per connection): they log warnings and
errors only, unless FANFARE_LOG_LEVEL=DEBUG asks for everything.
"""

from __future__ import annotations

import logging
import os

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


def process_age_s() -> float | None:
    """Seconds since this process started (Linux's /proc; None elsewhere): start-up timelines."""
    try:
        with open("/proc/self/stat", "rb") as f:
            # Fields after the command (which may hold spaces): the 22nd is the start time.
            fields = f.read().rpartition(b")")[2].split()
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
    except OSError:
        return None
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")


def log_started(log: logging.Logger, what: str) -> None:
    """Log a start-up step with the time since the process started (and wall time in the line)."""
    age = process_age_s()
    if age is None:
        log.info("%s", what)
    else:
        log.info("%s %.2f s after the process started", what, age)
