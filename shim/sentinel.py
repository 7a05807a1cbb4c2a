"""The sentinel pattern, sans-I/O: the instruction text the shim installs, and a scanner that
finds complete plan blocks in an agent's terminal output.

An agent is asked to print its plan as one JSON object between fixed marker lines::

    <<<TETHERLAB-PLAN
    {"summary": "...", "steps": ["..."], "files": ["..."], "concepts": {"modify": [], "depend": []}}
    TETHERLAB-PLAN>>>

and, when done, ``<<<TETHERLAB-DONE ... TETHERLAB-DONE>>>`` (a JSON object with a summary, or
nothing). Terminal output is noisy: colour codes, carriage returns, wrapped lines, binary. The
scanner strips escape sequences, keeps a bounded window, and turns each complete block into an
event; a malformed block becomes an event that says what is wrong, never an exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tetherlab.cluster.core.engine.registry import parse_toml
from tetherlab.cluster.core.errors import RegistryError

PLAN_OPEN, PLAN_CLOSE = "<<<TETHERLAB-PLAN", "TETHERLAB-PLAN>>>"
DONE_OPEN, DONE_CLOSE = "<<<TETHERLAB-DONE", "TETHERLAB-DONE>>>"
BLOCK_MAX_CHARS = 64 * 1024  # a plan larger than this is refused, and the scanner never holds more
WINDOW_MAX_CHARS = 2 * BLOCK_MAX_CHARS  # text kept while looking for an opening marker
_TOO_LONG = f"a plan block was longer than {BLOCK_MAX_CHARS} characters; print a shorter plan"
SECTION_BEGIN = "<!-- tetherlab:begin (managed by tether; removed when the agent exits) -->"
SECTION_END = "<!-- tetherlab:end -->"

# Concepts listed in the instruction section: enough for an agent to pick ids, bounded so the
# section stays a small part of its context.
CONCEPTS_IN_INSTRUCTIONS_MAX = 80
TITLE_IN_INSTRUCTIONS_MAX_CHARS = 80
REGISTRY_FILE = Path(".tetherlab") / "concepts.toml"


def render_instructions(concepts: Sequence[tuple[str, str]] = (), total: int | None = None) -> str:
    """The instruction section; ``concepts`` are (id, title) pairs of the repository's registry,
    listed so the agent can name what its plan modifies and depends on."""
    listing = ""
    if concepts:
        rows = [f"- `{cid}`: {title[:TITLE_IN_INSTRUCTIONS_MAX_CHARS]}" if title else f"- `{cid}`"
                for cid, title in list(concepts)[:CONCEPTS_IN_INSTRUCTIONS_MAX]]
        more = (total if total is not None else len(concepts)) - len(rows)
        if more > 0:
            rows.append(f"- ... and {more} more in {REGISTRY_FILE}")
        listing = "\nConcepts of this repository (id: title):\n" + "\n".join(rows) + "\n"
    return f"""{SECTION_BEGIN}
## Coordinating with other agents (Tetherlab)

Other coding agents, on other machines, work on this repository at the same time. Before you
edit any file, print your plan as ONE JSON object between these exact marker lines, each on a
line of its own:

{PLAN_OPEN}
{{"summary": "one line: what you will do", "steps": ["step 1", "step 2"],
 "files": ["paths you expect to change"], "concepts": {{"modify": [], "depend": []}}}}
{PLAN_CLOSE}

Name the concepts your plan touches: under `modify` the ones whose code, files or contract you
will change; under `depend` the ones you use, call, subclass, wrap, raise or read without
changing them. Leave out what you only mention, test, investigate or leave alone. In plan mode,
end the plan with a line `Concepts: modify a.b, c.d; depend e.f`. The ids are in
{REGISTRY_FILE}; if you name none, the master derives them from your words, which is less exact.
{listing}
`files` is optional. Print a new block whenever your plan changes. When you have finished, print:

{DONE_OPEN}
{{"summary": "what you did"}}
{DONE_CLOSE}

