"""The state store: where a replica keeps the replicated state, and its snapshot file format.

:class:`Store` is what the Raft adapter and the node need from it. Two implementations pass the
same conformance tests (tests/unit/test_store_conformance.py):

- :class:`~tetherlab.cluster.replica.lmdbstore.LmdbStore`: LMDB on disk (production);
- :class:`~tetherlab.cluster.replica.memstore.MemoryStore`: in memory, with an explicit
  durable/volatile split so a simulated crash loses exactly what was not synced.

Both apply through :func:`tetherlab.cluster.core.apply.apply` and commit each entry's writes
together with its Raft index, so replaying the log after a restart changes nothing.

Snapshot file: ``MAGIC (8 bytes) | header length (4 bytes, big-endian) | header (JSON) | body``;
the magic names the body's format (an LMDB data file, or the memory store's JSON).
"""

from __future__ import annotations

import base64
import json
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.core.apply import Outcome
from tetherlab.cluster.core.engine.commands import Command as EngineCommand
from tetherlab.cluster.core.engine.engine import Engine
from tetherlab.cluster.replica.files import Files, OsFiles

_HDR_LEN = struct.Struct(">I")
MAGIC_LEN = 8
# Commands proposed here and not yet applied here: a few hundred at saturation. Beyond this
# (a leader deposed with entries it never applied) the oldest go, and decode as any entry does.
PROPOSED_MAX = 1024

OnApply = Callable[[Outcome], None]


class ProposedCommands:
    """Engine commands this node proposed, by the exact bytes of their log entry, until its own
    apply takes them: the proposer built and checked each command before encoding it, and
    decoding the bytes again (JSON and every field check) was about a quarter of the apply. Put
    on the event loop, taken on the Raft thread; a follower has none and takes nothing."""

    def __init__(self, capacity: int = PROPOSED_MAX) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()  # put and take run on different threads
        self._by_payload: dict[bytes, tuple[int, EngineCommand]] = {}

    def put(self, payload: bytes, now_ms: int, cmd: EngineCommand) -> None:
        with self._lock:
            self._by_payload[payload] = (now_ms, cmd)
            while len(self._by_payload) > self.capacity:
                del self._by_payload[next(iter(self._by_payload))]

    def take(self, payload: bytes) -> tuple[int, EngineCommand] | None:
        # A follower's case, without the lock: an entry's put comes before its proposal, so a
        # leader's map is never empty when that entry is applied.
        if not self._by_payload:
            return None
        with self._lock:
            return self._by_payload.pop(payload, None)

    def __len__(self) -> int:
        return len(self._by_payload)


class SnapshotError(RuntimeError):
    """Returned when a snapshot file is not one of ours, is truncated, or is of another store."""


class Store(Protocol):
    on_apply: OnApply | None
    proposed: ProposedCommands  # what this node proposed, for its apply to skip decoding

    @property
    def applied_index(self) -> int: ...

    @property
    def revision(self) -> int: ...

    def apply(self, index: int, payload: bytes) -> dict[str, Any]:
        """Apply the entry at Raft ``index`` (a replayed index changes nothing); its result."""
        ...

    def get(self, ns: str, key: str) -> sm.Record | None: ...

    def scan(self, ns: str, after: str = "", limit: int = 100) -> list[tuple[str, sm.Record]]: ...

    def engine_view(self, fn: Callable[[Engine], Any]) -> Any:
        """Run a read-only query on the engine, excluded from concurrent applies."""
        ...

    def engine_peek(self, fn: Callable[[Engine], Any]) -> Any:
        """Run ``fn`` on the engine without waiting for an apply in progress: for reads of
        immutable objects whose users check what they got later (the match basis: apply checks
        its versions), never for anything answered to a client."""
        ...

    def dump(self) -> dict[str, Any]:
        """The whole replicated state as plain data (to compare replicas)."""
        ...

    def sync(self) -> None:
        """Make every applied entry durable."""
        ...

    def flush_applied(self, before_commit: Callable[[], None] | None = None) -> None:
        """Commit (durably) what was applied since the last flush; the Raft node calls it once per
        tick, and hands the results of those entries out in ``before_commit``.

        ``before_commit`` runs before the commit when no entry of the batch wrote a key-value
        record (or reset the engine): engine state is read from memory, which already holds the
        batch, and a node that crashes before the commit replays the entries from its log (the
        commit index never passes the log's durable end, and the log is compacted only after a
        snapshot of a synced state). The commit's fsync then overlaps the replies. Otherwise it
        runs after the commit: key-value records are read from the store by other threads (a
        revoked key must be gone before anyone hears it was revoked)."""
        ...

    def close(self) -> None: ...

    def write_snapshot(self, path: Path, header: dict[str, Any]) -> dict[str, Any]:
        """Write a consistent, fsynced copy of the state to ``path``; the header written."""
        ...

    def install_snapshot(self, path: Path, force: bool = False) -> bool:
        """Replace the state with the snapshot's if it is newer (or ``force``); True if replaced."""
        ...

    def read_snapshot_header(self, path: Path) -> tuple[dict[str, Any], int]:
        """(header, offset of the body) of one of this store's snapshot files."""
        ...


def write_header(out: Any, magic: bytes, header: dict[str, Any]) -> None:
    assert len(magic) == MAGIC_LEN
    hdr = json.dumps(header, sort_keys=True).encode()
    out.write(magic + _HDR_LEN.pack(len(hdr)) + hdr)


def read_snapshot_header(path: Path, magic: bytes | None = None,
                         files: Files | None = None) -> tuple[dict[str, Any], int, bytes]:
    """(header, offset of the body, magic) of a snapshot file; ``magic`` checks its format."""
    with (files or OsFiles()).open(str(path), "rb") as f:
        head = f.read(MAGIC_LEN + _HDR_LEN.size)
        if len(head) < MAGIC_LEN + _HDR_LEN.size or not head.startswith(b"TLSNAP"):
            raise SnapshotError(f"{path} is not a Tetherlab snapshot")
        found = head[:MAGIC_LEN]
        if magic is not None and found != magic:
            raise SnapshotError(f"{path} is a {found!r} snapshot, not {magic!r}")
        (n,) = _HDR_LEN.unpack_from(head, MAGIC_LEN)
        raw = f.read(n)
        if len(raw) != n:
            raise SnapshotError(f"{path} is truncated")
        return json.loads(raw), len(head) + n, found


def entry_to_json(entry: tuple[bytes, int, int]) -> list[Any]:
    return [base64.b64encode(bytes(entry[0])).decode(), entry[1], entry[2]]


def entry_from_json(obj: list[Any]) -> tuple[bytes, int, int]:
    return (base64.b64decode(obj[0]), int(obj[1]), int(obj[2]))
