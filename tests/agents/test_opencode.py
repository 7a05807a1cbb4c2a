"""The real OpenCode (`opencode run`) under `tether run`, with Tetherlab's plugin, against the
scripted model (an OpenAI-compatible provider in the repository's opencode.json) and a real
cluster. The model prints its plan as a TETHERLAB-PLAN block (tether scans the agent's output)
and the plugin asks tether before every tool call.

Where a case depends on the verdict having arrived before the next model turn, that turn is
gated on tether's `verdict` event (model_server.gated), so the test does not race the master.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tetherlab.chaos.agents.model_server import ModelServer, gated, text, tool_call

from .harness import (
    Box,
    Env,
    TetherRun,
    event_seen,
    install_opencode,
    intents,
    make_box,
    needs_agents,
    start_holder,
    tether_cmd,
    verdicts,
)

pytestmark = [pytest.mark.slow, pytest.mark.agents, needs_agents, pytest.mark.timeout(240)]

WORLD_HEADING = "# Tetherlab world slice"
GATE_TIMEOUT_S = 15.0


def plan_block(summary: str, path: str) -> str:
    plan = {"summary": summary, "steps": [f"write {path}"], "files": [path]}
    return f"Here is my plan.\n<<<TETHERLAB-PLAN\n{json.dumps(plan)}\nTETHERLAB-PLAN>>>\n"


def run_opencode(env: Env, box: Box, dev: str, prompt: str, fmt: str = "default") -> TetherRun:
    run = TetherRun(tether_cmd(env, dev, ["opencode", "run", "--format", fmt, prompt], "opencode"), box)
    try:
        run.wait()
    finally:
        run.close()
    return run


def prepare(env: Env, model: ModelServer, tmp_path: Path, name: str) -> Box:
    box = make_box(tmp_path, name, model)
    install_opencode(box, model)
    return box


def write_results(model: ModelServer) -> list[dict[str, Any]]:
    return [r for r in model.tool_results() if "README" not in r["text"] and "shop" not in r["text"]]


def test_opencode_write_before_a_plan_is_denied_and_the_model_gets_the_reason(
        env: Env, model: ModelServer, tmp_path: Path) -> None:
    box = prepare(env, model, tmp_path, "oc-a")
    target = box.repo / "src/billing/refund.py"
    model.script([tool_call("write", filePath=str(target), content="written\n"), text("I will plan first.")])
    run = run_opencode(env, box, "bob", "Add refunds")
    assert run.proc.returncode == 0, run.report()
    assert not target.exists()
    results = model.tool_results()
    assert len(results) == 1 and "no accepted plan yet" in results[0]["text"], model.summary()
    assert "Tetherlab: Tetherlab:" not in results[0]["text"], results[0]["text"]  # the plugin prefixes once
    # The plugin's system-prompt hook put tether's context in front of the model.
    assert "print your plan before editing" in model.conversation()[0].text(), model.summary()
    # No npm install and no registry: the pre-installed @opencode-ai/plugin was used.
    assert not (box.home / ".npm").exists()


@pytest.mark.parametrize(("fmt", "concept", "area"), [("default", "shipping.rates", "shipping"),
                                                    ("json", "search.index", "search")])
def test_opencode_plan_and_write_in_one_message_get_the_verdict(
        env: Env, model: ModelServer, tmp_path: Path, fmt: str, concept: str, area: str) -> None:
    """The write is tried about 25 ms after the plan is printed, before its verdict: it waits for
    the verdict instead of being told to present a plan (also when the block is inside JSON)."""
    box = prepare(env, model, tmp_path, f"oc-d-{fmt}")
    summary, path = f"Add {area} rates", f"src/{area}/rates.py"
    model.script([tool_call("write", text_before=plan_block(summary, path), filePath=str(box.repo / path),
                            content="written\n"), text("all done")])
    run = run_opencode(env, box, "bob", summary, fmt=fmt)
    v = verdicts(run.events())
    assert v and v[0]["action"] == "continue", run.report()  # the plan itself is accepted...
    assert [c["concept"] for c in v[0]["claims"]["modify"]] == [concept]
    results = model.tool_results()
    assert results and "no accepted plan yet" not in results[0]["text"], model.summary()  # ...the write is not
    assert (box.repo / path).read_text() == "written\n"


def test_opencode_plan_then_write_after_the_verdict_and_the_world_slice_reaches_the_model(
        env: Env, model: ModelServer, tmp_path: Path) -> None:
    box = prepare(env, model, tmp_path, "oc-f")
    summary, path = "Add CSV report exports", "src/reports/csv.py"
    model.script([tool_call("read", text_before=plan_block(summary, path), filePath=str(box.repo / "README.md")),
                  gated(tool_call("write", filePath=str(box.repo / path), content="written\n"),
                        event_seen(box, "verdict"), GATE_TIMEOUT_S),
                  text("all done")])
    run = run_opencode(env, box, "bob", summary)
    assert run.proc.returncode == 0, run.report()
    events = run.events()
    v = verdicts(events)
    assert v and v[0]["action"] == "continue", run.report()
    assert [c["concept"] for c in v[0]["claims"]["modify"]] == ["reports.exports"]
    assert not any(r.gate_timed_out for r in model.requests), model.summary()
    assert (box.repo / path).read_text() == "written\n", model.summary()
    assert any(e["event"] == "complete" for e in events), run.report()
    mine = [i for i in intents(env.cluster) if i["summary"] == summary]
    assert len(mine) == 1 and mine[0]["status"] == "completed", mine
    # The write's request (turn 1) carries the world slice in its system prompt.
    turn1 = next(r for r in model.conversation() if r.turn == 1)
    system = " ".join(str(m.get("content")) for m in turn1.body["messages"] if m.get("role") == "system")
    assert WORLD_HEADING in system and "reports.exports" in system, system[-2000:]


def test_opencode_conflicting_plan_is_stopped_naming_the_holder(
        env: Env, model: ModelServer, tmp_path: Path) -> None:
    holder = start_holder(env, make_box(tmp_path, "oc-e-alice", model), "alice", "Rewrite email templates",
                          "notifications.email")
    try:
        box = prepare(env, model, tmp_path, "oc-e-bob")
        summary, path = "Add email digests", "src/notifications/digest.py"
        model.script([tool_call("read", text_before=plan_block(summary, path), filePath=str(box.repo / "README.md")),
                      gated(tool_call("write", filePath=str(box.repo / path), content="written\n"),
                            event_seen(box, "verdict"), GATE_TIMEOUT_S),
                      text("all done")])
        run = run_opencode(env, box, "bob", summary)
        assert run.proc.returncode == 4, run.report()
        events = run.events()
        v = verdicts(events)
        assert v and v[0]["action"] == "stop", run.report()
        conflict = v[0]["conflicts"][0]
        assert conflict["holder_agent_id"].startswith("alice/") and conflict["concept"] == "notifications.email"
        stopping = next(e for e in events if e["event"] == "stopping")
        assert "alice/" in stopping["reason"] and "notifications.email" in stopping["reason"], stopping
        assert not (box.repo / path).exists(), "the write after a stop must not happen"
        for r in write_results(model):  # if the write reached the plugin before the agent died, it was refused
            assert "stop" in r["text"].lower(), r
    finally:
        holder.close()
