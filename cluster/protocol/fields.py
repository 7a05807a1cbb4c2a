"""Limits, and the field specs every message is validated with on construction."""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, dataclass, fields
from typing import Any, Final

from tetherlab.cluster.protocol.errors import ErrorCode, LocalProtocolError, RequestId
from tetherlab.cluster.protocol.memo import Passed

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


# --- Field validators ---------------------------------------------------------------------
# A field's spec checks a value at construction (and normalises lists to tuples), decodes it
# from JSON (nested objects become dataclasses) and encodes it back. Failures raise
# LocalProtocolError: constructing a bad message is the constructor's fault, and decode()
# re-raises them as RemoteProtocolError.

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates cannot be encoded as UTF-8
DEVELOPER_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
AGENT_ID_RE = re.compile(rf"({DEVELOPER_PATTERN})/({_UUID})")
ADDRESS_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")
COMMIT_RE = re.compile(r"[0-9a-f]{7,64}")
CODE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
DIGEST_RE = re.compile(r"[0-9a-f]{64}")
BASE64_RE = re.compile(r"[A-Za-z0-9+/=]*")
# A packed code index travels in chunks that fit a frame (core's codeindex uses the same numbers).
MAX_INDEX_CHUNK_CHARS: Final = 160 * 1024
MAX_INDEX_CHUNKS: Final = 256


def json_type(value: Any) -> str:
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


def preview(value: Any) -> str:
    # Echo at most a little of the peer's input back, so error replies stay small.
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def bad_field(path: str, what: str) -> LocalProtocolError:
    return LocalProtocolError(ErrorCode.BAD_FIELD, f"field {path!r} {what}")


