"""`tether install` / `tether uninstall`: put Tetherlab's hooks into an agent's configuration.

Claude Code: merge our command hooks into `.claude/settings.json` of the repository (or
`~/.claude/settings.json` with --global). The merge keeps every existing setting and hook,
is idempotent, writes atomically, and refuses a file that is not valid JSON rather than
overwrite what the developer wrote. The hook runs on every tool call, so the command written
starts the hook module directly with the interpreter tether runs under, isolated and without
site-packages (`PYTHON -I -S .../shim/hooks.py claude-code  # tether hook claude-code`): no
console script, no package finder, no site start-up (the module imports only the standard
library). Our entries are recognised by their command (`... tether ... hook claude-code`, the
trailing comment included), so uninstall removes only those, and a re-install from another
path replaces the old entry instead of adding a second one.

OpenCode: copy the packaged plugin (opencode_plugin.js) to `.opencode/plugins/tetherlab.js`
(or `~/.config/opencode/plugins/tetherlab.js` with --global).
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tetherlab.shim.hooks import HOOK_TIMEOUT_S

# Tools that can change files, and every MCP tool (they may write; tether denies them before a verdict).
TOOL_MATCHER = "Edit|Write|MultiEdit|NotebookEdit|Bash|mcp__.*"
PLAN_MATCHER = "ExitPlanMode"
CONTEXT_EVENTS = ("SessionStart", "UserPromptSubmit")
PLUGIN_NAME = "tetherlab.js"
# Present in the packaged plugin; tells our file apart from someone else's of the same name.
PLUGIN_MARKER = "tetherlab-plugin: managed by `tether install opencode`"


class RefusedError(Exception):
    """The existing configuration cannot be merged safely; nothing was written."""


@dataclass(frozen=True)
class HookSpec:
    event: str
    matcher: str | None
    command: str

    def entry(self) -> dict[str, object]:
        return {"type": "command", "command": self.command, "timeout": HOOK_TIMEOUT_S}


# --- locating things ----------------------------------------------------------------


def tether_executable() -> str:
    """Absolute path of the running `tether`, so hooks work without it on the agent's PATH."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "tether" and os.path.isfile(argv0):
        return os.path.abspath(argv0)
    # The console script sits next to the interpreter in a venv's bin/.
    sibling = os.path.join(os.path.dirname(sys.executable), "tether")
    if os.path.isfile(sibling) and os.access(sibling, os.X_OK):
        return sibling
    found = shutil.which("tether")
    return os.path.abspath(found) if found else "tether"


MARK = "  # tether hook claude-code"  # a shell comment: how the fast command is recognised as ours


def hook_command(tether: str) -> str:
    """The hook as a command: ``tether hook claude-code``, or, given ``fast_launcher()``'s
    ``PYTHON -I -S HOOKS.PY``, that launcher with the agent and our mark."""
    if tether.endswith(" -I -S " + shlex.quote(hooks_module())):
        return f"{tether} claude-code{MARK}"
    return f"{shlex.quote(tether)} hook claude-code"


def guarded_command(tether: str) -> str:
    # Claude Code treats any exit but 2 as "proceed"; if tether itself cannot start
    # (moved, deleted venv: exit 127) the shell turns that into a block.
    plain = hook_command(tether)
    if plain.endswith(MARK):
        return f"{plain[: -len(MARK)]} || exit 2{MARK}"
    return f"{plain} || exit 2"


def hooks_module() -> str:
    return str(Path(__file__).resolve().with_name("hooks.py"))


def fast_launcher() -> str | None:
    """``PYTHON -I -S HOOKS.PY``: the hook module run directly by this interpreter, without
    site-packages and the editable install's finder (12 ms of a 30 ms hook); None when the
    module is not a plain file (a zip import)."""
    module = Path(hooks_module())
    if not module.is_file() or not os.access(sys.executable, os.X_OK):
        return None
    return f"{shlex.quote(sys.executable)} -I -S {shlex.quote(str(module))}"


def find_repo(start: Path) -> Path:
    """The enclosing git work tree (a `.git` dir or file), else `start` itself."""
    start = start.resolve()
    for d in (start, *start.parents):
        if (d / ".git").exists():
            return d
    return start


