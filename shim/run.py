"""``tether run``: wrap an agent, get its plan out, enforce the verdict, fail closed.

Life of a wrapped agent:

1. Open a session with the master (agent id ``<developer>/<uuid>``, tool, machine, repository
   remote, base commit). Without a quorum-backed answer the agent does not start.
2. Install the sentinel instruction (a marked section of CLAUDE.md / AGENTS.md), serve the
   local hook socket (``TETHER_SOCK``), and run the agent in a pseudo-terminal.
3. Plans printed between the sentinel markers, or sent by a hook (Claude Code's ExitPlanMode),
   become intents (``initial``, then ``replan``); the verdict is enforced: ``continue`` writes
   the world slice to ``.tetherlab/world.md``; ``stop`` ends the agent's process group
   (interrupt, terminate, kill, each bounded); ``revert`` stops it, stashes every change since
   the intent began under a stash named for the intent, and restores the tree to its base.
4. Heartbeats keep the session alive. When no quorum-confirmed acknowledgement has arrived for
   ``fail_closed_s`` the agent is stopped: F is always below the session TTL minus a margin, so
   a cut-off agent stops before the master could hand its concepts to anyone else.
5. Exit status 0 or a done block completes the intent; any other exit abandons it.

Exit codes: the agent's own status when it ran to its end; 2 bad usage or configuration;
3 the master's quorum was unreachable (the agent did not start, or was stopped); 4 the agent
was stopped by a verdict; 5 it was stopped and its changes reverted (stashed).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import time
import tomllib
import tty
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tetherlab.cluster import protocol as p
from tetherlab.cluster.core.exitcodes import EXIT_REVERTED, EXIT_STOPPED, EXIT_UNAVAILABLE, EXIT_USAGE
from tetherlab.shim.client import (
    ClientError,
    ClusterUnavailable,
    HostKeyMismatch,
    Master,
    MasterClient,
    RequestError,
)
from tetherlab.shim.sentinel import (
    DoneBlock,
    MalformedBlock,
    PlanBlock,
    Scanner,
    install_section,
    plan_from_markdown,
    remove_section,
)

STARTUP_DEADLINE_S = 15.0  # to open the session through a quorum-backed leader
SUBMIT_DEADLINE_S = 15.0  # a plan's verdict (hooks wait up to 20 s)
FAIL_CLOSED_DEFAULT_S = 5.0
FAIL_CLOSED_MARGIN_S = 5.0  # F + margin must stay below the session TTL
HEARTBEAT_INTERVAL_MAX_S = 1.0
WATCHDOG_INTERVAL_S = 0.1
STOP_GRACE_INTERRUPT_S = 2.0  # SIGINT, then SIGTERM after this, then SIGKILL after the next
STOP_GRACE_TERMINATE_S = 2.0
HOOK_LINE_MAX_BYTES = 4 * 1024 * 1024
WORLD_FILE = Path(".tetherlab") / "world.md"
FAILURE_REPORTS_MAX = 100  # earlier fail-closed events reported per run, newest kept
CONFIG_PATHS = (Path("~/.config/tetherlab/shim.toml"),)
EDIT_TOOLS = {"Edit", "Write", "MultiEdit", "NotebookEdit", "Bash", "edit", "write", "patch", "bash", "multiedit"}
READ_ONLY_COMMANDS = {"ls", "cat", "pwd", "head", "tail", "wc", "grep", "rg", "find", "tree", "echo", "which",
                      "file", "stat", "du", "git"}
READ_ONLY_GIT = {"status", "log", "diff", "show", "branch", "rev-parse", "ls-files", "blame", "grep", "remote"}


class UsageError(Exception):
    """Bad flags or configuration: the message says what to fix."""


@dataclass
class ShimConfig:
    masters: list[Master]
    key: Path
    developer: str
    tool: str
    command: list[str]
    fail_closed_s: float = FAIL_CLOSED_DEFAULT_S
    json: bool = False
    repo: Path = field(default_factory=Path.cwd)
    instructions: Path | None = None


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with open(path.expanduser(), "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from None


def load_config(args: Any) -> ShimConfig:
    """Flags win over environment variables, which win over the config file."""
    env = os.environ
    cfg_path = args.cluster or env.get("TETHER_CLUSTER")
    data: dict[str, Any] = {}
    if cfg_path:
        data = _read_config_file(Path(cfg_path))
    else:
        for candidate in CONFIG_PATHS:
            if candidate.expanduser().exists():
                cfg_path = str(candidate.expanduser())
                data = _read_config_file(candidate)
                break
    masters: list[Master] = []
    for i, n in enumerate(data.get("node", []) or []):
        try:
            host, _, port = str(n["ssh"]).rpartition(":")
            masters.append(Master(str(n.get("id", f"m{i + 1}")), host.strip("[]"), int(port), n.get("host_key")))
        except (KeyError, ValueError):
            raise UsageError(f"{cfg_path}: [[node]] #{i + 1} needs ssh = \"HOST:PORT\"") from None
    spec = getattr(args, "masters", None) or env.get("TETHER_MASTERS")
    if spec:
        known = {m.address: m for m in masters}
        masters = []
        for item in spec.split(","):
            host, _, port = item.strip().rpartition(":")
            if not host or not port.isdigit():
                raise UsageError(f"--masters: {item!r} is not HOST:PORT")
            addr = f"{host.strip('[]')}:{port}"
            masters.append(known.get(addr) or Master(addr, host.strip("[]"), int(port), None))
    if not masters:
        raise UsageError("no masters: pass --cluster FILE or --masters HOST:PORT,..., or set TETHER_CLUSTER "
                         "(the shim.toml that `tetherlab init` writes)")
    base = Path(cfg_path).expanduser().parent if cfg_path else Path.cwd()
    key = getattr(args, "key", None) or env.get("TETHER_KEY") or data.get("key")
    if not key:
        for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
            if (Path.home() / ".ssh" / name).exists():
                key = str(Path.home() / ".ssh" / name)
                break
    if not key:
        raise UsageError("no SSH key: pass --key FILE, set TETHER_KEY, or add key = \"PATH\" to the config")
    key_path = Path(key).expanduser()
    if not key_path.is_absolute():
        key_path = base / key_path
    developer = getattr(args, "developer", None) or env.get("TETHER_DEVELOPER") or data.get("developer") \
        or env.get("USER") or ""
    if not developer:
        raise UsageError("no developer name: pass --developer, set TETHER_DEVELOPER, or add developer = \"NAME\"")
    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("no agent command: tether run [options] -- COMMAND [ARGS...]")
    fail_closed = args.fail_closed_s if getattr(args, "fail_closed_s", None) is not None else \
        float(env.get("TETHER_FAIL_CLOSED_S") or data.get("fail_closed_s") or FAIL_CLOSED_DEFAULT_S)
    if not 0.5 <= fail_closed <= 600:
        raise UsageError(f"--fail-closed-s must be between 0.5 and 600 seconds, got {fail_closed}")
    tool = getattr(args, "tool", None) or _tool_of(command[0])
    instructions = getattr(args, "instructions", None)
    return ShimConfig(masters, key_path, developer, tool, command, fail_closed, bool(getattr(args, "json", False)),
                      Path.cwd(), Path(instructions) if instructions else None)


def _tool_of(cmd: str) -> str:
    name = Path(cmd).name
    return {"claude": "claude-code", "opencode": "opencode", "codex": "codex"}.get(name, name)


# --- git --------------------------------------------------------------------------------------


def git(repo: Path, *args: str, check: bool = True) -> str:
    p_ = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60)
    if check and p_.returncode != 0:
        raise UsageError(f"git {' '.join(args)} failed: {p_.stderr.strip()}")
    return p_.stdout.strip()


def repo_facts(cwd: Path) -> tuple[Path, str, str]:
    try:
        top = Path(git(cwd, "rev-parse", "--show-toplevel"))
    except (UsageError, FileNotFoundError):
        raise UsageError(f"{cwd} is not inside a git repository: tether coordinates one git remote") from None
    remote = git(top, "remote", "get-url", "origin", check=False) or f"file://{top}"
    head = git(top, "rev-parse", "HEAD", check=False)
    if not re.fullmatch(r"[0-9a-f]{7,64}", head):
        raise UsageError(f"{top} has no commit yet: commit once so tether knows the base")
    return top, remote, head


def revert_changes(repo: Path, base: str, intent_id: str, agent_id: str, summary: str,
                   own_paths: tuple[str, ...] = ()) -> dict[str, Any]:
    """Save every change since ``base`` (commits, tracked and untracked files) as one stash
    named for the intent, and leave the tree clean at ``base``. Nothing is deleted: the old
    HEAD stays reachable under refs/tetherlab/reverted/<intent>. ``own_paths`` are tether's
    own files (the instruction section, the world slice): not the agent's work."""
    head = git(repo, "rev-parse", "HEAD")
    ref = None
    if head != base:
        ref = f"refs/tetherlab/reverted/{intent_id}"
        git(repo, "update-ref", ref, head)
        git(repo, "reset", "--soft", base)  # the agent's commits become staged changes
        if own_paths:
            git(repo, "reset", "-q", base, "--", *own_paths, check=False)
    message = f"tetherlab revert {intent_id} ({agent_id}): {summary}"[:500]
    stash = None
    if git(repo, "status", "--porcelain", "--untracked-files=all"):
        git(repo, "stash", "push", "--include-untracked", "-m", message)
        stash = git(repo, "rev-parse", "stash@{0}")
    return {"stash": stash, "stash_message": message, "previous_head_ref": ref, "base": base}


