"""What the benchmarks read of other processes from /proc: CPU, memory, argv, children.

Linux only and without psutil, so a benchmark's figures need nothing the flows do not.
"""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (None if the process is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm can hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def children_of(pid: int) -> list[int]:
    """Direct children of a process, from /proc (no psutil)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields_ = stat_fields(int(entry.name))
            if fields_ is not None and int(fields_[1]) == pid:
                kids.append(int(entry.name))
    return sorted(kids)


def cmdline(pid: int) -> list[str]:
    """A process's argv from /proc (empty if it is gone)."""
    try:
        return [p.decode() for p in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if p]
    except OSError:
        return []


def mem_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile in bytes."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); 0.0 once it is gone."""
    f = stat_fields(pid)
    if f is None:
        return 0.0
    return (int(f[11]) + int(f[12])) / CLK_TCK


def system_busy_seconds() -> float:
    """CPU-seconds the whole machine spent not idle (all cores), from /proc/stat."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in parts]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / CLK_TCK


def redis_pids() -> list[int]:
    """redis-server processes on this machine (the flow's ledger and limiter load lands there)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = cmdline(int(entry.name))
            if argv and "redis-server" in argv[0]:
                out.append(int(entry.name))
    return out
