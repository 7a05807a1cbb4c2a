"""Agent hooks: ask the local `tether run` process, answer in the agent's own format.

`tether hook claude-code` runs on every tool call of the agent, so this module
imports only os, sys, time and the C modules under json and socket (``_json``, ``_socket``):
``json`` and ``socket`` themselves pull in re, enum and selectors, most of a hook's start-up.
`tether install` runs this file directly (``python -I -S .../hooks.py claude-code``).

Contract with the local `tether run` process, over the unix socket whose path is
in ``TETHER_SOCK`` (inherited by the agent and so by its hooks): the hook sends
ONE JSON line and reads ONE JSON line back.

    request: {"v": 1, "op": "hook", "agent": "claude-code" | "opencode",
              "event": "PreToolUse" | "SessionStart" | "UserPromptSubmit" | ...,
              "session_id": str | null, "cwd": str | null,
              "tool_name": str | null, "tool_input": object | null,
              "prompt": str | null, "budget_s": number}

``budget_s`` is how long the hook can still wait for the reply: an edit that arrives while the
plan's verdict is on its way waits for it, within that budget, instead of being denied.
    reply:   {"decision": "allow" | "deny" | "stop", "reason": str, "context": str}

ExitPlanMode is an ordinary PreToolUse request (``tool_input.plan`` holds the
Markdown plan); the tether side submits it as the intent and replies with the
verdict, so it gets the longer budget.

Claude Code hooks fail OPEN on exit 1, on a timeout and on a crash, so this
hook never exits 1 and always answers before the installed hook timeout: when
the shim cannot be asked it denies (PreToolUse) or warns (context events).
The mapping to Claude Code's output is pure (dicts in, ``(exit_code,
stdout_json)`` out) so it is table-tested without sockets.
"""

from __future__ import annotations

import os
import sys
import time

try:  # json's and socket's C halves, without the Python modules' imports
    import _json
except ImportError:  # an interpreter built without the accelerator: json itself, below
    _json = None  # type: ignore[assignment]
import _socket

# Stays a plain constant so that the hook path does not import `typing`.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

JSON = dict[str, object]
Output = tuple[int, "JSON | None"]

PROTOCOL_VERSION = 1
AGENTS = ("claude-code", "opencode")
DECISIONS = ("allow", "deny", "stop")
PLAN_TOOL = "ExitPlanMode"

# The `timeout` written into the agent's hook config; every budget below stays under it.
HOOK_TIMEOUT_S = 30
# A plan verdict goes through Raft on the master; anything else is answered locally.
PLAN_BUDGET_S = 20.0
HOOK_BUDGET_S = 3.0
# Time kept back from the budget for writing our own answer and process exit.
BUDGET_MARGIN_S = 0.2
# Tests and slow machines may lower or raise the budget, never past the hook timeout.
BUDGET_ENV = "TETHER_HOOK_BUDGET_S"
MAX_BUDGET_S = HOOK_TIMEOUT_S - 5.0
SOCK_ENV = "TETHER_SOCK"

# Claude Code drops additionalContext beyond 10,000 characters.
MAX_CONTEXT_CHARS = 10_000
TRUNCATION_MARK = "\n[... truncated by tether]"
# A reply is a verdict plus a world slice; anything bigger is not ours.
MAX_REPLY_BYTES = 4 * 1024 * 1024

CONTEXT_EVENTS = ("SessionStart", "UserPromptSubmit")
AFTER_EVENT = "PostToolUse"  # an edit landed: tether reports the working state; news for the agent comes back
UNREACHABLE_FIX = (
    "Run the agent under `tether run -- <agent>` so it is coordinated, "
    "or remove the hooks with `tether uninstall claude-code`."
)


# --- JSON without `json` ---------------------------------------------------------


class _ScanContext:
    """What json's C scanner reads from a decoder: strict strings, no hooks, no NaN."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> object:
        raise ValueError(f"{name} is not valid JSON")


_WHITESPACE = " \t\n\r"
_scan = _json.make_scanner(_ScanContext) if _json is not None else None
_encode = (_json.make_encoder(None, None, _json.encode_basestring_ascii, None, ":", ",", False, False, False)
           if _json is not None else None)


def loads(data: bytes | str) -> object:
    """``json.loads`` for UTF-8 input; raises ValueError (UnicodeDecodeError is one)."""
    if _scan is None:
        import json

        return json.loads(data)
    text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        obj, end = _scan(text, start)
    except StopIteration:
        raise ValueError("no JSON value") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError("extra data after the JSON value")
    return obj


def dumps(obj: object) -> str:
    """Compact ``json.dumps`` (ASCII, no NaN)."""
    if _encode is None:
        import json

        return json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return "".join(_encode(obj, 0))


class TetherUnreachable(Exception):
    """No usable answer from the local tether process (missing, refused, late, malformed)."""


# --- request / reply -------------------------------------------------------------


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def build_request(agent: str, payload: JSON) -> JSON:
    """The socket request for one hook call; `payload` is the agent's hook JSON."""
    tool_input = payload.get("tool_input")
    return {
        "v": PROTOCOL_VERSION,
        "op": "hook",
        "agent": agent,
        "event": _str_or_none(payload.get("hook_event_name")),
        "session_id": _str_or_none(payload.get("session_id")),
        "cwd": _str_or_none(payload.get("cwd")),
        "tool_name": _str_or_none(payload.get("tool_name")),
        "tool_input": tool_input if isinstance(tool_input, dict) else None,
        "prompt": _str_or_none(payload.get("prompt")),
    }


