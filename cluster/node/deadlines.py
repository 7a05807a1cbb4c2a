"""Timeouts for many futures at once, on one timer of the event loop (see :class:`Expiry`)."""

from __future__ import annotations

import asyncio
import heapq
from typing import Any


class Expired(Exception):
    """The future's outcome did not come within its timeout."""


class Expiry:
    """Deadlines of many futures on one timer of the loop (proposals, plans at the match
    worker). ``asyncio.timeout`` around each proposal (a timer armed, moved and cancelled, and
    the task machinery of a timeout) took 3% of a busy leader's one GIL (py-spy --gil, the
    cluster benchmark's saturation).

    Deadlines sit in a heap; the timer is armed at the earliest. When it fires, every future at
    the top that is done is dropped and every one that is due fails with :class:`Expired`; so
    the heap holds at most the futures added within the last timeout (rate x timeout_s)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, asyncio.Future[Any]]] = []
        self._seq = 0  # ties in deadline keep proposal order (futures do not compare)
        self._timer: asyncio.TimerHandle | None = None

    def add(self, fut: asyncio.Future[Any], timeout_s: float) -> None:
        deadline = self.loop.time() + timeout_s
        self._seq += 1
        heapq.heappush(self._heap, (deadline, self._seq, fut))
        if self._timer is None or deadline < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._fire)

    def __len__(self) -> int:
        return len(self._heap)

    def _fire(self) -> None:
        self._timer = None
        # The loop may run a timer a hair early: what is due within a millisecond is due.
        now, heap = self.loop.time() + 0.001, self._heap
        while heap and (heap[0][0] <= now or heap[0][2].done()):
            fut = heapq.heappop(heap)[2]
            if not fut.done():
                fut.set_exception(Expired())
        if heap:
            self._timer = self.loop.call_at(heap[0][0], self._fire)
