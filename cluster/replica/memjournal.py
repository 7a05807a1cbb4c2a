"""The Raft journal in memory: the twin of :class:`~tetherlab.cluster.replica.journal.LmdbJournal`.

Same interface (pysyncobj's ``Journal`` plus ``flush``, ``dirty``, ``durable_last_index``,
``read_range``, ``stats``)
and the same durability rule, passing the same conformance tests
(tests/unit/test_journal_conformance.py): every change is pending until :meth:`flush` makes
all of them durable at once (LMDB's commit of the open write transaction); term and vote are
flushed before :meth:`setCurrentTerm` returns; a new commit index flushes pending entries.
:meth:`crash` drops everything pending, as a crash of the machine would.

For the simulator: ``step(name)`` runs before each durable step (a simulator raises from it to
crash the machine at exactly that point), and ``fsync_enabled = False`` turns flushes into
no-ops whose data the OS writes back only when :meth:`writeback` runs (the ``journal-nofsync``
fault the simulator must catch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from pysyncobj.journal import Journal

from tetherlab.cluster.replica.journal import NOOP_COMMAND, Entry, JournalError


class _Image:
    __slots__ = ("commit", "entries", "term", "vote")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.term = 0
        self.vote: str | None = None
        self.commit = 1

    def copy(self) -> _Image:
        c = _Image()
        c.entries = list(self.entries)
        c.term, c.vote, c.commit = self.term, self.vote, self.commit
        return c


class JournalDead(RuntimeError):
    """Returned when a crashed machine's journal is used before the machine restarts."""


class MemoryJournal(Journal):
    def __init__(self, seed_index: int = 1, seed_term: int = 0,
                 step: Callable[[str], None] | None = None) -> None:
        self._live = _Image()
        self._durable = _Image()
        self._dirty = False
        self._dirty_entries = False
        self.step = step
        self.fsync_enabled = True
        self.dead = False
        self.fsyncs = 0
        self._durable_last = 0  # see durable_last_index
        self.add(NOOP_COMMAND, seed_index, seed_term if seed_index > 1 else 0)
        self.flush()

    # --- crash model --------------------------------------------------------------------------

    def crash(self) -> None:
        """Lose everything not flushed; the journal refuses work until :meth:`revive`."""
        self._live = self._durable.copy()
        self._dirty = self._dirty_entries = False
        self._durable_last = self.last_index or 0
        self.dead = True

    def revive(self) -> None:
        self.dead = False

    def writeback(self) -> None:
        """The OS writing dirty pages back on its own (only matters with ``fsync_enabled`` off)."""
        if not self.dead:
            self._durable = self._live.copy()

    def durable_last_index(self) -> int:
        """The last index up to which the log, as it stands, is durable as far as this journal
        knows (what :meth:`flush` made durable, less what was truncated since); 0 when none is.
        With ``fsync_enabled`` off it believes its flushes, as a journal on a lying disk would."""
        return min(self._durable_last, self.last_index or 0)

    def _alive(self) -> None:
        if self.dead:
            raise JournalDead("the machine holding this journal crashed")

    # --- write path -----------------------------------------------------------------------------

    def flush(self) -> None:
        self._alive()
        if not self._dirty:
            return
        if self.step is not None:
            self.step("journal_flush")
        if self.fsync_enabled:
            self._durable = self._live.copy()
            self.fsyncs += 1
        self._dirty = self._dirty_entries = False
        self._durable_last = self.last_index or 0

    @property
    def dirty(self) -> bool:
        return self._dirty

    @property
    def last_index(self) -> int | None:
        e = self._live.entries
        return e[-1][1] if e else None

    def add(self, command: Any, idx: int, term: int) -> None:
        self._alive()
        e = self._live.entries
        if e and idx != e[-1][1] + 1:
            raise JournalError(f"append of index {idx} after {e[-1][1]}: the log must stay contiguous")
        e.append((bytes(command), idx, term))
        self._dirty = self._dirty_entries = True

    def clear(self) -> None:
        self._alive()
        self._live.entries = []
        self._durable_last = 0
        self._dirty = self._dirty_entries = True

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        """Drop entries from list position ``entryFrom`` to the end (a conflicting suffix)."""
        self._alive()
        if entryFrom < 0 or entryFrom >= len(self._live.entries):
            return
        del self._live.entries[entryFrom:]
        self._durable_last = min(self._durable_last, self.last_index or 0)
        self._dirty = self._dirty_entries = True

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Drop entries before list position ``entryTo`` (compaction after a snapshot)."""
        self._alive()
        if entryTo <= 0 or not self._live.entries:
            return
        del self._live.entries[:entryTo]
        self._dirty = self._dirty_entries = True

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        self._alive()
        if raftCommitIndex == self._live.commit:
            return
        self._live.commit = raftCommitIndex
        self._dirty = True
        # Like LmdbJournal: a node (a leader about to apply) must not apply what is not durable.
        if self._dirty_entries and self.flush_on_commit:
            self.flush()

    flush_on_commit = True  # the simulator's leader-unflushed-commit fault turns it off

    def getRaftCommitIndex(self) -> int:
        return self._live.commit

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        self._alive()
        self._live.term = term
        self._live.vote = None if votedForNodeId is None else str(votedForNodeId)
        self._dirty = True
        self.flush()  # Raft: term and vote are durable before anything reflects them

    def getCurrentTerm(self) -> int:
        return self._live.term

    def getVotedForNodeId(self) -> str | None:
        return self._live.vote

    def onOneSecondTimer(self) -> None:
        self.flush()

    def _destroy(self) -> None:
        if not self.dead:
            self.flush()

    # --- read path --------------------------------------------------------------------------------

    def read_range(self, start: int, stop: int) -> list[Entry]:
        """Entries with Raft index in [start, stop)."""
        e = self._live.entries
        if not e or start >= stop:
            return []
        first = e[0][1]
        return e[max(0, start - first): max(0, stop - first)]

    def __len__(self) -> int:
        return len(self._live.entries)

    def __getitem__(self, item: int | slice) -> Any:
        if isinstance(item, slice):
            if item.step not in (None, 1):
                raise JournalError("stepped slices of the log are not supported")
            return self._live.entries[item]
        return self._live.entries[item]

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._live.entries))

    def stats(self) -> dict[str, int]:
        e = self._live.entries
        return {
            "first_index": e[0][1] if e else 0,
            "last_index": e[-1][1] if e else 0,
            "entries": len(e),
            "current_term": self._live.term,
            "commit_index": self._live.commit,
            "fsyncs": self.fsyncs,
        }

    def durable_entries(self) -> list[Entry]:
        """What a crash now would leave (for checkers)."""
        return list(self._durable.entries)
