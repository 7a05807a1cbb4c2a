"""The OpenCode plugin, loaded by node and driven against a fake `tether run` socket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_tether import HANG, FakeTether

PLUGIN = Path(__file__).resolve().parents[2] / "shim" / "opencode_plugin.js"
NODE = shutil.which("node") or ("/usr/bin/node" if os.path.exists("/usr/bin/node") else None)
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def answer(request: dict[str, object]) -> bytes:
    if request.get("event") == "SessionStart":
        body = {"decision": "allow", "reason": "", "context": f"world slice for {request.get('session_id')}"}
    elif request.get("event") == "PostToolUse":
        body = {"decision": "allow", "reason": "", "context": "Tetherlab: bob/2 is also changing src/a.ts"
                if request.get("tool_name") == "edit" else ""}
        if request.get("tool_name") == "bash":
            body = {"decision": "stop", "reason": "changes reached billing, held by bob/2", "context": ""}
    else:
        body = {
            "edit": {"decision": "allow", "reason": "", "context": ""},
            "write": {"decision": "deny", "reason": "alice/1 holds auth.session-store-contract", "context": ""},
            "bash": {"decision": "stop", "reason": "master quorum unreachable", "context": ""},
        }.get(str(request.get("tool_name")), {})
    if request.get("tool_name") == "hang":
        return HANG
    if request.get("tool_name") == "garbage":
        return b"not json\n"
    return json.dumps(body).encode() + b"\n"


DRIVER = r"""
import { pathToFileURL } from "node:url";
const mod = await import(pathToFileURL(process.argv[2]).href);
const out = {};
async function outcome(fn) {
  const t0 = Date.now();
  try { await fn(); return { threw: false, ms: Date.now() - t0 }; }
  catch (e) { return { threw: true, message: String(e && e.message), ms: Date.now() - t0 }; }
}
const ctx = { directory: "/repo", worktree: "/repo" };
const hooks = await mod.TetherlabPlugin(ctx);
out.sameExport = mod.default === mod.TetherlabPlugin;
out.exports = Object.keys(mod).sort();
out.secondRegistration = Object.keys(await mod.default(ctx));
const before = hooks["tool.execute.before"];
const after = hooks["tool.execute.after"];
for (const tool of ["edit", "write", "bash"]) {
  const result = { title: tool, output: "done", metadata: {} };
  out["after_" + tool] = await outcome(() => after({ tool, sessionID: "s1", callID: "c2" }, result));
  out["after_" + tool].output = result.output;
}
const transform = hooks["experimental.chat.system.transform"];
const call = (tool) => before({ tool, sessionID: "s1", callID: "c1" }, { args: { filePath: "src/a.ts" } });
for (const tool of ["edit", "write", "bash", "garbage"]) out[tool] = await outcome(() => call(tool));
process.env.TETHER_HOOK_BUDGET_S = "0.3";
out.hang = await outcome(() => call("hang"));
delete process.env.TETHER_HOOK_BUDGET_S;
const sys = { system: ["base prompt"] };
await transform({ sessionID: "s1" }, sys);
out.system = sys.system;
const odd = {};
await transform(undefined, odd);
out.oddSystem = odd.system;
process.env.TETHER_SOCK = "/tmp/definitely-not-a-tether.sock";
out.missing = await outcome(() => call("edit"));
const warn = { system: [] };
await transform({ sessionID: "s1" }, warn);
out.warning = warn.system;
delete process.env.TETHER_SOCK;
out.unset = await outcome(() => call("edit"));
console.log(JSON.stringify(out));
"""


@pytest.fixture
def fake() -> Iterator[FakeTether]:
    server = FakeTether(answer)
    try:
        yield server
    finally:
        server.close()


def test_node_check() -> None:
    proc = subprocess.run([str(NODE), "--check", str(PLUGIN)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_plugin_blocks_and_allows(fake: FakeTether, tmp_path: Path) -> None:
    # .mjs so node loads it as an ES module whatever package.json says (OpenCode's Bun does so for .js).
    plugin = tmp_path / "tetherlab.mjs"
    shutil.copy(PLUGIN, plugin)
    driver = tmp_path / "driver.mjs"
    driver.write_text(DRIVER)
    env = {**os.environ, "TETHER_SOCK": fake.path}
    env.pop("TETHER_HOOK_BUDGET_S", None)
    proc = subprocess.run(
        [str(NODE), str(driver), str(plugin)], capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)

    # OpenCode calls every export as a plugin: only the plugin itself, registered once.
    assert out["sameExport"] and out["exports"] == ["TetherlabPlugin", "default"]
    assert out["secondRegistration"] == []

    assert out["edit"]["threw"] is False
    assert out["write"]["threw"] and "alice/1 holds auth.session-store-contract" in out["write"]["message"]
    assert out["bash"]["threw"] and "master quorum unreachable" in out["bash"]["message"]
    assert out["garbage"]["threw"] and "malformed" in out["garbage"]["message"]
    assert out["hang"]["threw"] and "in time" in out["hang"]["message"] and out["hang"]["ms"] < 3000
    assert out["missing"]["threw"] and "unreachable" in out["missing"]["message"]
    assert out["unset"]["threw"] and "TETHER_SOCK is not set" in out["unset"]["message"]

    # After a tool ran: news from the master is appended to the output the model reads; a stop
    # (the changes drifted onto someone's concept) throws; nothing to tell changes nothing.
    assert out["after_edit"] == {**out["after_edit"], "threw": False,
                                 "output": "done\n\nTetherlab: bob/2 is also changing src/a.ts"}
    assert out["after_write"]["threw"] is False and out["after_write"]["output"] == "done"
    assert out["after_bash"]["threw"] and "held by bob/2" in out["after_bash"]["message"]
    after = [r for r in fake.requests if r.get("event") == "PostToolUse"]
    assert [r["tool_name"] for r in after] == ["edit", "write", "bash"]
    assert out["system"] == ["base prompt", "world slice for s1"]
    assert out["oddSystem"] == ["world slice for None"]  # session_id null reached the server
    assert len(out["warning"]) == 1 and "unreachable" in out["warning"][0]

    edit = next(r for r in fake.requests if r.get("tool_name") == "edit" and r["event"] == "PreToolUse")
    assert edit == {
        "v": 1,
        "op": "hook",
        "agent": "opencode",
        "event": "PreToolUse",
        "session_id": "s1",
        "cwd": "/repo",
        "tool_name": "edit",
        "tool_input": {"filePath": "src/a.ts"},
        "prompt": None,
        "budget_s": 2.8,  # the plugin's budget less its margin: tether waits within it
    }
