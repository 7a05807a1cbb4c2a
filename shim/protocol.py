"""The shim protocol, sans-I/O: bytes in, events out; events in, bytes out.

Shims (`tether`, the admin CLI) talk to a node over the SSH subsystem ``tetherlab``, one JSON
object per line. This module is the whole protocol and does no I/O, reads no clock and draws
no random numbers, so the node's SSH endpoint and the shim client drive the same code (the
h11 pattern)::

    conn.receive_data(chunk)           # b"" means the peer sent EOF
    while (event := conn.next_event()) is not NEED_DATA:
        ...                            # a Message, a ProtocolViolation or ConnectionClosed
    transport.write(conn.send(reply))  # validated, bookkept, framed

Layout, top to bottom: limits; error codes and exceptions; field validators; the messages
(frozen dataclasses, validated on construction); ``decode`` (dict to message, the one place
where a bad field becomes the peer's fault); line framing; the state table; the connections.

Wire format
    One JSON object per line, UTF-8, ``\\n``-terminated, at most ``MAX_FRAME_BYTES`` bytes
    without the newline. Blank lines are ignored. Every object has a ``type``. Requests carry
    an ``id`` (a string of 1..MAX_ID_CHARS characters or an integer 0..2**53-1) and get exactly
    one reply with the same id. Notifications carry no id. Optional fields may be omitted or
    null; unknown fields are refused (``unknown_field``) so a typo is never silently ignored.

Conversation
    client: hello {versions, client_name, client_version, agent?}
    server: hello_ok {version, node_id, server_version} | error version_mismatch
    then any number of requests, up to ``MAX_IN_FLIGHT`` unanswered at once, answered in any
    order by result {payload} | redirect {leader_id, leader_address} |
    unavailable {reason, retry_after_ms, message} | error {code, message}; and the server may
    push verdict_changed / revoked at any time after hello_ok.

Client requests (fields; ``?`` = optional, default in brackets)
    ping {} · status {}
    open_session {agent_id, tool, machine, repo_remote, base_commit, ttl_s?}
    heartbeat {agent_ids: [agent_id, ...]}
    submit_intent {agent_id, tool, intent: {summary, steps: [str], files?: [str],
                   concepts?: {modify: [str], depend: [str]}}, trigger: initial|replan|complete|abandon}
    complete {agent_id, intent_id} · abandon {agent_id, intent_id} · world_slice {agent_id}
    admin: keys_add {developer, public_key, role? [developer]} · keys_list {} · keys_revoke {key_id}
           concepts_push {toml} · concepts_list {} · concepts_show {concept_id}
           intents_list {all? [false], limit? [100], cursor?} · intents_revoke {intent_id, revert? [false]}

Bad input from the peer never raises: it becomes a ``ProtocolViolation`` event with a stable
``code`` (see ``ErrorCode``) and the connection's state is left exactly as it was. The server
answers a violation by sending it back (``server.send(violation)`` frames it as an ``error``).
Misusing the API (sending a reply nobody asked for, a request before hello, ...) raises
``LocalProtocolError``.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections import deque
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Final, Literal, TypeAlias

# --- Limits ------------------------------------------------------------------------------

PROTOCOL_VERSIONS: Final[tuple[int, ...]] = (1,)
# A frame is one line without its newline. 256 KiB holds a large concept registry push and
# bounds what one peer can make a node buffer.
MAX_FRAME_BYTES: Final = 256 * 1024
# Unanswered requests per connection; past this the server refuses (flood protection) and the
# client refuses to send.
MAX_IN_FLIGHT: Final = 64
MAX_ID_CHARS: Final = 64
MAX_INT_ID: Final = 2**53 - 1  # largest integer every JSON implementation keeps exact
MAX_NAME_CHARS: Final = 256  # tool, machine, node ids, key ids, concept ids, intent ids
MAX_TEXT_CHARS: Final = 4096  # summary, one step, a message
MAX_URL_CHARS: Final = 2048  # repo_remote
MAX_PATH_CHARS: Final = 1024
MAX_PUBLIC_KEY_CHARS: Final = 16 * 1024  # an OpenSSH line for a 16384-bit RSA key fits
MAX_LIST_ITEMS: Final = 256  # steps, files, concepts, agent ids
MAX_VERSIONS: Final = 16
MAX_JSON_DEPTH: Final = 32  # free-form payloads (result, verdict)
MAX_TTL_S: Final = 24 * 3600
MAX_RETRY_AFTER_MS: Final = 60_000
MAX_LIST_LIMIT: Final = 1000
DEFAULT_LIST_LIMIT: Final = 100


# --- Error codes and exceptions -----------------------------------------------------------


class ErrorCode(enum.StrEnum):
    """Stable codes carried by ``error`` replies, ``ProtocolViolation`` and the exceptions."""

    BAD_JSON = "bad_json"  # not UTF-8 or not JSON
    NOT_OBJECT = "not_object"  # JSON, but not an object
    FRAME_TOO_LARGE = "frame_too_large"  # a line over MAX_FRAME_BYTES
    TRUNCATED_FRAME = "truncated_frame"  # EOF in the middle of a line
    UNKNOWN_TYPE = "unknown_type"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"  # wrong JSON type, out of range, bad format
    UNKNOWN_FIELD = "unknown_field"
    UNEXPECTED_MESSAGE = "unexpected_message"  # valid message, wrong direction or moment
    NOT_HELLO = "not_hello"  # a request before the hello exchange finished
    VERSION_MISMATCH = "version_mismatch"
    DUPLICATE_ID = "duplicate_id"  # the id of a request still unanswered
    TOO_MANY_REQUESTS = "too_many_requests"  # MAX_IN_FLIGHT unanswered already
    UNKNOWN_REPLY_ID = "unknown_reply_id"  # a reply to no outstanding request
    CONNECTION_CLOSED = "connection_closed"  # local only: send() after close()
    # Never produced by this module; reserved so the node's own errors use stable names too.
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    INTERNAL = "internal"


RequestId: TypeAlias = str | int


class ProtocolError(Exception):
    """Base of both protocol errors: a stable ``code``, a ``message`` naming what was wrong
    and, when the offending frame had a readable one, the request ``id``."""

    def __init__(self, code: str, message: str, id: RequestId | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.id = id


class LocalProtocolError(ProtocolError):
    """Raised when this side misuses the API: constructs an invalid message, sends a message
    the state table does not allow, or replies to a request that is not outstanding."""


class RemoteProtocolError(ProtocolError):
    """Raised by ``decode`` when the peer sent bad data; connections turn it into a
    ``ProtocolViolation`` event instead of raising."""


# --- Field validators ---------------------------------------------------------------------
# A field's spec checks a value at construction (and normalises lists to tuples), decodes it
# from JSON (nested objects become dataclasses) and encodes it back. Failures raise
# LocalProtocolError: constructing a bad message is the constructor's fault, and decode()
# re-raises them as RemoteProtocolError.

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates cannot be encoded as UTF-8
_DEVELOPER = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_AGENT_ID = re.compile(rf"({_DEVELOPER})/({_UUID})")
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")
_COMMIT = re.compile(r"[0-9a-f]{7,64}")
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _preview(value: Any) -> str:
    # Echo at most a little of the peer's input back, so error replies stay small.
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _bad(path: str, what: str) -> LocalProtocolError:
    return LocalProtocolError(ErrorCode.BAD_FIELD, f"field {path!r} {what}")


class _Spec:
    def check(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def decode(self, raw: Any, path: str) -> Any:
        return self.check(raw, path)

    def encode(self, value: Any) -> Any:
        return value


class _Str(_Spec):
    def __init__(
        self,
        max_chars: int,
        *,
        pattern: re.Pattern[str] | None = None,
        pattern_name: str = "",
        choices: tuple[str, ...] = (),
        multiline: bool = False,
        min_chars: int = 1,
    ) -> None:
        self.max_chars = max_chars
        self.pattern = pattern
        self.pattern_name = pattern_name
        self.choices = choices
        self.multiline = multiline
        self.min_chars = min_chars

    def check(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise _bad(path, f"must be a string, got {_json_type(value)}")
        if len(value) < self.min_chars:
            raise _bad(path, "must not be empty")
        if len(value) > self.max_chars:
            raise _bad(path, f"is longer than {self.max_chars} characters")
        if self.choices and value not in self.choices:
            raise _bad(path, f"must be one of {', '.join(self.choices)}; got {_preview(value)}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise _bad(path, f"must be {self.pattern_name}; got {_preview(value)}")
        if _SURROGATE.search(value):
            raise _bad(path, "contains a lone surrogate")
        if self.multiline:
            if "\x00" in value:
                raise _bad(path, "must not contain NUL")
        elif _CONTROL.search(value):
            raise _bad(path, "must not contain control characters")
        return str(value)  # a StrEnum such as ErrorCode becomes its plain value


class _Int(_Spec):
    def __init__(self, lo: int, hi: int) -> None:
        self.lo = lo
        self.hi = hi

    def check(self, value: Any, path: str) -> int:
        # bool is an int subclass in Python but not a number in JSON
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(path, f"must be an integer, got {_json_type(value)}")
        if not self.lo <= value <= self.hi:
            raise _bad(path, f"must be between {self.lo} and {self.hi}; got {value}")
        return value


class _Bool(_Spec):
    def check(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise _bad(path, f"must be a boolean, got {_json_type(value)}")
        return value


class _Id(_Spec):
    def check(self, value: Any, path: str) -> RequestId:
        if isinstance(value, str):
            return _Str(MAX_ID_CHARS).check(value, path)
        if isinstance(value, int) and not isinstance(value, bool):
            return _Int(0, MAX_INT_ID).check(value, path)
        raise _bad(path, f"must be a string or an integer, got {_json_type(value)}")


class _List(_Spec):
    def __init__(self, item: _Spec, *, max_items: int = MAX_LIST_ITEMS, min_items: int = 0) -> None:
        self.item = item
        self.max_items = max_items
        self.min_items = min_items

    def _items(self, value: Any, path: str) -> list[Any] | tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise _bad(path, f"must be an array, got {_json_type(value)}")
        if len(value) < self.min_items:
            raise _bad(path, f"must have at least {self.min_items} item(s)")
        if len(value) > self.max_items:
            raise _bad(path, f"has more than {self.max_items} items")
        return value

    def check(self, value: Any, path: str) -> tuple[Any, ...]:
        return tuple(self.item.check(v, f"{path}[{i}]") for i, v in enumerate(self._items(value, path)))

    def decode(self, raw: Any, path: str) -> tuple[Any, ...]:
        return tuple(self.item.decode(v, f"{path}[{i}]") for i, v in enumerate(self._items(raw, path)))

    def encode(self, value: Any) -> list[Any]:
        return [self.item.encode(v) for v in value]


class _JsonObject(_Spec):
    """A free-form JSON object (a verdict, a status): checked to be plain, bounded JSON."""

    def check(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _bad(path, f"must be an object, got {_json_type(value)}")
        _check_plain_json(value, path, MAX_JSON_DEPTH)
        return value


def _check_plain_json(value: Any, path: str, depth_left: int) -> None:
    if depth_left < 0:
        raise _bad(path, f"nests deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or _SURROGATE.search(k):
                raise _bad(path, f"has a key that is not a valid string: {_preview(k)}")
            _check_plain_json(v, f"{path}.{k}", depth_left - 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain_json(v, f"{path}[{i}]", depth_left - 1)
    elif isinstance(value, str):
        if _SURROGATE.search(value):
            raise _bad(path, "contains a lone surrogate")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _bad(path, "must be a finite number")
    elif value is not None and not isinstance(value, bool | int):
        raise _bad(path, f"is not JSON: {type(value).__name__}")


class _Nested(_Spec):
    def __init__(self, cls: type[_Record]) -> None:
        self.cls = cls

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, self.cls):
            raise _bad(path, f"must be a {self.cls.__name__}, got {type(value).__name__}")
        return value

    def decode(self, raw: Any, path: str) -> Any:
        if not isinstance(raw, dict):
            raise _bad(path, f"must be an object, got {_json_type(raw)}")
        return self.cls._from_json(raw, f"{path}.")

    def encode(self, value: Any) -> Any:
        return value.to_json()


class _Optional(_Spec):
    """None is allowed (and omitted on the wire)."""

    def __init__(self, inner: _Spec) -> None:
        self.inner = inner

    def check(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.check(value, path)

    def decode(self, raw: Any, path: str) -> Any:
        return None if raw is None else self.inner.decode(raw, path)

    def encode(self, value: Any) -> Any:
        return self.inner.encode(value)


def _spec(spec: _Spec) -> dict[str, _Spec]:
    return {"spec": spec}


_ID = _Id()
_NAME = _Str(MAX_NAME_CHARS)
_TEXT = _Str(MAX_TEXT_CHARS, multiline=True)
_AGENT = _Str(MAX_NAME_CHARS, pattern=_AGENT_ID, pattern_name="'<developer>/<uuid>'")
_DEV = _Str(64, pattern=re.compile(_DEVELOPER), pattern_name="a developer name ([A-Za-z0-9._-], 1-64)")


@dataclass(frozen=True, kw_only=True)
class _Record:
    """Validates every field on construction and maps to and from JSON via field specs."""

    def __post_init__(self) -> None:
        for f in fields(self):
            # frozen: normalising (list -> tuple) has to go through object.__setattr__
            object.__setattr__(self, f.name, f.metadata["spec"].check(getattr(self, f.name), f.name))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = f.metadata["spec"].encode(value)
        return out

    @classmethod
    def _from_json(cls, obj: dict[str, Any], prefix: str = "") -> Any:
        known = {f.name: f for f in fields(cls)}
        extra = [k for k in obj if k not in known and k != "type"]
        if extra:
            raise LocalProtocolError(ErrorCode.UNKNOWN_FIELD, f"unknown field {_preview(prefix + str(extra[0]))}")
        kwargs: dict[str, Any] = {}
        for name, f in known.items():
            path = prefix + name
            if name not in obj or (obj[name] is None and f.default is None):
                if f.default is MISSING:
                    raise LocalProtocolError(ErrorCode.MISSING_FIELD, f"field {path!r} is missing")
                continue
            kwargs[name] = f.metadata["spec"].decode(obj[name], path)
        # Nested errors name their full path; the constructor re-checks with bare names, but
        # decode already validated every field, so it cannot fail here.
        return cls(**kwargs)


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
class Message(_Record):
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
    id: RequestId = field(metadata=_spec(_ID))


@dataclass(frozen=True, kw_only=True)
class Hello(Request):
    type: ClassVar[str] = "hello"
    kind: ClassVar[Kind] = Kind.HELLO
    versions: tuple[int, ...] = field(metadata=_spec(_List(_Int(1, 2**31 - 1), min_items=1, max_items=MAX_VERSIONS)))
    client_name: str = field(metadata=_spec(_NAME))
    client_version: str = field(metadata=_spec(_NAME))
    agent: str | None = field(default=None, metadata=_spec(_Optional(_NAME)))  # e.g. "claude-code 2.1.3"


@dataclass(frozen=True, kw_only=True)
class Ping(Request):
    type: ClassVar[str] = "ping"


@dataclass(frozen=True, kw_only=True)
class Status(Request):
    type: ClassVar[str] = "status"


@dataclass(frozen=True, kw_only=True)
class OpenSession(Request):
    type: ClassVar[str] = "open_session"
    agent_id: str = field(metadata=_spec(_AGENT))
    tool: str = field(metadata=_spec(_NAME))
    machine: str = field(metadata=_spec(_NAME))
    repo_remote: str = field(metadata=_spec(_Str(MAX_URL_CHARS)))
    base_commit: str = field(metadata=_spec(_Str(64, pattern=_COMMIT, pattern_name="a lowercase hex commit id")))
    ttl_s: int | None = field(default=None, metadata=_spec(_Optional(_Int(1, MAX_TTL_S))))  # None: the node's default


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Request):
    type: ClassVar[str] = "heartbeat"
    agent_ids: tuple[str, ...] = field(metadata=_spec(_List(_AGENT, min_items=1)))


@dataclass(frozen=True, kw_only=True)
class Concepts(_Record):
    """Concept ids the intent will change (``modify``) and relies on (``depend``)."""

    modify: tuple[str, ...] = field(default=(), metadata=_spec(_List(_NAME)))
    depend: tuple[str, ...] = field(default=(), metadata=_spec(_List(_NAME)))


@dataclass(frozen=True, kw_only=True)
class Intent(_Record):
    """The plan an agent printed (the seed's JSON shape)."""

    summary: str = field(metadata=_spec(_TEXT))
    steps: tuple[str, ...] = field(metadata=_spec(_List(_TEXT)))
    files: tuple[str, ...] | None = field(default=None, metadata=_spec(_Optional(_List(_Str(MAX_PATH_CHARS)))))
    concepts: Concepts | None = field(default=None, metadata=_spec(_Optional(_Nested(Concepts))))


Trigger: TypeAlias = Literal["initial", "replan", "complete", "abandon"]
TRIGGERS: Final[tuple[str, ...]] = ("initial", "replan", "complete", "abandon")


@dataclass(frozen=True, kw_only=True)
class SubmitIntent(Request):
    type: ClassVar[str] = "submit_intent"
    agent_id: str = field(metadata=_spec(_AGENT))
    tool: str = field(metadata=_spec(_NAME))
    intent: Intent = field(metadata=_spec(_Nested(Intent)))
    trigger: Trigger = field(metadata=_spec(_Str(16, choices=TRIGGERS)))


@dataclass(frozen=True, kw_only=True)
class Complete(Request):
    type: ClassVar[str] = "complete"
    agent_id: str = field(metadata=_spec(_AGENT))
    intent_id: str = field(metadata=_spec(_NAME))


@dataclass(frozen=True, kw_only=True)
class Abandon(Request):
    type: ClassVar[str] = "abandon"
    agent_id: str = field(metadata=_spec(_AGENT))
    intent_id: str = field(metadata=_spec(_NAME))


@dataclass(frozen=True, kw_only=True)
class WorldSlice(Request):
    type: ClassVar[str] = "world_slice"
    agent_id: str = field(metadata=_spec(_AGENT))


KeyRole: TypeAlias = Literal["admin", "developer"]


@dataclass(frozen=True, kw_only=True)
class KeysAdd(Request):
    type: ClassVar[str] = "keys_add"
    admin: ClassVar[bool] = True
    developer: str = field(metadata=_spec(_DEV))
    public_key: str = field(metadata=_spec(_Str(MAX_PUBLIC_KEY_CHARS)))  # an authorized_keys line or .pub content
    role: KeyRole = field(default="developer", metadata=_spec(_Str(16, choices=("admin", "developer"))))


@dataclass(frozen=True, kw_only=True)
class KeysList(Request):
    type: ClassVar[str] = "keys_list"
    admin: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class KeysRevoke(Request):
    type: ClassVar[str] = "keys_revoke"
    admin: ClassVar[bool] = True
    key_id: str = field(metadata=_spec(_NAME))


@dataclass(frozen=True, kw_only=True)
class ConceptsPush(Request):
    type: ClassVar[str] = "concepts_push"
    admin: ClassVar[bool] = True
    toml: str = field(metadata=_spec(_Str(MAX_FRAME_BYTES, multiline=True)))  # the frame bound is the real limit


@dataclass(frozen=True, kw_only=True)
class ConceptsList(Request):
    type: ClassVar[str] = "concepts_list"
    admin: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class ConceptsShow(Request):
    type: ClassVar[str] = "concepts_show"
    admin: ClassVar[bool] = True
    concept_id: str = field(metadata=_spec(_NAME))


@dataclass(frozen=True, kw_only=True)
class IntentsList(Request):
    type: ClassVar[str] = "intents_list"
    admin: ClassVar[bool] = True
    all: bool = field(default=False, metadata=_spec(_Bool()))  # include completed, abandoned and revoked intents
    limit: int = field(default=DEFAULT_LIST_LIMIT, metadata=_spec(_Int(1, MAX_LIST_LIMIT)))
    cursor: str | None = field(default=None, metadata=_spec(_Optional(_NAME)))  # from the previous page's result


@dataclass(frozen=True, kw_only=True)
class IntentsRevoke(Request):
    type: ClassVar[str] = "intents_revoke"
    admin: ClassVar[bool] = True
    intent_id: str = field(metadata=_spec(_NAME))
    revert: bool = field(default=False, metadata=_spec(_Bool()))  # tell the agent's shim to stash its changes


_HOSTPORT = _Str(MAX_NAME_CHARS, pattern=_ADDRESS, pattern_name="'host:port'")
SHIM_EVENTS: Final[tuple[str, ...]] = ("failed_closed",)


@dataclass(frozen=True, kw_only=True)
class ShimReport(Request):
    """A shim reports, when it next reaches the master, something that happened while it could
    not (it failed closed); operators see it in tetherlab_shims_failing_closed."""

    type: ClassVar[str] = "shim_report"
    agent_id: str = field(metadata=_spec(_AGENT))
    event: str = field(metadata=_spec(_Str(32, choices=SHIM_EVENTS)))
    at_unix_ms: int = field(metadata=_spec(_Int(0, 2**53 - 1)))
    detail: str = field(default="", metadata=_spec(_Str(MAX_TEXT_CHARS, multiline=True, min_chars=0)))


@dataclass(frozen=True, kw_only=True)
class ClusterAdd(Request):
    """Add a node to the Raft membership (one change at a time; refused if it would lose quorum)."""

    type: ClassVar[str] = "cluster_add"
    admin: ClassVar[bool] = True
    node_id: str = field(metadata=_spec(_Str(32, pattern=re.compile(r"[a-z0-9][a-z0-9_-]{0,31}"),
                                             pattern_name="a node id ([a-z0-9_-], 1-32)")))
    raft: str = field(metadata=_spec(_HOSTPORT))
    ssh: str = field(metadata=_spec(_HOSTPORT))
    http: str = field(metadata=_spec(_HOSTPORT))


@dataclass(frozen=True, kw_only=True)
class ClusterRemove(Request):
    type: ClassVar[str] = "cluster_remove"
    admin: ClassVar[bool] = True
    node_id: str = field(metadata=_spec(_NAME))


@dataclass(frozen=True, kw_only=True)
class Reply(Message):
    """An answer from the server to the request with the same ``id``."""

    kind: ClassVar[Kind] = Kind.REPLY
    sender: ClassVar[Role] = Role.SERVER
    id: RequestId = field(metadata=_spec(_ID))


@dataclass(frozen=True, kw_only=True)
class HelloOk(Reply):
    type: ClassVar[str] = "hello_ok"
    kind: ClassVar[Kind] = Kind.HELLO_OK
    version: int = field(metadata=_spec(_Int(1, 2**31 - 1)))
    node_id: str = field(metadata=_spec(_NAME))
    server_version: str = field(metadata=_spec(_NAME))


@dataclass(frozen=True, kw_only=True)
class Result(Reply):
    type: ClassVar[str] = "result"
    payload: dict[str, Any] = field(metadata=_spec(_JsonObject()))  # read-only by convention: a verdict, a list...


@dataclass(frozen=True, kw_only=True)
class Redirect(Reply):
    """This node is not the leader; ask ``leader_address`` (the leader's SSH host:port)."""

    type: ClassVar[str] = "redirect"
    leader_id: str = field(metadata=_spec(_NAME))
    leader_address: str = field(metadata=_spec(_Str(MAX_NAME_CHARS, pattern=_ADDRESS, pattern_name="'host:port'")))

    def __post_init__(self) -> None:
        super().__post_init__()
        split_address(self.leader_address)  # the port range


UNAVAILABLE_REASONS: Final[tuple[str, ...]] = ("no_leader", "no_quorum", "timeout", "shutting_down")
UnavailableReason: TypeAlias = Literal["no_leader", "no_quorum", "timeout", "shutting_down"]


@dataclass(frozen=True, kw_only=True)
class Unavailable(Reply):
    """No quorum-backed answer now (never a verdict); retry after ``retry_after_ms``."""

    type: ClassVar[str] = "unavailable"
    reason: UnavailableReason = field(metadata=_spec(_Str(32, choices=UNAVAILABLE_REASONS)))
    retry_after_ms: int = field(metadata=_spec(_Int(0, MAX_RETRY_AFTER_MS)))
    message: str = field(default="", metadata=_spec(_Str(MAX_TEXT_CHARS, multiline=True, min_chars=0)))


@dataclass(frozen=True, kw_only=True)
class Error(Reply):
    """A refusal: ``code`` is stable (an ``ErrorCode`` value or the node's own), ``message``
    says what was wrong. ``id`` is None only when the offending frame had no readable id."""

    type: ClassVar[str] = "error"
    kind: ClassVar[Kind] = Kind.ERROR
    id: RequestId | None = field(default=None, metadata=_spec(_Optional(_ID)))
    code: str = field(metadata=_spec(_Str(64, pattern=_CODE, pattern_name="a lowercase code")))
    message: str = field(metadata=_spec(_Str(MAX_TEXT_CHARS, multiline=True)))


@dataclass(frozen=True, kw_only=True)
class Notification(Message):
    """Pushed by the server, unasked; carries no id."""

    kind: ClassVar[Kind] = Kind.NOTIFICATION
    sender: ClassVar[Role] = Role.SERVER


@dataclass(frozen=True, kw_only=True)
class VerdictChanged(Notification):
    type: ClassVar[str] = "verdict_changed"
    agent_id: str = field(metadata=_spec(_AGENT))
    intent_id: str = field(metadata=_spec(_NAME))
    verdict: dict[str, Any] = field(metadata=_spec(_JsonObject()))


@dataclass(frozen=True, kw_only=True)
class Revoked(Notification):
    """The agent's session (or one intent of it) was revoked; the shim must stop the agent."""

    type: ClassVar[str] = "revoked"
    agent_id: str = field(metadata=_spec(_AGENT))
    reason: str = field(metadata=_spec(_TEXT))
    intent_id: str | None = field(default=None, metadata=_spec(_Optional(_NAME)))
    revert: bool = field(default=False, metadata=_spec(_Bool()))


MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    cls.type: cls
    for cls in (
        Hello, Ping, Status, OpenSession, Heartbeat, SubmitIntent, Complete, Abandon, WorldSlice,
        KeysAdd, KeysList, KeysRevoke, ConceptsPush, ConceptsList, ConceptsShow, IntentsList,
        IntentsRevoke, ClusterAdd, ClusterRemove, ShimReport, HelloOk, Result, Redirect, Unavailable, Error,
        VerdictChanged, Revoked,
    )
}  # fmt: skip


