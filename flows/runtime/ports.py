"""Free TCP ports on 127.0.0.1.

A local cluster's ports, and those of the throwaway stacks of the tests, the demo, the fault
harness and the benchmarks.

Ports are picked below the kernel's ephemeral range (`ip_local_port_range`). A port the kernel
hands out for `bind(0)` comes from that range, and so does the local port of every outgoing
connection of every process on the machine: between the pick and the server's own bind, a
Kafka or Redis client's connection could take it. Below the range only another listener can.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000  # above the well-known and most registered service ports


def listen_port_range() -> range:
    """Where listening ports are picked: below the ephemeral range, or above it if too low."""
    try:
        low, high = (int(x) for x in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        low, high = 32_768, 60_999  # Linux's default
    if low - _LOWEST >= 2_000:
        return range(_LOWEST, low)
    if 65_535 - high >= 2_000:
        return range(high + 1, 65_536)
    return range(1_024, 65_536)  # no room outside it: any unprivileged port


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP port can be bound on `host` now, as fanfare's HTTP servers bind it."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        return False
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the servers do: a port whose last connection is in TIME_WAIT is free for them.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free ports (a cluster's /metrics ports)."""
    ports = listen_port_range()
    if count < 1 or count > len(ports):
        raise ValueError(f"count must be between 1 and {len(ports)}, not {count}")
    for _ in range(500):
        first = random.randrange(ports.start, ports.stop - count + 1)
        if all(port_free(first + i) for i in range(count)):
            return first
    raise RuntimeError(f"found no {count} consecutive free ports in {ports}")


def free_ports(count: int) -> list[int]:
    """`count` different ports nothing listens on now."""
    picked: list[int] = []
    while len(picked) < count:
        port = free_port_run(1)
        if port not in picked:
            picked.append(port)
    return picked


def free_port() -> int:
    """A TCP port nothing listens on now."""
    return free_port_run(1)
