"""In-flight changes of the real agents (issue 15): after each edit their hooks tell tether
(Claude Code's PostToolUse, OpenCode's ``tool.execute.after``), tether reports the working
state to the master, and what the master answers reaches the model: a concept the changes
reached is claimed, a concept someone else holds stops the agent, a shared file is a soft
conflict both agents hear of.

The model's turns that must come after the master's answer are gated on tether's events, so
the tests do not race the report.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tetherlab.chaos.agents.model_server import ModelServer, gated, text, tool_call

from .harness import (
    Box,
    Env,
    TetherRun,
    install_opencode,
    make_box,
    needs_agents,
    read_events,
    start_holder,
    stderr_path,
    tether_cmd,
    verdicts,
)
from .test_claude_code import install_claude_hooks, plan_markdown, run_sdk_piped

pytestmark = [pytest.mark.slow, pytest.mark.agents, needs_agents, pytest.mark.timeout(240)]

GATE_TIMEOUT_S = 20.0
WRITER = textwrap.dedent('''
    import json, os, signal, sys, time
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    summary, concept, path, hold_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    print("<<<TETHERLAB-PLAN")
    print(json.dumps({"summary": summary, "steps": ["work"], "concepts": {"modify": [concept], "depend": []}}))
    print("TETHERLAB-PLAN>>>", flush=True)
    time.sleep(1.0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").write("def shared_total(x):\\n    return x\\n")
    time.sleep(hold_s)
''')


def plan_block(summary: str, path: str) -> str:
    plan = {"summary": summary, "steps": [f"write {path}"], "files": [path]}
    return f"Here is my plan.\n<<<TETHERLAB-PLAN\n{json.dumps(plan)}\nTETHERLAB-PLAN>>>\n"


def verdict_count_at_least(box: Box, n: int) -> Any:
    path = stderr_path(box)
    return lambda: sum(1 for e in read_events(path) if e.get("event") == "verdict") >= n


def seen(box: Box, kind: str, name: str = "tether") -> Any:
    path = stderr_path(box, name)
    return lambda: any(e.get("event") == kind for e in read_events(path))


def run_opencode(env: Env, box: Box, dev: str, prompt: str) -> TetherRun:
    run = TetherRun(tether_cmd(env, dev, ["opencode", "run", prompt], "opencode"), box)
    try:
        run.wait()
    finally:
        run.close()
    return run


def test_opencode_changes_reaching_a_free_concept_claim_it_and_the_model_is_told(
        env: Env, model: ModelServer, tmp_path: Path) -> None:
    box = make_box(tmp_path, "ch-oc-drift", model)
    install_opencode(box, model)
    summary, planned, reached = "Add cart totals", "src/orders/cart.py", "src/inventory/stock.py"
    model.script([
        tool_call("read", text_before=plan_block(summary, planned), filePath=str(box.repo / "README.md")),
        gated(tool_call("write", filePath=str(box.repo / planned), content="TOTAL = 1\n"), seen(box, "verdict"),
              GATE_TIMEOUT_S),
        tool_call("write", filePath=str(box.repo / reached), content="STOCK = 2\n"),
        # After the master's answer to the report (a second verdict: the claim was added).
        gated(tool_call("read", filePath=str(box.repo / "README.md")), verdict_count_at_least(box, 2),
              GATE_TIMEOUT_S),
        text("all done")])
    run = run_opencode(env, box, "bob", summary)
    assert run.proc.returncode == 0, run.report()
    v = verdicts(run.events())
    assert [c["concept"] for c in v[0]["claims"]["modify"]] == ["orders.cart"], run.report()
    drift = [x for x in v if (x.get("drift") or {}).get("claimed")]
    assert drift and drift[0]["drift"]["claimed"] == ["inventory.stock"], run.report()
    assert drift[0]["fencing_token"] > v[0]["fencing_token"]
    assert not any(r.gate_timed_out for r in model.requests), model.summary()
    # The master's answer reached the model (through the plugin's after-hook into a tool result,
    # or the system prompt tether's context goes into on the next request, whichever came first).
    told = [r for r in model.conversation() if "now claimed for intent" in r.text()]
    assert told, model.summary()


def test_opencode_and_a_plain_agent_changing_one_file_both_hear_of_the_soft_conflict(
        env: Env, model: ModelServer, tmp_path: Path) -> None:
    shared = "src/common/totals.py"
    plain_box = make_box(tmp_path, "ch-soft-plain", model)
    plain_box.env["TETHER_REPORT_INTERVAL_S"] = "0.5"  # no hooks: it reports on its interval
    plain = TetherRun(tether_cmd(env, "alice", [sys.executable, "-c", WRITER, "Tax totals", "pricing.rules",
                                                str(plain_box.repo / shared), "60"], "scripted"),
                      plain_box, name="plain")
    try:
        assert plain.wait_event("verdict", 30) is not None, plain.report()
        box = make_box(tmp_path, "ch-soft-oc", model)
        install_opencode(box, model)
        box.env["TETHER_REPORT_INTERVAL_S"] = "0.5"
        summary, planned = "Discount rules for carts", "src/wishlist/discount.py"
        model.script([
            tool_call("read", text_before=plan_block(summary, planned), filePath=str(box.repo / "README.md")),
            gated(tool_call("write", filePath=str(box.repo / planned), content="D = 1\n"), seen(box, "verdict"),
                  GATE_TIMEOUT_S),
            tool_call("write", filePath=str(box.repo / shared), content="def shared_total(x):\n    return 2 * x\n"),
            gated(tool_call("read", filePath=str(box.repo / "README.md")), seen(box, "soft_conflict"),
                  GATE_TIMEOUT_S),
            # Bob stays on his intent until the plain agent has heard of the overlap too (it hears
            # on a heartbeat, once a second; the overlap ends when Bob completes).
            gated(text("all done"), seen(plain_box, "soft_conflict", "plain"), GATE_TIMEOUT_S)])
        run = run_opencode(env, box, "bob", summary)
        assert run.proc.returncode == 0, run.report()
        soft = [e for e in run.events() if e["event"] == "soft_conflict"]
        assert soft and "alice/" in json.dumps(soft[0]) and shared in json.dumps(soft[0]), run.report()
        assert any("alice/" in r.text() and "is also changing" in r.text() for r in model.conversation()), \
            model.summary()
        # The plain agent heard of it too (in its next heartbeat reply).
        assert plain.wait_event("soft_conflict", 15) is not None, plain.report()
        told = [e for e in plain.events() if e["event"] == "soft_conflict"]
        assert "bob/" in json.dumps(told[0]) and shared in json.dumps(told[0])
        assert all(x["action"] == "continue" for x in verdicts(run.events()) + verdicts(plain.events()))
    finally:
        plain.close()


def test_claude_code_changes_reaching_a_concept_another_agent_modifies_revert_it(
        env: Env, model: ModelServer, tmp_path: Path) -> None:
    holder = start_holder(env, make_box(tmp_path, "ch-cc-alice", model), "alice", "Rework stock levels",
                          "warehouse.stock")
    try:
        box = make_box(tmp_path, "ch-cc-bob", model)
        install_claude_hooks(box)
        summary, planned, reached = "Add gift wrapping", "src/giftwrap/wrap.py", "src/warehouse/levels.py"
        model.script([tool_call("ExitPlanMode", plan=plan_markdown(summary, planned)),
                      tool_call("Write", file_path=str(box.repo / planned), content="written\n"),
                      tool_call("Write", file_path=str(box.repo / reached), content="LEVEL = 3\n"),
                      # Claude waits for this turn until tether is stopping it.
                      gated(text("all done"), seen(box, "stopping"), GATE_TIMEOUT_S)])
        run, _ = run_sdk_piped(env, box, "bob", summary)
        events = run.events()
        assert run.proc.returncode == 5, run.report()  # stopped, its changes stashed
        revert = [v for v in verdicts(events) if v["action"] == "revert"]
        assert revert and revert[0]["drift"]["blocked"] == ["warehouse.stock"], run.report()
        assert revert[0]["conflicts"][0]["holder_agent_id"].startswith("alice/")
        assert not (box.repo / reached).exists() and not (box.repo / planned).exists()
        assert any(e["event"] == "reverted" for e in events), run.report()
    finally:
        holder.close()

