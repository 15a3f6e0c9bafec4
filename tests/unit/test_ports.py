"""Listening ports for local stacks are picked where no outgoing connection can take them."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from flows.runtime import ports


def test_ports_are_picked_below_the_ephemeral_range_so_no_client_connection_takes_them() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    picked = [ports.free_port() for _ in range(50)] + [ports.free_port_run(3)]
    assert all(10_000 <= p < low for p in picked)


def test_a_run_of_ports_skips_a_taken_port(monkeypatch: pytest.MonkeyPatch) -> None:
    first = ports.free_port_run(13)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first + 1))
        taken.listen()
        starts = iter([first, first + 10])
        monkeypatch.setattr(random, "randrange", lambda *_: next(starts))
        # The run starting at `first` holds the taken port: the next start is used.
        assert ports.free_port_run(3) == first + 10


def test_free_ports_are_distinct() -> None:
    picked = ports.free_ports(20)
    assert len(set(picked)) == 20
    assert all(ports.port_free(p) for p in picked)


def test_the_range_falls_above_a_low_ephemeral_range(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "range"
    fake.write_text("1024\t40000\n")
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE", fake)
    assert ports.listen_port_range() == range(40_001, 65_536)
    fake.write_text("10500\t65000\n")
    assert ports.listen_port_range() == range(1_024, 65_536)


def test_an_impossible_run_is_refused() -> None:
    with pytest.raises(ValueError, match="count must be"):
        ports.free_port_run(0)
