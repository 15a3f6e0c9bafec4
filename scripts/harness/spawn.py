"""Start and stop `fanfare` commands as subprocesses.

The one way the tests, the demo, the fault harness and the benchmarks run a flow. Each command
runs in a session of its own, so a signal to the group reaches the runner's `bytewax.run`
children too, and a Ctrl-C in the terminal reaches only the caller (which stops what it
started). Output goes to a log file, after a line naming the command.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def start_fanfare(
    argv: Sequence[str], env: Mapping[str, str], log_path: Path, module: str = "scripts.cli"
) -> subprocess.Popen[bytes]:
    """`fanfare ARGV` (as `python -m scripts.cli`, or another module), output in `log_path`."""
    cmd = [sys.executable, "-m", module, *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        out.write(f"--- {' '.join(cmd)}\n".encode())
        out.flush()
        return subprocess.Popen(
            cmd,
            env=dict(env),
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def signal_fanfare(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send `sig` to the command and everything it started (its session's process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def stop_fanfare(proc: subprocess.Popen[bytes], timeout_s: float = 40.0) -> int | None:
    """SIGTERM the command (a runner stops its processes), SIGKILL the group if it lingers.

    Returns its exit code (None if it could not be reaped).
    """
    if proc.poll() is None:
        signal_fanfare(proc, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            signal_fanfare(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
    return proc.poll()
