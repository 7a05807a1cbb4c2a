"""One log entry applied to the replicated state: the dispatch every store uses.

``apply(index, payload, view)`` decides, for the entry at Raft ``index``:

- idempotency: an index at or below the view's applied index is a replay and changes nothing
  (a restart replays the log over a state that may already hold it);
- what the payload is: a KV command (``statemachine``) or an engine command (``{"op": "engine",
  "now_ms", "cmd"}``), or neither (a refusal that every replica makes the same way);
- the writes, which the store commits atomically together with ``index``.

Pure: the view is read, never written; the caller persists the :class:`Outcome`.

Two kinds of failure, told apart here once:

- a failure of *this node*: out of memory, the recursion limit, or anything raised by the
  view's storage while it is read (wrapped in :class:`NodeFailure`). It is raised, so the node
  stops (and replays the entry after a restart) instead of carrying on with a state its peers
  do not have;
- anything else raised while decoding or applying the command is a property of the entry, which
  every replica holds byte for byte: a bug they all hit identically. It is answered as a
  deterministic ``internal`` refusal that changes nothing (an engine that failed midway is
  rebuilt from the records it had: ``Outcome.reset_engine``), so one malformed entry cannot stop
  every replica in turn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.core.engine.commands import Command as EngineCommand
from tetherlab.cluster.core.engine.commands import decode_command as decode_engine_command
from tetherlab.cluster.core.engine.engine import Engine
from tetherlab.cluster.core.errors import CommandError
from tetherlab.cluster.protocol import jsoncodec

log = logging.getLogger("tetherlab.apply")

EngineWrite = tuple[str, str, bytes | None]



class NodeFailure(RuntimeError):
    """Returned when this node's storage failed while an entry was applied (not the entry's fault)."""


# A failure of this process, not of the entry: re-raised so the node stops (its peers carry on).
NODE_FAILURES = (MemoryError, RecursionError, OSError, NodeFailure)


class StateView(Protocol):
    """What apply reads: the applied index, the KV revision and records, the live engine."""

    engine: Engine

    def applied_index_now(self) -> int: ...

    def revision_now(self) -> int: ...

    def read(self, ns: str, key: str) -> sm.Record | None: ...


@dataclass(frozen=True)
class Outcome:
    index: int
    result: dict[str, Any]  # what the proposer gets back; carries "index"
    kv_writes: tuple[sm.Write, ...] = ()
    engine_writes: tuple[EngineWrite, ...] = ()
    revision: int = 0  # the KV revision after this entry
    command: sm.Command | None = None  # the decoded KV command (None for engine and bad entries)
    replayed: bool = False  # at or below the applied index: nothing to write, not even the index
    reset_engine: bool = False  # the engine failed mid-command: rebuild it from the stored records

    @property
    def engine_only(self) -> bool:
        """Changed no key-value record and left the engine whole: its result may be handed out
        before the state's commit (Store.flush_applied)."""
        return not self.kv_writes and not self.reset_engine


def _internal(index: int, revision: int, what: str) -> Outcome:
    log.exception("%s failed on raft index %d; every replica refuses it the same way", what, index)
    err = CommandError("internal", f"the {what} failed on this command; nothing changed")
    return Outcome(index, {**err.to_json(), "index": index}, revision=revision)


def apply(index: int, payload: bytes, view: StateView,
          decoded: tuple[int, EngineCommand] | None = None) -> Outcome:
    """``decoded``: the (now_ms, command) this node encoded into ``payload`` when it proposed it
    (replica.store.ProposedCommands): applied instead of decoding the same bytes again, which
    costs about a quarter of an entry's apply. Bytes that ``encode_engine`` made from a command
    decode to an equal command (tests/unit/test_proposed_commands.py), so every replica applies
    the same command either way."""
    try:
        applied = view.applied_index_now()
        revision = view.revision_now()
    except NODE_FAILURES:
        raise
    except Exception as e:
        raise NodeFailure(f"cannot read the applied index: {e}") from e
    if index <= applied:
        return Outcome(index, {"ok": True, "replayed": True, "index": index}, replayed=True, revision=revision)
    if decoded is not None:
        return _apply_engine_command(index, decoded[0], decoded[1], view, revision)
    obj: Any = None
    parse_error: str | None = None
    try:
        obj = jsoncodec.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # the same bytes on every replica
        parse_error = str(e) or type(e).__name__
    if isinstance(obj, dict) and obj.get("op") == "engine":
        return _apply_engine(index, obj, view, revision)
    try:
        if parse_error is not None:
            raise CommandError("bad_json", f"command is not JSON: {parse_error}")
        cmd = sm.decode_command(obj)
    except CommandError as e:
        return Outcome(index, {**e.to_json(), "index": index}, revision=revision)
    except NODE_FAILURES:
        raise
    except Exception:
        return _internal(index, revision, "command decoder")

    def read(ns: str, key: str) -> sm.Record | None:
        try:
            return view.read(ns, key)
        except NODE_FAILURES:
            raise
        except Exception as e:  # the storage of this node, not the command
            raise NodeFailure(f"cannot read {ns}/{key}: {e}") from e

    try:
        out = sm.apply(cmd, revision=revision, read=read)
    except NODE_FAILURES:
        raise
    except Exception:
        return _internal(index, revision, "state machine")
    return Outcome(index, {**out.result, "index": index}, kv_writes=out.writes, revision=out.revision, command=cmd)


def _apply_engine(index: int, obj: dict[str, Any], view: StateView, revision: int) -> Outcome:
    now_ms = obj.get("now_ms")
    if not isinstance(now_ms, int) or isinstance(now_ms, bool) or now_ms < 0:
        err = CommandError("bad_field", "engine command needs an integer 'now_ms' (the leader's clock)")
        return Outcome(index, {**err.to_json(), "index": index}, revision=revision)
    try:
        cmd = decode_engine_command(obj.get("cmd"))
    except CommandError as e:
        return Outcome(index, {**e.to_json(), "index": index}, revision=revision)
    except NODE_FAILURES:
        raise
    except Exception:
        return _internal(index, revision, "command decoder")
    return _apply_engine_command(index, now_ms, cmd, view, revision)


def _apply_engine_command(index: int, now_ms: int, cmd: EngineCommand, view: StateView, revision: int) -> Outcome:
    try:
        applied = view.engine.apply(cmd, index=index, now_ms=now_ms)
    except NODE_FAILURES:
        raise
    except Exception:
        out = _internal(index, revision, "engine")
        return Outcome(index, out.result, revision=revision, reset_engine=True)
    return Outcome(index, {**applied.result, "index": index}, engine_writes=tuple(applied.writes), revision=revision)
