"""WorkerLocal: per-worker values that survive Bytewax's worker threads."""

from __future__ import annotations

import ast
import threading
from pathlib import Path
from typing import Any

from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, cluster_main

from operators.worker_local import WorkerLocal


def test_each_thread_has_its_own_values() -> None:
    local = WorkerLocal()
    local.x = 1
    seen: list[object] = []

    def other() -> None:
        seen.append(getattr(local, "x", None))
        local.x = 2
        seen.append(local.x)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == [None, 2]
    assert local.x == 1
    del local.x
    assert getattr(local, "x", None) is None


def _builds_per_worker(local: Any) -> list[int]:
    """Run 20 one-item batches on 2 cluster workers; how often each thread made its value."""
    counts: dict[int, int] = {}

    def step(batch: list[int]) -> list[int]:
        if getattr(local, "made", None) is None:
            local.made = object()
            ident = threading.get_ident()
            counts[ident] = counts.get(ident, 0) + 1
        return batch

    flow = Dataflow("worker_local")
    s = op.input("in", flow, TestingSource(range(20), batch_size=1))
    out: list[int] = []
    op.output("out", op.flat_map_batch("step", s, step), TestingSink(out))
    cluster_main(flow, [], 0, worker_count_per_proc=2)
    assert sorted(out) == list(range(20))
    return sorted(counts.values())


def test_bytewax_cluster_workers_lose_threading_local_but_not_worker_local() -> None:
    # The premise of WorkerLocal: if this starts failing, Bytewax keeps thread states now and
    # threading.local would do again.
    assert max(_builds_per_worker(threading.local())) > 1
    assert _builds_per_worker(WorkerLocal()) == [1]


def test_no_code_a_worker_runs_keeps_its_state_in_a_threading_local() -> None:
    """What the flows' steps, sources, sinks and adapters keep per worker is in a WorkerLocal.

    A cluster run found five: the delivery engine, the acks store, the bulk round budget, the Redis
    clients and the SQLite connections, all made again on every call in a cluster.
    """
    root = Path(__file__).resolve().parents[2]
    found = []
    for package in ("flows", "operators"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                uses = (
                    isinstance(node, ast.Attribute)
                    and node.attr == "local"
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "threading"
                ) or (
                    isinstance(node, ast.ImportFrom)
                    and node.module == "threading"
                    and any(alias.name == "local" for alias in node.names)
                )
                if uses:
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert found == []
