"""The node's allocator settings (cluster/node/heap.py): what it asks glibc, and what glibc then
does with a freed block at the top of the heap (in a child process: the settings are global)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tetherlab.cluster.node.heap import (
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    MMAP_THRESHOLD_BYTES,
    TRIM_THRESHOLD_BYTES,
    keep_heap,
)


class FakeLibc:
    def __init__(self, answer: int = 1) -> None:
        self.answer = answer
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


def test_keep_heap_sets_both_thresholds() -> None:
    libc = FakeLibc()
    assert keep_heap(libc)
    assert libc.calls == [(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)]


def test_keep_heap_says_when_glibc_refuses() -> None:
    assert not keep_heap(FakeLibc(answer=0))


def test_on_glibc_a_freed_block_at_the_heap_top_stays_for_reuse() -> None:
    code = textwrap.dedent("""
        import ctypes, ctypes.util, json
        from tetherlab.cluster.node.heap import keep_heap

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        libc.mallinfo2.restype = MallInfo2

        def kept_after_free() -> int:
            p = libc.malloc(1 << 20)
            libc.free(p)
            return libc.mallinfo2().keepcost

        before = kept_after_free()
        tuned = keep_heap()
        print(json.dumps([before, tuned, kept_after_free()]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    before, tuned, after = __import__("json").loads(out.stdout)
    assert tuned
    assert before < 1 << 20  # glibc's default: a 1 MiB block is mapped on its own, or trimmed away
    assert after >= 1 << 20  # kept: the next one reuses it without faulting pages in
