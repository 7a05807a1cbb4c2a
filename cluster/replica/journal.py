"""The Raft log, current term, vote and commit index of pysyncobj, kept in LMDB.

pysyncobj's own FileJournal never fsyncs and keeps the whole log in a Python list. This
journal keeps entries only in LMDB and reads them back on demand (a bounded cache holds the
last few), and it makes promises durable with *group commit*:

- every change (append, truncate, commit index) goes into one open LMDB write transaction;
- :meth:`LmdbJournal.flush` commits that transaction with fsync; the durable transport calls
  it before any message leaves the node, so a vote or an append acknowledgement is never sent
  for something that is not on disk, and all the entries written since the last message share
  one fsync;
- term and vote are flushed before :meth:`setCurrentTerm` returns;
- :meth:`LmdbJournal.durable_last_index` is the last index up to which the log is durable as it
  stands (a leader sends its entries before its own fsync and counts itself toward a commit only
  up to there: patch ``leader_commit_durable``).

All methods except the ``stats`` counters are called from pysyncobj's tick thread only: the
open write transaction belongs to that thread.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
from pysyncobj.journal import Journal

Entry = tuple[bytes, int, int]  # (command, raft index, term), pysyncobj's entry shape

_IDX = struct.Struct(">Q")  # big-endian so LMDB key order is index order
_TERM = struct.Struct(">Q")
_CACHE_ENTRIES_MAX = 1024  # recently written entries are read back at once by the leader's sends

NOOP_COMMAND = b"\x01"  # pysyncobj's _COMMAND_TYPE.NO_OP
META_TERM = b"current_term"
META_VOTE = b"voted_for"
META_COMMIT = b"commit_index"


class JournalError(RuntimeError):
    """Returned when the on-disk log breaks a Raft invariant (a gap, a corrupt record)."""


class LmdbJournal(Journal):
    def __init__(
        self,
        path: str | Path,
        map_size_bytes: int = 1 << 30,
        on_fsync: Callable[[float], None] | None = None,
        seed_index: int = 1,
        seed_term: int = 0,
    ) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # sync=True: a committed write transaction is fsynced (data, then meta page).
        self.env = lmdb.open(
            str(self.path), map_size=map_size_bytes, max_dbs=4, sync=True, metasync=True, readahead=False
        )
        self._log = self.env.open_db(b"log")
        self._meta = self.env.open_db(b"meta")
        self._txn: lmdb.Transaction | None = None
        self._txn_thread = 0
        self._dirty_entries = False
        self._on_fsync = on_fsync
        self._cache: OrderedDict[int, Entry] = OrderedDict()
        self._durable_last = 0  # see durable_last_index
        self.fsyncs = 0
        self.lock = threading.Lock()  # held while a flush runs, so a reader never sees half a state

        with self.env.begin() as txn:
            cur = txn.cursor(self._log)
            self._first: int | None = _IDX.unpack(cur.key())[0] if cur.first() else None
            self._last: int | None = _IDX.unpack(cur.key())[0] if cur.last() else None
            self._term = _int(txn.get(META_TERM, db=self._meta), 0)
            vote = txn.get(META_VOTE, db=self._meta)
            self._vote: str | None = vote.decode() if vote else None
            self._commit = _int(txn.get(META_COMMIT, db=self._meta), 1)
        if self._first is not None and self._last is not None:
            with self.env.begin() as txn:
                n = txn.stat(self._log)["entries"]
            if n != self._last - self._first + 1:
                raise JournalError(
                    f"{self.path}: log has {n} entries between {self._first} and {self._last}: a gap"
                )

        if self._first is None:
            # pysyncobj seeds an empty log with a no-op at index 1 from its constructor's
            # thread; seed it here and commit, so no write transaction outlives that thread.
            # A restored node's log starts right after its snapshot (seed_index > 1).
            self.add(NOOP_COMMAND, seed_index, seed_term if seed_index > 1 else 0)
            self.flush()
        self._durable_last = self._last or 0

    # --- write path -------------------------------------------------------------------------

    def _w(self) -> lmdb.Transaction:
        if self._txn is None:
            self._txn = self.env.begin(write=True)
            self._txn_thread = threading.get_ident()
        elif self._txn_thread != threading.get_ident():
            # LMDB write transactions belong to one thread; another would deadlock on the lock.
            raise JournalError("journal written from two threads")
        return self._txn

    def flush(self) -> None:
        """Make every promise written so far durable (one fsync for all of them)."""
        txn = self._txn
        if txn is None:
            return
        with self.lock:
            t0 = time.perf_counter()
            txn.commit()
            self._txn = None
            self._dirty_entries = False
            self._durable_last = self._last or 0
            self.fsyncs += 1
            if self._on_fsync is not None:
                self._on_fsync(time.perf_counter() - t0)

    @property
    def dirty(self) -> bool:
        return self._txn is not None

    def durable_last_index(self) -> int:
        """The last index up to which the log, as it stands, is durable: entries after it were
        written (or rewritten after a truncation) since the last flush; 0 when none is."""
        return min(self._durable_last, self._last or 0)

    @property
    def last_index(self) -> int | None:
        return self._last

    def add(self, command: Any, idx: int, term: int) -> None:
        if self._last is not None and idx != self._last + 1:
            raise JournalError(f"append of index {idx} after {self._last}: the log must stay contiguous")
        command = bytes(command)
        self._w().put(_IDX.pack(idx), _TERM.pack(term) + command, db=self._log)
        if self._first is None:
            self._first = idx
        self._last = idx
        self._dirty_entries = True
        self._remember(idx, (command, idx, term))

    def clear(self) -> None:
        txn = self._w()
        txn.drop(self._log, delete=False)
        self._first = self._last = None
        self._durable_last = 0
        self._cache.clear()
        self._dirty_entries = True

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        """Drop entries from list position ``entryFrom`` to the end (a conflicting suffix)."""
        if self._first is None or self._last is None or entryFrom < 0:
            return
        start = self._first + entryFrom
        if start > self._last:
            return
        txn = self._w()
        for idx in range(self._last, start - 1, -1):
            txn.delete(_IDX.pack(idx), db=self._log)
            self._cache.pop(idx, None)
        self._last = start - 1
        self._durable_last = min(self._durable_last, self._last)
        if self._last < self._first:
            self._first = self._last = None
        self._dirty_entries = True

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Drop entries before list position ``entryTo`` (compaction after a snapshot)."""
        if self._first is None or self._last is None or entryTo <= 0:
            return
        end = min(self._first + entryTo, self._last + 1)  # exclusive
        txn = self._w()
        for idx in range(self._first, end):
            txn.delete(_IDX.pack(idx), db=self._log)
            self._cache.pop(idx, None)
        self._first = end if end <= self._last else None
        if self._first is None:
            self._last = None
        self._dirty_entries = True

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        if raftCommitIndex == self._commit:
            return
        self._commit = raftCommitIndex
        self._w().put(META_COMMIT, str(raftCommitIndex).encode(), db=self._meta)
        # A single node (or a leader about to apply) must not apply what is not yet durable.
        if self._dirty_entries:
            self.flush()

    def getRaftCommitIndex(self) -> int:
        return self._commit

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        self._term = term
        self._vote = None if votedForNodeId is None else str(votedForNodeId)
        txn = self._w()
        txn.put(META_TERM, str(term).encode(), db=self._meta)
        if self._vote is None:
            txn.delete(META_VOTE, db=self._meta)
        else:
            txn.put(META_VOTE, self._vote.encode(), db=self._meta)
        self.flush()  # Raft: term and vote are durable before anything reflects them

    def getCurrentTerm(self) -> int:
        return self._term

    def getVotedForNodeId(self) -> str | None:
        return self._vote

    def onOneSecondTimer(self) -> None:
        self.flush()

    def _destroy(self) -> None:
        self.flush()
        self.env.close()

    # --- read path --------------------------------------------------------------------------

    def _remember(self, idx: int, entry: Entry) -> None:
        self._cache[idx] = entry
        if len(self._cache) > _CACHE_ENTRIES_MAX:
            self._cache.popitem(last=False)

    def _read(self, idx: int) -> Entry:
        hit = self._cache.get(idx)
        if hit is not None:
            return hit
        raw = self._get_raw(idx)
        if raw is None:
            raise JournalError(f"log entry {idx} missing between {self._first} and {self._last}")
        return (bytes(raw[8:]), idx, _TERM.unpack_from(raw)[0])

    def _get_raw(self, idx: int) -> bytes | None:
        if self._txn is not None:
            return self._txn.get(_IDX.pack(idx), db=self._log)
        with self.env.begin() as txn:
            return txn.get(_IDX.pack(idx), db=self._log)

    def read_range(self, start: int, stop: int) -> list[Entry]:
        """Entries with Raft index in [start, stop), read with one cursor."""
        out: list[Entry] = []
        if start >= stop:
            return out
        if all(i in self._cache for i in (start, stop - 1)) and stop - start <= len(self._cache):
            try:
                return [self._cache[i] for i in range(start, stop)]
            except KeyError:
                out = []
        own = self._txn is None
        txn = self.env.begin() if own else self._txn
        assert txn is not None
        try:
            cur = txn.cursor(self._log)
            if cur.set_key(_IDX.pack(start)):
                for key, raw in cur:
                    idx = _IDX.unpack(key)[0]
                    if idx >= stop:
                        break
                    out.append((bytes(raw[8:]), idx, _TERM.unpack_from(raw)[0]))
        finally:
            if own:
                txn.abort()
        return out

    def __len__(self) -> int:
        if self._first is None or self._last is None:
            return 0
        return self._last - self._first + 1

    def __getitem__(self, item: int | slice) -> Any:
        n = len(self)
        if isinstance(item, slice):
            start, stop, step = item.indices(n)
            if step != 1:
                raise JournalError("stepped slices of the log are not supported")
            if self._first is None or start >= stop:
                return []
            return LogSlice(self, self._first + start, self._first + stop)
        if item < 0:
            item += n
        if not 0 <= item < n or self._first is None:
            raise IndexError("log position out of range")
        return self._read(self._first + item)

    def stats(self) -> dict[str, int]:
        return {
            "first_index": self._first or 0,
            "last_index": self._last or 0,
            "entries": len(self),
            "current_term": self._term,
            "commit_index": self._commit,
            "fsyncs": self.fsyncs,
        }


