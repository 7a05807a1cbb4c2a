"""The LMDB journal: durability points, truncation and replay as Raft requires.

Crashes are real: a child process writes and then dies with os._exit (no flush, no close),
and a fresh process reads the LMDB files back."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tetherlab.cluster.replica.journal import NOOP_COMMAND, JournalError, LmdbJournal


def crash_after(path: Path, body: str) -> None:
    """Run ``body`` with ``j`` bound to a journal at ``path``, then die without flushing."""
    code = textwrap.dedent(
        f"""
        import os
        from tetherlab.cluster.replica.journal import LmdbJournal
        j = LmdbJournal({str(path)!r})
        """
    ) + textwrap.dedent(body) + "\nos._exit(9)\n"
    subprocess.run([sys.executable, "-c", code], check=False, timeout=60)


def test_new_journal_is_seeded_with_pysyncobj_noop(tmp_path: Path) -> None:
    j = LmdbJournal(tmp_path / "j")
    assert len(j) == 1
    assert j[0] == (NOOP_COMMAND, 1, 0)
    assert j.getRaftCommitIndex() == 1
    j._destroy()


def test_term_and_vote_are_durable_when_set_current_term_returns(tmp_path: Path) -> None:
    crash_after(tmp_path / "j", "j.setCurrentTerm(7, '127.0.0.1:9001')")
    j = LmdbJournal(tmp_path / "j")
    assert (j.getCurrentTerm(), j.getVotedForNodeId()) == (7, "127.0.0.1:9001")
    j._destroy()
    crash_after(tmp_path / "j", "j.setCurrentTerm(8, None)")
    j2 = LmdbJournal(tmp_path / "j")
    assert (j2.getCurrentTerm(), j2.getVotedForNodeId()) == (8, None)


def test_entries_are_durable_only_after_flush(tmp_path: Path) -> None:
    # Unflushed entries were never promised to anyone (nothing was sent): losing them is allowed.
    crash_after(tmp_path / "a", "j.add(b'x', 2, 1)\nj.add(b'y', 3, 1)")
    assert len(LmdbJournal(tmp_path / "a")) == 1
    crash_after(tmp_path / "b", "j.add(b'x', 2, 1)\nj.add(b'y', 3, 1)\nj.flush()")
    j = LmdbJournal(tmp_path / "b")
    assert [e for e in j[0:]] == [(NOOP_COMMAND, 1, 0), (b"x", 2, 1), (b"y", 3, 1)]


def test_group_commit_uses_one_fsync_for_many_entries(tmp_path: Path) -> None:
    j = LmdbJournal(tmp_path / "j")
    before = j.fsyncs
    for i in range(2, 102):
        j.add(b"c%d" % i, i, 1)
    j.flush()
    j.flush()  # nothing pending: no second fsync
    assert j.fsyncs == before + 1
    assert len(j) == 101


def test_indexing_and_slicing_match_a_list(tmp_path: Path) -> None:
    j = LmdbJournal(tmp_path / "j")
    model = [(NOOP_COMMAND, 1, 0)]
    for i in range(2, 600):
        j.add(b"c%d" % i, i, 1 + i // 100)
        model.append((b"c%d" % i, i, 1 + i // 100))
    j.flush()
    j._cache.clear()  # read from LMDB, not the write cache
    assert j[-1] == model[-1] and j[0] == model[0] and j[123] == model[123]
    assert list(j[10:]) == model[10:]
    assert j[5:17] == model[5:17]
    assert list(j[595:])[:3] == model[595:598]
    assert j[10:][3:7] == model[13:17]
    assert len(j[590:]) == len(model[590:])
    with pytest.raises(IndexError):
        j[len(model)]


def test_truncating_a_conflicting_suffix_survives_restart(tmp_path: Path) -> None:
    crash_after(
        tmp_path / "j",
        """
        for i in range(2, 11):
            j.add(b'old%d' % i, i, 1)
        j.flush()
        j.deleteEntriesFrom(5)          # drop raft indexes 6..10 (list position 5 on)
        j.add(b'new6', 6, 2)
        j.flush()
        """,
    )
    j = LmdbJournal(tmp_path / "j")
    assert len(j) == 6
    assert j[-1] == (b"new6", 6, 2)
    assert j[4] == (b"old5", 5, 1)


def test_compaction_drops_a_prefix_and_keeps_positions_consistent(tmp_path: Path) -> None:
    j = LmdbJournal(tmp_path / "j")
    for i in range(2, 21):
        j.add(b"c%d" % i, i, 1)
    j.deleteEntriesTo(10)  # drop raft indexes 1..10
    j.flush()
    j._destroy()
    j = LmdbJournal(tmp_path / "j")
    assert j[0] == (b"c11", 11, 1)
    assert len(j) == 10
    j.add(b"c21", 21, 1)
    assert j[-1][1] == 21


def test_clear_then_reseed_like_a_snapshot_install(tmp_path: Path) -> None:
    j = LmdbJournal(tmp_path / "j")
    for i in range(2, 6):
        j.add(b"c", i, 1)
    j.clear()
    j.add(b"prev", 99, 3)
    j.add(b"last", 100, 3)
    j.flush()
    j._destroy()
    j = LmdbJournal(tmp_path / "j")
    assert list(j[0:]) == [(b"prev", 99, 3), (b"last", 100, 3)]


def test_gaps_are_refused(tmp_path: Path) -> None:
    j = LmdbJournal(tmp_path / "j")
    with pytest.raises(JournalError, match="contiguous"):
        j.add(b"x", 5, 1)


def test_commit_index_flushes_pending_entries_first(tmp_path: Path) -> None:
    # A single node commits without sending anything: the commit must not outrun the disk.
    j = LmdbJournal(tmp_path / "j")
    j.add(b"x", 2, 1)
    assert j.dirty
    j.setRaftCommitIndex(2)
    assert not j.dirty