def budget_for(request: JSON, env: dict[str, str] | None = None) -> float:
    """Seconds the whole hook may take for this request."""
    default = PLAN_BUDGET_S if request.get("tool_name") == PLAN_TOOL else HOOK_BUDGET_S
    raw = (os.environ if env is None else env).get(BUDGET_ENV)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            return default
        if value > 0:
            return min(value, MAX_BUDGET_S)
    return default


def parse_reply(raw: bytes) -> JSON:
    """Validate one reply line; anything unexpected is a failure, never a guess."""
    try:
        obj = loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise TetherUnreachable(f"malformed reply from the tether shim: {e}") from None
    if not isinstance(obj, dict):
        raise TetherUnreachable("malformed reply from the tether shim: not a JSON object")
    decision = obj.get("decision")
    reason = obj.get("reason", "")
    context = obj.get("context", "")
    if decision not in DECISIONS:
        raise TetherUnreachable(f"malformed reply from the tether shim: decision {decision!r}")
    if reason is None:
        reason = ""
    if context is None:
        context = ""
    if not isinstance(reason, str) or not isinstance(context, str):
        raise TetherUnreachable("malformed reply from the tether shim: reason/context not strings")
    return {"decision": decision, "reason": reason, "context": context}


def ask_tether(request: JSON, sock_path: str | None, deadline: float) -> JSON:
    """Send one request line and read one reply line before `deadline` (time.monotonic)."""
    if not sock_path:
        raise TetherUnreachable(f"{SOCK_ENV} is not set (the agent is not running under `tether run`)")
    line = dumps(request).encode() + b"\n"
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        buf = bytearray()
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(sock_path)
            sock.settimeout(_remaining(deadline))
            sock.sendall(line)
            while b"\n" not in buf:
                # Re-arm the timeout each read: the deadline bounds the whole exchange.
                sock.settimeout(_remaining(deadline))
                chunk = sock.recv(65536)
                if not chunk:
                    raise TetherUnreachable("the tether shim closed the connection without a reply")
                buf += chunk
                if len(buf) > MAX_REPLY_BYTES:
                    raise TetherUnreachable("reply from the tether shim is too large")
        except TimeoutError:
            raise TetherUnreachable("no reply from the tether shim in time") from None
        except OSError as e:
            raise TetherUnreachable(f"cannot reach the tether shim at {sock_path}: {e.strerror or e}") from None
    finally:
        sock.close()
    return parse_reply(bytes(buf[: buf.index(b"\n")]))


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


# --- Claude Code mapping (pure) ----------------------------------------------------


def truncate_context(text: str) -> str:
    if len(text) <= MAX_CONTEXT_CHARS:
        return text
    return text[: MAX_CONTEXT_CHARS - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def _context_output(event: str, context: str) -> Output:
    if not context:
        return 0, None
    return 0, {"hookSpecificOutput": {"hookEventName": event, "additionalContext": truncate_context(context)}}


def _deny_output(reason: str) -> JSON:
    return {
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": "deny",
            "permissionDecisionReason": reason,
        }
    }


def claude_output(event: str | None, reply: JSON) -> Output:
    """Map a validated tether reply to Claude Code's documented hook output."""
    decision = reply["decision"]
    reason = str(reply.get("reason") or "")
    context = str(reply.get("context") or "")
    if decision == "stop":
        stop_reason = reason or "stopped by Tetherlab"
        out: JSON = {"continue": False, "stopReason": stop_reason}
        if event == "PreToolUse":
            # Belt and braces: should `continue` ever be ignored, this tool call is still denied.
            out.update(_deny_output(stop_reason))
        return 0, out
    if event == "PreToolUse":
        if decision == "deny":
            return 0, _deny_output(reason or "denied by Tetherlab")
        # Allow adds no permissionDecision, so the user's own permission prompts still apply.
        return _context_output(event, context)
    if event in CONTEXT_EVENTS:
        if decision == "deny":
            # These events cannot be denied; tell the agent instead.
            warning = f"Tetherlab: {reason or 'denied'}"
            return _context_output(event, f"{warning}\n\n{context}" if context else warning)
        return _context_output(event, context)
    if event == AFTER_EVENT and decision == "allow":
        return _context_output(event, context)
    return 0, None


