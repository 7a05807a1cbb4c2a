"""``tetherlab demo --agents real``: the seed walkthrough with the real agents.

Alice and Carol run the real Claude Code (headless, SDK mode: stream-json through ``tether
run``'s stdin and stdout, ``--permission-mode plan``, so their plans come through ExitPlanMode
and the hook), Bob runs the real OpenCode (``opencode run``, his plan a TETHERLAB-PLAN block in
the same message as his first write, through the plugin). One scripted model answers all three
(each conversation picked by a marker in its prompt). The walkthrough is the scripted demo's:
Alice continues and keeps her intent while the others plan; Bob is stopped, naming Alice's agent
and the session store contract; Carol continues with a world slice of billing only. Then what
each agent saw is printed: the tool results its model received and the world slice in its
context, read from the requests the model server recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tetherlab.chaos.agents import boxes
from tetherlab.chaos.agents.model_server import ModelServer, Recorded, text, tool_call, tool_results
from tetherlab.cluster.core.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from tetherlab.cluster.tools import demo as scripted

STEP_TIMEOUT_S = 120.0  # one agent's turn, real binaries against the scripted model
STOP_GRACE_S = 10.0
WORLD_HEADING = "# Tetherlab world slice"
MARKERS = {"alice": "JWT instead of session cookies", "bob": "order route handlers", "carol": "invoice PDF export"}
PROMPTS = {
    "alice": "Refactor the auth layer to use JWT instead of session cookies.",
    "bob": "Add order route handlers that read the user from the session store.",
    "carol": "Add invoice PDF export with a download link.",
}


def plan_markdown(plan: dict[str, Any], path: str) -> str:
    steps = "\n".join(f"{i}. {s}" for i, s in enumerate(plan["steps"], 1))
    return f"# {plan['summary']}\n\n{steps}\n{len(plan['steps']) + 1}. Write `{path}`\n"


def plan_block(plan: dict[str, Any]) -> str:
    body = {"summary": plan["summary"], "steps": plan["steps"]}
    return f"Here is my plan.\n<<<TETHERLAB-PLAN\n{json.dumps(body)}\nTETHERLAB-PLAN>>>\n"


class AgentRun:
    """One `tether run` around a real agent: stdout lines are read by a thread (Claude's SDK
    permission requests answered: allow), stderr holds tether's --json events."""

    def __init__(self, name: str, cmd: list[str], box: boxes.Box, t0: float, say: Callable[[float, str, str], None],
                 sdk: bool) -> None:
        self.name = name
        self.box = box
        self.sdk = sdk
        self.events: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []  # SDK "result" messages
        self.verdict: dict[str, Any] | None = None
        self.world: dict[str, Any] | None = None
        self.changed = threading.Condition()
        self._t0, self._say = t0, say
        self.proc = subprocess.Popen(cmd, cwd=box.repo, env=box.env,
                                     stdin=subprocess.PIPE if sdk else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self._threads = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._threads:
            t.start()

    def send(self, obj: dict[str, Any]) -> None:
        stdin: IO[bytes] | None = self.proc.stdin
        with contextlib.suppress(BrokenPipeError, ValueError, OSError):
            assert stdin is not None
            stdin.write(json.dumps(obj).encode() + b"\n")
            stdin.flush()

    def end_input(self) -> None:
        with contextlib.suppress(BrokenPipeError, ValueError, OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            if not self.sdk:
                continue
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            answer = boxes.sdk_allow(msg)
            if answer is not None:
                self.send(answer)
            if msg.get("type") == "result":
                with self.changed:
                    self.results.append(msg)
                    self.changed.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("{"):
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self.changed:
                self.events.append(ev)
                kind = ev.get("event")
                if kind == "verdict" and self.verdict is None:
                    self.verdict = ev["verdict"]
                    self._say(self._t0, self.name, scripted.describe_verdict(ev["verdict"]))
                elif kind == "world":
                    self.world = ev.get("world")
                elif kind in ("session", "stopping", "complete", "exited", "closed", "unavailable", "refused",
                              "error", "reverted"):
                    self._say(self._t0, self.name, ev.get("message", kind))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, pred: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._threads)):
                    return pred()
                self.changed.wait(min(left, 0.2))
        return True

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.close()
            return self.proc.wait(STOP_GRACE_S)

    def close(self) -> None:
        """End tether (SIGTERM: it stops its agent and abandons its intent), then what is left."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_GRACE_S)
        started = next((e for e in self.events if e.get("event") == "started"), None)
        if started is not None:  # the agent runs in its own session: its group, by its leader's PID
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(started["pid"]), signal.SIGKILL)
        for t in self._threads:
            t.join(5)
        self.box.close()


def what_it_saw(requests: list[Recorded]) -> dict[str, Any]:
    """From the requests the model received in one conversation: the tool results, and the
    concepts of the world slice that reached its context."""
    convo = [r for r in requests if not r.side]
    results = tool_results(convo[-1].body) if convo else []
    world: set[str] = set()
    told: list[str] = []  # what tether's hooks put in front of the model, first line of each
    for r in convo:
        body = r.text()
        for line in re.findall(r"(Tetherlab(?: verdict)?: [^\\\"]{0,160})", body):
            if line not in told:
                told.append(line)
        i = body.find(WORLD_HEADING)
        if i >= 0:
            world |= set(re.findall(r"## ([a-z0-9][\w.-]*) \u2014", body[i:]))
    return {"tool_results": [{"error": r["is_error"], "text": r["text"][:400]} for r in results],
            "world_slice_concepts": sorted(world), "tether_said": told[:4], "requests": len(convo)}


def _script(model: ModelServer, repos: dict[str, Path]) -> None:
    a, b, c = (scripted.AGENTS[n]["plan"] for n in ("alice", "bob", "carol"))
    alice_path, bob_path, carol_path = "src/auth/jwt/verify.py", "src/api/routes/orders.py", "src/billing/export.py"
    model.script([tool_call("ExitPlanMode", plan=plan_markdown(a, alice_path)),
                  tool_call("Write", file_path=str(repos["alice"] / alice_path), content="def verify(token): ...\n"),
                  text("JWT verification is in place.")], marker=MARKERS["alice"])
    model.script([tool_call("write", text_before=plan_block(b), filePath=str(repos["bob"] / bob_path),
                            content="def orders(request): ...\n"),
                  text("Order routes are in place.")], marker=MARKERS["bob"])
    model.script([tool_call("ExitPlanMode", plan=plan_markdown(c, carol_path)),
                  tool_call("Write", file_path=str(repos["carol"] / carol_path), content="def export(invoice): ...\n"),
                  text("Invoices export as PDF.")], marker=MARKERS["carol"])


def walkthrough(tmp: Path, directory: Path, keys_dir: Path, remote: str, as_json: bool,
                say: Callable[[float, str, str], None]) -> int:
    runs: dict[str, AgentRun] = {}
    model = ModelServer().start()
    t0 = time.monotonic()
    try:
        repos = {n: boxes.make_repo(tmp / f"{n}-laptop" / "shop", remote) for n in ("alice", "bob", "carol")}
        _script(model, repos)

        def tether(name: str, agent: list[str], tool: str) -> list[str]:
            return [sys.executable, "-m", "tetherlab.shim.cli", "run", "--cluster", str(directory / "shim.toml"),
                    "--key", str(keys_dir / name), "--developer", name, "--tool", tool, "--json", "--", *agent]

        for name in ("alice", "bob", "carol"):
            box = boxes.make_box(repos[name], tmp / f"{name}-home", model)
            if name == "bob":
                boxes.install_opencode(box, model)
                runs[name] = AgentRun(name, tether(name, ["opencode", "run", PROMPTS[name]], "opencode"), box, t0,
                                      say, sdk=False)
                runs[name].wait(STEP_TIMEOUT_S)  # Bob's agent is stopped; his tether exits
                continue
            boxes.tether_install(box, "claude-code")
            run = runs[name] = AgentRun(name, tether(name, boxes.CLAUDE_SDK, "claude-code"), box, t0, say, sdk=True)
            run.send(boxes.sdk_user_message(PROMPTS[name]))
            # Her turn ends (plan, verdict, write) while her session and intent stay open.
            if not run.wait_for(lambda r=run: bool(r.results), STEP_TIMEOUT_S):  # type: ignore[misc]
                say(t0, name, "no result from the agent in time")
                break
        for name in ("alice", "carol"):
            if name in runs:
                runs[name].end_input()  # the session ends: Claude exits 0, tether completes the intent
        codes = {name: r.wait(STEP_TIMEOUT_S) for name, r in runs.items()}
        saw = {name: what_it_saw(model.conversation(MARKERS[name])) for name in runs}
    finally:
        for r in runs.values():
            r.close()
        model.stop()
    result: dict[str, Any] = {name: r.verdict for name, r in runs.items()}
    result["world"] = {name: sorted(c["id"] for c in (r.world or {}).get("concepts", [])) for name, r in runs.items()
                       if r.world is not None}
    result["saw"] = saw
    result["exit"] = codes
    ok = ((result.get("alice") or {}).get("action") == "continue"
          and (result.get("bob") or {}).get("action") == "stop"
          and (result.get("carol") or {}).get("action") == "continue"
          and codes.get("alice") == 0 and codes.get("bob") == 4 and codes.get("carol") == 0)
    if as_json:
        print(json.dumps(result))
    else:
        out = sys.stderr
        print("\nwhat each agent saw (the requests its model received):", file=out)
        for name, seen in saw.items():
            for line in seen["tether_said"]:
                print(f"  {name}: in its context: {line!r}", file=out)
            print(f"  {name}: world slice in its context: {', '.join(seen['world_slice_concepts']) or '(none)'}",
                  file=out)
            for r in seen["tool_results"]:
                print(f"  {name}: tool result{' (error)' if r['error'] else ''}: {r['text'][:200]!r}", file=out)
        print("walkthrough " + ("as expected" if ok else "NOT as expected"), file=out)
    return EXIT_OK if ok else EXIT_FAILED


def main(directory: str, as_json: bool) -> int:
    why = boxes.missing()
    if why is not None:
        print(f"tetherlab demo --agents real: {why}", file=sys.stderr)
        return EXIT_USAGE
    if shutil.which("git") is None:
        print("tetherlab demo --agents real: needs git", file=sys.stderr)
        return EXIT_USAGE
    try:
        return scripted.run_demo(Path(directory), as_json, walkthrough)
    except (OSError, subprocess.CalledProcessError, RuntimeError) as e:
        print(f"tetherlab demo --agents real: {e}", file=sys.stderr)
        return EXIT_USAGE
