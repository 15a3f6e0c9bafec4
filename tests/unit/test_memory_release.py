"""Handing the changelog load's freed memory back: when (ShardsLoaded) and how (malloc_trim)."""

from __future__ import annotations

import platform

import pytest

from operators import metrics
from operators.adapters import memory
from operators.fanout.loaded import ShardsLoaded


def test_called_when_every_shard_built_has_caught_up_and_again_after_a_late_one() -> None:
    calls: list[tuple[int, int]] = []
    loaded = ShardsLoaded(lambda: calls.append((loaded.built, loaded.caught_up)))
    for _ in range(3):
        loaded.shard_built()
    loaded.shard_caught_up()
    loaded.shard_caught_up()
    assert calls == []
    loaded.shard_caught_up()
    assert calls == [(3, 3)]
    loaded.shard_built()  # a late shard (another worker's)
    loaded.shard_caught_up()
    assert calls == [(3, 3), (4, 4)]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_trims_on_glibc_and_counts_it() -> None:
    before = metrics.MEMORY_TRIMS._value.get()
    garbage = [bytes(1000) for _ in range(10_000)]
    del garbage
    assert memory.release_freed_memory()
    assert metrics.MEMORY_TRIMS._value.get() == before + 1
    assert (memory.rss_bytes() or 0) > 0


def test_release_is_skipped_off_glibc_and_ignores_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert not memory.release_freed_memory()
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("glibc", "2.36"))

    def no_libc(name: str) -> None:
        raise OSError("no libc here")

    monkeypatch.setattr(memory.ctypes, "CDLL", no_libc)
    assert not memory.release_freed_memory()