def split_agent_id(agent_id: str) -> tuple[str, str]:
    """``"alice/<uuid>"`` -> ``("alice", "<uuid>")``; the node compares the developer part with
    the authenticated key's developer. Raises LocalProtocolError(bad_field) if malformed."""
    m = _AGENT_ID.fullmatch(agent_id) if isinstance(agent_id, str) else None
    if m is None:
        raise _bad("agent_id", f"must be '<developer>/<uuid>'; got {_preview(agent_id)}")
    return m.group(1), m.group(2)


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[::1]:port"`` -> (host, port). Raises LocalProtocolError."""
    m = _ADDRESS.fullmatch(address) if isinstance(address, str) else None
    if m is None or not 1 <= int(m.group(2)) <= 65535:
        raise _bad("leader_address", f"must be 'host:port' with a port 1-65535; got {_preview(address)}")
    return m.group(1).strip("[]"), int(m.group(2))


def negotiate(offered: tuple[int, ...], supported: tuple[int, ...] = PROTOCOL_VERSIONS) -> int | None:
    """The highest version both sides speak, or None."""
    common = set(offered) & set(supported)
    return max(common) if common else None


def _peek_id(obj: dict[str, Any]) -> RequestId | None:
    try:
        return _ID.check(obj.get("id"), "id")
    except LocalProtocolError:
        return None


