"""Handing memory the allocator keeps back to the operating system (glibc's `malloc_trim`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import resource
import time
from pathlib import Path

from operators import metrics

log = logging.getLogger(__name__)


def rss_bytes() -> int | None:
    """The process's resident memory now (Linux), or None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * resource.getpagesize()


def release_freed_memory() -> bool:
    """Return the free memory glibc's heaps hold to the OS; False where that is not possible.

    glibc keeps freed memory in its arenas for reuse; after the changelog load that is several
    hundred bytes a user that the process never needs again (it settles at the restart's size
    only after a restart). `malloc_trim(0)` releases the free pages of every arena. Only on
    glibc; any failure is logged and ignored (the memory merely stays with the allocator).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        before = rss_bytes()
        started = time.monotonic()
        libc.malloc_trim(0)
        took = time.monotonic() - started
        after = rss_bytes()
    except (OSError, AttributeError) as exc:
        log.warning("could not hand freed memory back to the OS: %s", exc)
        return False
    metrics.MEMORY_TRIMS.inc()
    if before is not None and after is not None:
        metrics.MEMORY_TRIMMED_BYTES.inc(max(0, before - after))
        log.info(
            "freed memory handed back to the OS after the changelog load: RSS %d MB -> %d MB "
            "(malloc_trim took %.2f s)",
            before >> 20,
            after >> 20,
            took,
        )
    return True
