"""``tether run``: wrap an agent, get its plan out, enforce the verdict, fail closed.

Life of a wrapped agent (the decisions are shim/session.py's; this module performs them):

1. Open a session with the master (agent id ``<developer>/<uuid>``, tool, machine, repository
   remote, base commit). Without a quorum-backed answer the agent does not start.
2. Install the sentinel instruction (a marked section of CLAUDE.md / AGENTS.md), serve the
   local hook socket (``TETHER_SOCK``), and run the agent: in a pseudo-terminal when tether's
   stdin is a terminal; headless otherwise (the agent inherits stdin, its stdout and stderr are
   pipes that tether passes on and scans, JSON-lines output decoded first).
3. Plans printed between the sentinel markers, or sent by a hook (Claude Code's ExitPlanMode),
   become intents (``initial``, then ``replan``); the verdict is enforced: ``continue`` writes
   the world slice to ``.tetherlab/world.md``; ``stop`` ends the agent's process group
   (interrupt, terminate, kill, each bounded); ``revert`` stops it, stashes every change since
   the intent began under a stash named for the intent, and restores the tree to its base.
4. Heartbeats (hedged across nodes) keep the session alive. When no quorum-confirmed
   acknowledgement has arrived for ``fail_closed_s`` the agent is stopped: F is always below the
   session TTL minus a margin, so a cut-off agent stops before the master could hand its
   concepts to anyone else.
5. When the agent has exited: revert if asked, complete the intent (exit status 0 or a done
   block) or abandon it, close the session, exit. SIGTERM, SIGHUP and SIGINT stop the agent and
   abandon its intent first. Effects a verdict or a signal started are never cancelled: tether
   waits for them, each bounded.

Exit codes: the agent's own status when it ran to its end; 2 bad usage or configuration;
3 the master's quorum was unreachable (the agent did not start, or was stopped); 4 the agent
was stopped by a verdict; 5 it was stopped and its changes reverted (stashed); 128 + N when
tether itself got signal N.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import shutil
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tetherlab.cluster import protocol as p
from tetherlab.cluster.core.config import ConfigError
from tetherlab.cluster.core.exitcodes import EXIT_UNAVAILABLE, EXIT_USAGE
from tetherlab.cluster.ops.config import load_cluster_file
from tetherlab.shim import session as s
from tetherlab.shim.client import (
    ClientError,
    ClusterUnavailable,
    HostKeyMismatch,
    Master,
    MasterClient,
    RequestError,
)
from tetherlab.shim.githooks import RunHooks
from tetherlab.shim.readonly import read_only
from tetherlab.shim.reporter import ChangeReporter, ReportSchedule
from tetherlab.shim.sentinel import (
    DoneBlock,
    JsonLines,
    MalformedBlock,
    PlanBlock,
    Scanner,
    install_section,
    plan_from_markdown,
    remove_section,
)

STARTUP_DEADLINE_S = 15.0  # to open the session through a quorum-backed leader
SUBMIT_DEADLINE_S = 15.0  # a plan's verdict (hooks wait up to 20 s)
END_DEADLINE_S = 5.0  # complete, abandon and close_session, while the quorum answers
END_UNREACHABLE_DEADLINE_S = 2.0  # the same once the quorum has stopped answering: tether exits soon
OPEN_CANCELLED_CLOSE_S = 2.0  # a signal during the opening: close whatever may have opened
FAIL_CLOSED_DEFAULT_S = 5.0
FAIL_CLOSED_MARGIN_S = s.FAIL_CLOSED_MARGIN_S
HEARTBEAT_INTERVAL_MAX_S = 1.0
HEARTBEATS_IN_FLIGHT_MAX = 2  # a slow one does not delay the next, but they do not pile up
WATCHDOG_INTERVAL_S = 0.1
STOP_GRACE_INTERRUPT_S = 2.0  # SIGINT, then SIGTERM after this, then SIGKILL after the next
STOP_GRACE_TERMINATE_S = 2.0
STOP_GRACE_KILL_S = 5.0
FINALE_MAX_S = 120.0  # from the agent's exit to tether's: every effect is bounded, this bounds them all
EFFECTS_MAX = 256  # ordered effects queued at once (the machine emits each at most once or twice)
REVERT_TIMEOUT_S = 90.0
REPORT_INTERVAL_DEFAULT_S = 5.0
REPORT_DEADLINE_S = 5.0  # one change report; a lost one is sent again at the next due time
HOOK_LINE_MAX_BYTES = 4 * 1024 * 1024
HOOK_READ_TIMEOUT_S = 5.0
HOOK_BUDGET_DEFAULT_S = 3.0  # a hook that does not say its budget (older hooks)
HOOK_BUDGET_MARGIN_S = 0.3  # kept back from the hook's budget for the reply to travel
WORLD_WAIT_S = 3.0  # an approved plan's hook waits this long for the world slice to go with it
PENDING_WAIT_MAX_S = 20.0  # an edit waits at most this long for a plan's verdict
OUTPUT_READ_BYTES = 65536
OUTPUT_DRAIN_MAX_BYTES = 16 * 1024 * 1024  # read after the agent exited, at most
WORLD_FILE = Path(".tetherlab") / "world.md"
FAILURE_REPORTS_MAX = 100  # earlier fail-closed events reported per run, newest kept
CONFIG_PATHS = (Path("~/.config/tetherlab/shim.toml"),)
# Tools that cannot change files: allowed before a verdict. Every other tool is denied until the
# plan has a continue verdict (deny by default), except a shell command proven read-only.
READ_ONLY_TOOLS = frozenset({
    "Read", "Glob", "Grep", "LS", "NotebookRead", "WebFetch", "WebSearch", "TodoWrite", "TodoRead", "BashOutput",
    "EnterPlanMode", "AskUserQuestion",
    "read", "glob", "grep", "list", "webfetch", "websearch", "codesearch", "todowrite", "todoread", "question",
})
SHELL_TOOLS = frozenset({"Bash", "bash"})
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


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
    config_file: Path | None = None  # the shim.toml in use: the pre-push check connects with it
    report_interval_s: float = REPORT_INTERVAL_DEFAULT_S  # in-flight change reports without a hooked edit


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
    try:
        report_interval = float(env.get("TETHER_REPORT_INTERVAL_S") or data.get("report_interval_s")
                                or REPORT_INTERVAL_DEFAULT_S)
    except (TypeError, ValueError):
        raise UsageError("report_interval_s (or TETHER_REPORT_INTERVAL_S) must be a number of seconds") from None
    if not 0.5 <= report_interval <= 300:
        raise UsageError(f"report_interval_s must be between 0.5 and 300 seconds, got {report_interval}")
    return ShimConfig(masters, key_path, developer, tool, command, fail_closed, bool(getattr(args, "json", False)),
                      Path.cwd(), Path(instructions) if instructions else None,
                      Path(cfg_path).expanduser().resolve() if cfg_path else None, report_interval)


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


def tree_at(repo: Path, base: str) -> bool:
    """HEAD is ``base`` and nothing is changed or untracked (ignored files aside)."""
    return (git(repo, "rev-parse", "HEAD", check=False) == base
            and not git(repo, "status", "--porcelain", "--untracked-files=all", check=False))


# --- the shim ---------------------------------------------------------------------------------


class Shim:
    def __init__(self, cfg: ShimConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.now = clock
        self.agent_id = f"{cfg.developer}/{uuid.uuid4()}"
        self.machine = s.Session(self.agent_id, cfg.fail_closed_s)
        self.client = MasterClient(cfg.masters, cfg.key, cfg.developer, on_notify=self._on_notify,
                                   client_name="tether", agent=cfg.tool)
        self.repo = cfg.repo
        self.remote = ""
        self.base_commit = ""
        self.intent_base: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.headless = False
        self.master_fd: int | None = None  # the pty, interactive runs
        self._out_fds: dict[int, tuple[Any, Scanner, JsonLines | None]] = {}  # fd -> (where to, scanner, decoder)
        self.sock_path: Path | None = None
        self._sock_dir: Path | None = None
        self._hook_server: asyncio.AbstractServer | None = None
        self._submit_lock = asyncio.Lock()
        self._settled = asyncio.Event()  # set while no plan is waiting for its verdict
        self._settled.set()
        self._effects: asyncio.Queue[s.Action] = asyncio.Queue(EFFECTS_MAX)
        self._exit: asyncio.Future[int] | None = None
        self._agent_gone = asyncio.Event()
        self._protected: set[asyncio.Task[Any]] = set()  # started by a verdict or a signal: awaited, never cancelled
        self._soft: set[asyncio.Task[Any]] = set()  # requests and refreshes: cancelled at exit
        self._opening: asyncio.Task[dict[str, Any]] | None = None
        self._signal_at_open: int | None = None
        self._stdin_raw: list[Any] | None = None
        self.instructions: Path | None = None
        self.section_installed = False
        self._heartbeats_in_flight = 0
        self._stderr_mid_line = False  # headless: the agent's stderr, passed on, ended mid-line
        self._world_task: asyncio.Task[None] | None = None
        self.githooks: RunHooks | None = None  # commit trailers and the pre-push check, for this run only
        self.reporter: ChangeReporter | None = None  # in-flight changes, while the agent holds continue
        self._last_report_error = ""

    # --- output to the developer ------------------------------------------------------------

    def event(self, kind: str, **fields: Any) -> None:
        try:
            if self._stderr_mid_line:  # our line must not be glued to a partial line of the agent's
                sys.stderr.write("\n")
                self._stderr_mid_line = False
            if self.cfg.json:
                sys.stderr.write(json.dumps({"event": kind, "agent_id": self.agent_id, **fields}) + "\n")
            else:
                text = fields.get("message") or kind
                sys.stderr.write(f"\r\n[tether] {text}\r\n" if not self.headless else f"[tether] {text}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # the terminal is gone (SIGHUP): nothing to tell

    # --- the machine and its effects ----------------------------------------------------------

    def feed(self, ev: s.Event) -> None:
        """Tell the session machine what happened and perform what it decides, in order."""
        for action in self.machine.handle(ev):
            if isinstance(action, s.Say):
                self.event(action.kind, message=action.message, **action.fields)
            elif isinstance(action, s.StartAgent):
                self._start_agent()
            elif isinstance(action, s.StopAgent):
                self._release_claim()  # commits from here on carry no claim; nothing more is reported
                self._protect(self._stop_agent())
            elif isinstance(action, s.Grant):
                self._on_grant(action.verdict)
            else:
                try:
                    self._effects.put_nowait(action)
                except asyncio.QueueFull:  # the machine emits each effect once: this is a bug, say so
                    self.event("error", message=f"too many effects queued; dropped {type(action).__name__}")

    def _protect(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._protected.add(task)
        task.add_done_callback(self._protected.discard)

    def _soft_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._soft.add(task)
        task.add_done_callback(self._soft.discard)

    async def _effect_worker(self) -> None:
        """Performs the ordered effects one after another; ends after Exit. Never cancelled."""
        while True:
            action = await self._effects.get()
            try:
                await self._perform(action)
            except Exception as e:  # one failed effect must not stop the ones after it
                self.event("error", message=f"{type(action).__name__} failed: {type(e).__name__}: {e}")
                if isinstance(action, s.Revert | s.EndIntent | s.CloseSession):
                    kind = {s.Revert: "revert", s.EndIntent: "end", s.CloseSession: "close"}[type(action)]
                    self.feed(s.EffectDone(kind, False))
            if isinstance(action, s.Exit):
                if self._exit is not None and not self._exit.done():
                    self._exit.set_result(action.code)
                return

    async def _perform(self, action: s.Action) -> None:
        if isinstance(action, s.RecordFailure):
            self._record_failure(action.detail)
        elif isinstance(action, s.Revert):
            ok = await self._revert(action)
            self.feed(s.EffectDone("revert", ok))
        elif isinstance(action, s.EndIntent):
            ok = await self._end_intent(action)
            self.feed(s.EffectDone("end", ok, {"trigger": action.trigger}))
        elif isinstance(action, s.CloseSession):
            ok = await self._close_session()
            self.feed(s.EffectDone("close", ok))
        elif isinstance(action, s.Release):
            self._on_release()

    def _end_deadline_s(self) -> float:
        return END_DEADLINE_S if self.machine.confirmed_at(self.now()) else END_UNREACHABLE_DEADLINE_S

    def _on_grant(self, verdict: dict[str, Any]) -> None:
        """A continue verdict, performed as soon as it arrives: commits carry the claim (agent,
        intent, fencing token) from now on, in-flight changes are reported against the intent's
        base, and the world slice is refreshed in the background."""
        intent_id, token = verdict.get("intent_id"), verdict.get("fencing_token")
        if self.githooks is not None and isinstance(intent_id, str) and isinstance(token, int):
            try:
                self.githooks.set_claim(self.agent_id, intent_id, token)
            except OSError as e:
                self.event("warning", message=f"commits will not carry the claim: {e}")
        if self.reporter is not None and isinstance(intent_id, str):
            self.reporter.begin(intent_id, self.intent_base or self.base_commit)
        task = asyncio.get_running_loop().create_task(self._refresh_world(verdict))
        self._soft.add(task)
        task.add_done_callback(self._soft.discard)
        self._world_task = task

    def _release_claim(self) -> None:
        if self.reporter is not None:
            self.reporter.end()
        if self.githooks is not None:
            with contextlib.suppress(OSError):
                self.githooks.clear_claim()

    def _on_release(self) -> None:
        """The last effect before exit, after the session was closed: the run's git hooks go, with
        the instruction section and the world slice."""
        self._release_claim()
        if self.githooks is not None:
            self.githooks.remove()
        self._remove_instructions()
        with contextlib.suppress(OSError):
            (self.repo / WORLD_FILE).unlink()

    async def _end_intent(self, action: s.EndIntent) -> bool:
        cls = p.Complete if action.trigger == "complete" else p.Abandon
        try:
            res = await self.client.call(cls, self._end_deadline_s(), agent_id=self.agent_id,
                                         intent_id=action.intent_id)
        except ClientError as e:
            self.event("warning", message=f"could not {action.trigger} intent {action.intent_id}: {e} "
                                          "(closing the session, or its expiry, releases it)")
            return False
        self.event(action.trigger, message=f"intent {action.intent_id} {action.trigger}d", result=res)
        return True

    async def _close_session(self) -> bool:
        try:
            res = await self.client.call(p.CloseSession, self._end_deadline_s(), agent_id=self.agent_id)
        except RequestError as e:
            if e.code in ("no_session", "not_implemented"):
                return True  # gone already, or a node from before close_session: it lapses by itself
            self.event("warning", message=f"could not close the session: {e}")
            return False
        except ClientError as e:
            self.event("warning", message=f"could not close the session: {e} (it lapses at the master by itself)")
            return False
        self.event("closed", message=f"session {self.agent_id} closed", result=res)
        return True

    async def _revert(self, action: s.Revert) -> bool:
        self._remove_instructions()
        with contextlib.suppress(OSError):
            (self.repo / WORLD_FILE).unlink()
        base = self.intent_base or self.base_commit
        own = tuple(str(x.relative_to(self.repo)) for x in (self.instructions, self.repo / WORLD_FILE)
                    if x is not None and x.is_relative_to(self.repo))
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(REVERT_TIMEOUT_S):
                result = await loop.run_in_executor(
                    None, revert_changes, self.repo, base, action.intent_id or "unknown", self.agent_id,
                    action.summary, own)
            at_base = await loop.run_in_executor(None, tree_at, self.repo, base)
        except (UsageError, TimeoutError, OSError, subprocess.SubprocessError) as e:
            self.event("error", message=f"revert failed, nothing was deleted: {e}")
            return False
        if not at_base:
            self.event("error", message=f"revert incomplete: the tree is not clean at {base}; nothing was deleted",
                       result=result)
            return False
        self.event("reverted", message=f"changes saved as stash {result['stash']} ({result['stash_message']}); "
                                       f"tree restored to {result['base']}", result=result)
        return True

    # --- life cycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            self.repo, self.remote, self.base_commit = repo_facts(self.cfg.repo)
        except UsageError as e:
            self.event("error", message=str(e))
            return EXIT_USAGE
        loop = asyncio.get_running_loop()
        self._exit = loop.create_future()
        self.headless = not sys.stdin.isatty()
        for sig in TERMINATING_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        worker = loop.create_task(self._effect_worker())
        try:
            code = await self._open()
            if code is not None:
                return code
            self._soft_task(self._report_past_failures())
            gone = loop.create_task(self._agent_gone.wait())
            self._soft.add(gone)
            await asyncio.wait([self._exit, gone], return_when=asyncio.FIRST_COMPLETED)
            if not self._exit.done():
                try:
                    async with asyncio.timeout(FINALE_MAX_S):
                        await asyncio.shield(self._exit)
                except TimeoutError:
                    self.event("error", message=f"tether's clean-up did not finish within {FINALE_MAX_S:.0f} s")
                    return self.machine.exit_code if self.machine.exit_code is not None else int(EXIT_UNAVAILABLE)
            return self._exit.result()
        finally:
            for sig in TERMINATING_SIGNALS:
                with contextlib.suppress(ValueError, RuntimeError):
                    loop.remove_signal_handler(sig)
            await self._drain_protected()
            if not worker.done():
                worker.cancel()
            await self._cleanup()

    async def _open(self) -> int | None:
        """Open the session and start the agent; an exit code when it cannot start."""
        sent = self.now()
        self._opening = asyncio.get_running_loop().create_task(self.client.call(
            p.OpenSession, STARTUP_DEADLINE_S, agent_id=self.agent_id, tool=self.cfg.tool,
            machine=socket.gethostname()[:200] or "unknown", repo_remote=self.remote, base_commit=self.base_commit))
        try:
            opened = await self._opening
        except asyncio.CancelledError:
            if self._signal_at_open is None:
                raise
            # A signal during the opening: the session may exist at the master; close it, bounded.
            with contextlib.suppress(ClientError):
                await self.client.call(p.CloseSession, OPEN_CANCELLED_CLOSE_S, agent_id=self.agent_id)
            self.event("exited", message=f"tether received {signal.Signals(self._signal_at_open).name} before the "
                                         "agent started", status=128 + self._signal_at_open)
            return 128 + self._signal_at_open
        except (ClusterUnavailable, HostKeyMismatch) as e:
            self.event("unavailable", message=f"the master's quorum is unreachable; the agent was not started ({e})")
            return int(EXIT_UNAVAILABLE)
        except RequestError as e:
            self.event("refused", message=f"the master refused the session ({e.code}): {e.message}")
            return int(EXIT_USAGE)
        finally:
            self._opening = None
        session = opened.get("session") or {}
        ttl_s = None
        if "deadline_ms" in session and "last_seen_ms" in session:
            ttl_s = (session["deadline_ms"] - session["last_seen_ms"]) / 1000
        self.event("session", message=f"session {self.agent_id} open (leader {self.client.leader_id})",
                   leader=self.client.leader_id, base_commit=self.base_commit, remote=self.remote,
                   headless=self.headless)
        self.feed(s.Opened(sent, ttl_s))
        return None

    def _start_agent(self) -> None:
        """StartAgent: the hook socket, the instruction, the agent, heartbeats and the watchdog."""
        try:
            self._start_hook_server()
            self._install_instructions()
            self._install_git_hooks()
            self._spawn()
        except (OSError, subprocess.SubprocessError) as e:
            self.event("error", message=f"cannot start the agent {self.cfg.command[0]!r}: {e}")
            self.feed(s.AgentExited(127))
            self._agent_gone.set()
            return
        self._soft_task(self._heartbeats())
        self._soft_task(self._watchdog())
        self.reporter = ChangeReporter(self.repo, self._send_report, self._on_report_reply,
                                       exclude=self._own_files(), on_error=self._report_error,
                                       schedule=ReportSchedule(interval_s=self.cfg.report_interval_s))
        self._soft_task(self.reporter.run())
        self._protect(self._wait_exit())  # the agent's exit starts the finale: never cancelled

    def _install_git_hooks(self) -> None:
        """The run's own git hooks (commit trailers, the pre-push check), seen only by the agent's
        processes through their environment; nothing in the repository changes."""
        assert self._sock_dir is not None
        verify: list[str] | None = None
        cf = self.cfg.config_file
        if cf is not None:
            try:
                load_cluster_file(cf)
                verify = [sys.executable, "-m", "tetherlab.cluster.cli", "git", "verify", "--pre-push",
                          "--cluster", str(cf), "--key", str(self.cfg.key), "--developer", self.cfg.developer]
            except (ConfigError, OSError, ValueError) as e:
                self.event("warning", message=f"pushes are not checked before they leave: {cf} is not a cluster file "
                                              f"({e}); the remote's pre-receive hook still is")
        else:
            self.event("warning", message="pushes are not checked before they leave (no shim.toml, only --masters); "
                                          "the remote's pre-receive hook still is")
        hooks = RunHooks(self.repo, self._sock_dir / "git-hooks", verify)
        try:
            hooks.install()
        except (OSError, subprocess.SubprocessError) as e:
            self.event("warning", message=f"cannot install the run's git hooks ({e}): commits will not carry the claim")
            return
        self.githooks = hooks

    def _own_files(self) -> list[str]:
        """Files tether itself writes in the repository: not the agent's changes."""
        own = [str(WORLD_FILE)]
        if self.instructions is not None and self.instructions.is_relative_to(self.repo):
            own.append(str(self.instructions.relative_to(self.repo)))
        return own

    async def _send_report(self, intent_id: str, report: dict[str, Any]) -> dict[str, Any] | None:
        try:
            files = tuple(p.FileReport(**{**f, "symbols": tuple(p.SymbolReport(**x) for x in f["symbols"]),
                                          "hunks": tuple(tuple(h) for h in f["hunks"])})
                          for f in report["files"])
            return await self.client.call(p.ReportChanges, REPORT_DEADLINE_S, agent_id=self.agent_id,
                                          intent_id=intent_id, files=files, truncated=bool(report["truncated"]))
        except p.ProtocolError as e:  # a path or name over the protocol's bounds: say so, report again later
            self._report_error(f"the change report was not accepted: {e.message}")
            return None
        except RequestError as e:
            if e.code in ("intent_mismatch", "not_active", "no_session"):
                return None  # the intent moved on; the verdict that moved it says what happens
            self._report_error(f"the master refused the change report ({e.code}): {e.message}")
            return None
        except ClientError:
            return None  # heartbeats and the watchdog judge the quorum; the report goes again later

    def _on_report_reply(self, reply: dict[str, Any]) -> None:
        self.feed(s.ChangesAnswered(reply))

    def _report_error(self, message: str) -> None:
        if message != self._last_report_error:  # the same problem every few seconds is said once
            self._last_report_error = message
            self.event("warning", message=message)

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self._opening is not None and not self._opening.done():
            self._signal_at_open = sig
            self._opening.cancel()
            return
        self.feed(s.Signalled(sig, name))

    async def _drain_protected(self) -> None:
        """Effects that a verdict or a signal started run to their end, bounded."""
        pending = set(self._protected)
        if pending:
            _, late = await asyncio.wait(pending, timeout=STOP_GRACE_INTERRUPT_S + STOP_GRACE_TERMINATE_S
                                         + STOP_GRACE_KILL_S + 1.0)
            for t in late:
                t.cancel()

    # --- the agent's process ------------------------------------------------------------------

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
        env = dict(os.environ)
        if self.githooks is not None:
            env.update(self.githooks.environment(env))
        env["TETHER_SOCK"] = str(self.sock_path)
        env["TETHER_AGENT_ID"] = self.agent_id
        loop = asyncio.get_running_loop()
        if self.headless:
            # Headless: the agent reads tether's own stdin (a pipe, a file, /dev/null) directly and
            # writes to pipes tether passes on unchanged and scans (JSON lines decoded first).
            self.proc = subprocess.Popen(self.cfg.command, stdin=None, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, cwd=self.cfg.repo, env=env, start_new_session=True)
            assert self.proc.stdout is not None and self.proc.stderr is not None
            for pipe, sink, decoder in ((self.proc.stdout, sys.stdout, JsonLines()),
                                        (self.proc.stderr, sys.stderr, None)):
                fd = pipe.fileno()
                os.set_blocking(fd, False)
                self._out_fds[fd] = (sink, Scanner(), decoder)
                loop.add_reader(fd, self._on_output, fd)
        else:
            master, slave = pty.openpty()
            if sys.stdout.isatty():
                with contextlib.suppress(OSError):
                    fcntl.ioctl(slave, termios.TIOCSWINSZ,
                                fcntl.ioctl(sys.stdout.fileno(), termios.TIOCGWINSZ, b"\0" * 8))

            def child_setup() -> None:  # runs in the child between fork and exec
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)

            try:
                self.proc = subprocess.Popen(self.cfg.command, stdin=slave, stdout=slave, stderr=slave,
                                             cwd=self.cfg.repo, env=env, start_new_session=True,
                                             preexec_fn=child_setup)
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            self.master_fd = master
            os.set_blocking(master, False)
            self._out_fds[master] = (sys.stdout, Scanner(), None)
            loop.add_reader(master, self._on_output, master)
            self._stdin_raw = termios.tcgetattr(sys.stdin.fileno())
            tty.setraw(sys.stdin.fileno())
            loop.add_reader(sys.stdin.fileno(), self._on_input)
            with contextlib.suppress(ValueError):
                loop.add_signal_handler(signal.SIGWINCH, self._on_winch)
        self.event("started", message=f"agent started: {' '.join(self.cfg.command)} (pid {self.proc.pid})",
                   pid=self.proc.pid, headless=self.headless)

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

    def _on_output(self, fd: int) -> None:
        """What the agent printed: passed on to the developer, then scanned for blocks."""
        try:
            data = os.read(fd, OUTPUT_READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO: the agent's side of the terminal is gone
        if not data:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(fd)
            return
        self._pass_on(fd, data)

    def _pass_on(self, fd: int, data: bytes) -> None:
        sink, scanner, decoder = self._out_fds[fd]
        with contextlib.suppress(OSError, ValueError):
            sink.buffer.write(data)
            sink.flush()
        if sink is sys.stderr:
            self._stderr_mid_line = not data.endswith(b"\n")
        for ev in scanner.feed(decoder.feed(data) if decoder is not None else data):
            if isinstance(ev, PlanBlock):
                self._start_submit(ev.intent, source="output")
            elif isinstance(ev, DoneBlock):
                self.feed(s.DonePrinted(ev.summary))
            elif isinstance(ev, MalformedBlock):
                self.feed(s.Malformed(ev.reason))
                self.event("malformed_plan", message=f"plan block not accepted: {ev.reason}")
                self._write_world(f"Your last plan block was not accepted: {ev.reason}\n")

    def _drain_output(self, max_bytes: int = OUTPUT_DRAIN_MAX_BYTES) -> None:
        """Read and scan whatever the agent has printed so far, without waiting: a hook call may
        arrive before the loop has read the plan block the agent printed just before it."""
        for fd in list(self._out_fds):
            left = max_bytes
            while left > 0:
                try:
                    data = os.read(fd, OUTPUT_READ_BYTES)
                except OSError:  # BlockingIOError: nothing more now; EIO: gone
                    break
                if not data:
                    break
                left -= len(data)
                self._pass_on(fd, data)

    async def _wait_exit(self) -> None:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        code = await loop.run_in_executor(None, self.proc.wait)
        # What the agent printed last (a done block may be in it), bounded: a child it left behind
        # may hold the output open.
        self._drain_output()
        for fd in list(self._out_fds):
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(fd)
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        status = code if code >= 0 else 128 - code
        self.event("exited", message=f"agent exited with status {status}", status=status)
        self.feed(s.AgentExited(status))
        self._agent_gone.set()

    async def _stop_agent(self) -> None:
        """StopAgent: end the agent's process group, interrupt, terminate, kill, each bounded. Its
        exit (seen by _wait_exit) starts the finale."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        loop = asyncio.get_running_loop()
        for sig, grace in ((signal.SIGINT, STOP_GRACE_INTERRUPT_S), (signal.SIGTERM, STOP_GRACE_TERMINATE_S),
                           (signal.SIGKILL, STOP_GRACE_KILL_S)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                async with asyncio.timeout(grace):
                    await loop.run_in_executor(None, proc.wait)
                break
            except TimeoutError:
                continue
        # Children that outlived the leader of the group go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    # --- plans and verdicts -------------------------------------------------------------------

    def _start_submit(self, plan: dict[str, Any], source: str) -> None:
        self.feed(s.SubmitStarted())
        self._settled.clear()
        self._soft_task(self.submit_plan(plan, source, counted=True))

    async def submit_plan(self, plan: dict[str, Any], source: str, counted: bool = False) -> dict[str, Any] | None:
        """Submit a plan; its verdict, or None (refused, stopping, no quorum)."""
        if not counted:
            self.feed(s.SubmitStarted())
            self._settled.clear()
        try:
            async with self._submit_lock:
                return await self._submit(plan, source)
        finally:
            if self.machine.pending_submits == 0:
                self._settled.set()

    async def _submit(self, plan: dict[str, Any], source: str) -> dict[str, Any] | None:
        trigger = self.machine.submit_trigger()
        if trigger is None:
            self.feed(s.SubmitFailed(f"the agent is being stopped: {self.machine.stopping}", unavailable=False))
            return None
        concepts = plan.get("concepts")
        try:
            intent = p.Intent(summary=plan["summary"][:4096], steps=tuple(x[:4096] for x in plan.get("steps", [])),
                              files=tuple(plan["files"]) if plan.get("files") else None,
                              concepts=p.Concepts(modify=tuple(concepts.get("modify", ())),
                                                  depend=tuple(concepts.get("depend", ())))
                              if concepts else None)
        except p.ProtocolError as e:
            reason = f"the plan was not accepted: {e.message}"
            self.event("malformed_plan", message=reason)
            self.feed(s.SubmitFailed(reason, unavailable=False))
            return None
        if trigger == "initial":
            self.intent_base = git(self.repo, "rev-parse", "HEAD", check=False) or self.base_commit
        sent = self.now()
        try:
            verdict = await self.client.call(p.SubmitIntent, SUBMIT_DEADLINE_S, agent_id=self.agent_id,
                                             tool=self.cfg.tool, intent=intent, trigger=trigger)
        except ClusterUnavailable as e:
            self.event("unavailable", message=f"no verdict: the master's quorum is unreachable ({e})")
            self.feed(s.SubmitFailed(str(e), unavailable=True))
            return None
        except RequestError as e:
            reason = f"the master refused the plan ({e.code}): {e.message}"
            self.event("refused", message=reason)
            self.feed(s.SubmitFailed(reason, unavailable=False))
            return None
        except ClientError as e:
            self.event("unavailable", message=f"no verdict ({e}); stopping the agent")
            self.feed(s.SubmitFailed(str(e), unavailable=True))
            return None
        self.feed(s.VerdictReceived(sent, verdict, plan["summary"]))
        return verdict

    async def _refresh_world(self, verdict: dict[str, Any]) -> None:
        try:
            world = await self.client.call(p.WorldSlice, END_DEADLINE_S, agent_id=self.agent_id)
        except ClientError:
            return
        if self.cfg.json:
            self.event("world", world=world)
        self._write_world(render_world(world, verdict))

    def _write_world(self, text: str) -> None:
        path = self.repo / WORLD_FILE
        with contextlib.suppress(OSError):
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)

    def context_text(self) -> str:
        verdict = self.machine.verdict
        if verdict is None:
            base = ("Tetherlab: print your plan before editing (plan mode, or a TETHERLAB-PLAN block as described in "
                    "the instructions).")
        else:
            base = f"Tetherlab verdict: {verdict.get('action')}. {verdict.get('context', '')}"
        if self.machine.malformed:
            base += f"\nYour last plan was not accepted: {self.machine.malformed}"
        notes = self.machine.take_notes()
        if notes:
            base += "\n" + notes
        path = self.repo / WORLD_FILE
        with contextlib.suppress(OSError):
            if path.exists():
                base += "\n\n" + path.read_text()[:8000]
        return base

    def _on_notify(self, n: p.Notification) -> None:
        if isinstance(n, p.Revoked) and n.agent_id == self.agent_id:
            self.feed(s.Revoked(n.reason, n.revert))

    # --- heartbeats and the watchdog -----------------------------------------------------------

    async def _heartbeats(self) -> None:
        """One hedged heartbeat every interval; a slow one does not hold up the next."""
        interval = min(HEARTBEAT_INTERVAL_MAX_S, self.cfg.fail_closed_s / 4)
        while not self._agent_gone.is_set():
            await asyncio.sleep(interval)
            if self._heartbeats_in_flight < HEARTBEATS_IN_FLIGHT_MAX:
                self._soft_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        self._heartbeats_in_flight += 1
        sent = self.now()
        try:
            # No later than the bound: an answer older than that could not keep the agent running.
            reply = await self.client.heartbeat([self.agent_id], deadline_s=self.machine.bound_s)
        except ClientError:
            return  # the watchdog decides when silence has lasted too long
        finally:
            self._heartbeats_in_flight -= 1
        self.feed(s.HeartbeatAnswered(sent, reply))

    async def _watchdog(self) -> None:
        while not self._agent_gone.is_set():
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            self.feed(s.Tick(self.now()))

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

    # --- clean-up -----------------------------------------------------------------------------

    def _remove_instructions(self) -> None:
        if self.section_installed and self.instructions is not None:
            with contextlib.suppress(OSError):
                remove_section(self.instructions)
            self.section_installed = False

    async def _cleanup(self) -> None:
        for t in list(self._soft):
            t.cancel()
        if self._soft:
            await asyncio.wait(set(self._soft), timeout=1.0)
        if self._stdin_raw is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._stdin_raw)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(sys.stdin.fileno())
        for fd in list(self._out_fds):
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
        if self.master_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.master_fd)
        if self.proc is not None:
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        self._remove_instructions()
        with contextlib.suppress(OSError):
            (self.repo / WORLD_FILE).unlink()
        if self._hook_server is not None:
            self._hook_server.close()
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
        await self.client.close()

    # --- the local hook socket ----------------------------------------------------------------

    def _start_hook_server(self) -> None:
        base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
        self._sock_dir = Path(tempfile.mkdtemp(prefix="tether-", dir=base))
        self._sock_dir.chmod(0o700)
        self.sock_path = self._sock_dir / "hook.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.sock_path))
            sock.listen(64)  # hooks may connect before the server task runs: the backlog keeps them
        except OSError:
            sock.close()
            raise
        self._soft_task(self._serve_hooks(sock))

    async def _serve_hooks(self, sock: socket.socket) -> None:
        self._hook_server = await asyncio.start_unix_server(self._hook_conn, sock=sock, limit=HOOK_LINE_MAX_BYTES)
        await self._hook_server.serve_forever()

    async def _hook_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HOOK_READ_TIMEOUT_S):
                line = await reader.readline()
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
        started = self.now()
        event = req.get("event")
        tool = req.get("tool_name") or ""
        tool_input = req.get("tool_input") or {}
        if self.machine.stop is not None:
            return {"decision": "stop", "reason": f"Tetherlab stopped this agent: {self.machine.stopping}",
                    "context": ""}
        if event in ("SessionStart", "UserPromptSubmit"):
            return {"decision": "allow", "reason": "", "context": self.context_text()}
        if event == "PostToolUse":
            # An edit landed: report the working state soon (debounced). The answer does not wait
            # for it; what the master said about earlier reports goes with it.
            if self.reporter is not None:
                self.reporter.poke()
            return {"decision": "allow", "reason": "", "context": self.machine.take_notes()}
        if event != "PreToolUse":
            return {"decision": "allow", "reason": "", "context": ""}
        if tool == "ExitPlanMode":
            try:
                plan = plan_from_markdown(str(tool_input.get("plan", "")))
            except ValueError as e:
                return {"decision": "deny", "reason": f"Tetherlab could not read the plan: {e}", "context": ""}
            verdict = await self.submit_plan(plan, source="hook")
            if verdict is None:
                why = self.machine.malformed or self.machine.stopping or "no verdict from the master"
                return {"decision": "deny", "reason": f"Tetherlab: {why}", "context": ""}
            if verdict.get("action") == "continue":
                if self._world_task is not None:  # the world slice goes with the approval
                    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                        async with asyncio.timeout(WORLD_WAIT_S):
                            await asyncio.shield(self._world_task)
                return {"decision": "allow", "reason": "", "context": self.context_text()}
            return {"decision": "stop", "reason": f"Tetherlab: {s.why(verdict)}", "context": ""}
        if tool in READ_ONLY_TOOLS:
            return {"decision": "allow", "reason": "", "context": ""}
        if tool in SHELL_TOOLS and read_only(str(tool_input.get("command", ""))):
            return {"decision": "allow", "reason": "", "context": ""}
        decision, reason = self.machine.edit_decision(self.now())
        if decision == "deny":
            self._drain_output()  # a plan block printed just before this call may not be read yet
            decision, reason = self.machine.edit_decision(self.now())
        if decision == "pending":
            budget = req.get("budget_s")
            budget_s = float(budget) if isinstance(budget, int | float) and budget > 0 else HOOK_BUDGET_DEFAULT_S
            wait_s = min(PENDING_WAIT_MAX_S, budget_s - HOOK_BUDGET_MARGIN_S - (self.now() - started))
            if wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._settled.wait()
            decision, reason = self.machine.edit_decision(self.now())
            if decision == "pending":
                decision = "deny"
        # News for the agent goes with PostToolUse and the context events, which every agent
        # shows the model (OpenCode's before-hook has no place for it).
        return {"decision": decision, "reason": reason, "context": ""}


def failures_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tetherlab" / "failed-closed.jsonl"


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
    except KeyboardInterrupt:  # only before the loop installed its handlers
        return 130