def claude_settings_path(repo: str | None, global_: bool, home: Path | None = None) -> Path:
    if global_:
        return (home or Path.home()) / ".claude" / "settings.json"
    return find_repo(Path(repo) if repo else Path.cwd()) / ".claude" / "settings.json"


def opencode_plugin_path(repo: str | None, global_: bool, home: Path | None = None) -> Path:
    if global_:
        base = os.environ.get("XDG_CONFIG_HOME") if home is None else None
        config = Path(base) if base else (home or Path.home()) / ".config"
        return config / "opencode" / "plugins" / PLUGIN_NAME
    return find_repo(Path(repo) if repo else Path.cwd()) / ".opencode" / "plugins" / PLUGIN_NAME


def plugin_source() -> str:
    return (Path(__file__).resolve().parent / "opencode_plugin.js").read_text(encoding="utf-8")


# --- Claude Code settings merge (pure) ----------------------------------------------


def claude_hook_specs(tether: str) -> list[HookSpec]:
    guarded = guarded_command(tether)
    plain = hook_command(tether)
    return [
        HookSpec("PreToolUse", PLAN_MATCHER, guarded),
        HookSpec("PreToolUse", TOOL_MATCHER, guarded),
        # Context events stay best effort: a broken tether must not eat the user's prompt.
        HookSpec("SessionStart", None, plain),
        HookSpec("UserPromptSubmit", None, plain),
        # After an edit: tether reports the working state (soft conflicts, drift); best effort.
        HookSpec("PostToolUse", TOOL_MATCHER, plain),
    ]


def is_ours(hook: object) -> bool:
    if not isinstance(hook, dict) or hook.get("type", "command") != "command":
        return False
    command = hook.get("command")
    return isinstance(command, str) and "tether" in command and "hook claude-code" in command


def _matcher(group: dict[str, object]) -> str:
    # An absent, empty or "*" matcher all mean "every tool/source".
    m = group.get("matcher")
    return "" if m in (None, "", "*") else str(m)


def _key(event: str, matcher: str | None, hook: object) -> str:
    return json.dumps([event, matcher or "", hook], sort_keys=True)


def _strip_ours(hooks: dict[str, object], keep: set[str]) -> None:
    """Remove our hooks not in `keep` (and duplicates), dropping only groups/events we emptied."""
    seen: set[str] = set()
    for event in list(hooks):
        groups = hooks[event]
        if not isinstance(groups, list):
            continue  # Not a shape we write; leave it for Claude Code to judge.
        kept_groups: list[object] = []
        for group in groups:
            inner = group.get("hooks") if isinstance(group, dict) else None
            if not isinstance(group, dict) or not isinstance(inner, list):
                kept_groups.append(group)
                continue
            kept: list[object] = []
            for hook in inner:
                if is_ours(hook):
                    key = _key(event, _matcher(group), hook)
                    if key not in keep or key in seen:
                        continue
                    seen.add(key)
                kept.append(hook)
            if kept or not inner:
                group["hooks"] = kept
                kept_groups.append(group)
        if kept_groups or not groups:
            hooks[event] = kept_groups
        else:
            del hooks[event]


def _hooks_of(settings: object) -> dict[str, object] | None:
    if not isinstance(settings, dict):
        raise RefusedError("the settings file does not hold a JSON object")
    hooks = settings.get("hooks")
    if hooks is not None and not isinstance(hooks, dict):
        raise RefusedError('"hooks" in the settings file is not a JSON object')
    return hooks


def _holds(group: object, spec: HookSpec) -> bool:
    if not isinstance(group, dict) or _matcher(group) != (spec.matcher or ""):
        return False
    inner = group.get("hooks")
    return isinstance(inner, list) and spec.entry() in inner


def merge_claude_settings(settings: dict[str, object], tether: str) -> dict[str, object]:
    """`settings` with our hooks present exactly once; the input is not modified."""
    new = copy.deepcopy(settings)
    hooks = _hooks_of(new)
    if hooks is None:
        hooks = {}
    specs = claude_hook_specs(tether)
    _strip_ours(hooks, {_key(s.event, s.matcher, s.entry()) for s in specs})
    for spec in specs:
        groups = hooks.setdefault(spec.event, [])
        if not isinstance(groups, list):
            raise RefusedError(f'"hooks.{spec.event}" in the settings file is not a JSON array')
        if not any(_holds(g, spec) for g in groups):
            group: dict[str, object] = {"matcher": spec.matcher} if spec.matcher else {}
            group["hooks"] = [spec.entry()]
            groups.append(group)
    new["hooks"] = hooks
    return new


