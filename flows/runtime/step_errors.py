"""Log a Python error raised in a dataflow step once, with its traceback, where it is raised.

Bytewax 0.21 loses it in a multi-process cluster (`cluster_main` with addresses). A step that
raises makes its worker thread panic with the error as the payload. Bytewax's panic hook
(src/run.rs) only *stores* that error, to re-raise it once every thread is joined, and prints
nothing. But the worker's panic also poisons timely's merge queues, so the process's TCP send
thread panics too ("MergeQueue poisoned."), and `CommsGuard::drop`'s
`join().expect("Send thread panic")` then panics on the main thread before the stored error is
read: the process dies with `pyo3_runtime.PanicException: Send thread panic`, and the step's
error and its traceback are never shown. With one process and one worker (`run_main`)
Bytewax re-raises the error itself.

So every flow wraps each callable Bytewax calls (step functions, stateful logic, sources, sinks
and their partitions) with a `FlowGuard`: an exception is logged with its traceback at ERROR,
marked, and re-raised unchanged (the dataflow still stops and `fanfare run` restarts it). The
mark makes it once: a guard further out does not log it again, and `flow_process` prints a
one-line pointer instead of a second traceback when Bytewax finally raises.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, NamedTuple, TypeVar, cast

from bytewax.inputs import (
    AbortExecution,
    DynamicSource,
    FixedPartitionedSource,
    Source,
    StatefulSourcePartition,
    StatelessSourcePartition,
)
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import (
    DynamicSink,
    FixedPartitionedSink,
    Sink,
    StatefulSinkPartition,
    StatelessSinkPartition,
)

from operators.adapters.providers.config import ProviderConfigError
from operators.config import ConfigError

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
_MARK = "_fanfare_logged_in"


class LoggedError(NamedTuple):
    """A step's error, logged where it was raised."""

    where: str
    error: BaseException

    def __str__(self) -> str:
        return f"{self.where} raised {type(self.error).__name__}: {self.error}"


_first: list[LoggedError] = []  # the first error logged in this process
# Not errors: a source partition's end (StopIteration), and bytewax.testing's abort.
_SIGNALS = (StopIteration, AbortExecution)


def first_logged() -> LoggedError | None:
    """The first step error this process logged, if any."""
    return _first[0] if _first else None


