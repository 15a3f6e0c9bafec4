"""`fanfare run FLOW`: a flow as a supervised Bytewax cluster (see `flows/runtime/runner.py`)."""

from __future__ import annotations

import argparse
from typing import Any

from flows.registry import FLOWS
from operators.config import Settings
from scripts.commands.arguments import non_negative_int, positive_int, positive_seconds


def add_parser(sub: Any) -> None:
    """Register `fanfare run`."""
    run = sub.add_parser(
        "run",
        help="run a dataflow as a supervised Bytewax cluster (restarts, /ready, /live)",
        description="Run a dataflow under `python -m bytewax.run`, supervised: a failed member "
        "restarts the cluster from the recovery directory (with backoff); /ready and /live "
        "answer on FANFARE_READY_PORT. SIGTERM or SIGINT stop it (exit 0).",
    )
    run.add_argument("flow", choices=list(FLOWS), help="which dataflow")
    run.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="worker threads per process (default 1, or BYTEWAX_WORKERS_PER_PROCESS)",
    )
    run.add_argument(
        "--processes",
        type=positive_int,
        default=None,
        help="processes of a cluster on this host (default 1); with --addresses, implied",
    )
    run.add_argument(
        "--process-id",
        type=int,
        default=None,
        metavar="I",
        help="run only member I of a multi-host cluster (default: BYTEWAX_PROCESS_ID, or the "
        "ordinal of BYTEWAX_POD_NAME in BYTEWAX_STATEFULSET_NAME)",
    )
    run.add_argument(
        "--addresses",
        default=None,
        metavar='"H:P;H:P"',
        help="every member's host:port, in process-id order (default: BYTEWAX_ADDRESSES or "
        "the lines of BYTEWAX_HOSTFILE_PATH)",
    )
    run.add_argument(
        "--max-restarts",
        type=non_negative_int,
        default=10,
        metavar="N",
        help="give up (exit 1) after more than N failures within --restart-window (10; 0: "
        "never restart)",
    )
    run.add_argument(
        "--restart-window",
        type=positive_seconds,
        default=600.0,
        metavar="SECONDS",
        help="the window --max-restarts counts failures in (600)",
    )
    run.add_argument(
        "--fresh",
        action="store_true",
        help="discard the recovery directory first (start from the topics' beginning)",
    )
    run.set_defaults(func=command)


def command(args: argparse.Namespace, settings: Settings) -> int:
    """Run the flow until a signal stops it (0) or it gives up (1)."""
    from flows.runtime.runner import run_command

    return run_command(args, settings)
