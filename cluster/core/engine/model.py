"""Typed records of the engine: intent bodies, intents, sessions, and the lifecycle table.

Records are plain data with exact JSON forms; they are what the adapter stores in LMDB and
what ``Engine.from_records`` rebuilds from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tetherlab.cluster.core.engine.globs import GlobError, normalise_path
from tetherlab.cluster.core.engine.registry import ID_RE
from tetherlab.cluster.core.engine.validate import check_str, check_str_list
from tetherlab.cluster.core.errors import CommandError

# --- intent lifecycle ------------------------------------------------------------------------

ACTIVE = "active"
COMPLETED = "completed"
ABANDONED = "abandoned"
STOPPED = "stopped"
LAPSED = "lapsed"
REVERTED = "reverted"
STATUSES = (ACTIVE, COMPLETED, ABANDONED, STOPPED, LAPSED, REVERTED)

# Every status change goes through this table (and ``Engine._set_status`` asserts it). A lapsed
# intent nobody has contended for may still be resumed by its agent (replan), completed or
# abandoned; claiming its concepts, or an operator's revert, makes it ``reverted``.
TRANSITIONS: dict[str, frozenset[str]] = {
    ACTIVE: frozenset({ACTIVE, COMPLETED, ABANDONED, STOPPED, LAPSED, REVERTED}),
    LAPSED: frozenset({ACTIVE, COMPLETED, ABANDONED, STOPPED, REVERTED}),
    COMPLETED: frozenset(),
    ABANDONED: frozenset(),
    STOPPED: frozenset(),
    REVERTED: frozenset(),
}
# Statuses whose claims are still in the indexes: active ones block, lapsed ones get reverted.
HOLDING = frozenset({ACTIVE, LAPSED})

TRIGGERS = ("initial", "replan", "complete", "abandon")

CONTINUE = "continue"
STOP = "stop"
REVERT = "revert"

# Conflict kinds, from the point of view of the intent the verdict is for.
MODIFY_MODIFY = "modify_modify"  # both modify the concept: always stops the later one
DEPEND_ON_MODIFIED = "depend_on_modified"  # it depends on what the holder modifies
MODIFY_DEPENDED = "modify_depended"  # it modifies what the holder depends on

# --- bounds ----------------------------------------------------------------------------------

AGENT_ID_MAX_CHARS = 200
SUMMARY_MAX_CHARS = 2000
STEP_MAX_CHARS = 2000
STEPS_MAX = 100
FILES_MAX = 1000
CONCEPT_REFS_MAX = 256
SHORT_FIELD_MAX_CHARS = 500
AGENT_IDS_PER_HEARTBEAT_MAX = 10_000

CONCEPT_ID_RE = ID_RE  # one definition: the registry owns the id syntax
# "developer/uuid": the developer part is the SSH identity the shim authenticated as.
AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class IntentBody:
    """The plan as the agent states it: ``{"summary", "steps", "files"?, "concepts"?}``."""

    summary: str
    steps: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    modify: tuple[str, ...] = ()
    depend: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_str(self.summary, "intent.summary", SUMMARY_MAX_CHARS)
        object.__setattr__(self, "steps", check_str_list(self.steps, "intent.steps", STEPS_MAX, STEP_MAX_CHARS))
        files = check_str_list(self.files, "intent.files", FILES_MAX, SHORT_FIELD_MAX_CHARS)
        try:
            files = tuple(dict.fromkeys(normalise_path(f) for f in files))
        except GlobError as e:
            raise CommandError("bad_field", f"field 'intent.files': {e}") from None
        object.__setattr__(self, "files", files)
        for name in ("modify", "depend"):
            refs = check_str_list(getattr(self, name), f"intent.concepts.{name}", CONCEPT_REFS_MAX, 128)
            for i, r in enumerate(refs):
                if not CONCEPT_ID_RE.match(r):
                    raise CommandError("bad_field", f"field 'intent.concepts.{name}[{i}]': {r!r} is not a concept id")
            object.__setattr__(self, name, tuple(dict.fromkeys(refs)))
        both = sorted(set(self.modify) & set(self.depend))
        if both:
            raise CommandError(
                "bad_field", f"field 'intent.concepts': {both} listed under both 'modify' and 'depend'"
            )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"summary": self.summary, "steps": list(self.steps)}
        if self.files:
            out["files"] = list(self.files)
        if self.modify or self.depend:
            out["concepts"] = {"modify": list(self.modify), "depend": list(self.depend)}
        return out


@dataclass
class Intent:
    """One agent task from its first plan to its end; replans keep the id."""

    intent_id: str
    agent_id: str
    tool: str
    body: IntentBody
    status: str
    trigger: str
    created_index: int
    created_ms: int
    updated_index: int
    # Raft index of the last grant (continue on initial/replan); None if never granted.
    fencing_token: int | None = None
    granted_ms: int | None = None
    finished_index: int | None = None
    finished_ms: int | None = None
    registry_version: int = 0
    claims: dict[str, Any] = field(default_factory=dict)
    # Conflicts of the last verdict, or who invalidated it; bounded by CONFLICTS_MAX.
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    # False while the agent still has to be told of a stop/revert it did not ask for.
    notified: bool = True
    ended_by: str = ""
    # What the agent's in-flight code touches (core/engine/footprint.py), its soft conflicts,
    # and the index up to which the agent was told of them (stored only once non-empty, so
    # records of intents that never reported stay as they were).
    footprint: dict[str, Any] = field(default_factory=dict)
    soft: list[dict[str, Any]] = field(default_factory=list)
    soft_changed_index: int = 0
    soft_told_index: int = 0

    @property
    def modifies(self) -> list[str]:
        return [c["concept"] for c in self.claims.get("modify", ())]

    @property
    def depends(self) -> list[str]:
        return [c["concept"] for c in self.claims.get("depend", ())]

    def to_json(self) -> dict[str, Any]:
        return {
            "intent_id": self.intent_id,
            "agent_id": self.agent_id,
            "tool": self.tool,
            "intent": self.body.to_json(),
            "status": self.status,
            "trigger": self.trigger,
            "created_index": self.created_index,
            "created_ms": self.created_ms,
            "updated_index": self.updated_index,
            "fencing_token": self.fencing_token,
            "granted_ms": self.granted_ms,
            "finished_index": self.finished_index,
            "finished_ms": self.finished_ms,
            "registry_version": self.registry_version,
            "claims": self.claims,
            "conflicts": self.conflicts,
            "notified": self.notified,
            "ended_by": self.ended_by,
            **({"footprint": self.footprint} if self.footprint else {}),
            **({"soft": self.soft, "soft_changed_index": self.soft_changed_index,
                "soft_told_index": self.soft_told_index} if self.soft or self.soft_changed_index else {}),
        }

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Intent:
        b = o["intent"]
        concepts = b.get("concepts", {})
        body = IntentBody(
            summary=b["summary"],
            steps=tuple(b["steps"]),
            files=tuple(b.get("files", ())),
            modify=tuple(concepts.get("modify", ())),
            depend=tuple(concepts.get("depend", ())),
        )
        return cls(
            intent_id=o["intent_id"],
            agent_id=o["agent_id"],
            tool=o["tool"],
            body=body,
            status=o["status"],
            trigger=o["trigger"],
            created_index=o["created_index"],
            created_ms=o["created_ms"],
            updated_index=o["updated_index"],
            fencing_token=o["fencing_token"],
            granted_ms=o["granted_ms"],
            finished_index=o["finished_index"],
            finished_ms=o["finished_ms"],
            registry_version=o["registry_version"],
            claims=o["claims"],
            conflicts=o["conflicts"],
            notified=o["notified"],
            ended_by=o["ended_by"],
            footprint=o.get("footprint", {}),
            soft=o.get("soft", []),
            soft_changed_index=o.get("soft_changed_index", 0),
            soft_told_index=o.get("soft_told_index", 0),
        )

    def summary_json(self) -> dict[str, Any]:
        """The short form used in listings and world slices."""
        return {
            "intent_id": self.intent_id,
            "agent_id": self.agent_id,
            "tool": self.tool,
            "summary": self.body.summary,
            "status": self.status,
            "fencing_token": self.fencing_token,
            "since": self.created_ms,
            "modify": self.modifies,
            "depend": self.depends,
        }


SESSION_OPEN = "open"
SESSION_LAPSED = "lapsed"


@dataclass
class Session:
    agent_id: str
    developer: str
    tool: str
    machine: str
    repo_remote: str
    base_commit: str
    status: str
    opened_index: int
    opened_ms: int
    last_seen_ms: int
    deadline_ms: int
    lapsed_ms: int | None = None
    # The agent's latest intent, whatever its status (None before its first).
    intent_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "developer": self.developer,
            "tool": self.tool,
            "machine": self.machine,
            "repo_remote": self.repo_remote,
            "base_commit": self.base_commit,
            "status": self.status,
            "opened_index": self.opened_index,
            "opened_ms": self.opened_ms,
            "last_seen_ms": self.last_seen_ms,
            "deadline_ms": self.deadline_ms,
            "lapsed_ms": self.lapsed_ms,
            "intent_id": self.intent_id,
        }

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Session:
        return cls(**o)


def canonical_remote(url: str) -> str:
    """A git remote reduced to host/path, so that the SSH, HTTPS and scp-like spellings of one
    repository compare equal: ``git@github.com:org/repo.git`` -> ``github.com/org/repo``."""
    s = url.strip()
    host = ""
    if "://" in s:
        _scheme, rest = s.split("://", 1)
        hostpart, _, path = rest.partition("/")
        host = hostpart.rsplit("@", 1)[-1].split(":", 1)[0]
    elif not s.startswith("/") and re.match(r"^[^/:]+:", s):
        hostpart, _, path = s.partition(":")
        host = hostpart.rsplit("@", 1)[-1]
    else:
        path = s
    path = path.strip("/")
    path = path.removesuffix(".git").rstrip("/")
    return f"{host.lower()}/{path}" if host else "/" + path
