"""Per-worker state that survives Bytewax's worker threads: `threading.local`, keyed by OS thread.

Why not `threading.local`: in a Bytewax 0.21 cluster (`cluster_main`: more than one process, or
more than one worker) the workers are Rust threads. Each operator activation enters Python with
pyo3's `Python::with_gil`, that is `PyGILState_Ensure`, and leaves with `PyGILState_Release`,
which deletes the thread's Python thread state when it was the outermost hold. A
`threading.local` keeps its values in that thread state, so they are gone at the next activation:
a client "made once per worker" is made again on every call and never closed. With one process
and one worker (`run_main`) the dataflow runs on the main Python thread, whose thread state
lives on, which is why this shows only in a cluster (a delivery engine, its event loop
thread and its provider connections built on every send call, until a reused firebase app name
crashed the cluster). `tests/unit/test_worker_local.py` checks that premise.

`WorkerLocal` keeps the values in a dict keyed by `threading.get_ident()`, which names the OS
thread and stays the same for the worker thread's whole life. Values of a thread that ended are
kept (worker threads live as long as their process); a later thread given the same identity
would see them.

Standard library only: the domain packages may import it (tests/unit/test_layout.py).
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any


class WorkerLocal:
    """Attribute access like `threading.local`: one namespace per OS thread."""

    __slots__ = ("_by_thread", "_lock")

    def __init__(self) -> None:
        object.__setattr__(self, "_by_thread", {})
        object.__setattr__(self, "_lock", threading.Lock())

    def _namespace(self) -> SimpleNamespace:
        ident = threading.get_ident()
        by_thread: dict[int, SimpleNamespace] = object.__getattribute__(self, "_by_thread")
        namespace = by_thread.get(ident)
        if namespace is None:
            with object.__getattribute__(self, "_lock"):
                namespace = by_thread.setdefault(ident, SimpleNamespace())
        return namespace

    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(self._namespace(), name)
        except AttributeError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._namespace(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._namespace(), name)
