"""Commands: what goes through the Raft log, as frozen dataclasses validated on construction.

Each command is a JSON object with a ``"type"``; ``decode_command`` turns one into a Command
(raising CommandError naming the bad field) and ``Command.to_json`` turns it back, so that
``decode_command(c.to_json()) == c``. The registry travels as JSON concepts, not TOML text:
TOML is parsed once at the edge, so replicas never depend on a TOML parser's version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

from tetherlab.cluster.core.engine.codeindex import (
    DIGEST_RE,
    INDEX_CHUNKS_MAX,
    CodeIndexError,
    check_chunk,
)
from tetherlab.cluster.core.engine.footprint import FileChange, decode_files
from tetherlab.cluster.core.engine.model import (
    AGENT_ID_MAX_CHARS,
    AGENT_ID_RE,
    AGENT_IDS_PER_HEARTBEAT_MAX,
    SHORT_FIELD_MAX_CHARS,
    TRIGGERS,
    IntentBody,
)
from tetherlab.cluster.core.engine.registry import Concept, load_toml, validate_concepts
from tetherlab.cluster.core.engine.validate import check_bool, check_each, check_int, check_str
from tetherlab.cluster.core.errors import CommandError
from tetherlab.cluster.protocol.memo import Passed

SESSION_TTL_MS_DEFAULT = 30_000
SESSION_TTL_MS_MIN = 1_000
REMOTE_MAX_CHARS = 1000
INTENT_ID_MAX_CHARS = 32
TOML_MAX_CHARS = 64 * 1024 * 1024


def _agent_id(value: Any, field: str) -> str:
    if value in _AGENT_IDS_OK:
        return value  # type: ignore[no-any-return]
    check_str(value, field, AGENT_ID_MAX_CHARS)
    if not AGENT_ID_RE.match(value):
        raise CommandError("bad_field", f"field {field!r}: {value!r} is not an agent id like 'alice/<uuid>'")
    _AGENT_IDS_OK.add(value)
    return value


# Agent ids _agent_id accepted: every heartbeat entry names the same ids again, and every replica
# decodes every entry (the leader twice: building the command, then applying it).
_AGENT_IDS_OK = Passed()


class _Command:
    TYPE: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


UNCOORDINATED_POLICIES = ("accept", "refuse")


@dataclass(frozen=True)
class Init(_Command):
    """Set the one git remote this cluster coordinates, the session TTL, and whether push-time
    verification accepts commits that carry no claim (``uncoordinated_commits``)."""

    TYPE: ClassVar[str] = "init"
    remote: str
    session_ttl_ms: int = SESSION_TTL_MS_DEFAULT
    uncoordinated_commits: str = "accept"

    def __post_init__(self) -> None:
        check_str(self.remote, "remote", REMOTE_MAX_CHARS)
        check_int(self.session_ttl_ms, "session_ttl_ms", minimum=SESSION_TTL_MS_MIN)
        if self.uncoordinated_commits not in UNCOORDINATED_POLICIES:
            raise CommandError("bad_field", f"field 'uncoordinated_commits' must be one of "
                                            f"{list(UNCOORDINATED_POLICIES)}, got {self.uncoordinated_commits!r}")

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if self.uncoordinated_commits == "accept":
            del out["uncoordinated_commits"]  # the default: entries stay readable by older nodes
        return out


def _digest(value: Any, field: str) -> str:
    check_str(value, field, 64)
    if not DIGEST_RE.match(value):
        raise CommandError("bad_field", f"field {field!r} must be a sha256 digest (64 lowercase hex digits)")
    return value


@dataclass(frozen=True)
class PushRegistry(_Command):
    """Replace the concept registry; with ``expected_version``, only if it is still current; with
    ``index_digest``, activate that code index (installed or staged by ``install_index``) with it."""

    TYPE: ClassVar[str] = "push_registry"
    concepts: tuple[Concept, ...]
    expected_version: int | None = None
    index_digest: str | None = None

    def __post_init__(self) -> None:
        if self.index_digest is not None:
            _digest(self.index_digest, "index_digest")
        # Accepts Concepts or their JSON objects; validated as a whole either way, since some
        # rules span concepts (unknown dependency, cycle, duplicate id).
        if not isinstance(self.concepts, list | tuple):
            raise CommandError("bad_field", "field 'concepts' must be a list of concept objects")
        raw = [c.to_json() if isinstance(c, Concept) else c for c in self.concepts]
        object.__setattr__(self, "concepts", validate_concepts(raw))
        if self.expected_version is not None:
            check_int(self.expected_version, "expected_version")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.TYPE,
            "concepts": [c.to_json() for c in self.concepts],
            "expected_version": self.expected_version,
        }
        if self.index_digest is not None:
            out["index_digest"] = self.index_digest
        return out


@dataclass(frozen=True)
class InstallIndex(_Command):
    """One chunk of a code index (``codeindex.pack``). When every chunk of ``digest`` has arrived
    and checks out, the index is complete; with ``activate`` it becomes the one matching uses,
    otherwise it waits for a ``push_registry`` that names it."""

    TYPE: ClassVar[str] = "install_index"
    digest: str
    seq: int
    total: int
    data: str
    activate: bool = True

    def __post_init__(self) -> None:
        _digest(self.digest, "digest")
        check_int(self.seq, "seq")
        check_int(self.total, "total", minimum=1)
        if self.total > INDEX_CHUNKS_MAX:
            raise CommandError("too_large", f"field 'total' must be at most {INDEX_CHUNKS_MAX}")
        if self.seq >= self.total:
            raise CommandError("bad_field", f"field 'seq' must be below 'total' ({self.total}), got {self.seq}")
        check_str(self.data, "data", 10**9, empty_ok=True)
        try:
            check_chunk(self.data)
        except CodeIndexError as e:
            raise CommandError("bad_field", f"field 'data': {e}") from None
        check_bool(self.activate, "activate")


@dataclass(frozen=True)
class OpenSession(_Command):
    TYPE: ClassVar[str] = "open_session"
    agent_id: str
    developer: str
    tool: str
    machine: str
    repo_remote: str
    base_commit: str

    def __post_init__(self) -> None:
        _agent_id(self.agent_id, "agent_id")
        check_str(self.developer, "developer", AGENT_ID_MAX_CHARS)
        check_str(self.tool, "tool", SHORT_FIELD_MAX_CHARS)
        check_str(self.machine, "machine", SHORT_FIELD_MAX_CHARS)
        check_str(self.repo_remote, "repo_remote", REMOTE_MAX_CHARS)
        check_str(self.base_commit, "base_commit", SHORT_FIELD_MAX_CHARS)
        owner = self.agent_id.split("/", 1)[0]
        if owner != self.developer:
            raise CommandError(
                "agent_developer_mismatch",
                f"agent id {self.agent_id!r} is not scoped under developer {self.developer!r}",
            )


@dataclass(frozen=True)
class CloseSession(_Command):
    """The agent exits: its session ends and its current intent is abandoned."""

    TYPE: ClassVar[str] = "close_session"
    agent_id: str

    def __post_init__(self) -> None:
        _agent_id(self.agent_id, "agent_id")


@dataclass(frozen=True)
class Heartbeat(_Command):
    """Keep-alives from many agents batched into one log entry."""

    TYPE: ClassVar[str] = "heartbeat"
    agent_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.agent_ids, list | tuple):
            raise CommandError("bad_field", "field 'agent_ids' must be a list of agent ids")
        if len(self.agent_ids) > AGENT_IDS_PER_HEARTBEAT_MAX:
            raise CommandError("too_large", f"field 'agent_ids' has more than {AGENT_IDS_PER_HEARTBEAT_MAX} entries")
        ids = check_each(self.agent_ids, "agent_ids", _agent_id)
        object.__setattr__(self, "agent_ids", tuple(dict.fromkeys(ids)))


@dataclass(frozen=True)
class SubmitIntent(_Command):
    """The seed's intent message: ``{"agent_id", "tool", "intent", "trigger"}``; ``intent`` may be
    omitted for complete/abandon, and ``intent_id`` pins which intent the agent means."""

    TYPE: ClassVar[str] = "intent"
    agent_id: str
    tool: str
    intent: IntentBody | None
    trigger: str
    intent_id: str | None = None
    # The proposing leader's match of the plan (``match_intent``'s claims with the registry and
    # code-index versions they were computed against): apply uses them when both versions are
    # still current and matches again otherwise, so every replica reaches the same verdict while
    # the plan-text matching runs once per intent instead of once per replica.
    matched: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        _agent_id(self.agent_id, "agent_id")
        check_str(self.tool, "tool", SHORT_FIELD_MAX_CHARS)
        if self.trigger not in TRIGGERS:
            raise CommandError("bad_field", f"field 'trigger' must be one of {list(TRIGGERS)}, got {self.trigger!r}")
        if self.intent is None and self.trigger in ("initial", "replan"):
            raise CommandError("missing_field", f"trigger {self.trigger!r} needs field 'intent'")
        if self.intent is not None and not isinstance(self.intent, IntentBody):
            raise CommandError("bad_field", "field 'intent' must be an IntentBody")
        if self.intent_id is not None:
            check_str(self.intent_id, "intent_id", INTENT_ID_MAX_CHARS)
            if self.trigger == "initial":
                raise CommandError(
                    "bad_field", "field 'intent_id' names an existing intent; trigger 'initial' starts a new one"
                )
        if self.matched is not None:
            check_matched(self.matched, self.intent, self.trigger)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "agent_id": self.agent_id, "tool": self.tool}
        if self.intent is not None:
            out["intent"] = self.intent.to_json()
        out["trigger"] = self.trigger
        if self.intent_id is not None:
            out["intent_id"] = self.intent_id
        if self.matched is not None:
            out["matched"] = self.matched  # absent otherwise: entries stay readable by older nodes
        return out


MATCHED_CLAIMS_MAX = 4096  # far above what match_intent produces (a plan names at most a few dozen)


def check_matched(m: Any, intent: IntentBody | None, trigger: str) -> None:
    """Claims ``m`` for a command with this plan and trigger: the shape apply relies on (which
    concepts exist is checked at apply, against the registry)."""
    if intent is None:
        raise CommandError("bad_field", f"field 'matched' needs an intent; trigger {trigger!r} has none")
    if not isinstance(m, Mapping):
        raise CommandError("bad_field", f"field 'matched' must be an object, got {type(m).__name__}")
    for key in ("registry_version", "index_version"):
        check_int(m.get(key), f"matched.{key}")
    for kind in ("modify", "depend"):
        claims = m.get(kind)
        if not isinstance(claims, list | tuple):
            raise CommandError("bad_field", f"field 'matched.{kind}' must be a list of claims")
        if len(claims) > MATCHED_CLAIMS_MAX:
            raise CommandError("too_large", f"field 'matched.{kind}' has more than {MATCHED_CLAIMS_MAX} claims")
        for i, c in enumerate(claims):
            if not isinstance(c, Mapping) or not isinstance(c.get("concept"), str):
                raise CommandError("bad_field", f"field 'matched.{kind}[{i}]' must be a claim "
                                                f"{{\"concept\", \"reasons\"}}")


@dataclass(frozen=True)
class Revoke(_Command):
    """An operator ends an intent: stopped, or with ``revert`` reverted."""

    TYPE: ClassVar[str] = "revoke"
    intent_id: str
    by: str
    revert: bool = False
    reason: str = ""

    def __post_init__(self) -> None:
        check_str(self.intent_id, "intent_id", INTENT_ID_MAX_CHARS)
        check_str(self.by, "by", AGENT_ID_MAX_CHARS)
        check_bool(self.revert, "revert")
        check_str(self.reason, "reason", SHORT_FIELD_MAX_CHARS, empty_ok=True)


@dataclass(frozen=True)
class LeaderElected(_Command):
    """A new leader's first entry: extends every open session by one TTL from ``now_ms``."""

    TYPE: ClassVar[str] = "leader_elected"
    now_ms: int

    def __post_init__(self) -> None:
        check_int(self.now_ms, "now_ms")


