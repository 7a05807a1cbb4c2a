"""The real Claude Code under `tether run`, against the scripted model and a real cluster.

Hooks come from `tether install claude-code` (the repository's .claude/settings.json). Cases:
a headless `-p` write before any verdict; SDK mode (stream-json on stdin, `--permission-mode
plan`) where ExitPlanMode's plan becomes the intent; interactive plan mode in a terminal; a
conflicting plan stopped with the holder named; the world slice reaching the model.

SDK mode runs headless: stream-json goes through `tether run`'s own stdin and stdout (tether
gives the agent plain pipes when its stdin is not a terminal), the way a script or CI job runs
it; the same flow with the agent's stdin redirected from a FIFO inside the wrapped command is
kept as a second route.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tetherlab.chaos.agents.model_server import ModelServer, text, tool_call

from .harness import (
    Box,
    Env,
    TetherRun,
    TmuxRun,
    install_claude_hooks,
    intents,
    make_box,
    needs_agents,
    preseed_claude,
    start_holder,
    tether_cmd,
    verdicts,
)

pytestmark = [pytest.mark.slow, pytest.mark.agents, needs_agents, pytest.mark.timeout(240)]

SDK = ["claude", "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
       "--permission-prompt-tool", "stdio", "--permission-mode", "plan"]
WORLD_HEADING = "# Tetherlab world slice"
NO_PLAN_YET = "no accepted plan yet"
SDK_WAIT_S = 60.0
FIFO_OPEN_TIMEOUT_S = 30.0
YES = re.compile(r"\u276f\s*1\.\s*Yes")  # the selected first option of a dialog


def plan_markdown(summary: str, path: str) -> str:
    return f"# {summary}\n\n1. Write `{path}`\n2. Cover it with a test\n"


def prepare(env: Env, model: ModelServer, tmp_path: Path, name: str) -> Box:
    box = make_box(tmp_path, name, model)
    install_claude_hooks(box)
    return box


def my_intents(env: Env, summary: str) -> list[dict[str, Any]]:
    return [i for i in intents(env.cluster) if i["summary"] == summary]


def world_after_plan(model: ModelServer) -> bool:
    """The world slice is in a request made after the plan (ExitPlanMode's additionalContext)."""
    return any(WORLD_HEADING in r.text() for r in model.conversation()[1:])


# --- SDK mode: stream-json in, stream-json out -------------------------------------------------


def sdk_session(write: Callable[[dict[str, Any]], None], run: TetherRun, prompt: str,
                timeout_s: float = SDK_WAIT_S) -> list[dict[str, Any]]:
    """Send one user message, allow every permission request (ExitPlanMode, Write), and return
    the JSON messages Claude printed up to its result (fewer if it ended or timed out first)."""
    write({"type": "user", "message": {"role": "user", "content": prompt}})
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    i = 0
    while time.monotonic() < deadline:
        got = run.wait_line(lambda ln: ln.lstrip().startswith("{"), deadline - time.monotonic(), i)
        if got is None:
            break
        i = got[0] + 1
        try:
            msg = json.loads(got[1].strip())
        except ValueError:
            continue
        seen.append(msg)
        if msg.get("type") == "control_request" and msg.get("request", {}).get("subtype") == "can_use_tool":
            write({"type": "control_response", "response": {
                "subtype": "success", "request_id": msg["request_id"],
                "response": {"behavior": "allow", "updatedInput": msg["request"].get("input", {})}}})
        if msg.get("type") == "result":
            break
    return seen


def run_sdk_piped(env: Env, box: Box, dev: str, prompt: str) -> tuple[TetherRun, list[dict[str, Any]]]:
    """SDK mode the way a script or CI job runs it: stream-json on tether's stdin."""
    run = TetherRun(tether_cmd(env, dev, SDK, "claude-code"), box, stdin=subprocess.PIPE)
    assert run.proc.stdin is not None

    def write(obj: dict[str, Any]) -> None:
        try:
            run.proc.stdin.write(json.dumps(obj).encode() + b"\n")  # type: ignore[union-attr]
            run.proc.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, ValueError):
            pass  # tether is gone: the assertions report it

    try:
        seen = sdk_session(write, run, prompt)
        run.proc.stdin.close()
        run.wait()
    finally:
        run.close()
    return run, seen


