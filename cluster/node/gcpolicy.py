"""Garbage collection for a node that holds a large, long-lived state.

Measured with a timing callback on ``gc`` (docs/performance.md): at the scale benchmark's size
(10,000 concepts, 6,000 sessions, 5,000 active intents) the leader ran 16 full collections in
25 s, 2.4 s in all and up to 270 ms each, and every thread of the node (the Raft thread too)
stands still while one runs. Nearly everything they scan is the coordination state, the
registry and the code index, which live for hours.

So the node moves what has survived into CPython's permanent generation (``gc.freeze``) every
``FREEZE_EVERY_S``, right after collecting the young generations (a full collection there
scanned everything made in the interval: at scale a 180 ms pause every 20 s, seen in a py-spy
profile of the leader); a full collection then scans only what was made since. A cycle that
becomes garbage after it reached the old generation or was frozen (a closed connection's
objects, say) is not collected while frozen, so every ``THAW_EVERY_S`` the permanent generation
is thawed and fully collected once: memory stays bounded, for one full collection per quarter
hour (and one at start, when the state has just been loaded).
Every second rather than every 5 s or 20: between freezes CPython still runs full collections
over what was made since the last one (about one a second at saturation,
``tetherlab_gc_pause_seconds``): with a 20 s interval they took 42 ms each, 0.21 s in 9 s of the
benchmark's saturation phase; with 5 s, 15 ms and 0.07 s. Measured again at saturation with the
leader's pause metrics, collection time per verdict, 5 s against 1 s: 47 against 23 µs on the
small registry, 63 against 40 µs at scale (full collections 18 → 4 and 28 → 5 µs), a tenth of
what the leader spends on a verdict at scale. Freezing that often leaks nothing measurable: thaws
after 10 s of freezing every second at scale found 0 to 73 unreachable objects (the node's
request path makes no reference cycles that outlive it), and the freeze itself is a young
collection (about 3 ms at scale) and a list splice.
Young collections keep CPython's thresholds: raising the first to 10,000 made them no cheaper in
all and up to 30 ms each.

One apply pauses the automatic collections (:meth:`GcPolicy.paused`): a large entry (a registry
push) builds some 10^5 objects that live on, and CPython ran full collections over them again and
again while it did: 0.5 to 0.7 s of a 10,000-concept push's 1.1 to 1.2 s apply, on the Raft thread.
The next freeze's collection takes what it left.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

log = logging.getLogger("tetherlab.gc")

FREEZE_EVERY_S = 1.0
THAW_EVERY_S = 900.0
SLOW_COLLECTION_S = 0.05  # a housekeeping collection longer than this is logged


class GcApi(Protocol):
    """What the policy uses of the ``gc`` module (the module itself, or a test's fake)."""

    def collect(self, generation: int = 2) -> int: ...

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...

    def isenabled(self) -> bool: ...

    def disable(self) -> None: ...

    def enable(self) -> None: ...


class GcPolicy:
    """Call ``start`` once the state is loaded, then ``tick`` every few seconds."""

    def __init__(self, api: GcApi = gc, freeze_every_s: float = FREEZE_EVERY_S,  # type: ignore[assignment]
                 thaw_every_s: float = THAW_EVERY_S) -> None:
        self.api = api
        self.freeze_every_s = freeze_every_s
        self.thaw_every_s = thaw_every_s
        self._last_freeze = self._last_thaw = float("-inf")

    def start(self, now_s: float) -> None:
        self._freeze(now_s, thaw=False, full=True)
        self._last_thaw = now_s

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No automatic collection while the block runs (an explicit ``collect`` still runs)."""
        was = self.api.isenabled()
        self.api.disable()
        try:
            yield
        finally:
            if was:
                self.api.enable()

    def tick(self, now_s: float) -> str | None:
        """What was done now: "thaw" (thawed, collected, frozen), "freeze", or None."""
        if now_s - self._last_thaw >= self.thaw_every_s:
            self._freeze(now_s, thaw=True)
            return "thaw"
        if now_s - self._last_freeze >= self.freeze_every_s:
            self._freeze(now_s, thaw=False)
            return "freeze"
        return None

    def _freeze(self, now_s: float, thaw: bool, full: bool = False) -> None:
        t0 = time.perf_counter()
        if thaw:
            self.api.unfreeze()
            self._last_thaw = now_s
        # What is garbage now is freed, not frozen: all of it at a thaw (and at start), the
        # young generations otherwise (short-lived cycles die there; the rest waits for a thaw).
        self.api.collect(2 if thaw or full else 1)
        self.api.freeze()
        self._last_freeze = now_s
        took_s = time.perf_counter() - t0
        if took_s > SLOW_COLLECTION_S:
            log.info("gc %s took %.0f ms", "thaw and collect" if thaw else "collect and freeze", took_s * 1000)


class GcPauses:
    """Times every collection through ``gc.callbacks`` and hands ``observe`` its generation and
    seconds: while one runs, every thread of the node stands still, so operators see the pauses
    (``tetherlab_gc_pause_seconds``) beside the latencies they add to. One collection runs at a
    time (it holds the GIL), so one start time is enough."""

    def __init__(self, observe: Callable[[int, float], None], callbacks: list[Any] = gc.callbacks,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.observe = observe
        self.callbacks = callbacks
        self.clock = clock
        self._started: float | None = None

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self.clock()
        elif self._started is not None:
            self.observe(int(info.get("generation", 0)), self.clock() - self._started)
            self._started = None

    def install(self) -> None:
        if self not in self.callbacks:
            self.callbacks.append(self)

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            self.callbacks.remove(self)