@dataclass(frozen=True)
class Expire(_Command):
    """The leader's periodic sweep: lapse sessions whose deadline is before ``now_ms``."""

    TYPE: ClassVar[str] = "expire"
    now_ms: int

    def __post_init__(self) -> None:
        check_int(self.now_ms, "now_ms")


@dataclass(frozen=True)
class ReportChanges(_Command):
    """An agent's in-flight changes since its intent's base (paths, symbols, hunk ranges; never
    contents): the engine keeps them as the intent's footprint and decides drift and soft
    conflicts (core/engine/footprint.py)."""

    TYPE: ClassVar[str] = "report_changes"
    agent_id: str
    intent_id: str
    files: tuple[FileChange, ...]
    truncated: bool = False  # the shim had more changed files than one report takes

    def __post_init__(self) -> None:
        _agent_id(self.agent_id, "agent_id")
        check_str(self.intent_id, "intent_id", INTENT_ID_MAX_CHARS)
        object.__setattr__(self, "files", decode_files(self.files))
        check_bool(self.truncated, "truncated")

    def to_json(self) -> dict[str, Any]:
        return {"type": self.TYPE, "agent_id": self.agent_id, "intent_id": self.intent_id,
                "files": [f.to_json() for f in self.files], "truncated": self.truncated}