def run_sdk_fifo(env: Env, box: Box, dev: str, prompt: str) -> tuple[TetherRun, list[dict[str, Any]]]:
    """SDK mode with the agent's stdin redirected from a FIFO inside the wrapped command (tether's
    own stdin is /dev/null, so the agent runs headless too)."""
    fifo = box.runtime / "stdin.fifo"
    os.mkfifo(fifo)
    run = TetherRun(tether_cmd(env, dev, ["bash", "-c", 'exec "$@" < "$0"', str(fifo), *SDK], "claude-code"), box)
    fd: int | None = None
    try:
        deadline = time.monotonic() + FIFO_OPEN_TIMEOUT_S
        while fd is None and time.monotonic() < deadline and run.proc.poll() is None:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until the agent opens its end
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                time.sleep(0.05)
        assert fd is not None, f"the agent never opened its stdin FIFO\n{run.report()}"
        os.set_blocking(fd, True)
        out = fd

        def write(obj: dict[str, Any]) -> None:
            with_newline = json.dumps(obj).encode() + b"\n"
            try:
                os.write(out, with_newline)
            except BrokenPipeError:
                pass

        seen = sdk_session(write, run, prompt)
        os.close(fd)
        fd = None
        run.wait()
    finally:
        if fd is not None:
            os.close(fd)
        run.close()
    return run, seen


def check_plan_became_the_intent(env: Env, model: ModelServer, run: TetherRun, box: Box, summary: str,
                                 concept: str, path: str) -> None:
    events = run.events()
    v = verdicts(events)
    assert v and v[0]["action"] == "continue", run.report()
    assert [c["concept"] for c in v[0]["claims"]["modify"]] == [concept], v[0]
    mine = my_intents(env, summary)
    assert len(mine) == 1 and mine[0]["intent_id"] == v[0]["intent_id"], mine
    assert (box.repo / path).read_text() == "written\n", run.report()
    assert run.proc.returncode == 0, run.report()
    assert any(e["event"] == "complete" for e in events), run.report()
    # The model saw the approval, then the write succeed, then the world slice (ExitPlanMode's context).
    results = model.tool_results()
    assert [r["is_error"] for r in results] == [False, False], model.summary()
    assert world_after_plan(model), model.summary()
    assert concept in next(r.text() for r in model.conversation()[1:] if WORLD_HEADING in r.text())


# --- (a) headless -p: a write before any plan ------------------------------------------------


def test_headless_write_before_a_verdict_is_denied_and_the_model_gets_the_reason(
        env: Env, model: ModelServer, tmp_path: Path) -> None:
    box = prepare(env, model, tmp_path, "a")
    target = box.repo / "src/billing/pdf.py"
    model.script([tool_call("Write", file_path=str(target), content="written\n"), text("I will plan first.")])
    run = TetherRun(tether_cmd(env, "carol", ["claude", "-p", "Add invoice PDF export", "--permission-mode",
                                              "acceptEdits"], "claude-code"), box)
    try:
        code = run.wait()
    finally:
        run.close()
    assert code == 0, run.report()  # a denied tool call does not fail a headless run
    assert not target.exists()
    results = model.tool_results()
    assert len(results) == 1 and results[0]["is_error"] is True, model.summary()
    assert NO_PLAN_YET in results[0]["text"] and "Present your plan first" in results[0]["text"], results
    # SessionStart's additionalContext reached the model in its first request.
    assert "print your plan before editing" in model.conversation()[0].text(), model.summary()
    assert not verdicts(run.events())


# --- (b) SDK mode: ExitPlanMode's plan becomes the intent ------------------------------------


def test_sdk_plan_through_a_pipe_becomes_the_intent(env: Env, model: ModelServer, tmp_path: Path) -> None:
    box = prepare(env, model, tmp_path, "b-pipe")
    summary, path = "Add a search index", "src/search/index.py"
    model.script([tool_call("ExitPlanMode", plan=plan_markdown(summary, path)),
                  tool_call("Write", file_path=str(box.repo / path), content="written\n"), text("all done")])
    run, seen = run_sdk_piped(env, box, "carol", summary)
    assert any(m.get("type") == "result" for m in seen), run.report()
    check_plan_became_the_intent(env, model, run, box, summary, "search.index", path)


def test_sdk_plan_via_a_fifo_becomes_the_intent_and_the_world_slice_reaches_the_model(
        env: Env, model: ModelServer, tmp_path: Path) -> None:
    box = prepare(env, model, tmp_path, "b-fifo")
    summary, path = "Add invoice PDF export", "src/billing/pdf.py"
    model.script([tool_call("ExitPlanMode", plan=plan_markdown(summary, path)),
                  tool_call("Write", file_path=str(box.repo / path), content="written\n"), text("all done")])
    run, seen = run_sdk_fifo(env, box, "carol", summary)
    assert any(m.get("type") == "result" and m.get("subtype") == "success" for m in seen), run.report()
    check_plan_became_the_intent(env, model, run, box, summary, "billing.invoices", path)
    # The hook saw Claude's plan, so the intent carries its steps.
    assert my_intents(env, summary)[0]["status"] == "completed"