def claude_failure(event: str | None, why: str) -> Output:
    """Fail closed when no answer came: deny tool calls, warn through context otherwise."""
    if event == "PreToolUse":
        return 0, _deny_output(
            f"Tetherlab: the tether shim is unreachable ({why}); this agent is coordinated and may not "
            f"use this tool until the shim answers. {UNREACHABLE_FIX}"
        )
    if event in CONTEXT_EVENTS:
        return _context_output(
            event,
            f"WARNING from Tetherlab: the tether shim is unreachable ({why}). You are not coordinated with "
            f"other agents; edits and shell commands will be denied until the shim answers. {UNREACHABLE_FIX}",
        )
    return 0, None


def handle_claude(payload: object, ask: Callable[[JSON], JSON]) -> Output:
    """One Claude Code hook call: `ask` sends the request and returns a validated reply or raises."""
    if not isinstance(payload, dict):
        # Without the event we cannot pick an output shape; exit 2 blocks every event that can block.
        return 2, None
    event = _str_or_none(payload.get("hook_event_name"))
    if event != "PreToolUse" and event not in CONTEXT_EVENTS and event != AFTER_EVENT:
        # Only these events are installed; others are not ours to answer.
        return 0, None
    try:
        reply = ask(build_request("claude-code", payload))
    except TetherUnreachable as e:
        return claude_failure(event, str(e))
    except Exception as e:  # Any bug here must still fail closed, not exit 1.
        return claude_failure(event, f"{type(e).__name__}: {e}")
    return claude_output(event, reply)


# --- OpenCode (CLI fallback for plugins that shell out) -----------------------------


def opencode_request(payload: JSON) -> JSON:
    """Accept OpenCode's names (tool, args, sessionID) as well as Claude Code's."""
    merged: JSON = {
        "hook_event_name": payload.get("event") or payload.get("hook_event_name") or "PreToolUse",
        "session_id": payload.get("sessionID", payload.get("session_id")),
        "cwd": payload.get("cwd"),
        "tool_name": payload.get("tool", payload.get("tool_name")),
        "tool_input": payload.get("args", payload.get("tool_input")),
        "prompt": payload.get("prompt"),
    }
    return build_request("opencode", merged)


def handle_opencode(payload: object, ask: Callable[[JSON], JSON]) -> Output:
    """Print the reply itself; exit 0 only on allow so a shell caller can block on non-zero."""
    if not isinstance(payload, dict):
        return 2, {"decision": "deny", "reason": "Tetherlab: hook input is not a JSON object", "context": ""}
    try:
        reply = ask(opencode_request(payload))
    except Exception as e:
        why = str(e) if isinstance(e, TetherUnreachable) else f"{type(e).__name__}: {e}"
        return 2, {"decision": "deny", "reason": f"Tetherlab: the tether shim is unreachable ({why})", "context": ""}
    return (0 if reply["decision"] == "allow" else 2), reply


# --- entry point --------------------------------------------------------------------


def hook_main(argv: list[str]) -> int:
    """`tether hook AGENT`: stdin is the agent's hook JSON, stdout our answer. Exits 0 or 2."""
    started = time.monotonic()
    agent = argv[0] if argv else ""
    try:
        raw = sys.stdin.buffer.read()
        try:
            payload: object = loads(raw) if raw.strip() else None
        except (ValueError, UnicodeDecodeError):
            payload = None

        def ask(request: JSON) -> JSON:
            budget = budget_for(request)
            # tether may wait for a plan's verdict before answering, within what is left of this.
            request["budget_s"] = round(budget - BUDGET_MARGIN_S - (time.monotonic() - started), 3)
            return ask_tether(request, os.environ.get(SOCK_ENV), started + budget - BUDGET_MARGIN_S)

        if agent == "claude-code":
            code, out = handle_claude(payload, ask)
        elif agent == "opencode":
            code, out = handle_opencode(payload, ask)
        else:
            sys.stderr.write(f"tether hook: unknown agent {agent!r} (expected one of {', '.join(AGENTS)})\n")
            return 2
        if code == 2 and out is None:
            sys.stderr.write("Tetherlab: the hook input was not valid JSON; blocking to stay safe.\n")
        if out is not None:
            sys.stdout.write(dumps(out) + "\n")
            sys.stdout.flush()
        return code
    except BaseException as e:  # Exit 1 (an uncaught error) would let the tool call through.
        if isinstance(e, SystemExit) and e.code in (0, 2):
            raise
        try:
            sys.stderr.write(f"Tetherlab: the tether hook failed ({type(e).__name__}: {e}); blocking to stay safe.\n")
        except Exception:
            pass
        return 2


if __name__ == "__main__":
    # `python -I -S .../shim/hooks.py AGENT`: what `tether install` writes into the agent's hooks,
    # so that a hook call starts no site-packages and no package finder (this file imports only
    # the standard library).
    sys.exit(hook_main(sys.argv[1:]))
