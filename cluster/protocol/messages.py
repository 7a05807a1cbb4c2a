"""The messages (frozen dataclasses, validated on construction) and ``decode``/``encode``,
the one place where a bad field becomes the peer's fault."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, TypeAlias

from tetherlab.cluster.protocol import jsoncodec
from tetherlab.cluster.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError, RequestId
from tetherlab.cluster.protocol.fields import (
    ADDRESS_RE,
    AGENT,
    AGENT_ID_RE,
    BASE64_RE,
    CODE_RE,
    COMMIT_RE,
    DEFAULT_LIST_LIMIT,
    DEVELOPER,
    DIGEST_RE,
    ID,
    MAX_FRAME_BYTES,
    MAX_INDEX_CHUNK_CHARS,
    MAX_INDEX_CHUNKS,
    MAX_LIST_LIMIT,
    MAX_NAME_CHARS,
    MAX_PATH_CHARS,
    MAX_PUBLIC_KEY_CHARS,
    MAX_RETRY_AFTER_MS,
    MAX_TEXT_CHARS,
    MAX_TTL_S,
    MAX_URL_CHARS,
    MAX_VERSIONS,
    NAME,
    PROTOCOL_VERSIONS,
    TEXT,
    Bool,
    Int,
    JsonObject,
    ListOf,
    Nested,
    Optional,
    Record,
    Str,
    bad_field,
    json_type,
    preview,
    spec,
)
from tetherlab.cluster.protocol.memo import Passed

# --- Messages -----------------------------------------------------------------------------


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class Kind(enum.Enum):
    """What a message is to the state table."""

    HELLO = "hello"
    REQUEST = "request"
    HELLO_OK = "hello_ok"
    REPLY = "reply"  # result, redirect, unavailable
    ERROR = "error"  # an error reply, or an unsolicited one (id null)
    NOTIFICATION = "notification"
    CLOSE = "close"


@dataclass(frozen=True, kw_only=True)
class Message(Record):
    """A message on the wire. ``type`` is its JSON tag; ``sender`` who may send it."""

    type: ClassVar[str]
    kind: ClassVar[Kind]
    sender: ClassVar[Role]

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, **super().to_json()}


@dataclass(frozen=True, kw_only=True)
class Request(Message):
    """A client request; ``admin`` requests need an admin key (the node enforces that)."""

    kind: ClassVar[Kind] = Kind.REQUEST
    sender: ClassVar[Role] = Role.CLIENT
    admin: ClassVar[bool] = False
    id: RequestId = field(metadata=spec(ID))


@dataclass(frozen=True, kw_only=True)
class Hello(Request):
    type: ClassVar[str] = "hello"
    kind: ClassVar[Kind] = Kind.HELLO
    versions: tuple[int, ...] = field(metadata=spec(ListOf(Int(1, 2**31 - 1), min_items=1, max_items=MAX_VERSIONS)))
    client_name: str = field(metadata=spec(NAME))
    client_version: str = field(metadata=spec(NAME))
    agent: str | None = field(default=None, metadata=spec(Optional(NAME)))  # e.g. "claude-code 2.1.3"


@dataclass(frozen=True, kw_only=True)
class Ping(Request):
    type: ClassVar[str] = "ping"


@dataclass(frozen=True, kw_only=True)
class Status(Request):
    type: ClassVar[str] = "status"


@dataclass(frozen=True, kw_only=True)
class OpenSession(Request):
    type: ClassVar[str] = "open_session"
    agent_id: str = field(metadata=spec(AGENT))
    tool: str = field(metadata=spec(NAME))
    machine: str = field(metadata=spec(NAME))
    repo_remote: str = field(metadata=spec(Str(MAX_URL_CHARS)))
    base_commit: str = field(metadata=spec(Str(64, pattern=COMMIT_RE, pattern_name="a lowercase hex commit id")))
    ttl_s: int | None = field(default=None, metadata=spec(Optional(Int(1, MAX_TTL_S))))  # None: the node's default


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Request):
    type: ClassVar[str] = "heartbeat"
    agent_ids: tuple[str, ...] = field(metadata=spec(ListOf(AGENT, min_items=1)))


@dataclass(frozen=True, kw_only=True)
class Concepts(Record):
    """Concept ids the intent will change (``modify``) and relies on (``depend``)."""

    modify: tuple[str, ...] = field(default=(), metadata=spec(ListOf(NAME)))
    depend: tuple[str, ...] = field(default=(), metadata=spec(ListOf(NAME)))


@dataclass(frozen=True, kw_only=True)
class Intent(Record):
    """The plan an agent printed (the seed's JSON shape)."""

    summary: str = field(metadata=spec(TEXT))
    steps: tuple[str, ...] = field(metadata=spec(ListOf(TEXT)))
    files: tuple[str, ...] | None = field(default=None, metadata=spec(Optional(ListOf(Str(MAX_PATH_CHARS)))))
    concepts: Concepts | None = field(default=None, metadata=spec(Optional(Nested(Concepts))))


Trigger: TypeAlias = Literal["initial", "replan", "complete", "abandon"]
TRIGGERS: Final[tuple[str, ...]] = ("initial", "replan", "complete", "abandon")


@dataclass(frozen=True, kw_only=True)
class SubmitIntent(Request):
    type: ClassVar[str] = "submit_intent"
    agent_id: str = field(metadata=spec(AGENT))
    tool: str = field(metadata=spec(NAME))
    intent: Intent = field(metadata=spec(Nested(Intent)))
    trigger: Trigger = field(metadata=spec(Str(16, choices=TRIGGERS)))


@dataclass(frozen=True, kw_only=True)
class Complete(Request):
    type: ClassVar[str] = "complete"
    agent_id: str = field(metadata=spec(AGENT))
    intent_id: str = field(metadata=spec(NAME))


@dataclass(frozen=True, kw_only=True)
class Abandon(Request):
    type: ClassVar[str] = "abandon"
    agent_id: str = field(metadata=spec(AGENT))
    intent_id: str = field(metadata=spec(NAME))


@dataclass(frozen=True, kw_only=True)
class CloseSession(Request):
    """The agent has exited: end its session (an intent it still holds is abandoned)."""

    type: ClassVar[str] = "close_session"
    agent_id: str = field(metadata=spec(AGENT))


@dataclass(frozen=True, kw_only=True)
class WorldSlice(Request):
    type: ClassVar[str] = "world_slice"
    agent_id: str = field(metadata=spec(AGENT))


KeyRole: TypeAlias = Literal["admin", "developer", "verifier"]
KEY_ROLES: Final[tuple[str, ...]] = ("admin", "developer", "verifier")  # verifier: push verification only


@dataclass(frozen=True, kw_only=True)
class KeysAdd(Request):
    type: ClassVar[str] = "keys_add"
    admin: ClassVar[bool] = True
    developer: str = field(metadata=spec(DEVELOPER))
    # an authorized_keys line or .pub content (a trailing newline is fine: the node parses the line)
    public_key: str = field(metadata=spec(Str(MAX_PUBLIC_KEY_CHARS, multiline=True)))
    role: KeyRole = field(default="developer", metadata=spec(Str(16, choices=KEY_ROLES)))


@dataclass(frozen=True, kw_only=True)
class KeysList(Request):
    type: ClassVar[str] = "keys_list"
    admin: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class KeysRevoke(Request):
    type: ClassVar[str] = "keys_revoke"
    admin: ClassVar[bool] = True
    key_id: str = field(metadata=spec(NAME))


@dataclass(frozen=True, kw_only=True)
class ConceptsPush(Request):
    type: ClassVar[str] = "concepts_push"
    admin: ClassVar[bool] = True
    toml: str = field(metadata=spec(Str(MAX_FRAME_BYTES, multiline=True)))  # the frame bound is the real limit
    # A code index sent before with concepts_index (activate false): it becomes active with this registry.
    index_digest: str | None = field(default=None, metadata=spec(Optional(Str(64, pattern=DIGEST_RE,
                                                                              pattern_name="a sha256 hex digest"))))


@dataclass(frozen=True, kw_only=True)
class ConceptsIndex(Request):
    """One chunk of a packed code index (``tetherlab concepts push --index``)."""

    type: ClassVar[str] = "concepts_index"
    admin: ClassVar[bool] = True
    digest: str = field(metadata=spec(Str(64, pattern=DIGEST_RE, pattern_name="a sha256 hex digest")))
    seq: int = field(metadata=spec(Int(0, MAX_INDEX_CHUNKS - 1)))
    total: int = field(metadata=spec(Int(1, MAX_INDEX_CHUNKS)))
    data: str = field(metadata=spec(Str(MAX_INDEX_CHUNK_CHARS, min_chars=0, pattern=BASE64_RE,
                                        pattern_name="base64 text")))
    activate: bool = field(default=True, metadata=spec(Bool()))


@dataclass(frozen=True, kw_only=True)
class ConceptsList(Request):
    type: ClassVar[str] = "concepts_list"
    admin: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class ConceptsShow(Request):
    type: ClassVar[str] = "concepts_show"
    admin: ClassVar[bool] = True
    concept_id: str = field(metadata=spec(NAME))


@dataclass(frozen=True, kw_only=True)
class IntentsList(Request):
    type: ClassVar[str] = "intents_list"
    admin: ClassVar[bool] = True
    all: bool = field(default=False, metadata=spec(Bool()))  # include completed, abandoned and revoked intents
    limit: int = field(default=DEFAULT_LIST_LIMIT, metadata=spec(Int(1, MAX_LIST_LIMIT)))
    cursor: str | None = field(default=None, metadata=spec(Optional(NAME)))  # from the previous page's result


@dataclass(frozen=True, kw_only=True)
class IntentsRevoke(Request):
    type: ClassVar[str] = "intents_revoke"
    admin: ClassVar[bool] = True
    intent_id: str = field(metadata=spec(NAME))
    revert: bool = field(default=False, metadata=spec(Bool()))  # tell the agent's shim to stash its changes


_HOSTPORT = Str(MAX_NAME_CHARS, pattern=ADDRESS_RE, pattern_name="'host:port'")
SHIM_EVENTS: Final[tuple[str, ...]] = ("failed_closed",)


@dataclass(frozen=True, kw_only=True)
class ShimReport(Request):
    """A shim reports, when it next reaches the master, something that happened while it could
    not (it failed closed); operators see it in tetherlab_shims_failing_closed."""

    type: ClassVar[str] = "shim_report"
    agent_id: str = field(metadata=spec(AGENT))
    event: str = field(metadata=spec(Str(32, choices=SHIM_EVENTS)))
    at_unix_ms: int = field(metadata=spec(Int(0, 2**53 - 1)))
    detail: str = field(default="", metadata=spec(Str(MAX_TEXT_CHARS, multiline=True, min_chars=0)))


@dataclass(frozen=True, kw_only=True)
class ClusterAdd(Request):
    """Add a node to the Raft membership (one change at a time; refused if it would lose quorum)."""

    type: ClassVar[str] = "cluster_add"
    admin: ClassVar[bool] = True
    node_id: str = field(metadata=spec(Str(32, pattern=re.compile(r"[a-z0-9][a-z0-9_-]{0,31}"),
                                             pattern_name="a node id ([a-z0-9_-], 1-32)")))
    raft: str = field(metadata=spec(_HOSTPORT))
    ssh: str = field(metadata=spec(_HOSTPORT))
    http: str = field(metadata=spec(_HOSTPORT))


@dataclass(frozen=True, kw_only=True)
class ClusterRemove(Request):
    type: ClassVar[str] = "cluster_remove"
    admin: ClassVar[bool] = True
    node_id: str = field(metadata=spec(NAME))


@dataclass(frozen=True, kw_only=True)
class Reply(Message):
    """An answer from the server to the request with the same ``id``."""

    kind: ClassVar[Kind] = Kind.REPLY
    sender: ClassVar[Role] = Role.SERVER
    id: RequestId = field(metadata=spec(ID))


@dataclass(frozen=True, kw_only=True)
class HelloOk(Reply):
    type: ClassVar[str] = "hello_ok"
    kind: ClassVar[Kind] = Kind.HELLO_OK
    version: int = field(metadata=spec(Int(1, 2**31 - 1)))
    node_id: str = field(metadata=spec(NAME))
    server_version: str = field(metadata=spec(NAME))


@dataclass(frozen=True, kw_only=True)
class Result(Reply):
    type: ClassVar[str] = "result"
    payload: dict[str, Any] = field(metadata=spec(JsonObject()))  # read-only by convention: a verdict, a list...


@dataclass(frozen=True, kw_only=True)
class Redirect(Reply):
    """This node is not the leader; ask ``leader_address`` (the leader's SSH host:port)."""

    type: ClassVar[str] = "redirect"
    leader_id: str = field(metadata=spec(NAME))
    leader_address: str = field(metadata=spec(Str(MAX_NAME_CHARS, pattern=ADDRESS_RE, pattern_name="'host:port'")))

    def _check_whole(self) -> None:
        split_address(self.leader_address)  # the port range


UNAVAILABLE_REASONS: Final[tuple[str, ...]] = ("no_leader", "no_quorum", "timeout", "shutting_down")
UnavailableReason: TypeAlias = Literal["no_leader", "no_quorum", "timeout", "shutting_down"]


@dataclass(frozen=True, kw_only=True)
class Unavailable(Reply):
    """No quorum-backed answer now (never a verdict); retry after ``retry_after_ms``."""

    type: ClassVar[str] = "unavailable"
    reason: UnavailableReason = field(metadata=spec(Str(32, choices=UNAVAILABLE_REASONS)))
    retry_after_ms: int = field(metadata=spec(Int(0, MAX_RETRY_AFTER_MS)))
    message: str = field(default="", metadata=spec(Str(MAX_TEXT_CHARS, multiline=True, min_chars=0)))


@dataclass(frozen=True, kw_only=True)
class Error(Reply):
    """A refusal: ``code`` is stable (an ``ErrorCode`` value or the node's own), ``message``
    says what was wrong. ``id`` is None only when the offending frame had no readable id."""

    type: ClassVar[str] = "error"
    kind: ClassVar[Kind] = Kind.ERROR
    id: RequestId | None = field(default=None, metadata=spec(Optional(ID)))
    code: str = field(metadata=spec(Str(64, pattern=CODE_RE, pattern_name="a lowercase code")))
    message: str = field(metadata=spec(Str(MAX_TEXT_CHARS, multiline=True)))


@dataclass(frozen=True, kw_only=True)
class Notification(Message):
    """Pushed by the server, unasked; carries no id."""

    kind: ClassVar[Kind] = Kind.NOTIFICATION
    sender: ClassVar[Role] = Role.SERVER


@dataclass(frozen=True, kw_only=True)
class VerdictChanged(Notification):
    type: ClassVar[str] = "verdict_changed"
    agent_id: str = field(metadata=spec(AGENT))
    intent_id: str = field(metadata=spec(NAME))
    verdict: dict[str, Any] = field(metadata=spec(JsonObject()))


@dataclass(frozen=True, kw_only=True)
class Revoked(Notification):
    """The agent's session (or one intent of it) was revoked; the shim must stop the agent."""

    type: ClassVar[str] = "revoked"
    agent_id: str = field(metadata=spec(AGENT))
    reason: str = field(metadata=spec(TEXT))
    intent_id: str | None = field(default=None, metadata=spec(Optional(NAME)))
    revert: bool = field(default=False, metadata=spec(Bool()))


MAX_COMMIT_PATHS: Final = 1024  # paths of one commit in one request; a client splits a bigger commit
TRAILER_INTENT = Str(32, pattern=re.compile(r"i-[0-9]{1,19}"), pattern_name="an intent id like i-42")


@dataclass(frozen=True, kw_only=True)
class CommitClaim(Record):
    """One commit to verify: the paths it changes and the claim its trailers name (all three, or
    none for a commit made without tether)."""

    commit: str = field(metadata=spec(Str(64, pattern=COMMIT_RE, pattern_name="a lowercase hex commit id")))
    paths: tuple[str, ...] = field(metadata=spec(ListOf(Str(MAX_PATH_CHARS), max_items=MAX_COMMIT_PATHS)))
    agent: str | None = field(default=None, metadata=spec(Optional(AGENT)))
    intent: str | None = field(default=None, metadata=spec(Optional(TRAILER_INTENT)))
    fence: int | None = field(default=None, metadata=spec(Optional(Int(1, 2**53 - 1))))


@dataclass(frozen=True, kw_only=True)
class VerifyCommits(Request):
    """Push-time fencing: may these commits land? Answered from linearizable state, for admin,
    developer and verifier keys (a verifier key may send nothing else)."""

    type: ClassVar[str] = "verify_commits"
    commits: tuple[CommitClaim, ...] = field(metadata=spec(ListOf(Nested(CommitClaim), min_items=1)))


@dataclass(frozen=True, kw_only=True)
class SymbolReport(Record):
    name: str = field(metadata=spec(Str(256)))
    change: str = field(default="modified", metadata=spec(Str(16, choices=("added", "removed", "modified",
                                                                          "renamed"))))
    old_name: str | None = field(default=None, metadata=spec(Optional(Str(256))))


@dataclass(frozen=True, kw_only=True)
class FileReport(Record):
    """One changed file: its path, what happened to it, the symbols the change touches and the
    changed line ranges; never its contents."""

    path: str = field(metadata=spec(Str(MAX_PATH_CHARS)))
    change: str = field(default="modified", metadata=spec(Str(16, choices=("added", "modified", "deleted",
                                                                          "renamed"))))
    old_path: str | None = field(default=None, metadata=spec(Optional(Str(MAX_PATH_CHARS))))
    symbols: tuple[SymbolReport, ...] = field(default=(), metadata=spec(ListOf(Nested(SymbolReport),
                                                                                max_items=128)))
    hunks: tuple[tuple[int, ...], ...] = field(default=(), metadata=spec(ListOf(
        ListOf(Int(0, 2**31 - 1), min_items=2, max_items=2), max_items=64)))


@dataclass(frozen=True, kw_only=True)
class ReportChanges(Request):
    """The agent's in-flight changes since its intent's base (soft conflicts and drift)."""

    type: ClassVar[str] = "report_changes"
    agent_id: str = field(metadata=spec(AGENT))
    intent_id: str = field(metadata=spec(NAME))
    files: tuple[FileReport, ...] = field(metadata=spec(ListOf(Nested(FileReport), max_items=512)))
    truncated: bool = field(default=False, metadata=spec(Bool()))


@dataclass(frozen=True, kw_only=True)
class ConflictsList(Request):
    """Soft conflicts now, and recent drifts and soft conflicts."""

    type: ClassVar[str] = "conflicts_list"
    limit: int = field(default=DEFAULT_LIST_LIMIT, metadata=spec(Int(1, MAX_LIST_LIMIT)))


TOKEN_NAME = Str(64, pattern=re.compile(r"[a-z0-9][a-z0-9._-]{0,63}"), pattern_name="a token name ([a-z0-9._-], 1-64)")


@dataclass(frozen=True, kw_only=True)
class UiTokenIssue(Request):
    """A new read token for the HTTP view (/ui/, /v1/, /metrics from a non-loopback address);
    the token is in the reply once, the cluster keeps only its hash."""

    type: ClassVar[str] = "ui_token_issue"
    admin: ClassVar[bool] = True
    name: str = field(metadata=spec(TOKEN_NAME))


@dataclass(frozen=True, kw_only=True)
class UiTokenRevoke(Request):
    type: ClassVar[str] = "ui_token_revoke"
    admin: ClassVar[bool] = True
    name: str = field(metadata=spec(TOKEN_NAME))


@dataclass(frozen=True, kw_only=True)
class UiTokensList(Request):
    type: ClassVar[str] = "ui_tokens_list"
    admin: ClassVar[bool] = True


MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    cls.type: cls
    for cls in (
        Hello, Ping, Status, OpenSession, Heartbeat, SubmitIntent, Complete, Abandon, CloseSession, WorldSlice,
        KeysAdd, KeysList, KeysRevoke, ConceptsPush, ConceptsIndex, ConceptsList, ConceptsShow, IntentsList,
        IntentsRevoke, ClusterAdd, ClusterRemove, ShimReport, VerifyCommits, UiTokenIssue, UiTokenRevoke,
        UiTokensList, ReportChanges, ConflictsList, HelloOk, Result, Redirect,
        Unavailable, Error, VerdictChanged, Revoked,
    )
}  # fmt: skip