# --- (c) interactive plan mode in a terminal --------------------------------------------------


def answer_dialogs(t: TmuxRun, done_text: str) -> Callable[[str], bool]:
    """Approve Claude's dialogs (exit plan mode, create file) and leave with /exit once done."""
    sent_exit = False

    def answer(screen: str) -> bool:
        nonlocal sent_exit
        if YES.search(screen):
            t.keys("Enter")
            return True
        if done_text in screen and not sent_exit:
            t.keys("/exit", literal=True)
            time.sleep(0.3)
            t.keys("Enter")
            sent_exit = True
            return True
        return False

    return answer


def test_interactive_plan_mode_in_a_terminal(env: Env, model: ModelServer, tmp_path: Path) -> None:
    box = prepare(env, model, tmp_path, "c")
    preseed_claude(box)
    summary, path = "Add product catalog pages", "src/catalog/pages.py"
    model.script([tool_call("ExitPlanMode", plan=plan_markdown(summary, path)),
                  tool_call("Write", file_path=str(box.repo / path), content="written\n"), text("all done")])
    t = TmuxRun(tether_cmd(env, "carol", ["claude", "--permission-mode", "plan", summary], "claude-code"), box)
    try:
        code = t.drive(answer_dialogs(t, "all done"))
    finally:
        t.close()
    assert code == 0, t.report()
    assert any("Exit plan mode?" in s for s in t.screens), t.report()
    events = t.events()
    v = verdicts(events)
    assert v and v[0]["action"] == "continue", t.report()
    assert [c["concept"] for c in v[0]["claims"]["modify"]] == ["catalog.products"]
    assert (box.repo / path).read_text() == "written\n"
    mine = my_intents(env, summary)
    assert len(mine) == 1 and mine[0]["status"] == "completed", mine
    assert world_after_plan(model), model.summary()


# --- (e) a conflicting plan is stopped, naming the holder -------------------------------------


def check_stopped_by_holder(events: list[dict[str, Any]], code: int | None, concept: str, holder_summary: str,
                            report: str) -> None:
    assert code == 4, report
    v = verdicts(events)
    assert v and v[0]["action"] == "stop", report
    conflict = v[0]["conflicts"][0]
    assert conflict["holder_agent_id"].startswith("alice/") and conflict["concept"] == concept, conflict
    assert conflict["holder_summary"] == holder_summary
    stopping = next(e for e in events if e["event"] == "stopping")
    assert "alice/" in stopping["reason"] and concept in stopping["reason"], stopping


def test_interactive_conflicting_plan_is_stopped_naming_the_holder(
        env: Env, model: ModelServer, tmp_path: Path) -> None:
    holder_box = make_box(tmp_path, "e-alice", model)
    holder = start_holder(env, holder_box, "alice", "Rework user profiles", "accounts.profiles")
    try:
        box = prepare(env, model, tmp_path, "e-bob")
        preseed_claude(box)
        summary, path = "Add avatars to profiles", "src/accounts/avatar.py"
        model.script([tool_call("ExitPlanMode", plan=plan_markdown(summary, path)),
                      tool_call("Write", file_path=str(box.repo / path), content="written\n"), text("all done")])
        t = TmuxRun(tether_cmd(env, "bob", ["claude", "--permission-mode", "plan", summary], "claude-code"), box)
        try:
            code = t.drive(answer_dialogs(t, "all done"), timeout_s=60)
        finally:
            t.close()
        check_stopped_by_holder(t.events(), code, "accounts.profiles", "Rework user profiles", t.report())
        assert not (box.repo / path).exists(), "the write after a stop must not happen"
        # The model never got past the plan: no tool result carries a successful write.
        assert all("File created" not in r["text"] for r in model.tool_results()), model.summary()
    finally:
        holder.close()


def test_sdk_conflicting_plan_through_a_pipe_is_stopped_naming_the_holder(
        env: Env, model: ModelServer, tmp_path: Path) -> None:
    holder_box = make_box(tmp_path, "e2-alice", model)
    holder = start_holder(env, holder_box, "alice", "Replace the session store", "auth.session-store")
    try:
        box = prepare(env, model, tmp_path, "e2-bob")
        summary, path = "Add session expiry", "src/auth/expiry.py"
        model.script([tool_call("ExitPlanMode", plan=plan_markdown(summary, path)),
                      tool_call("Write", file_path=str(box.repo / path), content="written\n"), text("all done")])
        run, _ = run_sdk_piped(env, box, "bob", summary)
        check_stopped_by_holder(run.events(), run.proc.returncode, "auth.session-store", "Replace the session store",
                                run.report())
        assert not (box.repo / path).exists()
    finally:
        holder.close()