Command = (Init | PushRegistry | InstallIndex | OpenSession | CloseSession | Heartbeat | SubmitIntent | Revoke
           | LeaderElected | Expire | ReportChanges)

COMMAND_TYPES: dict[str, type[_Command]] = {
    c.TYPE: c
    for c in (Init, PushRegistry, InstallIndex, OpenSession, CloseSession, Heartbeat, SubmitIntent, Revoke,
              LeaderElected, Expire, ReportChanges)
}


def _field_table(cls: type[_Command]) -> tuple[frozenset[str], tuple[str, ...]]:
    """A command class's field names, and those without a default in declaration order (the
    order the first missing one is named in). ``intent`` may be left out (complete, abandon)."""
    fs = fields(cls)  # type: ignore[arg-type]
    return (frozenset(f.name for f in fs),
            tuple(f.name for f in fs if f.default is MISSING and f.default_factory is MISSING and f.name != "intent"))


# Built once: every replica decodes every entry, and this was rebuilt per call.
_FIELDS = {cls: _field_table(cls) for cls in COMMAND_TYPES.values()}


def _intent_body(obj: Any) -> IntentBody:
    if not isinstance(obj, Mapping):
        raise CommandError("bad_field", f"field 'intent' must be an object, got {type(obj).__name__}")
    extra = sorted(set(obj) - {"summary", "steps", "files", "concepts"})
    if extra:
        raise CommandError("unknown_field", f"field 'intent' does not take {extra}")
    if "summary" not in obj:
        raise CommandError("missing_field", "field 'intent.summary' is required")
    concepts = obj.get("concepts") or {}
    if not isinstance(concepts, Mapping):
        raise CommandError("bad_field", "field 'intent.concepts' must be an object with 'modify' and/or 'depend'")
    extra = sorted(set(concepts) - {"modify", "depend"})
    if extra:
        raise CommandError("unknown_field", f"field 'intent.concepts' does not take {extra}")
    return IntentBody(
        summary=obj["summary"],
        steps=obj.get("steps", ()),
        files=obj.get("files") or (),
        modify=concepts.get("modify") or (),
        depend=concepts.get("depend") or (),
    )


