"""The cluster benchmark's change reports follow tether run's rule (shim/reporter.py): a report
goes out only when the agent's state differs from the one last acknowledged for its intent."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tetherlab.chaos.bench import load as bl

INTERVAL_S = 0.02
ROUNDS = 4  # report rounds each test waits for
WAIT_S = 20.0  # bound on that wait (rounds take INTERVAL_S each on an idle machine)


class RecordingBackend(bl.Backend):
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, list[dict[str, Any]]]] = []

    async def report(self, agent: str, intent_id: str, files: list[dict[str, Any]]) -> None:
        self.sent.append((agent, intent_id, files))


def _developer(idle: bool) -> tuple[bl.Developer, RecordingBackend]:
    backend = RecordingBackend()
    dev = bl.Developer("dev0", backend, ["dev0/a", "dev0/b"], bl.Workload(concepts=100), seed=1, idle=idle)
    for k, a in enumerate(dev.agents):
        a.intent_id, a.concept = f"i-{k + 1}", f"d{k:02d}.c{k}"
    dev.measuring = True
    return dev, backend


async def _rounds(dev: bl.Developer, until: Callable[[], bool], unchanged: bool = False) -> None:
    """Runs the reporter until ``until()`` holds (or WAIT_S, then the test's asserts say what is
    missing): counted rounds, not time, so a slow machine only makes it take longer."""
    stop = asyncio.Event()
    task = asyncio.create_task(dev.reports(stop, INTERVAL_S, unchanged))
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not until() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(INTERVAL_S / 4)
    stop.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_an_idle_agent_reports_its_state_once_per_intent() -> None:
    dev, backend = _developer(idle=True)
    asyncio.run(_rounds(dev, lambda: dev.stats.reports_unchanged >= 2 * ROUNDS))
    assert sorted((a, i) for a, i, _ in backend.sent) == [("dev0/a", "i-1"), ("dev0/b", "i-2")]
    assert dev.stats.reports_unchanged >= 2 * ROUNDS  # later rounds counted, not sent
    # A new intent is a new base: its state has not been acknowledged yet.
    dev.agents[0].intent_id = "i-9"
    seen = dev.stats.reports_unchanged
    asyncio.run(_rounds(dev, lambda: dev.stats.reports_unchanged >= seen + 2 * ROUNDS))
    assert [(a, i) for a, i, _ in backend.sent[2:]] == [("dev0/a", "i-9")]


def test_a_working_agent_reports_every_round_with_new_changes() -> None:
    dev, backend = _developer(idle=False)
    asyncio.run(_rounds(dev, lambda: len(backend.sent) >= 2 * ROUNDS))
    per_agent = [[f for a, _, f in backend.sent if a == agent.id] for agent in dev.agents]
    assert all(len(fs) >= ROUNDS for fs in per_agent)  # every round, not once
    assert all(len({repr(f) for f in fs}) == len(fs) for fs in per_agent)  # each a new state
    assert dev.stats.reports_unchanged == 0


def test_unchanged_reports_can_be_sent_anyway() -> None:
    dev, backend = _developer(idle=True)
    asyncio.run(_rounds(dev, lambda: len(backend.sent) >= 2 * ROUNDS, unchanged=True))
    assert len(backend.sent) >= 2 * ROUNDS
    assert dev.stats.reports_unchanged == 0
