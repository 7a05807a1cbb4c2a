"""Simulated time: one event queue for the whole cluster, and an asyncio loop that runs on it.

:class:`Sim` owns the clock (``now``, seconds), a heap of timed callbacks, the random streams
(one per concern, all derived from the seed) and the trace. :class:`SimLoop` is an asyncio event
loop whose ``time()`` is the simulated clock and whose selector never blocks: the node's asyncio
code (the service, the leader duties, the replica's futures) and the simulated clients run on
it unchanged, interleaved with the simulator's own events in a fixed order. Nothing here reads
the real clock, so a seed replays exactly.
"""

from __future__ import annotations

import asyncio
import heapq
import random
from collections import deque
from collections.abc import Callable
from typing import Any

TRACE_EVENTS_MAX = 50_000  # the trace keeps the last events of a schedule (dumped on a violation)
EVENTS_PER_RUN_MAX = 5_000_000  # a schedule that needs more has a livelock: stop it


class SimError(RuntimeError):
    """Returned when the simulation itself goes wrong (a livelock, a task that failed)."""


class _NullSelector:
    def select(self, timeout: float | None = None) -> list[Any]:
        return []

    def close(self) -> None:
        pass


class SimLoop(asyncio.BaseEventLoop):
    """An asyncio loop on simulated time; the simulator calls :meth:`run_ready`."""

    def __init__(self, sim: Sim) -> None:
        super().__init__()
        self._sim = sim
        self._selector = _NullSelector()
        self._clock_resolution = 1e-9
        self.errors: list[str] = []
        self.set_exception_handler(self._on_error)

    def time(self) -> float:
        return self._sim.now

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass  # one thread: nothing to wake

    def _on_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, asyncio.CancelledError):
            return
        where = context.get("future") or context.get("task") or context.get("handle")
        self.errors.append(f"{context.get('message')}: {exc!r} ({str(where)[:300]})")

    def next_timer(self) -> float:
        scheduled = self._scheduled  # type: ignore[attr-defined]
        while scheduled and scheduled[0]._cancelled:
            heapq.heappop(scheduled)._scheduled = False
            self._timer_cancelled_count -= 1  # type: ignore[attr-defined]
        return float(scheduled[0]._when) if scheduled else float("inf")

    def has_ready(self) -> bool:
        return bool(self._ready)  # type: ignore[attr-defined]

    def run_ready(self) -> None:
        """Run every callback that is ready, and every timer that is due, at the current time."""
        while self._ready or self.next_timer() <= self._sim.now:  # type: ignore[attr-defined]
            self._run_once()  # type: ignore[attr-defined]


class Event:
    __slots__ = ("args", "cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Sim:
    def __init__(self, seed: int, trace: bool = True) -> None:
        self.seed = seed
        self.now = 0.0
        self._heap: list[tuple[float, int, Event]] = []
        self._seq = 0
        self.events_run = 0
        self.tracing = trace
        self.trace: deque[tuple[float, str, str]] = deque(maxlen=TRACE_EVENTS_MAX)
        self.current = "sim"  # whose code runs now (log records of the node's code are traced under it)
        self.loop = SimLoop(self)

    def rng(self, name: str) -> random.Random:
        """A random stream of its own for one concern: adding draws elsewhere changes nothing here."""
        return random.Random(f"{self.seed}:{name}")

    def at(self, when: float, fn: Callable[..., Any], *args: Any) -> Event:
        ev = Event(max(when, self.now), fn, args)
        self._seq += 1
        heapq.heappush(self._heap, (ev.when, self._seq, ev))
        return ev

    def after(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> Event:
        return self.at(self.now + max(0.0, delay_s), fn, *args)

    def note(self, who: str, what: str) -> None:
        if self.tracing:
            self.trace.append((self.now, who, what))

    def run(self, until: float) -> None:
        """Run events and the asyncio loop in time order until ``until`` (simulated seconds)."""
        loop = self.loop
        heap = self._heap
        asyncio.events._set_running_loop(loop)
        try:
            while True:
                loop.run_ready()
                t_ev = heap[0][0] if heap else float("inf")
                t_timer = loop.next_timer()
                t = t_ev if t_ev < t_timer else t_timer
                if t > until:
                    self.now = max(self.now, until)
                    return
                if t > self.now:
                    self.now = t
                if t_ev <= t_timer:
                    _, _, ev = heapq.heappop(heap)
                    if ev.cancelled:
                        continue
                    self.events_run += 1
                    if self.events_run > EVENTS_PER_RUN_MAX:
                        raise SimError(f"more than {EVENTS_PER_RUN_MAX} events: the schedule livelocked")
                    ev.fn(*ev.args)
        finally:
            asyncio.events._set_running_loop(None)

    def close(self) -> None:
        """Cancel every task left on the loop and drop the events (the schedule is over)."""
        asyncio.events._set_running_loop(self.loop)
        try:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            for _ in range(3):
                self.loop.run_ready()
        finally:
            asyncio.events._set_running_loop(None)
        self._heap.clear()
        self.loop._ready.clear()  # type: ignore[attr-defined]
        self.loop._scheduled.clear()  # type: ignore[attr-defined]
        self.loop.close()
