"""Free TCP ports on 127.0.0.1.

A local cluster's ports, and those of the throwaway stacks of the tests, the demo, the fault
harness and the benchmarks.
"""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """`count` different ports nothing listens on now (held together while they are picked)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A TCP port nothing listens on now."""
    return free_ports(1)[0]


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
    for _ in range(200):
        first = free_port()
        if first + count < 65_535 and all(port_free(first + i) for i in range(count)):
            return first
    raise RuntimeError(f"found no {count} consecutive free ports")
