"""How glibc's allocator keeps the heap of a node process (``keep_heap``, called at start).

By default glibc gives the top of the heap back to the kernel whenever more than 128 KiB of it
is free, and the next allocation there faults the pages in again. A node makes and frees such
blocks all the time: every Raft message pysyncobj sends is ``zlib.compress``-ed, and each call
allocates and frees some 256 KiB of deflate state, so each message cost about 75 to 100 µs of
CPU, almost all of it page faults and zeroing (5 µs with the heap kept; see
docs/performance.md, tenth round). Kept: up to ``TRIM_THRESHOLD_BYTES`` of free heap top, and
blocks under ``MMAP_THRESHOLD_BYTES`` come from the heap (setting the first switches off glibc's
own rising threshold, which the second stands in for). Elsewhere than glibc, nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any, Protocol

log = logging.getLogger("tetherlab.node")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD_BYTES = 32 << 20  # the most free heap a node keeps for reuse
MMAP_THRESHOLD_BYTES = 4 << 20  # larger blocks are mapped and unmapped on their own


class Libc(Protocol):
    def mallopt(self, param: int, value: int) -> int: ...


def _glibc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def keep_heap(libc: Libc | None = None) -> bool:
    """Tune the allocator as above; False (and nothing changed) where there is no glibc, or it
    refused a setting."""
    lib = libc if libc is not None else _glibc()
    if lib is None:
        return False
    ok = bool(lib.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(lib.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not ok:
        log.warning("glibc refused the heap settings (mallopt); running with its defaults")
    return ok