class LogSlice:
    """A lazy view of log entries [start, stop): pysyncobj slices the log to the end and then
    reads only as far as one batch, so materialising the whole tail would be wasted work."""

    def __init__(self, journal: LmdbJournal, start: int, stop: int) -> None:
        self._j = journal
        self._start = start
        self._stop = stop

    def __len__(self) -> int:
        return self._stop - self._start

    def __bool__(self) -> bool:
        return self._stop > self._start

    def __iter__(self) -> Iterator[Entry]:
        chunk = 256  # bounded reads: a lagging follower's tail is read a chunk at a time
        pos = self._start
        while pos < self._stop:
            end = min(pos + chunk, self._stop)
            yield from self._j.read_range(pos, end)
            pos = end

    def __getitem__(self, item: int | slice) -> Any:
        n = len(self)
        if isinstance(item, slice):
            start, stop, step = item.indices(n)
            if step != 1:
                raise JournalError("stepped slices of the log are not supported")
            return self._j.read_range(self._start + start, self._start + stop)
        if item < 0:
            item += n
        if not 0 <= item < n:
            raise IndexError("log slice position out of range")
        return self._j._read(self._start + item)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LogSlice | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable view, like a list

    def __reversed__(self) -> Iterator[Entry]:
        return reversed(self._j.read_range(self._start, self._stop))


def _int(raw: bytes | None, default: int) -> int:
    return int(raw) if raw else default


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
