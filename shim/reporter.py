"""In-flight change reports: while an agent holds ``continue``, tell the master what its code
actually touches (``report_changes``), so the master can see drift and soft conflicts.

When to report is pure logic (:class:`ReportSchedule`): after a hooked edit (Claude Code's
PostToolUse, OpenCode's ``tool.execute.after``), a short debounce gathers a burst of edits into
one report; without hooks, every ``interval_s``; never two collections closer than
``min_gap_s`` (each runs git and a parser). A report goes out only when it differs from the last
one the master acknowledged, so an idle agent costs one ``git diff`` per interval and no traffic.

:class:`ChangeReporter` performs it: collect in a worker thread (git and tree-sitter block),
send, hand the master's answer to the shim (a drift verdict, soft-conflict notices). Stopping it
at any point is safe: a report is an observation, not an effect a verdict started.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tetherlab.cluster.ops.codeparse import language_for, parse_symbols
from tetherlab.shim.changes import GitError, Report, collect

INTERVAL_S = 5.0  # agents without hooks: "at least every few seconds"
DEBOUNCE_S = 0.3  # an agent's edits come in bursts (a multi-file patch): one report for the burst
MIN_GAP_S = 1.0  # at most one git collection a second, however fast the hooks fire
COLLECT_TIMEOUT_S = 30.0  # git is bounded per call (changes.GIT_TIMEOUT_S); this bounds the whole walk

Collect = Callable[[Path, str, Iterable[str]], Report]
Send = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]]  # (intent id, report) -> reply


@dataclass
class ReportSchedule:
    """When the next collection is due, given hooked edits and the last collection (times in
    seconds on one monotonic clock)."""

    interval_s: float = INTERVAL_S
    debounce_s: float = DEBOUNCE_S
    min_gap_s: float = MIN_GAP_S
    last_collect_s: float | None = None
    poked_s: float | None = None  # the first edit not yet covered by a collection

    def poke(self, now_s: float) -> None:
        if self.poked_s is None:
            self.poked_s = now_s

    def due_s(self, now_s: float) -> float:
        if self.last_collect_s is None:
            return now_s if self.poked_s is None else self.poked_s + self.debounce_s
        earliest = self.last_collect_s + self.min_gap_s
        periodic = self.last_collect_s + self.interval_s
        if self.poked_s is not None:
            return max(earliest, min(periodic, self.poked_s + self.debounce_s))
        return periodic

    def collected(self, started_s: float) -> None:
        """A collection began at ``started_s``: edits before it are covered, later ones are not."""
        self.last_collect_s = started_s
        if self.poked_s is not None and self.poked_s <= started_s:
            self.poked_s = None

    def reset(self) -> None:
        self.last_collect_s = None
        self.poked_s = None


def collect_with_grammars(repo: Path, base: str, exclude: Iterable[str]) -> Report:
    """``changes.collect`` with the tree-sitter grammars (Python, TypeScript/JavaScript, Go, Rust)."""
    return collect(repo, base, parse_symbols, language_for, exclude)


class ChangeReporter:
    """Reports one agent's working state against its current intent's base while it holds
    ``continue``. ``begin``/``end`` follow the verdicts; ``poke`` is called on a hooked edit."""

    def __init__(self, repo: Path, send: Send, on_reply: Callable[[dict[str, Any]], None], *,
                 exclude: Iterable[str] = (), collect_fn: Collect | None = None,
                 schedule: ReportSchedule | None = None, clock: Callable[[], float] = time.monotonic,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.repo = repo
        self._send = send
        self._on_reply = on_reply
        self._on_error = on_error or (lambda _msg: None)
        self.exclude = list(exclude)
        self._collect = collect_fn or collect_with_grammars
        self.schedule = schedule or ReportSchedule()
        self._clock = clock
        self._intent: tuple[str, str] | None = None  # (intent id, base commit)
        self._acked: tuple[Any, ...] | None = None  # key of the last report the master answered
        self._wake = asyncio.Event()
        self.sent = 0
        self.collections = 0

    @property
    def active(self) -> bool:
        return self._intent is not None

    def begin(self, intent_id: str, base: str) -> None:
        """The agent holds ``continue`` on this intent; its changes count from ``base``."""
        if self._intent != (intent_id, base):
            self._intent = (intent_id, base)
            self._acked = None
            self.schedule.reset()
        self._wake.set()

    def end(self) -> None:
        self._intent = None
        self._acked = None
        self.schedule.reset()

    def poke(self) -> None:
        """A hooked edit landed (or a commit was made): report soon."""
        if self._intent is not None:
            self.schedule.poke(self._clock())
            self._wake.set()

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            self._wake.clear()  # before reading the schedule: a poke from here on wakes the wait
            if self._intent is None:
                await self._wait(None)
                continue
            now = self._clock()
            wait_s = self.schedule.due_s(now) - now
            if wait_s > 0:
                await self._wait(wait_s)
                continue
            await self.report_once()

    async def report_once(self) -> dict[str, Any] | None:
        """Collect now and send if the master has not seen this state; returns its reply."""
        if self._intent is None:
            return None
        intent_id, base = self._intent
        self.schedule.collected(self._clock())
        self.collections += 1
        try:
            async with asyncio.timeout(COLLECT_TIMEOUT_S):
                report = await asyncio.to_thread(self._collect, self.repo, base, list(self.exclude))
        except (GitError, OSError, TimeoutError, ValueError) as e:
            self._on_error(f"could not read the working state: {e}")
            return None
        key = report.key()
        if key == self._acked or self._intent != (intent_id, base):
            return None
        reply = await self._send(intent_id, report.to_json())
        if reply is None:  # not delivered: the next due time tries again
            return None
        if self._intent == (intent_id, base):
            self._acked = key
        self.sent += 1
        self._on_reply(reply)
        return reply

    async def _wait(self, timeout_s: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()
