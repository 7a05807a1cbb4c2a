"""Deadlines on one timer (cluster/node/deadlines.py ``Expiry``, for proposals and plans): every proposal
fails at its own deadline, whatever the order its timeouts come in, and the heap does not keep
what is done."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tetherlab.cluster.node.deadlines import Expired, Expiry


class _Handle:
    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self._when, self.fn, self.cancelled = when, fn, False

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """The part of an event loop ``Expiry`` uses, with time moved by the test."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[_Handle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, fn: Callable[[], None]) -> _Handle:
        h = _Handle(when, fn)
        self.timers.append(h)
        return h

    def advance(self, to: float) -> None:
        while True:
            due = sorted((h for h in self.timers if not h.cancelled and h.when() <= to), key=_Handle.when)
            if not due:
                break
            h = due[0]
            self.timers.remove(h)
            self.now = h.when()
            h.fn()
        self.now = to


def test_each_proposal_expires_at_its_own_deadline_and_answered_ones_do_not() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        clock = ManualClock()
        ex = Expiry(clock)  # type: ignore[arg-type]
        futs: dict[str, asyncio.Future[Any]] = {n: loop.create_future() for n in ("slow", "fast", "answered", "mid")}
        ex.add(futs["slow"], 3.0)
        ex.add(futs["fast"], 1.0)  # added later, due first: the timer moves earlier
        ex.add(futs["answered"], 1.5)
        ex.add(futs["mid"], 2.0)
        futs["answered"].set_result({"ok": True})

        def failed() -> list[str]:
            return sorted(n for n, f in futs.items() if f.done() and f.exception() is not None)

        clock.advance(0.99)
        assert failed() == []
        clock.advance(1.0)
        assert failed() == ["fast"]
        clock.advance(2.5)
        assert failed() == ["fast", "mid"]
        clock.advance(3.0)
        assert failed() == ["fast", "mid", "slow"]
        assert all(isinstance(futs[n].exception(), Expired) for n in failed())
        assert futs["answered"].result() == {"ok": True}
        assert len(ex) == 0 and [h for h in clock.timers if not h.cancelled] == []

    asyncio.run(run())


def test_answered_proposals_leave_the_heap_when_the_timer_fires() -> None:
    async def run() -> int:
        loop = asyncio.get_running_loop()
        ex = Expiry(loop)
        for _ in range(1000):
            f = loop.create_future()
            ex.add(f, 0.02)
            f.set_result({})
        late = loop.create_future()
        ex.add(late, 10.0)
        await asyncio.sleep(0.1)  # the expiry timer (due at 0.02) runs before this wakes
        assert not late.done()
        late.cancel()
        return len(ex)

    assert asyncio.run(run()) == 1  # only the one still waiting
