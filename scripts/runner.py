"""`fanfare run FLOW`: run a dataflow under `python -m bytewax.run` with a recovery directory.

A restart resumes where the last snapshot left off. With `--processes P` the processes form one
Bytewax cluster on this host; a cluster fails together, so when one member exits the others are
stopped and the command exits non-zero (a supervisor that restarts it is a later issue).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from operators.config import Settings

FLOWS = {
    "fanout": "flows.fanout:get_flow",
    "delivery": "flows.delivery:get_flow",
    "acks": "flows.acks:get_flow",
}
CLUSTER_BASE_PORT = 2101


def ensure_recovery_dir(path: Path, partitions: int) -> bool:
    """Create the recovery partitions once; returns True when it made them."""
    if any(path.glob("part-*.sqlite3")):
        return False
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "bytewax.recovery", str(path), str(partitions)], check=True
    )
    return True


def bytewax_command(
    settings: Settings, flow: str, workers: int, process_id: int | None, addresses: list[str]
) -> list[str]:
    """The `python -m bytewax.run` command line for one process."""
    cmd = [
        sys.executable,
        "-m",
        "bytewax.run",
        FLOWS[flow],
        "-w",
        str(workers),
        "-r",
        str(settings.recovery_dir(flow)),
        "-s",
        str(settings.snapshot_interval_s),
        "-b",
        "0",
    ]
    if process_id is not None:
        cmd += ["-i", str(process_id), "-a", ";".join(addresses)]
    return cmd


def process_env(settings: Settings, process_id: int) -> dict[str, str]:
    """Environment of one process: metrics endpoint on its own port."""
    env = dict(os.environ)
    env.setdefault("BYTEWAX_DATAFLOW_API_ENABLED", "1")
    env["BYTEWAX_DATAFLOW_API_PORT"] = str(settings.metrics_port + process_id)
    return env


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Start the processes, forward SIGINT/SIGTERM, stop all when one exits."""
    recovery = settings.recovery_dir(args.flow)
    if args.fresh and recovery.exists():
        shutil.rmtree(recovery)
        print(f"fanfare: removed {recovery}; the flow starts from the topics' beginning")
    if ensure_recovery_dir(recovery, settings.recovery_partitions):
        print(f"fanfare: created recovery directory {recovery}")
    processes = args.processes
    addresses = [f"127.0.0.1:{CLUSTER_BASE_PORT + i}" for i in range(processes)]
    children: list[subprocess.Popen[bytes]] = []
    for i in range(processes):
        cmd = bytewax_command(
            settings, args.flow, args.workers, i if processes > 1 else None, addresses
        )
        children.append(subprocess.Popen(cmd, env=process_env(settings, i)))
    ports = ", ".join(str(settings.metrics_port + i) for i in range(processes))
    print(
        f"fanfare: running {args.flow} with {processes} process(es) x {args.workers} worker(s); "
        f"metrics on port(s) {ports}; Ctrl-C stops"
    )
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            codes = [c.poll() for c in children]
            if all(code is not None for code in codes):
                break
            if any(code not in (None, 0) for code in codes) and not stopping:
                print("fanfare: a cluster member exited; stopping the others", file=sys.stderr)
                stop(signal.SIGTERM, None)
            time.sleep(0.2)
    finally:
        deadline = time.monotonic() + 20
        for c in children:
            try:
                c.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.kill()
    failed = [c.returncode for c in children if c.returncode not in (0, -2, -15)]
    if stopping and not failed:
        return 0
    return 1 if failed else 0