def logged_in(exc: BaseException | None) -> str | None:
    """Where `exc`, or an exception it was raised from or while handling, was logged, if it was."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        where = getattr(exc, _MARK, None)
        if where is not None:
            return str(where)
        exc = exc.__cause__ or exc.__context__
    return None


def log_once(exc: BaseException, where: str) -> None:
    """Log `exc` with its traceback unless it was logged already; mark it as logged."""
    if logged_in(exc) is not None:
        return
    if isinstance(exc, (ConfigError, ProviderConfigError)):  # a setting: its message says it
        log.error("%s raised %s: %s (the dataflow stops)", where, type(exc).__name__, exc)
    else:
        log.error(
            "%s raised %s: %s (the dataflow stops; traceback follows)",
            where,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
    with contextlib.suppress(AttributeError):  # a type with __slots__: logged, not marked
        setattr(exc, _MARK, where)
    if not _first:
        _first.append(LoggedError(where, exc))


def guard(where: str, fn: F) -> F:
    """`fn`, logging any Exception it raises once, then re-raising it unchanged.

    A source's end of input (StopIteration) is not an error, and is passed on unlogged.
    """

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _SIGNALS:
            raise
        except Exception as exc:
            log_once(exc, where)
            raise

    return cast(F, guarded)


# --- stateful logic ------------------------------------------------------------------------------


class _Logic(StatefulBatchLogic[Any, Any, Any]):
    def __init__(self, inner: StatefulBatchLogic[Any, Any, Any], where: str) -> None:
        self.inner = inner
        self._on_batch = guard(f"{where}.on_batch", inner.on_batch)
        self._on_notify = guard(f"{where}.on_notify", inner.on_notify)
        self._on_eof = guard(f"{where}.on_eof", inner.on_eof)
        self._notify_at = guard(f"{where}.notify_at", inner.notify_at)
        self._snapshot = guard(f"{where}.snapshot", inner.snapshot)

    def on_batch(self, values: list[Any]) -> tuple[Iterable[Any], bool]:
        return self._on_batch(values)

    def on_notify(self) -> tuple[Iterable[Any], bool]:
        return self._on_notify()

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        return self._on_eof()

    def notify_at(self) -> datetime | None:
        return self._notify_at()

    def snapshot(self) -> Any:
        return self._snapshot()


# --- sources -------------------------------------------------------------------------------------


class _StatefulSourcePart(StatefulSourcePartition[Any, Any]):
    def __init__(self, inner: StatefulSourcePartition[Any, Any], where: str) -> None:
        self.inner = inner
        self._next_batch = guard(f"{where}.next_batch", inner.next_batch)
        self._next_awake = guard(f"{where}.next_awake", inner.next_awake)
        self._snapshot = guard(f"{where}.snapshot", inner.snapshot)
        self._close = guard(f"{where}.close", inner.close)

    def next_batch(self) -> Iterable[Any]:
        return self._next_batch()

    def next_awake(self) -> datetime | None:
        return self._next_awake()

    def snapshot(self) -> Any:
        return self._snapshot()

    def close(self) -> None:
        self._close()


class _StatelessSourcePart(StatelessSourcePartition[Any]):
    def __init__(self, inner: StatelessSourcePartition[Any], where: str) -> None:
        self.inner = inner
        self._next_batch = guard(f"{where}.next_batch", inner.next_batch)
        self._next_awake = guard(f"{where}.next_awake", inner.next_awake)
        self._close = guard(f"{where}.close", inner.close)

    def next_batch(self) -> Iterable[Any]:
        return self._next_batch()

    def next_awake(self) -> datetime | None:
        return self._next_awake()

    def close(self) -> None:
        self._close()


class _FixedSource(FixedPartitionedSource[Any, Any]):
    def __init__(self, inner: FixedPartitionedSource[Any, Any], where: str) -> None:
        self.inner = inner
        self._where = where
        self._list_parts = guard(f"{where}.list_parts", inner.list_parts)
        self._build_part = guard(f"{where}.build_part", inner.build_part)

    def list_parts(self) -> list[str]:
        return self._list_parts()

    def build_part(
        self, step_id: str, for_part: str, resume_state: Any
    ) -> StatefulSourcePartition[Any, Any]:
        part = self._build_part(step_id, for_part, resume_state)
        return _StatefulSourcePart(part, f"{self._where}[{for_part}]")


class _DynamicSource(DynamicSource[Any]):
    def __init__(self, inner: DynamicSource[Any], where: str) -> None:
        self.inner = inner
        self._where = where
        self._build = guard(f"{where}.build", inner.build)

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> StatelessSourcePartition[Any]:
        part = self._build(step_id, worker_index, worker_count)
        return _StatelessSourcePart(part, f"{self._where}[worker {worker_index}]")


# --- sinks ---------------------------------------------------------------------------------------


class _StatefulSinkPart(StatefulSinkPartition[Any, Any]):
    def __init__(self, inner: StatefulSinkPartition[Any, Any], where: str) -> None:
        self.inner = inner
        self._write_batch = guard(f"{where}.write_batch", inner.write_batch)
        self._snapshot = guard(f"{where}.snapshot", inner.snapshot)
        self._close = guard(f"{where}.close", inner.close)

    def write_batch(self, values: list[Any]) -> None:
        self._write_batch(values)

    def snapshot(self) -> Any:
        return self._snapshot()

    def close(self) -> None:
        self._close()


class _StatelessSinkPart(StatelessSinkPartition[Any]):
    def __init__(self, inner: StatelessSinkPartition[Any], where: str) -> None:
        self.inner = inner
        self._write_batch = guard(f"{where}.write_batch", inner.write_batch)
        self._close = guard(f"{where}.close", inner.close)

    def write_batch(self, items: list[Any]) -> None:
        self._write_batch(items)

    def close(self) -> None:
        self._close()


class _FixedSink(FixedPartitionedSink[Any, Any]):
    def __init__(self, inner: FixedPartitionedSink[Any, Any], where: str) -> None:
        self.inner = inner
        self._where = where
        self._list_parts = guard(f"{where}.list_parts", inner.list_parts)
        self._part_fn = guard(f"{where}.part_fn", inner.part_fn)
        self._build_part = guard(f"{where}.build_part", inner.build_part)

    def list_parts(self) -> list[str]:
        return self._list_parts()

    def part_fn(self, item_key: str) -> int:
        return self._part_fn(item_key)

    def build_part(
        self, step_id: str, for_part: str, resume_state: Any
    ) -> StatefulSinkPartition[Any, Any]:
        part = self._build_part(step_id, for_part, resume_state)
        return _StatefulSinkPart(part, f"{self._where}[{for_part}]")


class _DynamicSink(DynamicSink[Any]):
    def __init__(self, inner: DynamicSink[Any], where: str) -> None:
        self.inner = inner
        self._where = where
        self._build = guard(f"{where}.build", inner.build)

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> StatelessSinkPartition[Any]:
        part = self._build(step_id, worker_index, worker_count)
        return _StatelessSinkPart(part, f"{self._where}[worker {worker_index}]")


# --- one flow's guards ---------------------------------------------------------------------------


class FlowGuard:
    """Guards for one flow's callables, each named `<flow>.<step_id>` in what it logs."""

    def __init__(self, flow_id: str) -> None:
        self.flow_id = flow_id

    def step(self, step_id: str, fn: F) -> F:
        """A step function (mapper, decoder, router) of the step `step_id`."""
        return guard(f"{self.flow_id}.{step_id}", fn)

    def stateful(
        self, step_id: str, builder: Callable[[Any], StatefulBatchLogic[Any, Any, Any]]
    ) -> Callable[[Any], StatefulBatchLogic[Any, Any, Any]]:
        """A `stateful_batch` builder whose logic has every method guarded."""
        where = f"{self.flow_id}.{step_id}"
        build = guard(f"{where}.build", builder)

        def guarded(resume_state: Any) -> StatefulBatchLogic[Any, Any, Any]:
            return _Logic(build(resume_state), where)

        return guarded

    def source(self, step_id: str, source: Source[Any]) -> Source[Any]:
        """`source` with every method Bytewax calls, and its partitions', guarded."""
        where = f"{self.flow_id}.{step_id}"
        if isinstance(source, FixedPartitionedSource):
            return _FixedSource(source, where)
        if isinstance(source, DynamicSource):
            return _DynamicSource(source, where)
        return source

    def sink(self, step_id: str, sink: Sink[Any]) -> Sink[Any]:
        """`sink` with every method Bytewax calls, and its partitions', guarded."""
        where = f"{self.flow_id}.{step_id}"
        if isinstance(sink, FixedPartitionedSink):
            return _FixedSink(sink, where)
        if isinstance(sink, DynamicSink):
            return _DynamicSink(sink, where)
        return sink