def decode_command(obj: Any) -> Command:
    """A JSON object to a validated Command; raises CommandError naming the bad field."""
    if not isinstance(obj, Mapping):
        raise CommandError("bad_command", f"a command must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    cls = COMMAND_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise CommandError("unknown_type", f"unknown command type {kind!r}; expected one of {sorted(COMMAND_TYPES)}")
    args = {k: v for k, v in obj.items() if k != "type"}
    if cls is PushRegistry:
        if ("toml" in args) == ("concepts" in args):
            raise CommandError("missing_field", "push_registry needs exactly one of 'concepts' or 'toml'")
        if "toml" in args:
            args["concepts"] = load_toml(check_str(args.pop("toml"), "toml", TOML_MAX_CHARS, empty_ok=True))
    if cls is SubmitIntent and args.get("intent") is not None:
        args["intent"] = _intent_body(args["intent"])
    names, required = _FIELDS[cls]
    extra = args.keys() - names
    if extra:
        raise CommandError("unknown_field", f"command {kind!r} does not take field(s) {sorted(extra)}")
    for name in required:
        if name not in args:
            raise CommandError("missing_field", f"command {kind!r} needs field {name!r}")
    if cls is SubmitIntent:
        args.setdefault("intent", None)
    try:
        cmd: Command = cls(**args)  # type: ignore[assignment]
    except TypeError as e:  # a field left out that the checks above did not name
        raise CommandError("missing_field", f"command {kind!r}: {e}") from None
    return cmd
