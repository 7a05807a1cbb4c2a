"""Helpers for driving the real Claude Code and OpenCode under `tether run` (fixtures are in
conftest.py next to this file).

The agents come from `make agents` (deploy/scripts/agents.sh) in .agents/ at the top of the
repository; without them every test here skips and says so. Each test gets a scripted model
(tests/agents/model_server.py) on loopback, a throwaway HOME and XDG folders, and the module
shares one real 3-node cluster with registered developer keys and a concept registry.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from tetherlab.chaos.agents import boxes
from tetherlab.chaos.agents.boxes import Box, install_opencode, preseed_claude
from tetherlab.chaos.agents.model_server import ModelServer
from tetherlab.cluster.ops.localcluster import LocalCluster

REMOTE = boxes.REMOTE
# One concept per test, so that an intent a test leaves behind (a session lapses only after its
# TTL) never meets another test's plan.
CONCEPTS = {
    "billing.invoices": "src/billing/**",
    "search.index": "src/search/**",
    "catalog.products": "src/catalog/**",
    "accounts.profiles": "src/accounts/**",
    "auth.session-store": "src/auth/**",
    "shipping.rates": "src/shipping/**",
    "payments.refunds": "src/payments/**",
    "reports.exports": "src/reports/**",
    "notifications.email": "src/notifications/**",
    # test_inflight_changes.py: in-flight changes
    "orders.cart": "src/orders/**",
    "inventory.stock": "src/inventory/**",
    "pricing.rules": "src/pricing/**",
    "wishlist.items": "src/wishlist/**",
    "warehouse.stock": "src/warehouse/**",
    "giftwrap.orders": "src/giftwrap/**",
}
REGISTRY = "".join(f'[[concept]]\nid = "{cid}"\ntitle = "{cid}"\npaths = ["{path}"]\n\n'
                   for cid, path in CONCEPTS.items())
TETHER_WAIT_S = 120.0  # a whole `tether run` of a real agent against the scripted model
STOP_GRACE_S = 10.0


SKIP_REASON = boxes.missing()
needs_agents = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


# --- the cluster ----------------------------------------------------------------------------


def keygen(path: Path, comment: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-C", comment, "-f", str(path)], check=True,
                   timeout=60)
    return path


def tl(c: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tetherlab.cluster.cli", *args, "--dir", str(c.dir)],
                          capture_output=True, text=True, timeout=120)


@dataclass
class Env:
    cluster: LocalCluster
    keys: dict[str, Path]
    tmp: Path


def intents(c: LocalCluster) -> list[dict[str, Any]]:
    r = tl(c, "intents", "list", "--all", "--json")
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout)["intents"])


# --- a repository, a home, the agents' configuration ----------------------------------------


def make_repo(path: Path) -> Path:
    return boxes.make_repo(path, REMOTE, {"README.md": "shop\n", "src/app.py": "print('hi')\n",
                                          "src/billing/__init__.py": ""})


def make_box(tmp: Path, name: str, model: ModelServer) -> Box:
    box = boxes.make_box(make_repo(tmp / f"repo-{name}"), tmp / f"home-{name}", model)
    box.env["USER"] = name
    return box


def install_claude_hooks(box: Box) -> None:
    """`tether install claude-code` into the repository's .claude/settings.json."""
    boxes.tether_install(box, "claude-code")


__all__ = ["Box", "install_opencode", "preseed_claude"]


# --- `tether run` ---------------------------------------------------------------------------


def tether_cmd(env_: Env, dev: str, agent: list[str], tool: str, fail_closed_s: float = 5.0) -> list[str]:
    return [sys.executable, "-m", "tetherlab.shim.cli", "run", "--cluster", str(env_.cluster.dir / "shim.toml"),
            "--key", str(env_.keys[dev]), "--developer", dev, "--tool", tool, "--json",
            "--fail-closed-s", str(fail_closed_s), "--", *agent]


def read_events(path: Path) -> list[dict[str, Any]]:
    """tether's --json events (its stderr, one JSON object a line)."""
    out = []
    with contextlib.suppress(OSError):
        for ln in path.read_text(errors="replace").splitlines():
            if ln.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(ln))
    return out


