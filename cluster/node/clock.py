"""Time for the node, injected: the real clock and a fake one that tests drive.

Two readings matter. ``monotonic()`` measures intervals (timeouts, batching windows, when a shim
last reported). ``now_ms()`` is what a leader stamps into engine commands (session deadlines,
expiry): it is the wall clock read once at start and then advanced by the monotonic clock, so
a step of the wall clock (NTP, an operator) while the node runs can neither shorten nor
lengthen a session. The engine also never lets its time go backwards across leaders.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds, for intervals only."""
        ...

    def now_ms(self) -> int:
        """Milliseconds since the epoch as this node knows it, immune to wall-clock steps."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def __init__(self) -> None:
        self._anchor_wall_ms = time.time() * 1000.0
        self._anchor_mono = time.monotonic()

    def monotonic(self) -> float:
        return time.monotonic()

    def now_ms(self) -> int:
        return int(self._anchor_wall_ms + (time.monotonic() - self._anchor_mono) * 1000.0)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """A clock that moves only when told to; ``sleep`` advances it and yields once, so code
    that waits runs instantly and deterministically."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._t = 0.0
        self._start_ms = start_ms

    def monotonic(self) -> float:
        return self._t

    def now_ms(self) -> int:
        return self._start_ms + int(self._t * 1000)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._t += seconds

    async def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)
