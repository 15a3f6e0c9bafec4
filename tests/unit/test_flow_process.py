"""A flow process's own /metrics server (flows/runtime/flow_process.py) and its command line."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from flows.runtime import flow_process
from flows.runtime.flow_process import MetricsServer, bytewax_argv, is_flow_process
from flows.runtime.ports import free_port


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_serves_the_registry_on_metrics_only() -> None:
    registry = CollectorRegistry()
    Counter("fanfare_test_things_total", "things", registry=registry).inc(3)
    server = MetricsServer("127.0.0.1", 0, registry)
    server.start()
    try:
        host, port = server.address
        assert host == "127.0.0.1"
        status, kind, body = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and kind.startswith("text/plain; version=0.0.4")
        assert "fanfare_test_things_total 3.0" in body
        assert get(f"http://127.0.0.1:{port}/metrics?x=1")[0] == 200
        status, _, body = get(f"http://127.0.0.1:{port}/dataflow")
        assert status == 404 and "/metrics" in body
    finally:
        server.close()


def test_binds_only_the_address_it_is_given() -> None:
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry())
    server.start()
    try:
        port = server.address[1]
        with socket.socket() as probe, pytest.raises(OSError):
            probe.bind(("0.0.0.0", port))  # an all-interfaces bind overlaps 127.0.0.1
        # The same port on another address is free: the server's socket is not 0.0.0.0.
        with socket.socket() as other:
            other.bind(("127.0.0.2", port))
    finally:
        server.close()


def test_a_taken_port_is_an_error_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        monkeypatch.setenv("FANFARE_METRICS_PORT", str(holder.getsockname()[1]))
        assert flow_process.main(["acks"]) == 3  # something it needs is taken: no restart
    err = capsys.readouterr().err
    assert "cannot serve /metrics on 127.0.0.1:" in err and "FANFARE_METRICS_PORT" in err


def test_bad_arguments_and_settings_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert flow_process.main([]) == 2
    assert flow_process.main(["nope", "-w", "1"]) == 2
    assert "fanout,delivery,acks" in capsys.readouterr().err
    monkeypatch.setenv("FANFARE_METRICS_SERVER", "prometheus")
    monkeypatch.setenv("FANFARE_METRICS_PORT", str(free_port()))
    assert flow_process.main(["acks"]) == 2
    assert "FANFARE_METRICS_SERVER" in capsys.readouterr().err


def test_runs_bytewax_run_on_the_flow_s_factory() -> None:
    assert bytewax_argv("delivery", ["-w", "2"]) == [
        "bytewax.run",
        "flows.delivery:get_flow",
        "-w",
        "2",
    ]
    assert is_flow_process(["/usr/bin/python3", "-m", "flows.runtime.flow_process", "fanout"])
    assert is_flow_process(["python", "-m", "bytewax.run", "flows.fanout:get_flow"])
    assert not is_flow_process(["python", "-m", "scripts.cli", "run", "fanout"])