# --- the shim ---------------------------------------------------------------------------------


class Shim:
    def __init__(self, cfg: ShimConfig) -> None:
        self.cfg = cfg
        self.agent_id = f"{cfg.developer}/{uuid.uuid4()}"
        self.client = MasterClient(cfg.masters, cfg.key, cfg.developer, on_notify=self._on_notify,
                                   client_name="tether", agent=cfg.tool)
        self.scanner = Scanner()
        self.repo = cfg.repo
        self.remote = ""
        self.base_commit = ""
        self.intent_id: str | None = None
        self.intent_base: str | None = None
        self.summary = ""
        self.verdict: dict[str, Any] | None = None
        self.malformed: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.master_fd: int | None = None
        self.stopping: str | None = None  # why we are ending the agent
        self.outcome = 0
        self.revert_result: dict[str, Any] | None = None
        self.ttl_s: float | None = None
        self.sock_path: Path | None = None
        self._submit_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self._exited = asyncio.Event()
        self._stdin_raw: list[Any] | None = None
        self.instructions: Path | None = None
        self.section_installed = False
        self.outcome_override = EXIT_STOPPED

    # --- output to the developer ------------------------------------------------------------

    def event(self, kind: str, **fields: Any) -> None:
        if self.cfg.json:
            sys.stderr.write(json.dumps({"event": kind, "agent_id": self.agent_id, **fields}) + "\n")
        else:
            text = fields.get("message") or kind
            sys.stderr.write(f"\r\n[tether] {text}\r\n")
        sys.stderr.flush()

    # --- life cycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            self.repo, self.remote, self.base_commit = repo_facts(self.cfg.repo)
        except UsageError as e:
            self.event("error", message=str(e))
            return EXIT_USAGE
        try:
            opened = await self.client.call(
                p.OpenSession, STARTUP_DEADLINE_S, agent_id=self.agent_id, tool=self.cfg.tool,
                machine=socket.gethostname()[:200] or "unknown", repo_remote=self.remote,
                base_commit=self.base_commit)
        except (ClusterUnavailable, HostKeyMismatch) as e:
            self.event("unavailable", message=f"the master's quorum is unreachable; the agent was not started ({e})")
            await self.client.close()
            return EXIT_UNAVAILABLE
        except RequestError as e:
            self.event("refused", message=f"the master refused the session ({e.code}): {e.message}")
            await self.client.close()
            return EXIT_USAGE
        self.client.last_confirmed = time.monotonic()
        session = opened.get("session") or {}
        if "deadline_ms" in session and "last_seen_ms" in session:
            self.ttl_s = (session["deadline_ms"] - session["last_seen_ms"]) / 1000
            if self.cfg.fail_closed_s + FAIL_CLOSED_MARGIN_S >= self.ttl_s:
                self.event("error", message=f"--fail-closed-s {self.cfg.fail_closed_s} plus a {FAIL_CLOSED_MARGIN_S} s "
                                            f"margin must stay below the session TTL of {self.ttl_s:.0f} s")
                await self.client.close()
                return EXIT_USAGE
        self.event("session", message=f"session {self.agent_id} open (leader {self.client.leader_id})",
                   leader=self.client.leader_id, base_commit=self.base_commit, remote=self.remote)
        await self._report_past_failures()
        try:
            await self._start_hook_server()
            self._install_instructions()
            self._spawn()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, self._on_terminate, sig)
            self._tasks = [
                loop.create_task(self._heartbeats()),
                loop.create_task(self._watchdog()),
                loop.create_task(self._wait_exit()),
            ]
            await self._exited.wait()
            return await self._finish()
        finally:
            await self._cleanup()

    def _exclude_world_file(self) -> None:
        """Keep the world slice out of the agent's commits (a local, untracked ignore rule)."""
        exclude = Path(git(self.repo, "rev-parse", "--git-path", "info/exclude", check=False) or ".git/info/exclude")
        if not exclude.is_absolute():
            exclude = self.repo / exclude
        with contextlib.suppress(OSError):
            text = exclude.read_text() if exclude.exists() else ""
            if str(WORLD_FILE) not in text.split("\n"):
                exclude.parent.mkdir(parents=True, exist_ok=True)
                exclude.write_text(text + ("" if text.endswith("\n") or not text else "\n") + f"{WORLD_FILE}\n")

    def _install_instructions(self) -> None:
        self._exclude_world_file()
        name = "CLAUDE.md" if self.cfg.tool == "claude-code" else "AGENTS.md"
        self.instructions = self.cfg.instructions or (self.repo / name)
        try:
            self.section_installed = install_section(self.instructions)
        except OSError as e:
            self.event("warning", message=f"cannot write the plan instruction to {self.instructions}: {e}")

    def _spawn(self) -> None:
        master, slave = pty.openpty()
        if sys.stdout.isatty():
            with contextlib.suppress(OSError):
                fcntl.ioctl(slave, termios.TIOCSWINSZ, fcntl.ioctl(sys.stdout.fileno(), termios.TIOCGWINSZ, b"\0" * 8))
        env = dict(os.environ)
        env["TETHER_SOCK"] = str(self.sock_path)
        env["TETHER_AGENT_ID"] = self.agent_id

        def child_setup() -> None:  # runs in the child between fork and exec
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        try:
            self.proc = subprocess.Popen(self.cfg.command, stdin=slave, stdout=slave, stderr=slave, cwd=self.cfg.repo,
                                         env=env, start_new_session=True, preexec_fn=child_setup)
        finally:
            os.close(slave)
        self.master_fd = master
        os.set_blocking(master, False)
        loop = asyncio.get_running_loop()
        loop.add_reader(master, self._on_output)
        if sys.stdin.isatty():
            self._stdin_raw = termios.tcgetattr(sys.stdin.fileno())
            tty.setraw(sys.stdin.fileno())
            loop.add_reader(sys.stdin.fileno(), self._on_input)
            with contextlib.suppress(ValueError):
                loop.add_signal_handler(signal.SIGWINCH, self._on_winch)
        self.event("started", message=f"agent started: {' '.join(self.cfg.command)} (pid {self.proc.pid})",
                   pid=self.proc.pid)

    def _on_winch(self) -> None:
        if self.master_fd is not None:
            with contextlib.suppress(OSError):
                size = fcntl.ioctl(sys.stdout.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
                fcntl.ioctl(self.master_fd, termios.TIOCSWINSZ, size)

    def _on_input(self) -> None:
        try:
            data = os.read(sys.stdin.fileno(), 65536)
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(sys.stdin.fileno())
            return
        if self.master_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.master_fd, data)

    def _on_output(self) -> None:
        assert self.master_fd is not None
        try:
            data = os.read(self.master_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO: the agent's side of the terminal is gone
        if not data:
            asyncio.get_running_loop().remove_reader(self.master_fd)
            return
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        for ev in self.scanner.feed(data):
            if isinstance(ev, PlanBlock):
                self._spawn_task(self.submit_plan(ev.intent, source="output"))
            elif isinstance(ev, DoneBlock):
                self._spawn_task(self.complete("complete", ev.summary))
            elif isinstance(ev, MalformedBlock):
                self.malformed = ev.reason
                self.event("malformed_plan", message=f"plan block not accepted: {ev.reason}")
                self._write_world(f"Your last plan block was not accepted: {ev.reason}\n")

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _wait_exit(self) -> None:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        code = await loop.run_in_executor(None, self.proc.wait)
        # Drain what the agent printed last (a done block may be in it).
        if self.master_fd is not None:
            with contextlib.suppress(OSError, ValueError):
                while True:
                    data = os.read(self.master_fd, 65536)
                    if not data:
                        break
                    sys.stdout.buffer.write(data)
                    for ev in self.scanner.feed(data):
                        if isinstance(ev, DoneBlock) and not self.stopping:
                            await self.complete("complete", ev.summary)
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
        self.event("exited", message=f"agent exited with status {code}", status=code)
        self.outcome = code if code >= 0 else 128 - code
        self._exited.set()

    # --- plans and verdicts -------------------------------------------------------------------

    async def submit_plan(self, plan: dict[str, Any], source: str) -> dict[str, Any] | None:
        async with self._submit_lock:
            if self.stopping:
                return None
            trigger = "initial" if self.intent_id is None or (self.verdict or {}).get("action") != "continue" \
                else "replan"
            concepts = plan.get("concepts")
            try:
                intent = p.Intent(summary=plan["summary"][:4096], steps=tuple(s[:4096] for s in plan.get("steps", [])),
                                  files=tuple(plan["files"]) if plan.get("files") else None,
                                  concepts=p.Concepts(modify=tuple(concepts.get("modify", ())),
                                                      depend=tuple(concepts.get("depend", ())))
                                  if concepts else None)
            except p.ProtocolError as e:
                self.malformed = f"the plan was not accepted: {e.message}"
                self.event("malformed_plan", message=self.malformed)
                return None
            if trigger == "initial":
                self.intent_base = git(self.repo, "rev-parse", "HEAD", check=False) or self.base_commit
            try:
                verdict = await self.client.call(p.SubmitIntent, SUBMIT_DEADLINE_S, agent_id=self.agent_id,
                                                 tool=self.cfg.tool, intent=intent, trigger=trigger)
            except ClusterUnavailable as e:
                self.event("unavailable", message=f"no verdict: the master's quorum is unreachable ({e})")
                await self.stop_agent("no verdict from a quorum-backed master", code=EXIT_UNAVAILABLE)
                return None
            except RequestError as e:
                self.malformed = f"the master refused the plan ({e.code}): {e.message}"
                self.event("refused", message=self.malformed)
                return None
            except ClientError as e:
                self.event("unavailable", message=f"no verdict ({e}); stopping the agent")
                await self.stop_agent("no verdict", code=EXIT_UNAVAILABLE)
                return None
            self.malformed = None
            self.client.last_confirmed = time.monotonic()
            self.summary = plan["summary"]
            await self.on_verdict(verdict, source)
            return verdict

    async def on_verdict(self, verdict: dict[str, Any], source: str) -> None:
        self.verdict = verdict
        self.intent_id = verdict.get("intent_id") or self.intent_id
        action = verdict.get("action")
        self.event("verdict", message=f"verdict {action} for {self.intent_id}: {verdict.get('context', '')}",
                   verdict=verdict)
        if action == "continue":
            await self._refresh_world()
        elif action == "stop":
            await self.stop_agent(_why(verdict), code=EXIT_STOPPED)
        elif action == "revert":
            await self.stop_agent(_why(verdict), code=EXIT_REVERTED, revert=True)

    async def complete(self, trigger: str, summary: str | None) -> None:
        async with self._submit_lock:
            if self.intent_id is None or (self.verdict or {}).get("action") != "continue":
                return
            try:
                res = await self.client.call(p.Complete if trigger == "complete" else p.Abandon, SUBMIT_DEADLINE_S,
                                             agent_id=self.agent_id, intent_id=self.intent_id)
                self.event(trigger, message=f"intent {self.intent_id} {trigger}d", result=res)
                self.verdict = {**(self.verdict or {}), "action": trigger}
            except ClientError as e:
                self.event("warning", message=f"could not {trigger} intent {self.intent_id}: {e} "
                                              "(the session's expiry releases it)")

    async def _refresh_world(self) -> None:
        try:
            world = await self.client.call(p.WorldSlice, 10.0, agent_id=self.agent_id)
        except ClientError:
            return
        if self.cfg.json:
            self.event("world", world=world)
        self._write_world(render_world(world, self.verdict))

    def _write_world(self, text: str) -> None:
        path = self.repo / WORLD_FILE
        with contextlib.suppress(OSError):
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)

    def context_text(self) -> str:
        if self.verdict is None:
            base = ("Tetherlab: print your plan before editing (plan mode, or a TETHERLAB-PLAN block as described in "
                    "the instructions).")
        else:
            base = f"Tetherlab verdict: {self.verdict.get('action')}. {self.verdict.get('context', '')}"
        if self.malformed:
            base += f"\nYour last plan was not accepted: {self.malformed}"
        path = self.repo / WORLD_FILE
        with contextlib.suppress(OSError):
            if path.exists():
                base += "\n\n" + path.read_text()[:8000]
        return base

    # --- stopping -----------------------------------------------------------------------------

    async def stop_agent(self, reason: str, code: int, revert: bool = False) -> None:
        if self.stopping:
            return
        self.stopping = reason
        self.outcome_override = code
        self.event("stopping", message=f"stopping the agent: {reason}", reason=reason, revert=revert)
        proc = self.proc
        if proc is not None and proc.poll() is None:
            loop = asyncio.get_running_loop()
            for sig, grace in ((signal.SIGINT, STOP_GRACE_INTERRUPT_S), (signal.SIGTERM, STOP_GRACE_TERMINATE_S),
                               (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    await asyncio.wait_for(loop.run_in_executor(None, proc.wait), grace)
                    break
                except TimeoutError:
                    continue
            # Children that outlived the leader of the group go too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if revert:
            self._remove_instructions()
            with contextlib.suppress(OSError):
                (self.repo / WORLD_FILE).unlink()
            try:
                own = tuple(str(x.relative_to(self.repo)) for x in (self.instructions, self.repo / WORLD_FILE)
                            if x is not None and x.is_relative_to(self.repo))
                self.revert_result = revert_changes(self.repo, self.intent_base or self.base_commit,
                                                    self.intent_id or "unknown", self.agent_id, self.summary, own)
                self.event("reverted", message=f"changes saved as stash {self.revert_result['stash']} "
                                               f"({self.revert_result['stash_message']}); tree restored to "
                                               f"{self.revert_result['base']}", result=self.revert_result)
            except UsageError as e:
                self.event("error", message=f"revert failed, nothing was deleted: {e}")

    def _on_terminate(self, sig: int) -> None:
        """tether itself is asked to end: end the agent too, and give up its intent."""
        self._spawn_task(self._terminate(sig))

    async def _terminate(self, sig: int) -> None:
        await self.stop_agent(f"tether received {signal.Signals(sig).name}", code=128 + sig)
        await self.complete("abandon", None)

    def _on_notify(self, n: p.Notification) -> None:
        if isinstance(n, p.Revoked) and n.agent_id == self.agent_id:
            code = EXIT_REVERTED if n.revert else EXIT_STOPPED
            self._spawn_task(self.stop_agent(f"intent revoked: {n.reason}", code=code, revert=n.revert))

    async def _heartbeats(self) -> None:
        interval = min(HEARTBEAT_INTERVAL_MAX_S, self.cfg.fail_closed_s / 4)
        while not self._exited.is_set():
            await asyncio.sleep(interval)
            try:
                res = await self.client.heartbeat([self.agent_id], deadline_s=max(0.5, self.cfg.fail_closed_s / 2))
            except ClientError:
                continue  # the watchdog decides when silence has lasted too long
            notice = (res.get("notices") or {}).get(self.agent_id)
            if notice is not None:
                await self.on_verdict(notice, "heartbeat")
            elif self.agent_id in (res.get("lapsed") or []):
                await self.stop_agent("the session lapsed at the master", code=EXIT_UNAVAILABLE)

    async def _report_past_failures(self) -> None:
        """Tell the master about earlier runs on this machine that failed closed (it could not be
        told then): operators see them in tetherlab_shims_failing_closed."""
        path = failures_file()
        try:
            lines = path.read_text().splitlines()[-FAILURE_REPORTS_MAX:]
        except OSError:
            return
        for line in lines:
            try:
                f = json.loads(line)
                await self.client.call(p.ShimReport, 5.0, agent_id=f["agent_id"], event="failed_closed",
                                       at_unix_ms=int(f["at_unix_ms"]), detail=str(f.get("detail", ""))[:1000])
            except (ValueError, KeyError, TypeError, p.ProtocolError, ClientError):
                continue  # a report that cannot be sent is not worth blocking the agent for
        with contextlib.suppress(OSError):
            path.unlink()

    def _record_failure(self, detail: str) -> None:
        path = failures_file()
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps({"agent_id": self.agent_id, "at_unix_ms": int(time.time() * 1000),
                                    "detail": detail}) + "\n")

    async def _watchdog(self) -> None:
        f = self.cfg.fail_closed_s
        while not self._exited.is_set():
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            last = self.client.last_confirmed
            if last is not None and time.monotonic() - last > f and not self.stopping:
                self.event("fail_closed", message=f"the master's quorum is unreachable: no confirmed heartbeat for "
                                                  f"{f:.1f} s; stopping the agent")
                self._record_failure(f"no quorum-confirmed heartbeat for {f:.1f} s")
                await self.stop_agent("the master's quorum is unreachable", code=EXIT_UNAVAILABLE)

    async def _finish(self) -> int:
        if not self.stopping and (self.verdict or {}).get("action") == "continue":
            await self.complete("complete" if self.outcome == 0 else "abandon", None)
        if self.stopping:
            return self.outcome_override
        return self.outcome

    def _remove_instructions(self) -> None:
        if self.section_installed and self.instructions is not None:
            with contextlib.suppress(OSError):
                remove_section(self.instructions)
            self.section_installed = False

    async def _cleanup(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._stdin_raw is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._stdin_raw)
        loop = asyncio.get_running_loop()
        if self.master_fd is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(self.master_fd)
            with contextlib.suppress(OSError):
                os.close(self.master_fd)
        self._remove_instructions()
        with contextlib.suppress(OSError):
            (self.repo / WORLD_FILE).unlink()
        if self._hook_server is not None:
            self._hook_server.close()
        if self.sock_path is not None:
            with contextlib.suppress(OSError):
                self.sock_path.unlink()
        await self.client.close()

    # --- the local hook socket ----------------------------------------------------------------

    _hook_server: asyncio.AbstractServer | None = None

    async def _start_hook_server(self) -> None:
        base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
        d = Path(tempfile.mkdtemp(prefix="tether-", dir=base))
        d.chmod(0o700)
        self.sock_path = d / "hook.sock"
        self._hook_server = await asyncio.start_unix_server(self._hook_conn, path=str(self.sock_path),
                                                            limit=HOOK_LINE_MAX_BYTES)

    async def _hook_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            req = json.loads(line)
            reply = await self.decide(req if isinstance(req, dict) else {})
        except (ValueError, TimeoutError, asyncio.LimitOverrunError) as e:
            reply = {"decision": "deny", "reason": f"Tetherlab: bad hook request ({e})", "context": ""}
        with contextlib.suppress(ConnectionError):
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        writer.close()

    async def decide(self, req: dict[str, Any]) -> dict[str, str]:
        """The answer to one hook call (shim/hooks.py maps it to the agent's format)."""
        event = req.get("event")
        tool = req.get("tool_name") or ""
        tool_input = req.get("tool_input") or {}
        if self.stopping:
            return {"decision": "stop", "reason": f"Tetherlab stopped this agent: {self.stopping}", "context": ""}
        if event in ("SessionStart", "UserPromptSubmit"):
            return {"decision": "allow", "reason": "", "context": self.context_text()}
        if event != "PreToolUse":
            return {"decision": "allow", "reason": "", "context": ""}
        if tool == "ExitPlanMode":
            try:
                plan = plan_from_markdown(str(tool_input.get("plan", "")))
            except ValueError as e:
                return {"decision": "deny", "reason": f"Tetherlab could not read the plan: {e}", "context": ""}
            verdict = await self.submit_plan(plan, source="hook")
            if verdict is None:
                why = self.malformed or self.stopping or "no verdict from the master"
                return {"decision": "deny", "reason": f"Tetherlab: {why}", "context": ""}
            if verdict.get("action") == "continue":
                return {"decision": "allow", "reason": "", "context": self.context_text()}
            return {"decision": "stop", "reason": f"Tetherlab: {_why(verdict)}", "context": ""}
        if tool not in EDIT_TOOLS:
            return {"decision": "allow", "reason": "", "context": ""}
        if tool.lower() == "bash" and _read_only(str(tool_input.get("command", ""))):
            return {"decision": "allow", "reason": "", "context": ""}
        last = self.client.last_confirmed
        if last is None or time.monotonic() - last > self.cfg.fail_closed_s:
            return {"decision": "deny", "reason": "Tetherlab: the master's quorum is unreachable; edits are blocked",
                    "context": ""}
        if (self.verdict or {}).get("action") != "continue":
            why = self.malformed or "no accepted plan yet"
            return {"decision": "deny", "reason": f"Tetherlab: {why}. Present your plan first (plan mode / "
                                                  "ExitPlanMode, or a TETHERLAB-PLAN block).", "context": ""}
        return {"decision": "allow", "reason": "", "context": ""}


def failures_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tetherlab" / "failed-closed.jsonl"


def _read_only(command: str) -> bool:
    """A shell command that cannot write: one read-only program, no redirection or chaining."""
    if not command.strip() or re.search(r"[>;&|`$]|\btee\b", command):
        return False
    words = command.split()
    if words[0] not in READ_ONLY_COMMANDS:
        return False
    return words[0] != "git" or (len(words) > 1 and words[1] in READ_ONLY_GIT)


def _why(verdict: dict[str, Any]) -> str:
    parts = []
    for c in verdict.get("conflicts", [])[:3]:
        parts.append(f"{c.get('holder_agent_id')} ({c.get('holder_summary')!r}) holds {c.get('concept')} "
                     f"[{c.get('kind')}]")
    head = f"{verdict.get('action')} on {verdict.get('intent_id')}"
    return head + (": " + "; ".join(parts) if parts else (": " + verdict.get("context", "") if verdict.get("context")
                                                           else ""))


def render_world(world: dict[str, Any], verdict: dict[str, Any] | None) -> str:
    lines = ["# Tetherlab world slice", "", "Written by tether for the agent: what other agents are doing in the",
             "parts of the code your plan touches. Refreshed on every verdict.", ""]
    if verdict:
        lines += [f"Verdict: **{verdict.get('action')}** for {verdict.get('intent_id')} "
                  f"(fencing token {verdict.get('fencing_token')}).", "", verdict.get("context", ""), ""]
    for c in world.get("concepts", []):
        lines.append(f"## {c.get('id')} — {c.get('title', '')} ({c.get('role', '')})")
        if c.get("description"):
            lines.append(c["description"])
        if c.get("paths"):
            lines.append("Paths: " + ", ".join(c["paths"]))
        for a in c.get("active", []):
            lines.append(f"- active: {a.get('agent_id')} ({a.get('kind', '')}): {a.get('summary', '')}")
        for r in c.get("recent", []):
            lines.append(f"- recently completed by {r.get('agent_id')}: {r.get('summary', '')}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(args: Any) -> int:
    try:
        cfg = load_config(args)
    except UsageError as e:
        print(f"tether run: {e}", file=sys.stderr)
        return EXIT_USAGE
    shim = Shim(cfg)
    try:
        return asyncio.run(shim.run())
    except KeyboardInterrupt:
        return 130

