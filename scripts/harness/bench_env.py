"""The environment a benchmark gives the flows and commands it starts.

The caller's environment, less what would point them at the host's own stores, credentials or
Bytewax API port, with the settings every benchmark wants (quiet logs, metrics on loopback,
unbuffered output) and then the benchmark's own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# A developer's shell may set these for their own stack; a benchmark's flows use the
# benchmark's local providers and the default stores inside its FANFARE_HOME instead.
HOST_ONLY = frozenset(
    {
        "BYTEWAX_DATAFLOW_API_PORT",
        "FANFARE_APNS_KEY_FILE",
        "FANFARE_FCM_CREDENTIALS_FILE",
        "FANFARE_STORE_URL",
        "FANFARE_NOTIFICATION_STORE_URL",
    }
)


def bench_flow_env(home: Path, redis_prefix: str, settings: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment without HOST_ONLY, with the benchmark's `settings` on top."""
    env = {k: v for k, v in os.environ.items() if k not in HOST_ONLY}
    env.update(
        {
            "FANFARE_HOME": str(home),
            "FANFARE_REDIS_PREFIX": redis_prefix,
            "FANFARE_METRICS_HOST": "127.0.0.1",  # scraped there
            "FANFARE_LOG_LEVEL": os.environ.get("FANFARE_LOG_LEVEL", "WARNING"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(settings)
    return env