def remove_claude_settings(settings: dict[str, object]) -> dict[str, object]:
    """`settings` without any of our hooks; everything else is kept as it was."""
    new = copy.deepcopy(settings)
    hooks = _hooks_of(new)
    if hooks:
        _strip_ours(hooks, set())
        if not hooks:
            del new["hooks"]  # We emptied it; an originally empty "hooks" stays.
    return new


# --- files --------------------------------------------------------------------------


def read_settings(path: Path) -> dict[str, object] | None:
    """The parsed settings, None when the file does not exist; refuses anything unparseable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise RefusedError(f"{path} is not valid UTF-8 JSON ({e}); fix or move it, then retry") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise RefusedError(f"{path} is not valid JSON ({e}); fix or move it, then retry") from None
    if not isinstance(data, dict):
        raise RefusedError(f"{path} does not hold a JSON object; fix or move it, then retry")
    return data


def atomic_write(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a crash never leaves half a settings file."""
    # Write through a symlink (dotfile managers link ~/.claude/settings.json) instead of replacing it.
    target = path.resolve() if path.is_symlink() else path
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # Directory fsync is best effort (not supported everywhere).


def dump_settings(settings: dict[str, object]) -> str:
    return json.dumps(settings, indent=2, ensure_ascii=False) + "\n"


# --- commands -----------------------------------------------------------------------


def install_claude(path: Path, tether: str) -> bool:
    """Merge our hooks into `path`; True when the file changed."""
    old = read_settings(path)
    new = merge_claude_settings(old or {}, tether)
    if old is not None and new == old:
        return False
    atomic_write(path, dump_settings(new))
    return True


def uninstall_claude(path: Path) -> bool:
    old = read_settings(path)
    if old is None:
        return False
    new = remove_claude_settings(old)
    if new == old:
        return False
    atomic_write(path, dump_settings(new))
    return True


def install_opencode(path: Path) -> bool:
    source = plugin_source()
    try:
        existing = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        existing = None
    except (UnicodeDecodeError, IsADirectoryError):
        existing = ""
    if existing == source:
        return False
    if existing is not None and PLUGIN_MARKER not in existing:
        raise RefusedError(f"{path} exists and is not Tetherlab's plugin; move it away, then retry")
    atomic_write(path, source)
    return True


def uninstall_opencode(path: Path) -> bool:
    try:
        existing = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    except UnicodeDecodeError:
        existing = ""
    if PLUGIN_MARKER not in existing:
        raise RefusedError(f"{path} is not Tetherlab's plugin; leaving it alone")
    path.unlink()
    return True


def install(agent: str, repo: str | None = None, global_: bool = False, tether: str | None = None) -> int:
    """`tether install AGENT`; returns the exit code (0 ok, 1 I/O error, 2 refused)."""
    return _run("install", agent, repo, global_, tether)


def uninstall(agent: str, repo: str | None = None, global_: bool = False) -> int:
    return _run("uninstall", agent, repo, global_, None)


def _run(verb: str, agent: str, repo: str | None, global_: bool, tether: str | None) -> int:
    try:
        if agent == "claude-code":
            path = claude_settings_path(repo, global_)
            if verb == "install":
                changed = install_claude(path, tether or fast_launcher() or tether_executable())
            else:
                changed = uninstall_claude(path)
            what = "hooks"
        elif agent == "opencode":
            path = opencode_plugin_path(repo, global_)
            changed = install_opencode(path) if verb == "install" else uninstall_opencode(path)
            what = "plugin"
        else:
            sys.stderr.write(f"tether {verb}: unknown agent {agent!r} (expected claude-code or opencode)\n")
            return 2
    except RefusedError as e:
        sys.stderr.write(f"tether {verb}: refused: {e}\n")
        return 2
    except OSError as e:
        sys.stderr.write(f"tether {verb}: {e}\n")
        return 1
    if verb == "install":
        print(f"tether: Tetherlab {what} {'installed in' if changed else 'already present in'} {path}")
    else:
        print(f"tether: Tetherlab {what} {'removed from' if changed else 'not present in'} {path}")
    return 0
