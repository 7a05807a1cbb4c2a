"""`Shim.decide`, the answer to one hook call, without processes or a cluster: deny by default
before a verdict, read-only tools and commands allowed, an edit waiting for a pending verdict."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from tetherlab.shim import session as s
from tetherlab.shim.client import Master
from tetherlab.shim.run import Shim, ShimConfig


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_shim(tmp: Path) -> tuple[Shim, Clock]:
    key = tmp / "key"
    if not key.exists():
        asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    cfg = ShimConfig(masters=[Master("n1", "127.0.0.1", 9, None)], key=key, developer="alice",
                     tool="opencode", command=["true"], repo=tmp)
    clock = Clock()
    shim = Shim(cfg, clock=clock)
    assert shim.machine.handle(s.Opened(clock.t, 30.0)) == [s.StartAgent()]  # running; nothing spawned
    return shim, clock


def hook(tool: str, budget_s: float = 3.0, **tool_input: Any) -> dict[str, Any]:
    return {"v": 1, "op": "hook", "agent": "opencode", "event": "PreToolUse", "tool_name": tool,
            "tool_input": tool_input, "budget_s": budget_s}


def run(tmp: Path, body: Callable[[Shim, Clock], Awaitable[None]]) -> None:
    async def main() -> None:
        shim, clock = make_shim(tmp)
        await body(shim, clock)

    asyncio.run(main())


@pytest.mark.parametrize(("tool", "tool_input", "decision"), [
    ("read", {"filePath": "a.py"}, "allow"),
    ("grep", {"pattern": "x"}, "allow"),
    ("Read", {"file_path": "a.py"}, "allow"),
    ("bash", {"command": "git log --oneline -5"}, "allow"),
    ("Bash", {"command": "find . -name '*.py'"}, "allow"),
    ("bash", {"command": "find . -name '*.pyc' -delete"}, "deny"),
    ("Bash", {"command": "git diff --output=x"}, "deny"),
    ("write", {"filePath": "a.py", "content": "x"}, "deny"),
    ("task", {"prompt": "do it"}, "deny"),  # a subagent may write: denied by default
    ("mcp__fs__write_file", {"path": "a"}, "deny"),
    ("some_new_tool", {}, "deny"),
])
def test_before_a_verdict_only_what_cannot_write_is_allowed(tmp_path: Path, tool: str, tool_input: dict[str, Any],
                                                          decision: str) -> None:
    async def body(shim: Shim, clock: Clock) -> None:
        reply = await shim.decide(hook(tool, **tool_input))
        assert reply["decision"] == decision, reply
        if decision == "deny":
            assert reply["reason"] == s.NO_PLAN_REASON
    run(tmp_path, body)


def test_an_edit_waits_for_the_pending_verdict_then_follows_it(tmp_path: Path) -> None:
    async def body(shim: Shim, clock: Clock) -> None:
        shim.machine.handle(s.SubmitStarted())
        shim._settled.clear()
        waiting = asyncio.create_task(shim.decide(hook("write", filePath="a.py", content="x")))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        shim.machine.handle(s.VerdictReceived(clock.t, {"action": "continue", "intent_id": "i-1"}, "plan"))
        shim._settled.set()
        assert (await asyncio.wait_for(waiting, 5))["decision"] == "allow"
    run(tmp_path, body)


def test_an_edit_that_outlasts_its_budget_is_told_to_retry_not_to_plan(tmp_path: Path) -> None:
    async def body(shim: Shim, clock: Clock) -> None:
        shim.machine.handle(s.SubmitStarted())
        shim._settled.clear()
        reply = await asyncio.wait_for(shim.decide(hook("write", budget_s=0.4, filePath="a.py")), 5)
        assert reply["decision"] == "deny" and reply["reason"] == s.PENDING_REASON
        assert "Present your plan" not in reply["reason"]
    run(tmp_path, body)


def test_after_the_bound_edits_are_denied_as_unreachable(tmp_path: Path) -> None:
    async def body(shim: Shim, clock: Clock) -> None:
        shim.machine.handle(s.VerdictReceived(clock.t, {"action": "continue", "intent_id": "i-1"}, "plan"))
        assert (await shim.decide(hook("write", filePath="a.py")))["decision"] == "allow"
        clock.t += 5.01
        reply = await shim.decide(hook("write", filePath="a.py"))
        assert reply["decision"] == "deny" and reply["reason"] == s.UNREACHABLE_REASON
    run(tmp_path, body)