def split_agent_id(agent_id: str) -> tuple[str, str]:
    """``"alice/<uuid>"`` -> ``("alice", "<uuid>")``; the node compares the developer part with
    the authenticated key's developer. Raises LocalProtocolError(bad_field) if malformed."""
    if agent_id in _SPLIT_OK:  # a well-formed id has exactly one "/" (neither part may hold one)
        developer, _, rest = agent_id.partition("/")
        return developer, rest
    m = AGENT_ID_RE.fullmatch(agent_id) if isinstance(agent_id, str) else None
    if m is None:
        raise bad_field("agent_id", f"must be '<developer>/<uuid>'; got {preview(agent_id)}")
    _SPLIT_OK.add(agent_id)
    return m.group(1), m.group(2)


_SPLIT_OK = Passed()  # ids split_agent_id has accepted (each heartbeat names a developer's agents)


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[::1]:port"`` -> (host, port). Raises LocalProtocolError."""
    m = ADDRESS_RE.fullmatch(address) if isinstance(address, str) else None
    if m is None or not 1 <= int(m.group(2)) <= 65535:
        raise bad_field("leader_address", f"must be 'host:port' with a port 1-65535; got {preview(address)}")
    return m.group(1).strip("[]"), int(m.group(2))


def negotiate(offered: tuple[int, ...], supported: tuple[int, ...] = PROTOCOL_VERSIONS) -> int | None:
    """The highest version both sides speak, or None."""
    common = set(offered) & set(supported)
    return max(common) if common else None


