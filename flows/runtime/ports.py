"""Free TCP ports on 127.0.0.1, for the throwaway stacks of the benchmarks and the chaos runner."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """Whether a TCP port on 127.0.0.1 can be bound now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free ports (a cluster's /metrics ports)."""
    for _ in range(200):
        first = free_port()
        if first + count < 65_535 and all(port_free(first + i) for i in range(count)):
            return first
    raise RuntimeError(f"found no {count} consecutive free ports")