def stderr_path(box: Box, name: str = "tether") -> Path:
    return box.repo.parent / f"{name}.stderr"


def event_seen(box: Box, kind: str, name: str = "tether") -> Callable[[], bool]:
    """A model-server gate: true once tether (run under ``name``) has printed a ``kind`` event."""
    path = stderr_path(box, name)
    return lambda: any(e.get("event") == kind for e in read_events(path))


class TetherRun:
    """A running `tether run` around a real agent. stdout is read by a thread (``lines``);
    events come from stderr (JSON lines, saved to a file). Always ``close()``: it ends tether
    (SIGTERM: tether stops its agent), then kills what is left, each bounded, by PID."""

    def __init__(self, cmd: list[str], box: Box, stdin: int | IO[bytes] | None = subprocess.DEVNULL,
                 name: str = "tether") -> None:
        self.box = box
        self.err_path = stderr_path(box, name)
        self.out_path = box.repo.parent / f"{name}.stdout"
        self._err = open(self.err_path, "wb")  # noqa: SIM115 - closed in close()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=box.repo, env=box.env, stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=self._err, start_new_session=True)
        self.out = bytearray()
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.elapsed_s: float | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        partial = b""
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
            with self._changed:
                self.out += chunk
                partial += chunk
                *done, partial = partial.split(b"\n")
                self.lines.extend(ln.decode(errors="replace").rstrip("\r") for ln in done)
                self._changed.notify_all()
        with self._changed:
            if partial:
                self.lines.append(partial.decode(errors="replace").rstrip("\r"))
            self._changed.notify_all()

    def wait_line(self, pred: Callable[[str], bool], timeout_s: float, start: int = 0) -> tuple[int, str] | None:
        """The first stdout line from index ``start`` that satisfies ``pred``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for i in range(start, len(self.lines)):
                    if pred(self.lines[i]):
                        return i, self.lines[i]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    return None
                self._changed.wait(min(left, 0.2))

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.err_path)

    def wait_event(self, kind: str, timeout_s: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for e in self.events():
                if e.get("event") == kind:
                    return e
            if self.proc.poll() is not None:
                return next((e for e in self.events() if e.get("event") == kind), None)
            time.sleep(0.05)
        return None

    def wait(self, timeout_s: float = TETHER_WAIT_S) -> int:
        try:
            code = self.proc.wait(timeout_s)
        finally:
            self.elapsed_s = time.monotonic() - self.t0
        self._reader.join(10)
        return code

    def stderr_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.err_path.read_text(errors="replace")
        return ""

    def stdout_text(self) -> str:
        return bytes(self.out).decode(errors="replace")

    def agent_pid(self) -> int | None:
        started = next((e for e in self.events() if e.get("event") == "started"), None)
        return int(started["pid"]) if started else None

    def close(self) -> None:
        agent = self.agent_pid()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_GRACE_S)
        if agent is not None:  # the agent runs in its own session: its group, by its leader's PID
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(agent, signal.SIGKILL)
        self._reader.join(10)
        self._err.close()
        with contextlib.suppress(OSError):
            self.out_path.write_bytes(bytes(self.out))
        shutil.rmtree(self.box.runtime, ignore_errors=True)

    def report(self) -> str:
        """Everything a failing assertion should show."""
        return (f"exit={self.proc.returncode} elapsed={self.elapsed_s}\n--- events/stderr ---\n"
                f"{self.stderr_text()[-6000:]}\n--- stdout ---\n{self.stdout_text()[-4000:]}")


def verdicts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["verdict"] for e in events if e.get("event") == "verdict"]


# --- an interactive agent in a terminal (tmux on a private socket) --------------------------

EXIT_MARK = "TETHER-EXIT="
TMUX_COLUMNS, TMUX_ROWS = 160, 50


class TmuxRun:
    """`tether run` in a real terminal: a tmux server of our own (its socket in the box's
    runtime folder) runs one pane; the test reads the rendered screen and types keys.
    tether's events (stderr) go to a file; its exit status is printed as ``TETHER-EXIT=N``."""

    def __init__(self, cmd: list[str], box: Box, name: str = "tether") -> None:
        self.box = box
        self.err_path = stderr_path(box, name)
        self.sock = box.runtime / "tmux.sock"
        self.tmux = ["tmux", "-S", str(self.sock), "-f", "/dev/null"]
        self.t0 = time.monotonic()
        self.elapsed_s: float | None = None
        shell = (f"cd {shlex.quote(str(box.repo))} && {shlex.join(cmd)} 2> {shlex.quote(str(self.err_path))}; "
                 f"echo {EXIT_MARK}$?; sleep 600")
        subprocess.run([*self.tmux, "new-session", "-d", "-x", str(TMUX_COLUMNS), "-y", str(TMUX_ROWS), "-s", "t",
                        "bash", "--noprofile", "--norc", "-c", shell], env=box.env, check=True, timeout=30)
        self.screens: list[str] = []

    def screen(self) -> str:
        r = subprocess.run([*self.tmux, "capture-pane", "-p", "-J", "-S", "-200", "-t", "t"], capture_output=True,
                           text=True, timeout=10)
        text = r.stdout
        if not self.screens or self.screens[-1] != text:
            self.screens.append(text)
        return text

    def keys(self, *keys: str, literal: bool = False) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", "t", *(["-l"] if literal else []), *keys], check=True,
                       timeout=10)

    def exit_code(self) -> int | None:
        for line in self.screen().splitlines():
            if line.startswith(EXIT_MARK) and line[len(EXIT_MARK):].strip().isdigit():
                self.elapsed_s = self.elapsed_s or time.monotonic() - self.t0
                return int(line[len(EXIT_MARK):].strip())
        return None

    def drive(self, answer: Callable[[str], bool], timeout_s: float = TETHER_WAIT_S,
              poll_s: float = 0.25) -> int | None:
        """Poll the screen until tether exits; ``answer(screen)`` types whatever the screen asks
        for (True when it typed something). The exit status, or None on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                return code
            if answer(self.screens[-1]):
                time.sleep(0.5)  # let the screen change before reading it again
            time.sleep(poll_s)
        return None

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.err_path)

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True, timeout=30)  # our own server only
        agent = next((e.get("pid") for e in self.events() if e.get("event") == "started"), None)
        if agent is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(agent), signal.SIGKILL)
        shutil.rmtree(self.box.runtime, ignore_errors=True)

    def report(self) -> str:
        last = self.screens[-1] if self.screens else ""
        with contextlib.suppress(OSError):
            err = self.err_path.read_text(errors="replace")[-6000:]
            return f"elapsed={self.elapsed_s}\n--- events/stderr ---\n{err}\n--- screen ---\n{last}"
        return f"--- screen ---\n{last}"


# --- a scripted holder: an agent that takes a concept and keeps it --------------------------

HOLDER = textwrap.dedent('''
    import json, signal, sys, time
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    signal.signal(signal.SIGINT, lambda *a: sys.exit(130))
    print("<<<TETHERLAB-PLAN")
    print(json.dumps({"summary": sys.argv[1], "steps": ["hold"], "concepts": {"modify": [sys.argv[2]], "depend": []}}))
    print("TETHERLAB-PLAN>>>", flush=True)
    time.sleep(float(sys.argv[3]))
''')


def start_holder(env_: Env, box: Box, dev: str, summary: str, concept: str, hold_s: float = 90.0) -> TetherRun:
    """A scripted agent under `tether run` that holds ``concept`` (modify) until closed; returns
    once its continue verdict is in."""
    run = TetherRun(tether_cmd(env_, dev, [sys.executable, "-c", HOLDER, summary, concept, str(hold_s)], "scripted"),
                    box, name=f"holder-{dev}")
    verdict = run.wait_event("verdict", 30)
    if verdict is None or verdict["verdict"]["action"] != "continue":
        run.close()
        raise AssertionError(f"the holder did not get its concept: {run.report()}")
    return run
