"""A step's error is logged once with its traceback, then re-raised unchanged."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from bytewax.inputs import DynamicSource, FixedPartitionedSource
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink
from bytewax.testing import TestingSink, TestingSource

from flows.runtime.ports import free_ports
from flows.runtime.step_errors import FlowGuard, guard, logged_in

ROOT = Path(__file__).resolve().parents[2]
LOGGER = "flows.runtime.step_errors"


def boom(x: int) -> int:
    raise ValueError(f"bad {x}")


def test_logs_once_with_the_traceback_and_reraises(caplog: pytest.LogCaptureFixture) -> None:
    inner = guard("flow.inner", boom)
    outer = guard("flow.outer", inner)
    with caplog.at_level(logging.ERROR), pytest.raises(ValueError, match="bad 3") as info:
        outer(3)
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert "flow.inner raised ValueError: bad 3" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is info.value
    # Re-raised by Bytewax with the original as its cause: still known as logged.
    try:
        raise RuntimeError("error calling mapper") from info.value
    except RuntimeError as wrapped:
        assert logged_in(wrapped) == "flow.inner"


def test_a_source_s_end_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    def done() -> None:
        raise StopIteration

    with caplog.at_level(logging.ERROR), pytest.raises(StopIteration):
        guard("flow.in", done)()
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_sources_sinks_and_logic_keep_their_kind_and_are_guarded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    g = FlowGuard("flow")
    src = g.source("in", TestingSource([1, 2]))
    assert isinstance(src, FixedPartitionedSource)
    part = src.build_part("in", src.list_parts()[0], None)
    assert list(part.next_batch()) == [1]
    assert isinstance(g.sink("out", TestingSink([])), DynamicSink)

    class Broken(StatefulBatchLogic[Any, Any, Any]):
        def on_batch(self, values: list[Any]) -> tuple[list[Any], bool]:
            raise KeyError("shard")

        def notify_at(self) -> datetime | None:
            return None

        def snapshot(self) -> Any:
            return None

    logic = g.stateful("expand", lambda resume: Broken())(None)
    assert isinstance(logic, StatefulBatchLogic)
    assert logic.notify_at() is None
    with caplog.at_level(logging.ERROR), pytest.raises(KeyError):
        logic.on_batch([1])
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert record.getMessage().startswith("flow.expand.on_batch raised KeyError")

    class Dynamic(DynamicSource[int]):
        def build(self, step_id: str, worker_index: int, worker_count: int) -> Any:
            raise OSError("no broker")

    with pytest.raises(OSError):
        g.source("dyn", Dynamic()).build("dyn", 0, 1)  # type: ignore[attr-defined]
    assert [r.getMessage().split(" raised")[0] for r in caplog.records if r.name == LOGGER] == [
        "flow.expand.on_batch",
        "flow.dyn.build",
    ]


FLOW_MODULE = """
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource

from flows.runtime.step_errors import FlowGuard
from operators.adapters.providers.config import ProviderConfigError


def check(x: int) -> int:
    if x == 7:
        raise {error}(f"item {{x}} is bad")
    return x


def get_flow() -> Dataflow:
    flow = Dataflow("boom")
    g = FlowGuard(flow.flow_id)
    s = op.input("in", flow, g.source("in", TestingSource(range(20), batch_size=1)))
    out = op.map("check", op.redistribute("spread", s), g.step("check", check))
    op.output("out", out, g.sink("out", TestingSink([])))
    return flow
"""

MEMBER = """
import sys
from flows.registry import FLOWS
from flows.runtime import flow_process

FLOWS["boom"] = "boom_flow:get_flow"
sys.exit(flow_process.main(["boom", *sys.argv[1:]]))
"""


def run_cluster(tmp_path: Path, error: str) -> tuple[list[int], str]:
    """A 2-process cluster whose step raises `error` on one item: exit codes, both outputs."""
    (tmp_path / "boom_flow.py").write_text(textwrap.dedent(FLOW_MODULE.format(error=error)))
    addresses = ";".join(f"127.0.0.1:{p}" for p in free_ports(2))
    metrics = free_ports(2)
    procs = []
    for i in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
            "FANFARE_HOME": str(tmp_path / "home"),
            "FANFARE_METRICS_PORT": str(metrics[i]),
            "FANFARE_METRICS_HOST": "127.0.0.1",
            "FANFARE_METRICS_SERVER": "fanfare",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", MEMBER, "-i", str(i), "-a", addresses],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        outputs.append(out.decode(errors="replace"))
    return [p.returncode for p in procs], "\n".join(outputs)


def test_a_cluster_member_prints_the_step_s_traceback_once(tmp_path: Path) -> None:
    """Bytewax alone prints only `PanicException: Send thread panic` in a 2-process cluster."""
    codes, both = run_cluster(tmp_path, "ValueError")
    assert 0 not in codes and 2 not in codes, both
    assert both.count("boom.check raised ValueError: item 7 is bad") == 2, both  # log + summary
    assert both.count("Traceback (most recent call last)") == 1, both
    assert 'raise ValueError(f"item {x} is bad")' in both, both
    assert "fanfare: the dataflow stopped: boom.check raised ValueError: item 7 is bad" in both
    # The peer ends with Bytewax's panic and no error of its own: one line, no traceback.
    assert "pyo3_runtime.PanicException" not in both, both


def test_a_setting_a_step_cannot_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """Exit 2 (a setting): the supervisor stops the cluster instead of restarting it."""
    codes, both = run_cluster(tmp_path, "ProviderConfigError")
    assert 2 in codes and 0 not in codes, (codes, both)
    assert "boom.check raised ProviderConfigError: item 7 is bad (the dataflow stops)" in both
    assert "fanfare boom: item 7 is bad" in both, both
    assert "Traceback (most recent call last)" not in both, both
