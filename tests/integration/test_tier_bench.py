"""`python -m scripts.bench.tiers` at a tiny size: the harness runs, and its report is whole.

The benchmark's figures are not asserted (they depend on the machine); what is: every process
started and answered, the whole campaign reached the local providers once per user, and every
transactional push was accepted exactly once, with its latency in the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
USERS = 2000


def test_the_tier_benchmark_reports_every_transactional_push_accepted_once(
    tmp_path: Path,
) -> None:
    report_path = tmp_path / "tiers.json"
    env = {**os.environ, "FANFARE_REDIS_URL": REDIS_URL}
    argv = [sys.executable, "-m", "scripts.bench.tiers", "--users", str(USERS)]
    argv += ["--idle-probes", "4", "--rate", "4", "--json", str(report_path)]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "publish -> accepted" in done.stdout and "during the drain" in done.stdout
    report = json.loads(report_path.read_text())
    assert "error" not in report

    campaign = report["campaign"]
    assert campaign["accepted"] == USERS and campaign["accepted_more_than_once"] == 0
    assert campaign["fanout_written"] == USERS
    assert campaign["accepted_per_s"] > 0 and campaign["drain_s"] >= 0

    tx = report["transactional"]
    assert tx["requests"] >= 4 and tx["pushes"] == 3 * tx["requests"]
    assert tx["accepted_once"] == tx["pushes"]
    assert tx["accepted_more_than_once"] == 0 and tx["missing"] == 0
    assert tx["idle"]["pushes"] == 12
    during, outside = tx["during_drain"]["pushes"], tx["outside_drain_window"]
    assert tx["idle"]["pushes"] + during + outside == tx["pushes"]
    for row in (tx["idle"], tx["fanout_half_idle"]):
        assert row["pushes"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    # A fan-out batch is written before its push is accepted.
    assert tx["fanout_half_idle"]["p50_ms"] <= tx["idle"]["max_ms"]

    cpu = report["cpu"]["by_process"]
    for name in ("fanout", "delivery", "broker", "apns server", "fcm server"):
        assert cpu[name]["cpu_s"] > 0, (name, cpu)
        assert cpu[name]["us_per_push"] > 0
    assert report["cpu"]["machine_busy_cores"] > 0
    assert report["redis_keys_deleted"] >= 0
    assert len(report["load_average_at_end"]) == 3
