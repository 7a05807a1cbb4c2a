"""`tether hook claude-code`: the pure mapping, the socket client, and the real executable."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_tether import HANG, FakeTether

from tetherlab.shim import cli, hooks

TETHER = Path(sys.executable).parent / "tether"

# --- fixtures in Claude Code's documented stdin format --------------------------------


def claude_payload(event: str, **extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "session_id": "abc123",
        "transcript_path": "/home/dev/.claude/projects/x/abc123.jsonl",
        "cwd": "/home/dev/repo",
        "permission_mode": "default",
        "hook_event_name": event,
    }
    base.update(extra)
    return base


EDIT = claude_payload(
    "PreToolUse",
    tool_name="Edit",
    tool_input={"file_path": "/home/dev/repo/auth.py", "old_string": "a", "new_string": "b"},
    tool_use_id="toolu_01",
)
BASH = claude_payload("PreToolUse", tool_name="Bash", tool_input={"command": "sed -i s/a/b/ x"}, tool_use_id="toolu_02")
PLAN = claude_payload(
    "PreToolUse",
    permission_mode="plan",
    tool_name="ExitPlanMode",
    tool_input={"plan": "# Plan\n\n1. Move sessions to Redis", "planFilePath": "/tmp/plan.md"},
    tool_use_id="toolu_03",
)
SESSION_START = claude_payload("SessionStart", source="startup")
PROMPT = claude_payload("UserPromptSubmit", prompt="add a login page")


def reply(decision: str, reason: str = "", context: str = "") -> dict[str, object]:
    return {"decision": decision, "reason": reason, "context": context}


def deny_json(reason: str) -> dict[str, object]:
    return {
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": "deny",
            "permissionDecisionReason": reason,
        }
    }


def context_json(event: str, context: str) -> dict[str, object]:
    return {"hookSpecificOutput": {"hookEventName": event, "additionalContext": context}}


# --- the pure mapping -------------------------------------------------------------------

MAPPING = [
    # (payload, reply, expected exit code, expected stdout JSON)
    (EDIT, reply("allow"), 0, None),
    (
        EDIT,
        reply("allow", context="Bob holds auth.session-store-contract"),
        0,
        context_json("PreToolUse", "Bob holds auth.session-store-contract"),
    ),
    (EDIT, reply("deny", "no continue verdict yet"), 0, deny_json("no continue verdict yet")),
    (BASH, reply("deny", "conflict with alice/1"), 0, deny_json("conflict with alice/1")),
    (PLAN, reply("allow", context="verdict: continue"), 0, context_json("PreToolUse", "verdict: continue")),
    (
        PLAN,
        reply("deny", "conflicts with alice/1 on auth.session-store-contract"),
        0,
        deny_json("conflicts with alice/1 on auth.session-store-contract"),
    ),
    (
        EDIT,
        reply("stop", "quorum lost"),
        0,
        {"continue": False, "stopReason": "quorum lost", **deny_json("quorum lost")},
    ),
    (
        SESSION_START,
        reply("allow", context="## World slice\n- auth: alice"),
        0,
        context_json("SessionStart", "## World slice\n- auth: alice"),
    ),
    (SESSION_START, reply("allow"), 0, None),
    (PROMPT, reply("allow", context="world"), 0, context_json("UserPromptSubmit", "world")),
    (PROMPT, reply("stop", "revert ordered"), 0, {"continue": False, "stopReason": "revert ordered"}),
    (PROMPT, reply("deny", "held by bob"), 0, context_json("UserPromptSubmit", "Tetherlab: held by bob")),
    (claude_payload("PostToolUse", tool_name="Edit"), reply("deny", "x"), 0, None),
    (claude_payload("PostToolUse", tool_name="Edit"), reply("allow"), 0, None),
    (claude_payload("PostToolUse", tool_name="Edit"), reply("allow", context="bob is also changing app.py"), 0,
     context_json("PostToolUse", "bob is also changing app.py")),
    (claude_payload("PostToolUse", tool_name="Edit"), reply("stop", "drift"), 0,
     {"continue": False, "stopReason": "drift"}),
    (claude_payload("Stop"), reply("allow", context="x"), 0, None),
]


@pytest.mark.parametrize(("payload", "answer", "code", "expected"), MAPPING)
def test_mapping(payload: dict[str, object], answer: dict[str, object], code: int, expected: object) -> None:
    assert hooks.handle_claude(payload, lambda _req: answer) == (code, expected)


def test_request_built_from_documented_fields() -> None:
    assert hooks.build_request("claude-code", PLAN) == {
        "v": 1,
        "op": "hook",
        "agent": "claude-code",
        "event": "PreToolUse",
        "session_id": "abc123",
        "cwd": "/home/dev/repo",
        "tool_name": "ExitPlanMode",
        "tool_input": PLAN["tool_input"],
        "prompt": None,
    }
    req = hooks.build_request("claude-code", PROMPT)
    assert (req["event"], req["prompt"], req["tool_name"], req["tool_input"]) == (
        "UserPromptSubmit",
        "add a login page",
        None,
        None,
    )


@pytest.mark.parametrize("payload", [EDIT, BASH, PLAN])
def test_unreachable_denies_tool_calls(payload: dict[str, object]) -> None:
    def boom(_req: dict[str, object]) -> dict[str, object]:
        raise hooks.TetherUnreachable("no reply from the tether shim in time")

    code, out = hooks.handle_claude(payload, boom)
    assert code == 0 and out is not None
    spec = out["hookSpecificOutput"]
    assert isinstance(spec, dict)
    assert spec["permissionDecision"] == "deny"
    assert "tether shim is unreachable" in spec["permissionDecisionReason"]


@pytest.mark.parametrize("payload", [SESSION_START, PROMPT])
def test_unreachable_warns_in_context(payload: dict[str, object]) -> None:
    def boom(_req: dict[str, object]) -> dict[str, object]:
        raise ConnectionRefusedError("refused")  # Not even a TetherUnreachable: still fails closed.

    code, out = hooks.handle_claude(payload, boom)
    assert code == 0 and out is not None
    spec = out["hookSpecificOutput"]
    assert isinstance(spec, dict)
    assert spec["hookEventName"] == payload["hook_event_name"]
    assert "unreachable" in spec["additionalContext"] and "permissionDecision" not in spec


def test_unusable_input_blocks_with_exit_2() -> None:
    assert hooks.handle_claude(None, lambda _r: reply("allow")) == (2, None)
    assert hooks.handle_claude([1, 2], lambda _r: reply("allow")) == (2, None)


def test_context_truncated_to_claude_limit() -> None:
    code, out = hooks.handle_claude(SESSION_START, lambda _r: reply("allow", context="x" * 50_000))
    assert code == 0 and out is not None
    text = out["hookSpecificOutput"]["additionalContext"]  # type: ignore[index]
    assert len(text) == hooks.MAX_CONTEXT_CHARS and text.endswith(hooks.TRUNCATION_MARK)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'{"decision": "maybe"}',
        b'{"decision": "allow", "reason": 3}',
        b'{"reason": "x"}',
        b"\xff\xfe",
    ],
)
def test_malformed_replies_rejected(raw: bytes) -> None:
    with pytest.raises(hooks.TetherUnreachable):
        hooks.parse_reply(raw)


def test_reply_defaults() -> None:
    assert hooks.parse_reply(b'{"decision": "allow"}') == reply("allow")
    assert hooks.parse_reply(b'{"decision": "deny", "reason": "r", "context": null}') == reply("deny", "r")


def test_budgets_stay_under_hook_timeout() -> None:
    plan = hooks.build_request("claude-code", PLAN)
    edit = hooks.build_request("claude-code", EDIT)
    assert hooks.budget_for(plan, {}) == hooks.PLAN_BUDGET_S
    assert hooks.budget_for(edit, {}) == hooks.HOOK_BUDGET_S
    assert hooks.budget_for(edit, {hooks.BUDGET_ENV: "0.5"}) == 0.5
    assert hooks.budget_for(edit, {hooks.BUDGET_ENV: "999"}) < hooks.HOOK_TIMEOUT_S
    assert hooks.budget_for(edit, {hooks.BUDGET_ENV: "junk"}) == hooks.HOOK_BUDGET_S
    assert hooks.PLAN_BUDGET_S < hooks.HOOK_TIMEOUT_S


# --- a fake `tether run` on a unix socket -----------------------------------------------


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def by_tool(request: dict[str, object]) -> bytes:
    """Scripted answers keyed by tool name, so one server serves every scenario."""
    tool = request.get("tool_name")
    if request.get("event") in ("SessionStart", "UserPromptSubmit"):
        return line(reply("allow", context=f"world slice for {request.get('session_id')}"))
    if tool == "ExitPlanMode":
        return line(reply("allow", context="verdict: continue"))
    if tool == "Write":
        return line(reply("deny", "alice/1 holds auth.session-store-contract"))
    if tool == "NotebookEdit":
        return line(reply("stop", "master quorum unreachable"))
    if tool == "MultiEdit":
        return HANG
    if tool == "Glob":
        return b'{"decision": "allow"'  # Truncated: never completes a line.
    if tool == "Grep":
        return b"garbage\n"
    return line(reply("allow"))


@pytest.fixture
def fake() -> Iterator[FakeTether]:
    server = FakeTether(by_tool)
    try:
        yield server
    finally:
        server.close()


def test_ask_tether_round_trip(fake: FakeTether) -> None:
    req = hooks.build_request("claude-code", EDIT)
    assert hooks.ask_tether(req, fake.path, time.monotonic() + 3) == reply("allow")
    assert fake.requests == [req]


def test_ask_tether_times_out(fake: FakeTether) -> None:
    req = hooks.build_request("claude-code", {**EDIT, "tool_name": "MultiEdit"})
    t0 = time.monotonic()
    with pytest.raises(hooks.TetherUnreachable, match="in time"):
        hooks.ask_tether(req, fake.path, time.monotonic() + 0.3)
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("tool", ["Glob", "Grep"])
def test_ask_tether_bad_replies(fake: FakeTether, tool: str) -> None:
    req = hooks.build_request("claude-code", {**EDIT, "tool_name": tool})
    with pytest.raises(hooks.TetherUnreachable):
        hooks.ask_tether(req, fake.path, time.monotonic() + 3)


def test_ask_tether_without_socket(tmp_path: Path) -> None:
    req = hooks.build_request("claude-code", EDIT)
    with pytest.raises(hooks.TetherUnreachable, match="not set"):
        hooks.ask_tether(req, None, time.monotonic() + 3)
    with pytest.raises(hooks.TetherUnreachable, match="cannot reach"):
        hooks.ask_tether(req, str(tmp_path / "none.sock"), time.monotonic() + 3)


# --- the real executable ------------------------------------------------------------------


def run_hook(
    payload: object, sock: str | None, agent: str = "claude-code", **env: str
) -> subprocess.CompletedProcess[str]:
    if not TETHER.exists():
        pytest.skip(f"{TETHER} is not installed (pip install -e .)")
    child_env = {k: v for k, v in os.environ.items() if k not in (hooks.SOCK_ENV, hooks.BUDGET_ENV)}
    if sock is not None:
        child_env[hooks.SOCK_ENV] = sock
    child_env.update(env)
    stdin = payload if isinstance(payload, str) else json.dumps(payload)
    proc = subprocess.run(
        [str(TETHER), "hook", agent], input=stdin, capture_output=True, text=True, env=child_env, timeout=30
    )
    assert proc.returncode != 1, "exit 1 lets Claude Code proceed"
    return proc


def stdout_json(proc: subprocess.CompletedProcess[str]) -> object:
    return json.loads(proc.stdout) if proc.stdout.strip() else None


EXE_CASES = [
    (EDIT, None),
    ({**EDIT, "tool_name": "Write"}, deny_json("alice/1 holds auth.session-store-contract")),
    (
        {**EDIT, "tool_name": "NotebookEdit"},
        {"continue": False, "stopReason": "master quorum unreachable", **deny_json("master quorum unreachable")},
    ),
    (PLAN, context_json("PreToolUse", "verdict: continue")),
    (SESSION_START, context_json("SessionStart", "world slice for abc123")),
    (PROMPT, context_json("UserPromptSubmit", "world slice for abc123")),
]


@pytest.mark.parametrize(("payload", "expected"), EXE_CASES)
def test_executable_against_fake_tether(fake: FakeTether, payload: dict[str, object], expected: object) -> None:
    proc = run_hook(payload, fake.path)
    assert proc.returncode == 0, proc.stderr
    assert stdout_json(proc) == expected
    (request,) = fake.requests
    budget = request.pop("budget_s")  # what is left of the hook's budget, for tether to wait within
    assert isinstance(budget, float) and 0 < budget < hooks.budget_for(request)
    assert request == hooks.build_request("claude-code", payload)


def test_executable_forwards_plan(fake: FakeTether) -> None:
    run_hook(PLAN, fake.path)
    (req,) = fake.requests
    assert req["tool_name"] == "ExitPlanMode"
    assert req["tool_input"] == {"plan": "# Plan\n\n1. Move sessions to Redis", "planFilePath": "/tmp/plan.md"}


@pytest.mark.parametrize(
    ("sock", "tool", "why"),
    [
        (None, "Edit", "TETHER_SOCK is not set"),
        ("/tmp/definitely-not-a-tether.sock", "Bash", "cannot reach"),
        ("FAKE", "MultiEdit", "in time"),
        ("FAKE", "Grep", "malformed"),
        ("FAKE", "Glob", "closed the connection"),
    ],
)
def test_executable_fails_closed(fake: FakeTether, sock: str | None, tool: str, why: str) -> None:
    t0 = time.monotonic()
    proc = run_hook({**EDIT, "tool_name": tool}, fake.path if sock == "FAKE" else sock, TETHER_HOOK_BUDGET_S="0.6")
    assert time.monotonic() - t0 < 5
    assert proc.returncode == 0, proc.stderr
    out = stdout_json(proc)
    assert isinstance(out, dict)
    spec = out["hookSpecificOutput"]
    assert spec["permissionDecision"] == "deny"
    assert "tether shim is unreachable" in spec["permissionDecisionReason"]
    assert why in spec["permissionDecisionReason"]


def test_executable_context_warning_when_unreachable() -> None:
    proc = run_hook(SESSION_START, None)
    assert proc.returncode == 0
    out = stdout_json(proc)
    assert isinstance(out, dict)
    assert "unreachable" in out["hookSpecificOutput"]["additionalContext"]


def test_executable_blocks_on_garbage_stdin() -> None:
    proc = run_hook("this is not json", None)
    assert proc.returncode == 2 and proc.stdout == "" and "blocking" in proc.stderr


def test_executable_opencode_variant(fake: FakeTether) -> None:
    ok = run_hook({"tool": "edit", "sessionID": "s1", "args": {"filePath": "a.py"}}, fake.path, agent="opencode")
    assert ok.returncode == 0 and stdout_json(ok) == reply("allow")
    assert fake.requests[0]["agent"] == "opencode" and fake.requests[0]["tool_input"] == {"filePath": "a.py"}
    denied = run_hook({"tool": "Write", "args": {}}, fake.path, agent="opencode")
    assert denied.returncode == 2 and stdout_json(denied)["decision"] == "deny"  # type: ignore[index]
    gone = run_hook({"tool": "edit"}, None, agent="opencode")
    assert gone.returncode == 2 and "unreachable" in stdout_json(gone)["reason"]  # type: ignore[index]


# --- the CLI skeleton -------------------------------------------------------------------


def test_hook_path_imports_only_light_modules() -> None:
    code = (
        "import sys, io; sys.stdin = io.TextIOWrapper(io.BytesIO(b'{}'));"
        "before = set(sys.modules);"
        "from tetherlab.shim.cli import main; main(['hook', 'claude-code']);"
        "after = sorted(set(sys.modules) - before); import json; print(json.dumps(after))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    loaded = set(json.loads(proc.stdout.strip()))
    heavy = {"argparse", "typing", "asyncio", "pathlib", "subprocess", "tetherlab.cluster",
             "tetherlab.cluster.protocol", "json", "socket", "selectors"}
    assert not loaded & heavy, loaded & heavy


def test_the_installed_hook_command_imports_nothing_but_the_interpreters_own() -> None:
    """`python -I -S shim/hooks.py`: no site, and neither json nor socket (re, enum, selectors)."""

    def imported(*args: str) -> set[str]:
        proc = subprocess.run([sys.executable, "-X", "importtime", "-I", "-S", *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=30)
        return {ln.rsplit("|", 1)[1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}

    extra = imported(str(Path(hooks.__file__).resolve()), "claude-code") - imported("-c", "import os, time")
    assert extra <= {"_json", "_socket", "__future__"}, extra


def test_the_json_stand_ins_agree_with_json() -> None:
    for value in ({"a": [1, 2.5, "x\u00e9\n", None, True, False, {"b": "\"q\""}]}, [], "s", 0):
        assert hooks.loads(json.dumps(value)) == value
        assert json.loads(hooks.dumps(value)) == value
    assert hooks.loads(b'  {"k": 1}\n') == {"k": 1}
    for bad in (b"", b"{", b'{"k": 1} x', b"NaN", b"\xff", b"[" * 100_000):
        with pytest.raises(ValueError):
            hooks.loads(bad)


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("tether ")
    for argv in (["--help"], ["run", "--help"], ["hook", "--help"], ["install", "--help"], ["uninstall", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        cli.main(["hook", "vim"])
    assert e.value.code == 2
    assert cli.main([]) == 2


def test_run_delegates_with_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    fake_run = types.ModuleType("tetherlab.shim.run")
    fake_run.main = lambda args: seen.append(args) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tetherlab.shim.run", fake_run)
    argv = shlex.split("run --cluster c.toml --masters h1:1,h2:2 --key k --tool claude --fail-closed-s 4.5 --json")
    argv += ["--", "claude", "--json", "-p", "hi"]
    assert cli.main(argv) == 7
    (args,) = seen
    assert (args.cluster, args.masters, args.key, args.tool, args.fail_closed_s, args.json) == (  # type: ignore[attr-defined]
        "c.toml",
        "h1:1,h2:2",
        "k",
        "claude",
        4.5,
        True,
    )
    assert args.command == ["claude", "--json", "-p", "hi"]  # type: ignore[attr-defined]
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--json"])
    assert e.value.code == 2
