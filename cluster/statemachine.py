"""The replicated state machine, pure: typed commands and records in, typed records out.

Every node applies the same commands in Raft order and must reach the same state, so this
module does no I/O, reads no clock and draws no random numbers. The store (``store.py``)
hands it a read function and writes what it returns, in the same LMDB transaction as the
Raft index of the command.

Primitives for the coordination engine to build on: namespaced records with put, delete and
compare-and-set, and a revision that grows by one with every change (like etcd's).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NS_MAX_CHARS = 64
KEY_MAX_CHARS = 512
VALUE_MAX_BYTES = 64 * 1024


class CommandError(ValueError):
    """Returned when a command is malformed: its code is stable, its message names the field."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


@dataclass(frozen=True)
class Record:
    value: str
    create_revision: int
    mod_revision: int
    version: int

    def to_json(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "create_revision": self.create_revision,
            "mod_revision": self.mod_revision,
            "version": self.version,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Record:
        return cls(obj["value"], obj["create_revision"], obj["mod_revision"], obj["version"])


def _check_name(value: Any, field: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise CommandError("bad_field", f"field {field!r} must be a string, got {type(value).__name__}")
    if not value:
        raise CommandError("bad_field", f"field {field!r} must not be empty")
    if len(value) > max_chars:
        raise CommandError("bad_field", f"field {field!r} is longer than {max_chars} characters")
    if "\x00" in value:
        raise CommandError("bad_field", f"field {field!r} must not contain NUL")
    return value


def _check_value(value: Any) -> str:
    if not isinstance(value, str):
        raise CommandError("bad_field", f"field 'value' must be a string, got {type(value).__name__}")
    if len(value.encode()) > VALUE_MAX_BYTES:
        raise CommandError("too_large", f"field 'value' is larger than {VALUE_MAX_BYTES} bytes")
    return value


@dataclass(frozen=True)
class Put:
    ns: str
    key: str
    value: str

    def __post_init__(self) -> None:
        _check_name(self.ns, "ns", NS_MAX_CHARS)
        _check_name(self.key, "key", KEY_MAX_CHARS)
        _check_value(self.value)


@dataclass(frozen=True)
class Delete:
    ns: str
    key: str

    def __post_init__(self) -> None:
        _check_name(self.ns, "ns", NS_MAX_CHARS)
        _check_name(self.key, "key", KEY_MAX_CHARS)


@dataclass(frozen=True)
class CompareAndSet:
    """Set (or delete, when ``value`` is None) only if the record's mod_revision equals
    ``expected_revision``; 0 means "only if the record does not exist"."""

    ns: str
    key: str
    expected_revision: int
    value: str | None

    def __post_init__(self) -> None:
        _check_name(self.ns, "ns", NS_MAX_CHARS)
        _check_name(self.key, "key", KEY_MAX_CHARS)
        if not isinstance(self.expected_revision, int) or isinstance(self.expected_revision, bool):
            raise CommandError("bad_field", "field 'expected_revision' must be an integer")
        if self.expected_revision < 0:
            raise CommandError("bad_field", "field 'expected_revision' must be >= 0")
        if self.value is not None:
            _check_value(self.value)


@dataclass(frozen=True)
class Barrier:
    """A no-op through the log: once applied locally, every write acknowledged before it was
    proposed is visible here, so a read after it is linearizable."""


Command = Put | Delete | CompareAndSet | Barrier

_OPS: dict[str, tuple[type, tuple[str, ...]]] = {
    "put": (Put, ("ns", "key", "value")),
    "delete": (Delete, ("ns", "key")),
    "cas": (CompareAndSet, ("ns", "key", "expected_revision", "value")),
    "barrier": (Barrier, ()),
}
_OP_OF = {cls: op for op, (cls, _) in _OPS.items()}


def decode_command(obj: Any) -> Command:
    if not isinstance(obj, dict):
        raise CommandError("bad_command", "a command must be a JSON object")
    op = obj.get("op")
    if op not in _OPS:
        raise CommandError("unknown_op", f"unknown op {op!r}; expected one of {sorted(_OPS)}")
    cls, fields = _OPS[op]
    kwargs: dict[str, Any] = {}
    for f in fields:
        if f not in obj:
            if cls is CompareAndSet and f == "value":
                kwargs[f] = None
                continue
            raise CommandError("missing_field", f"op {op!r} needs field {f!r}")
        kwargs[f] = obj[f]
    extra = set(obj) - set(fields) - {"op"}
    if extra:
        raise CommandError("bad_field", f"op {op!r} does not take field(s) {sorted(extra)}")
    cmd: Command = cls(**kwargs)
    return cmd


def command_to_json(cmd: Command) -> dict[str, Any]:
    out: dict[str, Any] = {"op": _OP_OF[type(cmd)]}
    out.update({k: getattr(cmd, k) for k in _OPS[out["op"]][1]})
    return out


def encode_command(cmd: Command) -> bytes:
    return json.dumps(command_to_json(cmd), separators=(",", ":"), sort_keys=True).encode()


Write = tuple[str, str, Record | None]


@dataclass(frozen=True)
class Outcome:
    result: dict[str, Any]
    writes: tuple[Write, ...]
    revision: int


ReadFn = Callable[[str, str], Record | None]


def apply(cmd: Command, *, revision: int, read: ReadFn) -> Outcome:
    """Apply one command to the state seen through ``read``; ``revision`` is the current one."""
    if isinstance(cmd, Barrier):
        return Outcome({"ok": True, "revision": revision}, (), revision)
    if isinstance(cmd, Put):
        return _set(cmd.ns, cmd.key, cmd.value, read(cmd.ns, cmd.key), revision)
    if isinstance(cmd, Delete):
        return _delete(cmd.ns, cmd.key, read(cmd.ns, cmd.key), revision)
    if isinstance(cmd, CompareAndSet):
        current = read(cmd.ns, cmd.key)
        actual = current.mod_revision if current is not None else 0
        if actual != cmd.expected_revision:
            return Outcome(
                {"ok": False, "succeeded": False, "revision": revision, "actual_revision": actual},
                (),
                revision,
            )
        if cmd.value is None:
            out = _delete(cmd.ns, cmd.key, current, revision)
        else:
            out = _set(cmd.ns, cmd.key, cmd.value, current, revision)
        return Outcome({**out.result, "succeeded": True}, out.writes, out.revision)
    raise AssertionError(f"unhandled command {cmd!r}")


def _set(ns: str, key: str, value: str, current: Record | None, revision: int) -> Outcome:
    rev = revision + 1
    rec = Record(
        value=value,
        create_revision=current.create_revision if current else rev,
        mod_revision=rev,
        version=(current.version + 1) if current else 1,
    )
    return Outcome({"ok": True, "revision": rev, "record": rec.to_json()}, ((ns, key, rec),), rev)


def _delete(ns: str, key: str, current: Record | None, revision: int) -> Outcome:
    if current is None:
        return Outcome({"ok": True, "revision": revision, "deleted": False}, (), revision)
    rev = revision + 1
    return Outcome({"ok": True, "revision": rev, "deleted": True}, ((ns, key, None),), rev)
