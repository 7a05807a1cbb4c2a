"""The replicated state machine, pure: typed commands and records in, typed records out.

Every node applies the same commands in Raft order and must reach the same state, so this
module does no I/O, reads no clock and draws no random numbers. The store (``store.py``)
hands it a read function and writes what it returns, in the same LMDB transaction as the
Raft index of the command.

Primitives for the coordination engine to build on: namespaced records with put, delete and
compare-and-set, and a revision that grows by one with every change (like etcd's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tetherlab.cluster.core.errors import CommandError
from tetherlab.cluster.protocol import jsoncodec

NS_MAX_CHARS = 64
KEY_MAX_CHARS = 512
VALUE_MAX_BYTES = 64 * 1024


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


def check_name(value: Any, field: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise CommandError("bad_field", f"field {field!r} must be a string, got {type(value).__name__}")
    if not value:
        raise CommandError("bad_field", f"field {field!r} must not be empty")
    if len(value) > max_chars:
        raise CommandError("bad_field", f"field {field!r} is longer than {max_chars} characters")
    if "\x00" in value:
        raise CommandError("bad_field", f"field {field!r} must not contain NUL")
    return value


def check_value(value: Any) -> str:
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
        check_name(self.ns, "ns", NS_MAX_CHARS)
        check_name(self.key, "key", KEY_MAX_CHARS)
        check_value(self.value)


@dataclass(frozen=True)
class Delete:
    ns: str
    key: str

    def __post_init__(self) -> None:
        check_name(self.ns, "ns", NS_MAX_CHARS)
        check_name(self.key, "key", KEY_MAX_CHARS)


@dataclass(frozen=True)
class CompareAndSet:
    """Set (or delete, when ``value`` is None) only if the record's mod_revision equals
    ``expected_revision``; 0 means "only if the record does not exist"."""

    ns: str
    key: str
    expected_revision: int
    value: str | None

    def __post_init__(self) -> None:
        check_name(self.ns, "ns", NS_MAX_CHARS)
        check_name(self.key, "key", KEY_MAX_CHARS)
        if not isinstance(self.expected_revision, int) or isinstance(self.expected_revision, bool):
            raise CommandError("bad_field", "field 'expected_revision' must be an integer")
        if self.expected_revision < 0:
            raise CommandError("bad_field", "field 'expected_revision' must be >= 0")
        if self.value is not None:
            check_value(self.value)


@dataclass(frozen=True)
class Barrier:
    """A no-op through the log: once applied locally, every write acknowledged before it was
    proposed is visible here, so a read after it is linearizable."""


@dataclass(frozen=True)
class Compare:
    """Holds when the record's mod_revision equals ``revision`` (0: the record is absent)."""

    ns: str
    key: str
    revision: int

    def __post_init__(self) -> None:
        check_name(self.ns, "ns", NS_MAX_CHARS)
        check_name(self.key, "key", KEY_MAX_CHARS)
        if not isinstance(self.revision, int) or isinstance(self.revision, bool) or self.revision < 0:
            raise CommandError("bad_field", "field 'revision' of a compare must be an integer >= 0")


TXN_OPS_MAX = 64


@dataclass(frozen=True)
class Txn:
    """etcd-style transaction: if every compare holds, apply ``success``, else ``failure``;
    all of it at one revision, atomically."""

    compare: tuple[Compare, ...]
    success: tuple[Put | Delete, ...]
    failure: tuple[Put | Delete, ...] = ()

    def __post_init__(self) -> None:
        if len(self.compare) + len(self.success) + len(self.failure) > TXN_OPS_MAX:
            raise CommandError("too_large", f"a txn takes at most {TXN_OPS_MAX} compares and operations")


Command = Put | Delete | CompareAndSet | Barrier | Txn

_OPS: dict[str, tuple[type, tuple[str, ...]]] = {
    "put": (Put, ("ns", "key", "value")),
    "delete": (Delete, ("ns", "key")),
    "cas": (CompareAndSet, ("ns", "key", "expected_revision", "value")),
    "barrier": (Barrier, ()),
}
_OP_OF = {cls: op for op, (cls, _) in _OPS.items()}


def _decode_txn(obj: dict[str, Any]) -> Txn:
    def ops(field: str) -> tuple[Put | Delete, ...]:
        raw = obj.get(field, [])
        if not isinstance(raw, list):
            raise CommandError("bad_field", f"txn field {field!r} must be a list")
        out: list[Put | Delete] = []
        for i, o in enumerate(raw):
            cmd = decode_command(o)
            if not isinstance(cmd, Put | Delete):
                raise CommandError("bad_field", f"txn {field}[{i}] must be a put or delete")
            out.append(cmd)
        return tuple(out)

    raw_cmp = obj.get("compare", [])
    if not isinstance(raw_cmp, list):
        raise CommandError("bad_field", "txn field 'compare' must be a list")
    compares = []
    for i, c in enumerate(raw_cmp):
        if not isinstance(c, dict) or set(c) != {"ns", "key", "revision"}:
            raise CommandError("bad_field", f"txn compare[{i}] must be an object with ns, key and revision")
        compares.append(Compare(c["ns"], c["key"], c["revision"]))
    extra = set(obj) - {"op", "compare", "success", "failure"}
    if extra:
        raise CommandError("bad_field", f"op 'txn' does not take field(s) {sorted(extra)}")
    return Txn(tuple(compares), ops("success"), ops("failure"))


def decode_command(obj: Any) -> Command:
    if not isinstance(obj, dict):
        raise CommandError("bad_command", "a command must be a JSON object")
    op = obj.get("op")
    if op == "txn":
        return _decode_txn(obj)
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
    if isinstance(cmd, Txn):
        return {
            "op": "txn",
            "compare": [{"ns": c.ns, "key": c.key, "revision": c.revision} for c in cmd.compare],
            "success": [command_to_json(o) for o in cmd.success],
            "failure": [command_to_json(o) for o in cmd.failure],
        }
    out: dict[str, Any] = {"op": _OP_OF[type(cmd)]}
    out.update({k: getattr(cmd, k) for k in _OPS[out["op"]][1]})
    return out


def encode_command(cmd: Command) -> bytes:
    return jsoncodec.dumps(command_to_json(cmd), sort_keys=True)


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
    if isinstance(cmd, Txn):
        return _txn(cmd, revision, read)
    raise AssertionError(f"unhandled command {cmd!r}")


def _txn(cmd: Txn, revision: int, read: ReadFn) -> Outcome:
    def holds(c: Compare) -> bool:
        rec = read(c.ns, c.key)
        return (rec.mod_revision if rec is not None else 0) == c.revision

    succeeded = all(holds(c) for c in cmd.compare)
    ops = cmd.success if succeeded else cmd.failure
    # Every operation of one txn shares one new revision, and later ones see earlier ones.
    pending: dict[tuple[str, str], Record | None] = {}

    def view(ns: str, key: str) -> Record | None:
        return pending[(ns, key)] if (ns, key) in pending else read(ns, key)

    rev = revision + 1
    for op in ops:
        current = view(op.ns, op.key)
        if isinstance(op, Put):
            pending[(op.ns, op.key)] = Record(
                value=op.value,
                create_revision=current.create_revision if current else rev,
                mod_revision=rev,
                version=(current.version + 1) if current else 1,
            )
        elif current is not None:
            pending[(op.ns, op.key)] = None
    changed = tuple((ns, key, rec) for (ns, key), rec in pending.items())
    new_rev = rev if changed else revision
    return Outcome({"ok": True, "succeeded": succeeded, "revision": new_rev}, changed, new_rev)


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
