"""The Raft journal's contract, run against both implementations: LMDB (production) and the
in-memory twin (simulation). A *crash* loses what was not flushed: for LMDB the open write
transaction is aborted and the files reopened (the process-level crash tests are in
test_journal.py); the twin's ``crash()`` does the same to its image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tetherlab.cluster.replica.journal import NOOP_COMMAND, JournalError, LmdbJournal
from tetherlab.cluster.replica.memjournal import MemoryJournal


class Twin:
    """Opens a journal of one kind, and crashes and reopens it."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind, self.path = kind, path
        self.j: Any = LmdbJournal(path) if kind == "lmdb" else MemoryJournal()

    def crash(self) -> Any:
        if self.kind == "lmdb":
            if self.j._txn is not None:
                self.j._txn.abort()
                self.j._txn = None
            self.j.env.close()
            self.j = LmdbJournal(self.path)
        else:
            self.j.crash()
            self.j.revive()
        return self.j


Factory = Callable[[], Twin]


@pytest.fixture(params=["lmdb", "memory"])
def journal(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    return lambda: Twin(request.param, tmp_path / "j")


def entries(j: Any) -> list[tuple[bytes, int, int]]:
    return [tuple(e) for e in j[0:]]  # type: ignore[misc]


def test_a_new_journal_holds_pysyncobjs_no_op_durably(journal: Factory) -> None:
    t = journal()
    assert entries(t.j) == [(NOOP_COMMAND, 1, 0)] and t.j.getRaftCommitIndex() == 1
    assert entries(t.crash()) == [(NOOP_COMMAND, 1, 0)]


def test_entries_are_durable_only_once_flushed(journal: Factory) -> None:
    t = journal()
    t.j.add(b"a", 2, 1)
    t.j.add(b"b", 3, 1)
    assert t.j.dirty and len(t.j) == 3
    assert entries(t.crash()) == [(NOOP_COMMAND, 1, 0)]
    t.j.add(b"a", 2, 1)
    t.j.flush()
    assert not t.j.dirty
    assert entries(t.crash())[-1] == (b"a", 2, 1)


def test_term_and_vote_are_durable_when_set(journal: Factory) -> None:
    t = journal()
    t.j.setCurrentTerm(7, "10.0.0.1:7100")
    j = t.crash()
    assert (j.getCurrentTerm(), j.getVotedForNodeId()) == (7, "10.0.0.1:7100")
    j.setCurrentTerm(8, None)
    j = t.crash()
    assert (j.getCurrentTerm(), j.getVotedForNodeId()) == (8, None)


def test_a_new_commit_index_flushes_the_entries_it_covers(journal: Factory) -> None:
    t = journal()
    t.j.add(b"a", 2, 1)
    t.j.setRaftCommitIndex(2)
    j = t.crash()
    assert j.getRaftCommitIndex() == 2 and entries(j)[-1] == (b"a", 2, 1)


def test_the_durable_index_is_how_far_the_log_as_it_stands_is_flushed(journal: Factory) -> None:
    # A leader counts itself toward a commit only up to here (patch leader_commit_durable).
    t = journal()
    assert t.j.durable_last_index() == 1
    t.j.add(b"a", 2, 1)
    t.j.add(b"b", 3, 1)
    assert t.j.durable_last_index() == 1  # written, not flushed
    t.j.flush()
    assert t.j.durable_last_index() == 3
    t.j.deleteEntriesFrom(2)  # a conflicting suffix from index 3 on
    t.j.add(b"b2", 3, 2)
    assert t.j.durable_last_index() == 2  # the durable entry 3 is not the log's entry 3
    t.j.setCurrentTerm(2, None)  # term and vote are flushed: the whole pending state with them
    assert t.j.durable_last_index() == 3
    t.j.add(b"c", 4, 2)
    t.j.deleteEntriesTo(1)  # compaction does not move it
    assert t.j.durable_last_index() == 3
    j = t.crash()
    assert j.durable_last_index() == 3 and entries(j)[-1] == (b"b2", 3, 2)
    j.clear()  # a snapshot install
    j.add(b"prev", 99, 3)
    j.add(b"last", 100, 3)
    assert j.durable_last_index() == 0
    j.flush()
    assert j.durable_last_index() == 100 and t.crash().durable_last_index() == 100


def test_positions_truncation_and_compaction(journal: Factory) -> None:
    t = journal()
    for i in range(2, 11):
        t.j.add(b"c%d" % i, i, 1)
    t.j.deleteEntriesFrom(5)  # drop raft indexes 6..10 (list position 5 on)
    t.j.add(b"new6", 6, 2)
    t.j.deleteEntriesTo(2)  # compaction: drop raft indexes 1..2
    t.j.flush()
    j = t.crash()
    assert entries(j) == [(b"c3", 3, 1), (b"c4", 4, 1), (b"c5", 5, 1), (b"new6", 6, 2)]
    assert j[-1] == (b"new6", 6, 2) and j[0][1] == 3 and len(j) == 4
    assert list(j[1:3]) == [(b"c4", 4, 1), (b"c5", 5, 1)]
    assert [tuple(e) for e in j.read_range(4, 6)] == [(b"c4", 4, 1), (b"c5", 5, 1)]


def test_clear_and_reseed_like_a_snapshot_install(journal: Factory) -> None:
    t = journal()
    t.j.add(b"x", 2, 1)
    t.j.clear()
    t.j.add(b"prev", 99, 3)
    t.j.add(b"last", 100, 3)
    t.j.flush()
    assert entries(t.crash()) == [(b"prev", 99, 3), (b"last", 100, 3)]


def test_gaps_are_refused(journal: Factory) -> None:
    t = journal()
    with pytest.raises(JournalError, match="contiguous"):
        t.j.add(b"x", 5, 1)


def test_stats_name_the_log_and_the_fsyncs(journal: Factory) -> None:
    t = journal()
    before = t.j.fsyncs
    for i in range(2, 52):
        t.j.add(b"c", i, 1)
    t.j.flush()
    t.j.flush()  # nothing pending: no second fsync (group commit)
    st = t.j.stats()
    assert (st["first_index"], st["last_index"], st["entries"]) == (1, 51, 51)
    assert t.j.fsyncs == before + 1 and t.j.last_index == 51


def test_the_twin_can_leave_fsync_to_the_os() -> None:
    # The journal-nofsync fault: flush does not make anything durable; only a writeback does.
    j = MemoryJournal()
    j.fsync_enabled = False
    j.add(b"a", 2, 1)
    j.flush()
    j.crash()
    j.revive()
    assert len(j) == 1
    j.add(b"a", 2, 1)
    j.writeback()
    j.crash()
    assert len(j) == 2