class Spec:
    def check(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def decode(self, raw: Any, path: str) -> Any:
        return self.check(raw, path)

    def encode(self, value: Any) -> Any:
        return value


class Str(Spec):
    def __init__(
        self,
        max_chars: int,
        *,
        pattern: re.Pattern[str] | None = None,
        pattern_name: str = "",
        choices: tuple[str, ...] = (),
        multiline: bool = False,
        min_chars: int = 1,
        memo: bool = False,
    ) -> None:
        self.max_chars = max_chars
        # Values that passed this check (agent ids: every heartbeat repeats them).
        self.memo = Passed() if memo else None
        self.pattern = pattern
        self.pattern_name = pattern_name
        self.choices = choices
        self.multiline = multiline
        self.min_chars = min_chars

    def check(self, value: Any, path: str) -> str:
        memo = self.memo
        if memo is not None and value in memo:
            return value  # type: ignore[no-any-return]
        if not isinstance(value, str):
            raise bad_field(path, f"must be a string, got {json_type(value)}")
        if len(value) < self.min_chars:
            raise bad_field(path, "must not be empty")
        if len(value) > self.max_chars:
            raise bad_field(path, f"is longer than {self.max_chars} characters")
        if self.choices and value not in self.choices:
            raise bad_field(path, f"must be one of {', '.join(self.choices)}; got {preview(value)}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise bad_field(path, f"must be {self.pattern_name}; got {preview(value)}")
        # ASCII text (nearly every field) cannot hold a surrogate, and for it isprintable() is
        # the control-character test: two C calls instead of two regex scans per string.
        ascii_text = value.isascii()
        if not ascii_text and _SURROGATE.search(value):
            raise bad_field(path, "contains a lone surrogate")
        if self.multiline:
            if "\x00" in value:
                raise bad_field(path, "must not contain NUL")
        elif not (value.isprintable() if ascii_text else _CONTROL.search(value) is None):
            raise bad_field(path, "must not contain control characters")
        if memo is not None:
            memo.add(value)
        return str(value)  # a StrEnum such as ErrorCode becomes its plain value


class Int(Spec):
    def __init__(self, lo: int, hi: int) -> None:
        self.lo = lo
        self.hi = hi

    def check(self, value: Any, path: str) -> int:
        # bool is an int subclass in Python but not a number in JSON
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad_field(path, f"must be an integer, got {json_type(value)}")
        if not self.lo <= value <= self.hi:
            raise bad_field(path, f"must be between {self.lo} and {self.hi}; got {value}")
        return value


class Bool(Spec):
    def check(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise bad_field(path, f"must be a boolean, got {json_type(value)}")
        return value


class IdSpec(Spec):
    def __init__(self) -> None:
        # Built once: every request and reply carries an id.
        self._as_str = Str(MAX_ID_CHARS)
        self._as_int = Int(0, MAX_INT_ID)

    def check(self, value: Any, path: str) -> RequestId:
        if isinstance(value, str):
            return self._as_str.check(value, path)
        if isinstance(value, int) and not isinstance(value, bool):
            return self._as_int.check(value, path)
        raise bad_field(path, f"must be a string or an integer, got {json_type(value)}")


class ListOf(Spec):
    def __init__(self, item: Spec, *, max_items: int = MAX_LIST_ITEMS, min_items: int = 0) -> None:
        self.item = item
        self.max_items = max_items
        self.min_items = min_items

    def _items(self, value: Any, path: str) -> list[Any] | tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise bad_field(path, f"must be an array, got {json_type(value)}")
        if len(value) < self.min_items:
            raise bad_field(path, f"must have at least {self.min_items} item(s)")
        if len(value) > self.max_items:
            raise bad_field(path, f"has more than {self.max_items} items")
        return value

    # Items are checked with the list's path, and only a failure is checked again item by item
    # to name the bad one ("agent_ids[3]"): no path string is built per item of a good list
    # (a heartbeat carries up to 256 agent ids).
    def check(self, value: Any, path: str) -> tuple[Any, ...]:
        items, check = self._items(value, path), self.item.check
        try:
            return tuple([check(v, path) for v in items])
        except LocalProtocolError:
            return tuple(check(v, f"{path}[{i}]") for i, v in enumerate(items))

    def decode(self, raw: Any, path: str) -> tuple[Any, ...]:
        items, decode = self._items(raw, path), self.item.decode
        try:
            return tuple([decode(v, path) for v in items])
        except LocalProtocolError:
            return tuple(decode(v, f"{path}[{i}]") for i, v in enumerate(items))

    def encode(self, value: Any) -> list[Any]:
        return [self.item.encode(v) for v in value]


class JsonObject(Spec):
    """A free-form JSON object (a verdict, a status): checked to be plain, bounded JSON."""

    def check(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise bad_field(path, f"must be an object, got {json_type(value)}")
        # Every reply's payload passes here (a verdict is a few dozen values): a check that builds
        # no path strings first, and the one naming the bad value only when there is one.
        if not _plain_json(value, MAX_JSON_DEPTH):
            _check_plain_json(value, path, MAX_JSON_DEPTH)
        return value


def _plain_json(value: Any, depth_left: int) -> bool:
    """True only for values ``_check_plain_json`` accepts (False: let it decide and say why)."""
    if depth_left < 0:
        return False
    t = type(value)
    if t is str:
        return value.isascii() or _SURROGATE.search(value) is None
    if t is int or t is bool or value is None:
        return True
    if t is dict:
        for k in value:
            if type(k) is not str or not (k.isascii() or _SURROGATE.search(k) is None):
                return False
        return _plain_items(value.values(), depth_left - 1)
    if t is list:
        return _plain_items(value, depth_left - 1)
    if t is float:
        return math.isfinite(value)
    return False  # subclasses, tuples, anything else: the full check decides and names it


def _plain_items(items: Any, depth_left: int) -> bool:
    """``_plain_json`` of every item; strings, integers, booleans and null are checked here
    rather than in a call each (every reply passes here; most of its values are such leaves)."""
    if depth_left < 0:
        return not items  # an empty container at the depth limit is fine; any item is too deep
    for v in items:
        t = type(v)
        if t is str:
            if not (v.isascii() or _SURROGATE.search(v) is None):
                return False
        elif not (t is int or t is bool or v is None or _plain_json(v, depth_left)):
            return False
    return True


def _check_plain_json(value: Any, path: str, depth_left: int) -> None:
    if depth_left < 0:
        raise bad_field(path, f"nests deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or _SURROGATE.search(k):
                raise bad_field(path, f"has a key that is not a valid string: {preview(k)}")
            _check_plain_json(v, f"{path}.{k}", depth_left - 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain_json(v, f"{path}[{i}]", depth_left - 1)
    elif isinstance(value, str):
        if _SURROGATE.search(value):
            raise bad_field(path, "contains a lone surrogate")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise bad_field(path, "must be a finite number")
    elif value is not None and not isinstance(value, bool | int):
        raise bad_field(path, f"is not JSON: {type(value).__name__}")


class Nested(Spec):
    def __init__(self, cls: type[Record]) -> None:
        self.cls = cls

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, self.cls):
            raise bad_field(path, f"must be a {self.cls.__name__}, got {type(value).__name__}")
        return value

    def decode(self, raw: Any, path: str) -> Any:
        if not isinstance(raw, dict):
            raise bad_field(path, f"must be an object, got {json_type(raw)}")
        return self.cls._from_json(raw, f"{path}.")

    def encode(self, value: Any) -> Any:
        return value.to_json()


class Optional(Spec):
    """None is allowed (and omitted on the wire)."""

    def __init__(self, inner: Spec) -> None:
        self.inner = inner

    def check(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.check(value, path)

    def decode(self, raw: Any, path: str) -> Any:
        return None if raw is None else self.inner.decode(raw, path)

    def encode(self, value: Any) -> Any:
        return self.inner.encode(value)


def spec(spec: Spec) -> dict[str, Spec]:
    return {"spec": spec}


ID = IdSpec()
NAME = Str(MAX_NAME_CHARS)
TEXT = Str(MAX_TEXT_CHARS, multiline=True)
AGENT = Str(MAX_NAME_CHARS, pattern=AGENT_ID_RE, pattern_name="'<developer>/<uuid>'", memo=True)
DEVELOPER = Str(64, pattern=re.compile(DEVELOPER_PATTERN), pattern_name="a developer name ([A-Za-z0-9._-], 1-64)")


@dataclass(frozen=True, kw_only=True)
class Record:
    """Validates every field on construction and maps to and from JSON via field specs."""

    def __post_init__(self) -> None:
        for name, field_spec, _ in _field_specs(type(self)):
            # frozen: normalising (list -> tuple) has to go through object.__setattr__
            object.__setattr__(self, name, field_spec.check(getattr(self, name), name))
        self._check_whole()

    def _check_whole(self) -> None:
        """Rules across fields, or beyond each field's spec; run after the fields are checked."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, field_spec, _ in _field_specs(type(self)):
            value = getattr(self, name)
            if value is not None:
                out[name] = field_spec.encode(value)
        return out

    @classmethod
    def _from_json(cls, obj: dict[str, Any], prefix: str = "") -> Any:
        names = _names_of(cls)
        for k in obj:
            if k != "type" and k not in names:
                raise LocalProtocolError(ErrorCode.UNKNOWN_FIELD, f"unknown field {preview(prefix + str(k))}")
        # decode() checks each field as the constructor would (naming nested fields by their
        # full path), so the instance is built without checking every field a second time.
        inst = object.__new__(cls)
        for name, field_spec, default in _field_specs(cls):
            raw = obj.get(name)
            if raw is None and (name not in obj or default is None):
                if default is MISSING:
                    raise LocalProtocolError(ErrorCode.MISSING_FIELD, f"field {prefix + name!r} is missing")
                value = default
            else:
                value = field_spec.decode(raw, prefix + name)
            object.__setattr__(inst, name, value)
        inst._check_whole()
        return inst


_FIELD_SPECS: dict[type, tuple[tuple[str, Spec, Any], ...]] = {}
_NAMES: dict[type, frozenset[str]] = {}


def _field_specs(cls: type) -> tuple[tuple[str, Spec, Any], ...]:
    """(name, spec, default) per field, once per class: what decoding, checking and encoding
    read for every field of every frame, without ``dataclasses.fields`` and the look-ups through
    each ``Field`` (a decode took 13.1 to 14.2 µs a frame with them, 11.4 to 11.8 without:
    submit and complete frames)."""
    got = _FIELD_SPECS.get(cls)
    if got is None:
        got = _FIELD_SPECS[cls] = tuple((f.name, f.metadata["spec"], f.default) for f in fields(cls))
        _NAMES[cls] = frozenset(name for name, _, _ in got)
    return got


def _names_of(cls: type) -> frozenset[str]:
    names = _NAMES.get(cls)
    if names is None:
        _field_specs(cls)
        names = _NAMES[cls]
    return names