def peek_id(obj: dict[str, Any]) -> RequestId | None:
    try:
        return ID.check(obj.get("id"), "id")
    except LocalProtocolError:
        return None


def decode(obj: Any, *, sender: Role | None = None) -> Message:
    """A parsed JSON value -> a message. Raises RemoteProtocolError: this is the boundary where
    a failed validation becomes the peer's fault. ``sender`` refuses messages from the wrong side."""
    if not isinstance(obj, dict):
        raise RemoteProtocolError(ErrorCode.NOT_OBJECT, f"a frame must be a JSON object, got {json_type(obj)}")
    rid = peek_id(obj)
    if "type" not in obj:
        raise RemoteProtocolError(ErrorCode.MISSING_FIELD, "field 'type' is missing", rid)
    tag = obj["type"]
    if not isinstance(tag, str):
        raise RemoteProtocolError(ErrorCode.BAD_FIELD, f"field 'type' must be a string, got {json_type(tag)}", rid)
    cls = MESSAGE_TYPES.get(tag)
    if cls is None:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {preview(tag)}", rid)
    if sender is not None and cls.sender is not sender:
        raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"a {sender.value} may not send {tag!r}", rid)
    try:
        msg: Message = cls._from_json(obj)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(exc.code, exc.message, rid) from None
    return msg


def encode(msg: Message) -> bytes:
    """One frame: compact JSON and a newline (no size check; connections do that)."""
    try:
        return jsoncodec.dumps(msg.to_json()) + b"\n"
    except (UnicodeEncodeError, ValueError, RecursionError) as exc:  # unreachable for validated messages
        raise LocalProtocolError(ErrorCode.BAD_FIELD, f"cannot encode {msg.type}: {exc}") from None
