"""The benchmarks' shared flow environment and /proc readings (no processes started)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scripts.harness.bench_env import HOST_ONLY, bench_flow_env
from scripts.harness.procfs import cmdline, cpu_seconds, mem_status, stat_fields


def test_the_host_s_stores_and_credentials_never_reach_a_benchmark_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in HOST_ONLY:
        monkeypatch.setenv(name, "/host/own")
    monkeypatch.setenv("FANFARE_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("SOME_TOOL_PATH", "/kept")
    env = bench_flow_env(tmp_path, "b:", {"FANFARE_TOPIC_PARTITIONS": "4"})
    assert not HOST_ONLY & env.keys()
    assert env["SOME_TOOL_PATH"] == "/kept"
    assert env["FANFARE_LOG_LEVEL"] == "DEBUG"  # the caller may still ask for more logs
    assert env["FANFARE_HOME"] == str(tmp_path)
    assert env["FANFARE_REDIS_PREFIX"] == "b:"
    assert env["FANFARE_TOPIC_PARTITIONS"] == "4"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_a_benchmark_s_own_settings_win_over_the_shared_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FANFARE_LOG_LEVEL", raising=False)
    env = bench_flow_env(tmp_path, "b:", {"FANFARE_METRICS_HOST": "0.0.0.0"})
    assert env["FANFARE_METRICS_HOST"] == "0.0.0.0"
    assert env["FANFARE_LOG_LEVEL"] == "WARNING"


def test_each_benchmark_builds_its_flow_env_from_the_shared_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scripts.bench import delivery, fanout, tiers

    monkeypatch.setenv("FANFARE_STORE_URL", "postgresql://host/own")
    envs = [
        fanout.bench_env(fanout.build_parser().parse_args([]), tmp_path, 9092, 3030, "f:"),
        delivery.bench_env(delivery.build_parser().parse_args([]), tmp_path, "d:"),
        tiers.bench_env(tiers.build_parser().parse_args([]), tmp_path, "t:"),
    ]
    for env, prefix in zip(envs, ("f:", "d:", "t:"), strict=True):
        assert "FANFARE_STORE_URL" not in env
        assert env["FANFARE_REDIS_PREFIX"] == prefix
        assert env["FANFARE_METRICS_HOST"] == "127.0.0.1"


def test_this_process_reads_as_alive_and_a_gone_one_as_empty() -> None:
    me = os.getpid()
    assert cpu_seconds(me) > 0
    assert mem_status(me)["VmRSS"] > 0
    assert cmdline(me)
    gone = 2**22 + 1  # above Linux's pid_max ceiling: never a process
    assert stat_fields(gone) is None
    assert cpu_seconds(gone) == 0.0
    assert cmdline(gone) == [] and mem_status(gone) == {}