If an edit is denied or you are told to stop, stop: another agent holds that part of the code.
.tetherlab/world.md describes what other agents are doing in the areas you touch.
{SECTION_END}
"""


INSTRUCTIONS = render_instructions()


# CSI (colours, cursor moves), OSC (titles, hyperlinks) and other two-byte escapes.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class PlanBlock:
    intent: dict[str, Any]  # {"summary", "steps", "files"?, "concepts"?}


@dataclass(frozen=True)
class DoneBlock:
    summary: str | None


@dataclass(frozen=True)
class MalformedBlock:
    reason: str  # written for the agent to read and act on


Event = PlanBlock | DoneBlock | MalformedBlock


def validate_plan(obj: Any) -> dict[str, Any]:
    """The plan object, normalised; raises ValueError with a message for the agent."""
    if not isinstance(obj, dict):
        raise ValueError("the plan must be a JSON object with 'summary' and 'steps'")
    extra = sorted(set(obj) - {"summary", "steps", "files", "concepts"})
    if extra:
        raise ValueError(f"the plan has unknown field(s) {extra}; allowed: summary, steps, files, concepts")
    summary = obj.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        raise ValueError("the plan needs a non-empty string 'summary'")
    steps = obj.get("steps", [])
    if not isinstance(steps, list) or not all(isinstance(s, str) and s.strip() for s in steps):
        raise ValueError("'steps' must be a list of non-empty strings")
    out: dict[str, Any] = {"summary": summary.strip(), "steps": [s.strip() for s in steps]}
    files = obj.get("files")
    if files is not None:
        if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
            raise ValueError("'files' must be a list of paths")
        out["files"] = files
    concepts = obj.get("concepts")
    if concepts is not None:
        if not isinstance(concepts, dict) or set(concepts) - {"modify", "depend"}:
            raise ValueError("'concepts' must be an object with 'modify' and/or 'depend' lists of concept ids")
        for k in ("modify", "depend"):
            v = concepts.get(k, [])
            if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
                raise ValueError(f"'concepts.{k}' must be a list of concept ids")
        out["concepts"] = {"modify": concepts.get("modify", []), "depend": concepts.get("depend", [])}
    return out


_CONCEPTS_LINE = re.compile(r"^\W*concepts\W*:\s*(.*)$", re.IGNORECASE)
_CONCEPT_ID = re.compile(r"[a-z0-9][a-z0-9_-]*(?:\.[a-z0-9][a-z0-9_-]*)+|[a-z0-9][a-z0-9_-]*")


def _concepts_line(text: str) -> dict[str, list[str]] | None:
    """``Concepts: modify a.b, c.d; depend e.f`` (markers and emphasis allowed) to claims."""
    out: dict[str, list[str]] = {"modify": [], "depend": []}
    found = False
    for part in re.split(r"[;|]", text):
        m = re.match(r"\W*(modify|modifies|modifying|depend|depends on|depends|depending on)\b\W*(.*)", part.strip(),
                     re.IGNORECASE)
        if m is None:
            continue
        kind = "modify" if m.group(1).lower().startswith("modif") else "depend"
        ids = [i for i in _CONCEPT_ID.findall(m.group(2).replace("`", " ")) if "." in i or i.isalpha()]
        ids = [i for i in ids if i not in ("none", "nothing", "and")]
        out[kind].extend(i for i in ids if i not in out[kind])
        found = True
    return out if found else None


def plan_from_markdown(markdown: str) -> dict[str, Any]:
    """A plan from Claude Code's ExitPlanMode Markdown: the first heading or line is the summary;
    every other non-empty line is a step (list markers and emphasis removed, so context
    paragraphs and sub-headings reach the master, which reads what each step changes). A
    ``Concepts: modify a.b; depend c.d`` line becomes the plan's explicit claims."""
    lines = [ln.strip() for ln in markdown.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("the plan is empty")
    summary = re.sub(r"^#+\s*", "", lines[0]).strip() or "plan"
    steps: list[str] = []
    concepts: dict[str, list[str]] | None = None
    for ln in lines[1:]:
        m = _CONCEPTS_LINE.match(re.sub(r"^([-*+]|\d+[.)])\s+", "", ln).replace("**", ""))
        parsed = _concepts_line(m.group(1)) if m else None
        if parsed is not None:
            concepts = parsed
            continue
        step = re.sub(r"^([-*+]|\d+[.)])\s+", "", ln).strip()
        if step:
            steps.append(step[:2000])
    plan: dict[str, Any] = {"summary": summary[:2000], "steps": steps[:100]}
    if concepts is not None:
        plan["concepts"] = {k: v[:256] for k, v in concepts.items()}
    return plan


class Scanner:
    """Feed it terminal output; it yields events for complete blocks."""

    def __init__(self) -> None:
        self._buf = ""
        self._pending = b""  # an incomplete UTF-8 sequence at the end of the last chunk

    def feed(self, data: bytes) -> list[Event]:
        raw = self._pending + data
        text = raw.decode("utf-8", errors="ignore")
        # Keep a cut multi-byte character for the next chunk (at most 3 bytes).
        tail = len(raw) - len(text.encode("utf-8", errors="ignore"))
        self._pending = raw[len(raw) - tail :] if 0 < tail <= 3 else b""
        text = _CONTROL.sub("", _ANSI.sub("", text.replace("\r\n", "\n").replace("\r", "\n")))
        self._buf += text
        events: list[Event] = []
        while True:
            ev = self._next()
            if ev is None:
                break
            events.append(ev)
        if len(self._buf) > WINDOW_MAX_CHARS:
            # Keep only what could still hold the start of a marker or a block.
            keep = self._buf[-WINDOW_MAX_CHARS:]
            if PLAN_OPEN in self._buf or DONE_OPEN in self._buf:
                i = max(self._buf.rfind(PLAN_OPEN), self._buf.rfind(DONE_OPEN))
                if len(self._buf) - i > BLOCK_MAX_CHARS:
                    events.append(MalformedBlock(_TOO_LONG))
                    keep = self._buf[i + 1 :][-WINDOW_MAX_CHARS:]
            self._buf = keep
        return events

    def _next(self) -> Event | None:
        starts = [(i, m) for m in (PLAN_OPEN, DONE_OPEN) if (i := self._buf.find(m)) >= 0]
        if not starts:
            return None
        start, opener = min(starts)
        closer = PLAN_CLOSE if opener == PLAN_OPEN else DONE_CLOSE
        body_start = start + len(opener)
        end = self._buf.find(closer, body_start)
        # A newer opening marker before the close means the first block was never closed.
        reopen = min((i for m in (PLAN_OPEN, DONE_OPEN) if (i := self._buf.find(m, body_start)) >= 0),
                     default=-1)
        if reopen >= 0 and (end < 0 or reopen < end):
            self._buf = self._buf[reopen:]
            # Reasons never quote a marker verbatim: an agent that echoes one must not open a block.
            return MalformedBlock(f"a {_NAMES[opener]} block was not closed before the next block began")
        if end < 0:
            if len(self._buf) - start > BLOCK_MAX_CHARS:
                self._buf = self._buf[body_start:]
                return MalformedBlock(_TOO_LONG)
            return None
        body = self._buf[body_start:end].strip()
        self._buf = self._buf[end + len(closer) :]
        if opener == DONE_OPEN:
            if not body:
                return DoneBlock(None)
            try:
                obj = json.loads(body)
            except ValueError:
                return DoneBlock(body[:2000])
            summary = obj.get("summary") if isinstance(obj, dict) else None
            return DoneBlock(summary if isinstance(summary, str) else None)
        try:
            obj = json.loads(_unwrap(body))
        except ValueError as e:
            return MalformedBlock(f"the plan block is not valid JSON ({e}); print it again as one JSON object")
        try:
            return PlanBlock(validate_plan(obj))
        except ValueError as e:
            return MalformedBlock(f"the plan was not accepted: {e}")


_NAMES = {PLAN_OPEN: "TETHERLAB-PLAN", DONE_OPEN: "TETHERLAB-DONE"}

# JSON-lines output of headless agents: objects of these types are not the assistant's own text
# (tool calls and results echo our deny reasons, results repeat the last message, stream events
# are partial deltas of a message that arrives whole as well).
_NOT_ASSISTANT_TEXT = frozenset({"user", "tool_result", "tool_use", "tool", "system", "result", "stream_event",
                                 "control_request", "control_response", "error", "step_start", "step_finish"})
JSON_LINE_MAX_BYTES = 4 * 1024 * 1024  # a longer line is passed on undecoded
_JSON_DEPTH_MAX = 32


def assistant_texts(obj: Any) -> list[str]:
    """The assistant's text in one JSON-lines event: every ``{"type": "text", "text": ...}`` that is
    not inside a tool call, a tool result, a user message or a result summary."""
    out: list[str] = []

    def walk(o: Any, depth: int) -> None:
        if depth > _JSON_DEPTH_MAX:
            return
        if isinstance(o, dict):
            kind = o.get("type")
            if kind in _NOT_ASSISTANT_TEXT:
                return
            if kind == "text" and isinstance(o.get("text"), str):
                out.append(o["text"])
            for k, v in o.items():
                if k != "text":
                    walk(v, depth + 1)
        elif isinstance(o, list):
            for v in o:
                walk(v, depth + 1)

    walk(obj, 0)
    return out


class JsonLines:
    """Turns a headless agent's output into text for the :class:`Scanner`: a line that is one JSON
    object with a ``type`` (an event of ``claude -p --output-format stream-json`` or ``opencode run
    --format json``) becomes the assistant text it carries, unescaped; any other line passes
    unchanged."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._mode = "start"  # at a line's start | "json": collecting a JSON line | "raw": passing a line on

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl + 1
            chunk = data[pos:end]
            pos = end
            eol = chunk.endswith(b"\n")
            if self._mode == "raw":
                out += chunk
            else:
                self._buf += chunk
                if self._mode == "start":
                    head = self._buf.lstrip()
                    if head:
                        self._mode = "json" if head[:1] == b"{" else "raw"
                    if self._mode == "raw" or (self._mode == "start" and eol):
                        out += self._buf
                        self._buf.clear()
                if self._mode == "json":
                    if eol:
                        out += self._decode(bytes(self._buf))
                        self._buf.clear()
                    elif len(self._buf) > JSON_LINE_MAX_BYTES:
                        out += self._buf
                        self._buf.clear()
                        self._mode = "raw"
            if eol:
                self._mode = "start"
        return bytes(out)

    @staticmethod
    def _decode(line: bytes) -> bytes:
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return line
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            return line  # not an agent's event (a plan object, for one, has no "type")
        texts = assistant_texts(obj)
        return ("\n".join(texts) + "\n").encode() if texts else b""


def _unwrap(body: str) -> str:
    """Terminals wrap long lines and agents sometimes fence JSON in ``` — undo both."""
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", body.strip())
    return body.replace("\n", " ")


# --- the instructions file section ------------------------------------------------------------


def registry_concepts(repo: Path) -> tuple[list[tuple[str, str]], int]:
    """(id, title) of the concepts in the repository's registry, and how many there are; nothing
    when there is no registry file or it does not parse (the section then lists none)."""
    path = repo / REGISTRY_FILE
    try:
        concepts = parse_toml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RegistryError):
        return [], 0
    return [(c.id, c.title) for c in concepts[:CONCEPTS_IN_INSTRUCTIONS_MAX]], len(concepts)


def install_section(path: Path, concepts: Sequence[tuple[str, str]] | None = None) -> bool:
    """Add our marked section to an instructions file (created if missing). False if present.
    Without ``concepts``, the registry next to the file (``.tetherlab/concepts.toml`` in its
    directory, the repository root) is listed."""
    text = path.read_text() if path.exists() else ""
    if SECTION_BEGIN in text:
        return False
    total: int | None = None
    if concepts is None:
        concepts, total = registry_concepts(path.parent)
    sep = "\n" if text.endswith("\n") else ("\n\n" if text else "")
    path.write_text(text + sep + render_instructions(concepts, total))
    return True


def remove_section(path: Path) -> bool:
    """Remove our section, leaving the file as it was (deleted if we created it empty)."""
    if not path.exists():
        return False
    text = path.read_text()
    i = text.find(SECTION_BEGIN)
    j = text.find(SECTION_END, i)
    if i < 0 or j < 0:
        return False
    j += len(SECTION_END)
    if text[j : j + 1] == "\n":
        j += 1
    before = text[:i]
    if before.endswith("\n\n"):
        before = before[:-1]
    new = before + text[j:]
    if new.strip():
        path.write_text(new)
    else:
        path.unlink()
    return True