def decode(obj: Any, *, sender: Role | None = None) -> Message:
    """A parsed JSON value -> a message. Raises RemoteProtocolError: this is the boundary where
    a failed validation becomes the peer's fault. ``sender`` refuses messages from the wrong side."""
    if not isinstance(obj, dict):
        raise RemoteProtocolError(ErrorCode.NOT_OBJECT, f"a frame must be a JSON object, got {_json_type(obj)}")
    rid = _peek_id(obj)
    if "type" not in obj:
        raise RemoteProtocolError(ErrorCode.MISSING_FIELD, "field 'type' is missing", rid)
    tag = obj["type"]
    if not isinstance(tag, str):
        raise RemoteProtocolError(ErrorCode.BAD_FIELD, f"field 'type' must be a string, got {_json_type(tag)}", rid)
    cls = MESSAGE_TYPES.get(tag)
    if cls is None:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {_preview(tag)}", rid)
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
        return json.dumps(msg.to_json(), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    except (UnicodeEncodeError, ValueError, RecursionError) as exc:  # unreachable for validated messages
        raise LocalProtocolError(ErrorCode.BAD_FIELD, f"cannot encode {msg.type}: {exc}") from None


# --- Events that are not messages ---------------------------------------------------------


@dataclass(frozen=True)
class ProtocolViolation:
    """The peer sent something bad; nothing changed. A server answers it with
    ``send(violation)``; a client may log it and carry on or reconnect."""

    code: str
    message: str
    id: RequestId | None = None

    def to_error(self) -> Error:
        return Error(id=self.id, code=self.code, message=self.message)


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer sent EOF (after every frame before it was delivered), or we closed."""


class NeedData(enum.Enum):
    NEED_DATA = "need_data"


NEED_DATA: Final = NeedData.NEED_DATA

Event: TypeAlias = Message | ProtocolViolation | ConnectionClosed


# --- Framing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FrameFault:
    code: ErrorCode
    message: str


class _LineReader:
    """Splits bytes into lines, keeping at most ``max_frame_bytes`` of a partial line. A line
    over the bound is reported once and its remaining bytes dropped as they arrive, so an
    endless line costs no memory."""

    def __init__(self, max_frame_bytes: int) -> None:
        self._max = max_frame_bytes
        self._partial = bytearray()
        self._discarding = False
        self._frames: deque[bytes | _FrameFault] = deque()  # bounded by what the caller fed
        self.eof = False

    def _too_large(self) -> _FrameFault:
        return _FrameFault(ErrorCode.FRAME_TOO_LARGE, f"frame is larger than {self._max} bytes; discarded")

    def feed(self, data: bytes) -> None:
        if not data:
            if self._partial and not self._discarding:
                self._frames.append(
                    _FrameFault(ErrorCode.TRUNCATED_FRAME, f"EOF after {len(self._partial)} bytes of a frame")
                )
            self._partial.clear()
            self.eof = True
            return
        start = 0
        while start < len(data):
            nl = data.find(b"\n", start)
            end = len(data) if nl == -1 else nl
            if not self._discarding:
                if len(self._partial) + (end - start) > self._max:
                    self._frames.append(self._too_large())
                    self._partial.clear()
                    self._discarding = True
                else:
                    self._partial += data[start:end]
            if nl == -1:
                break
            if self._discarding:
                self._discarding = False  # the oversized line ends here
            else:
                self._frames.append(bytes(self._partial))
                self._partial.clear()
            start = nl + 1

    def next_frame(self) -> bytes | _FrameFault | None:
        return self._frames.popleft() if self._frames else None


def _parse_frame(line: bytes, sender: Role) -> Message:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(ErrorCode.BAD_JSON, f"frame is not UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise RemoteProtocolError(ErrorCode.BAD_JSON, "frame nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and ints too long to convert
        raise RemoteProtocolError(ErrorCode.BAD_JSON, f"frame is not JSON: {exc}") from None
    return decode(obj, sender=sender)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# --- The state table ----------------------------------------------------------------------


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    READY = "ready"
    CLOSED = "closed"


# Every allowed (state, sender, kind) and the state it leads to; anything absent is refused.
# Both connections consult the same table: what the client may send is exactly what the
# server may receive. Request ids are bookkept beside it (see _Connection._apply).
_C, _S = Role.CLIENT, Role.SERVER
TRANSITIONS: Final[dict[tuple[State, Role, Kind], State]] = {
    (State.AWAIT_HELLO, _C, Kind.HELLO): State.AWAIT_HELLO,
    (State.AWAIT_HELLO, _S, Kind.HELLO_OK): State.READY,
    (State.AWAIT_HELLO, _S, Kind.ERROR): State.AWAIT_HELLO,  # version_mismatch: try again
    (State.READY, _C, Kind.REQUEST): State.READY,
    (State.READY, _S, Kind.REPLY): State.READY,
    (State.READY, _S, Kind.ERROR): State.READY,
    (State.READY, _S, Kind.NOTIFICATION): State.READY,
    (State.AWAIT_HELLO, _C, Kind.CLOSE): State.CLOSED,
    (State.AWAIT_HELLO, _S, Kind.CLOSE): State.CLOSED,
    (State.READY, _C, Kind.CLOSE): State.CLOSED,
    (State.READY, _S, Kind.CLOSE): State.CLOSED,
}


# --- Connections --------------------------------------------------------------------------


class _Connection:
    our_role: ClassVar[Role]
    their_role: ClassVar[Role]

    def __init__(
        self,
        *,
        versions: tuple[int, ...] = PROTOCOL_VERSIONS,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.versions = tuple(versions)
        self.max_frame_bytes = max_frame_bytes
        self.max_in_flight = max_in_flight
        self._reader = _LineReader(max_frame_bytes)
        self._state = State.AWAIT_HELLO
        # Requests the client sent that the server has not answered, with their type: both
        # sides keep the same set (one from sending, the other from receiving).
        self._in_flight: dict[RequestId, type[Request]] = {}
        self._hello_offer: tuple[int, ...] | None = None  # versions of the pending hello
        self._version: int | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def version(self) -> int | None:
        """The negotiated protocol version, once hello_ok has passed."""
        return self._version

    @property
    def in_flight(self) -> frozenset[RequestId]:
        """Ids of requests sent and not yet answered."""
        return frozenset(self._in_flight)

    @property
    def peer_closed(self) -> bool:
        """The peer sent EOF; we may still answer what it asked, then close()."""
        return self._reader.eof

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means EOF."""
        if self._state is State.CLOSED:
            return  # bytes that were in flight when we closed
        if self._reader.eof:
            if data:
                raise LocalProtocolError(ErrorCode.CONNECTION_CLOSED, "receive_data() after EOF")
            return
        self._reader.feed(bytes(data))

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA. Never raises for anything the peer sent."""
        while True:
            if self._state is State.CLOSED:
                return ConnectionClosed()
            item = self._reader.next_frame()
            if item is None:
                return ConnectionClosed() if self._reader.eof else NEED_DATA
            if isinstance(item, _FrameFault):
                return ProtocolViolation(item.code, item.message)
            if not item.strip():
                continue  # blank lines are allowed as keepalives
            try:
                msg = _parse_frame(item, self.their_role)
                self._apply(msg, RemoteProtocolError)
            except RemoteProtocolError as exc:
                return ProtocolViolation(exc.code, exc.message, exc.id)
            return msg

    def events(self) -> list[Event]:
        """Every event available now, ending with ConnectionClosed if the peer closed."""
        out: list[Event] = []
        while not isinstance(event := self.next_event(), NeedData):
            out.append(event)
            if isinstance(event, ConnectionClosed):
                break
        return out

    def send(self, event: Message | ProtocolViolation | ConnectionClosed) -> bytes:
        """Validate ``event`` against the state table, bookkeep it, and return its frame."""
        if self._state is State.CLOSED:
            raise LocalProtocolError(ErrorCode.CONNECTION_CLOSED, "send() after close()")
        if isinstance(event, ConnectionClosed):
            self.close()
            return b""
        if isinstance(event, ProtocolViolation):
            if self.our_role is not Role.SERVER:
                raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "only a server answers violations")
            # The offending frame never entered the bookkeeping, so its answer does not either.
            return self._frame(event.to_error())
        if not isinstance(event, Message):
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"cannot send {type(event).__name__}")
        if event.sender is not self.our_role:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE, f"a {self.our_role.value} may not send {event.type!r}", _id_of(event)
            )
        data = self._frame(event)
        self._apply(event, LocalProtocolError)
        return data

    def close(self) -> None:
        """Stop sending; the caller closes the channel. Idempotent."""
        if self._state is not State.CLOSED:
            self._state = TRANSITIONS[(self._state, self.our_role, Kind.CLOSE)]

    def _frame(self, msg: Message) -> bytes:
        data = encode(msg)
        if len(data) - 1 > self.max_frame_bytes:
            raise LocalProtocolError(
                ErrorCode.FRAME_TOO_LARGE, f"{msg.type} is {len(data) - 1} bytes, over {self.max_frame_bytes}"
            )
        return data

    def _apply(self, msg: Message, fault: type[ProtocolError]) -> None:
        """Check ``msg`` against the table and the request bookkeeping, then commit. ``fault`` is
        LocalProtocolError for what we send and RemoteProtocolError for what we receive; on a
        fault nothing has changed."""
        rid = _id_of(msg)
        new_state = TRANSITIONS.get((self._state, msg.sender, msg.kind))
        if new_state is None:
            if self._state is State.AWAIT_HELLO and msg.kind is Kind.REQUEST:
                raise fault(ErrorCode.NOT_HELLO, f"{msg.type!r} before the hello exchange finished", rid)
            raise fault(ErrorCode.UNEXPECTED_MESSAGE, f"{msg.type!r} is not allowed in state {self._state.value}", rid)
        version = self._version
        offer = self._hello_offer
        if isinstance(msg, Request):
            if msg.id in self._in_flight:
                raise fault(ErrorCode.DUPLICATE_ID, f"request id {_preview(msg.id)} is still in flight", rid)
            if len(self._in_flight) >= self.max_in_flight:
                raise fault(ErrorCode.TOO_MANY_REQUESTS, f"{self.max_in_flight} requests already in flight", rid)
            if isinstance(msg, Hello):
                if offer is not None:
                    raise fault(ErrorCode.UNEXPECTED_MESSAGE, "a hello is already waiting for its answer", rid)
                offer = msg.versions
            self._in_flight[msg.id] = type(msg)
        elif isinstance(msg, Reply) and msg.id is not None:  # an Error with no id answers nothing
            asked = self._in_flight.get(msg.id)
            if asked is None:
                raise fault(ErrorCode.UNKNOWN_REPLY_ID, f"{msg.type} for id {_preview(msg.id)}, not in flight", rid)
            # hello_ok answers only a hello, result/redirect/unavailable never do, error answers anything
            if (msg.kind is Kind.HELLO_OK) != (asked is Hello) and msg.kind is not Kind.ERROR:
                raise fault(ErrorCode.UNEXPECTED_MESSAGE, f"{msg.type} cannot answer {asked.type!r}", rid)
            if isinstance(msg, HelloOk):
                if offer is None or msg.version not in offer:
                    raise fault(ErrorCode.VERSION_MISMATCH, f"hello_ok chose version {msg.version}, "
                                f"not one of those offered {list(offer or ())}", rid)  # fmt: skip
                version = msg.version
            if asked is Hello:
                offer = None
            del self._in_flight[msg.id]
        self._state, self._version, self._hello_offer = new_state, version, offer


def _id_of(msg: Message) -> RequestId | None:
    return getattr(msg, "id", None)


class ServerConnection(_Connection):
    """The node's side of one SSH channel. Answer every request event (``Hello`` included)
    with exactly one reply carrying its id, and every ProtocolViolation with ``send(it)``."""

    our_role: ClassVar[Role] = Role.SERVER
    their_role: ClassVar[Role] = Role.CLIENT

    def answer_hello(self, hello: Hello, *, node_id: str, server_version: str) -> HelloOk | Error:
        """The reply to ``hello``: the highest common version, or an error naming both sides'."""
        version = negotiate(hello.versions, self.versions)
        if version is None:
            return Error(
                id=hello.id,
                code=ErrorCode.VERSION_MISMATCH,
                message=f"no common protocol version: client offers {list(hello.versions)}, "
                f"server supports {list(self.versions)}",
            )
        return HelloOk(id=hello.id, version=version, node_id=node_id, server_version=server_version)


class ClientConnection(_Connection):
    """The shim's side: send ``Hello`` first, then requests; replies come back as events
    carrying the request's id (match them with your own id -> future map)."""

    our_role: ClassVar[Role] = Role.CLIENT
    their_role: ClassVar[Role] = Role.SERVER

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._next_id = 0

    def next_id(self) -> int:
        """A fresh request id (1, 2, 3, ...); never one in flight."""
        self._next_id += 1
        while self._next_id in self._in_flight:
            self._next_id += 1
        return self._next_id

    def hello(self, *, client_name: str, client_version: str, agent: str | None = None) -> Hello:
        """A Hello offering every version this connection speaks (then ``send()`` it)."""
        return Hello(
            id=self.next_id(), versions=self.versions, client_name=client_name,
            client_version=client_version, agent=agent,
        )  # fmt: skip


__all__ = [
    "DEFAULT_LIST_LIMIT",
    "MAX_FRAME_BYTES",
    "MAX_ID_CHARS",
    "MAX_IN_FLIGHT",
    "MAX_JSON_DEPTH",
    "MAX_LIST_ITEMS",
    "MAX_LIST_LIMIT",
    "MAX_NAME_CHARS",
    "MAX_PUBLIC_KEY_CHARS",
    "MAX_RETRY_AFTER_MS",
    "MAX_TEXT_CHARS",
    "MAX_TTL_S",
    "MESSAGE_TYPES",
    "NEED_DATA",
    "PROTOCOL_VERSIONS",
    "TRANSITIONS",
    "TRIGGERS",
    "UNAVAILABLE_REASONS",
    "Abandon",
    "ClientConnection",
    "Complete",
    "Concepts",
    "ConceptsList",
    "ConceptsPush",
    "ConceptsShow",
    "ConnectionClosed",
    "Error",
    "ErrorCode",
    "Event",
    "Heartbeat",
    "Hello",
    "HelloOk",
    "Intent",
    "IntentsList",
    "IntentsRevoke",
    "KeyRole",
    "KeysAdd",
    "KeysList",
    "KeysRevoke",
    "Kind",
    "LocalProtocolError",
    "Message",
    "NeedData",
    "Notification",
    "OpenSession",
    "Ping",
    "ProtocolError",
    "ProtocolViolation",
    "Redirect",
    "RemoteProtocolError",
    "Reply",
    "Request",
    "RequestId",
    "Result",
    "Revoked",
    "Role",
    "ServerConnection",
    "State",
    "Status",
    "SubmitIntent",
    "Unavailable",
    "VerdictChanged",
    "WorldSlice",
    "decode",
    "encode",
    "negotiate",
    "split_address",
    "split_agent_id",
]
