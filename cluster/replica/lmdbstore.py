"""LMDB as the store of the replicated state machine, and snapshots as LMDB copies.

Each applied command is written in one LMDB transaction together with the Raft index it came
from, so replaying the log after a restart skips what is already applied (idempotent apply).

The state environment commits with fsync of its data pages (``sync=True``) but without a separate
fsync of the meta page (``metasync=False``, LMDB's MDB_NOMETASYNC): LMDB keeps its integrity
through any crash and at most the last transaction is undone (replayed from the log). Without
sync (MDB_NOSYNC, which this store used before) LMDB documents that a system crash can corrupt
the database unless the file system preserves write order, and LMDB has no checksums to notice.
The cost is one fsync per write transaction, so a Raft node applies in batches
(``batch_applies``): every entry applied in one tick shares one transaction, committed by
:meth:`LmdbStore.flush_applied`, whose results are handed out before that commit when the batch
wrote only engine records (see Store.flush_applied). A state written before a
snapshot is made durable with ``env.sync``, so the log can be compacted safely.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.core.apply import Outcome
from tetherlab.cluster.core.apply import apply as core_apply
from tetherlab.cluster.core.engine.engine import Engine
from tetherlab.cluster.replica.journal import fsync_dir
from tetherlab.cluster.replica.store import OnApply, ProposedCommands, read_snapshot_header, write_header

log = logging.getLogger("tetherlab.store")

_REC = struct.Struct(">QQQ")  # create_revision, mod_revision, version
SNAPSHOT_MAGIC = b"TLSNAP01"  # the body is an LMDB data file
_COPY_CHUNK_BYTES = 1 << 20
DUMP_COMMIT_WAIT_S = 10.0  # a commit (one fsync) slower than this is a sick disk: say so, not a stale dump

META_APPLIED = b"applied_index"
META_REVISION = b"revision"


def _kv_key(ns: str, key: str) -> bytes:
    return ns.encode() + b"\x00" + key.encode()


def _enc(rec: sm.Record) -> bytes:
    return _REC.pack(rec.create_revision, rec.mod_revision, rec.version) + rec.value.encode()


def _dec(raw: bytes) -> sm.Record:
    c, m, v = _REC.unpack_from(raw)
    return sm.Record(bytes(raw[_REC.size :]).decode(), c, m, v)


@dataclass
class _Batch:
    """Applies sharing one open write transaction until flush_applied commits it."""

    txn: lmdb.Transaction
    # Only this thread may commit the batch while it runs: LMDB's writer lock is the opening
    # thread's, and a commit from another (a backup's executor) leaves the lock held, so the
    # owner's next write transaction would wait for ever.
    thread: threading.Thread
    outcomes: list[Outcome] = field(default_factory=list)  # told to on_apply after the commit
    # (applied index, revision), written once at the commit: two fewer LMDB calls per entry,
    # and py-lmdb gives up the GIL in every call.
    meta: tuple[int, int] | None = None
    # Engine records written by the batch's applies (None: deleted), put at the commit: a key
    # written by many entries of one tick (the engine clock, a session, a grant) is put once.
    # Nothing reads engine records back from the open transaction but an engine rebuild, which
    # puts these first (LmdbStore._put_engine).
    engine: dict[bytes, bytes | None] = field(default_factory=dict)


def _put_meta(txn: lmdb.Transaction, db: Any, index: int, revision: int) -> None:
    txn.put(META_APPLIED, str(index).encode(), db=db)
    txn.put(META_REVISION, str(revision).encode(), db=db)


class LmdbStore:
    """The state in LMDB (see ``replica.store.Store``)."""

    def __init__(self, path: str | Path, map_size_bytes: int = 1 << 30, batch_applies: bool = False) -> None:
        self.dir = Path(path)
        self.map_size_bytes = map_size_bytes
        self._lock = threading.RLock()  # env swaps (snapshot install) exclude readers
        self.env: lmdb.Environment
        self._open()
        self.on_apply: OnApply | None = None
        self.proposed = ProposedCommands()
        self._wtxn: lmdb.Transaction | None = None
        # batch_applies: applies share one open write transaction until flush_applied() (the
        # applying thread's); on_apply runs for each only once it is committed.
        self.batch_applies = batch_applies
        self._batch: _Batch | None = None
        # Signalled after every commit of applies: a backup waits on it for the batch that was
        # open when it started (wait_committed).
        self._committed = threading.Condition(self._lock)
        # The Raft index of a batch flush_applied took and has not committed yet: its results may
        # already be out (an engine-only batch's are told before the commit), so readers of the
        # committed state wait for it (last_applied_index, dump).
        self._committing: int | None = None

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(self.dir), map_size=self.map_size_bytes, max_dbs=4, sync=True, metasync=False, readahead=False
        )
        self._meta = self.env.open_db(b"meta")
        self._kv = self.env.open_db(b"kv")
        self._engine_db = self.env.open_db(b"engine")
        with self.env.begin() as txn:
            self.engine = Engine.from_records(self._engine_records(txn))

    def _engine_records(self, txn: lmdb.Transaction) -> Iterator[tuple[str, str, bytes]]:
        for k, v in txn.cursor(self._engine_db):
            ns, _, key = bytes(k).partition(b"\x00")
            yield ns.decode(), key.decode(), bytes(v)

    def engine_view(self, fn: Callable[[Engine], Any]) -> Any:
        """Run a read-only query on the engine, excluded from concurrent applies."""
        with self._lock:
            return fn(self.engine)

    def close(self) -> None:
        with self._lock:
            self.flush_applied()
            self.env.sync(True)
            self.env.close()

    def sync(self) -> None:
        with self._lock:
            self.flush_applied()
            self.env.sync(True)

    def sync_unlocked(self) -> None:
        """fsync without excluding applies (LMDB allows it); may fail while the env is swapped."""
        self.env.sync(True)

    # --- apply ------------------------------------------------------------------------------

    def _meta_int(self, txn: lmdb.Transaction, key: bytes) -> int:
        raw = txn.get(key, db=self._meta)
        return int(raw) if raw else 0

    @property
    def applied_index(self) -> int:
        with self._lock, self.env.begin() as txn:
            return self._meta_int(txn, META_APPLIED)

    @property
    def revision(self) -> int:
        with self._lock, self.env.begin() as txn:
            return self._meta_int(txn, META_REVISION)

    def last_applied_index(self) -> int:
        """The index of the last entry applied, whether or not its batch is committed yet."""
        with self._lock:
            batch = self._batch
            if batch is not None and batch.meta is not None:
                return batch.meta[0]
            return self._committing if self._committing is not None else self.applied_index

    def wait_committed(self, index: int, timeout_s: float) -> bool:
        """Wait (on another thread than the applier's) until the committed state reaches Raft
        ``index``; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._committed:
            while self.applied_index < index:
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    return False
                self._committed.wait(left_s)
        return True

    def applied_index_now(self) -> int:  # StateView, inside apply's transaction
        assert self._wtxn is not None
        if self._batch is not None and self._batch.meta is not None:
            return self._batch.meta[0]
        return self._meta_int(self._wtxn, META_APPLIED)

    def revision_now(self) -> int:
        assert self._wtxn is not None
        if self._batch is not None and self._batch.meta is not None:
            return self._batch.meta[1]
        return self._meta_int(self._wtxn, META_REVISION)

    def read(self, ns: str, key: str) -> sm.Record | None:
        assert self._wtxn is not None
        raw = self._wtxn.get(_kv_key(ns, key), db=self._kv)
        return _dec(raw) if raw is not None else None

    def apply(self, index: int, payload: bytes) -> dict[str, Any]:
        """Apply the command at Raft ``index``; a replayed index changes nothing."""
        with self._lock:
            batch = self._batch
            own = batch is None  # this apply opens the transaction
            txn = self.env.begin(write=True) if batch is None else batch.txn
            if batch is None and self.batch_applies:
                batch = self._batch = _Batch(txn, threading.current_thread())
            try:
                out = self._apply_in(txn, index, payload)
            except BaseException:
                if own:
                    self._batch = None
                    txn.abort()
                raise
            if batch is None:
                txn.commit()
                self._committed.notify_all()
            if out.replayed:
                return out.result
            if batch is not None:
                batch.outcomes.append(out)
                return out.result
        if self.on_apply is not None:
            self.on_apply(out)
        return out.result

    def _apply_in(self, txn: lmdb.Transaction, index: int, payload: bytes) -> Outcome:
        self._wtxn = txn
        try:
            out = core_apply(index, payload, self, self.proposed.take(payload))
        finally:
            self._wtxn = None
        if out.replayed:
            return out
        for ns, key, rec in out.kv_writes:
            if rec is None:
                txn.delete(_kv_key(ns, key), db=self._kv)
            else:
                txn.put(_kv_key(ns, key), _enc(rec), db=self._kv)
        batch = self._batch
        if batch is not None:
            pending = batch.engine
            for ns, key, value in out.engine_writes:
                pending[_kv_key(ns, key)] = value
            batch.meta = (index, out.revision)  # put by flush_applied, before the commit
        else:
            self._put_engine(txn, {_kv_key(ns, key): value for ns, key, value in out.engine_writes})
            _put_meta(txn, self._meta, index, out.revision)
        if out.reset_engine:
            if batch is not None:
                self._put_engine(txn, batch.engine)
                batch.engine.clear()
            self.engine = Engine.from_records(self._engine_records(txn))
        return out

    def _put_engine(self, txn: lmdb.Transaction, writes: dict[bytes, bytes | None]) -> None:
        db = self._engine_db
        for k, value in writes.items():
            if value is None:
                txn.delete(k, db=db)
            else:
                txn.put(k, value, db=db)

    def flush_applied(self, before_commit: Callable[[], None] | None = None) -> None:
        """Commit the applies batched so far (one fsync) and tell ``on_apply`` about each; see
        Store.flush_applied for when ``before_commit`` runs. From another thread than the one
        that opened the batch, while that one runs, it does nothing (see ``_Batch.thread``)."""
        with self._lock:
            batch = self._batch
            if batch is not None and batch.thread is not threading.current_thread() and batch.thread.is_alive():
                return  # the applying thread commits it at the end of its tick
            self._batch = None
            if batch is not None:
                self._put_engine(batch.txn, batch.engine)
                if batch.meta is not None:
                    _put_meta(batch.txn, self._meta, *batch.meta)
                    self._committing = batch.meta[0]
        outcomes = batch.outcomes if batch is not None else []
        early = batch is not None and before_commit is not None and all(o.engine_only for o in outcomes)
        if early:
            self._tell(outcomes)
            before_commit()  # type: ignore[misc]
        # The commit (and its fsync) runs outside the lock: readers on other threads use their
        # own read transactions and must not wait for the disk. Only this (the tick) thread
        # writes or swaps the environment, so nothing can change it meanwhile.
        if batch is not None:
            try:
                batch.txn.commit()
            finally:
                with self._committed:
                    self._committing = None
                    self._committed.notify_all()
        if not early:
            self._tell(outcomes)
            if before_commit is not None:
                before_commit()

    def _tell(self, outcomes: list[Outcome]) -> None:
        if self.on_apply is not None:
            for out in outcomes:
                self.on_apply(out)

    # --- reads ------------------------------------------------------------------------------

    def get(self, ns: str, key: str) -> sm.Record | None:
        # Every request reads its key's record: a read transaction of its own, not the lock the
        # tick thread holds while it applies. Only a snapshot install (which closes the
        # environment) can get in the way, and then the read is made again under the lock.
        try:
            with self.env.begin() as txn:
                raw = txn.get(_kv_key(ns, key), db=self._kv)
        except lmdb.Error:
            with self._lock, self.env.begin() as txn:
                raw = txn.get(_kv_key(ns, key), db=self._kv)
        return _dec(raw) if raw is not None else None

    def engine_peek(self, fn: Callable[[Engine], Any]) -> Any:
        """Run ``fn`` on the engine without waiting for applies (see Store.engine_peek)."""
        return fn(self.engine)

    def scan(self, ns: str, after: str = "", limit: int = 100) -> list[tuple[str, sm.Record]]:
        """Records of ``ns`` with keys after ``after``, in key order, at most ``limit``."""
        prefix = ns.encode() + b"\x00"
        out: list[tuple[str, sm.Record]] = []
        with self._lock, self.env.begin() as txn:
            cur = txn.cursor(self._kv)
            start = prefix + after.encode()
            if not cur.set_range(start):
                return out
            for k, v in cur:
                if not k.startswith(prefix):
                    break
                key = bytes(k[len(prefix) :]).decode()
                if key == after and after:
                    continue
                out.append((key, _dec(v)))
                if len(out) >= limit:
                    break
        return out

    def iter_all(self) -> Iterator[tuple[str, str, sm.Record]]:
        with self._lock, self.env.begin() as txn:
            for k, v in txn.cursor(self._kv):
                ns, _, key = bytes(k).partition(b"\x00")
                yield ns.decode(), key.decode(), _dec(v)

    def dump(self, commit_wait_s: float = DUMP_COMMIT_WAIT_S) -> dict[str, Any]:
        """The whole replicated state as plain data (to compare replicas), holding every write
        whose result is out: an engine-only batch's results go out before its commit, and a drill
        that dumps right after an acknowledgement must find the acknowledged write, so a batch
        being committed is waited for (not one still open: nothing of it has been told).
        TimeoutError if that commit takes over ``commit_wait_s``."""
        with self._lock:
            target = self._committing
        if target is not None and not self.wait_committed(target, commit_wait_s):
            raise TimeoutError(f"the state's commit did not reach Raft index {target} within {commit_wait_s:g} s")
        with self._lock, self.env.begin() as txn:
            records: dict[str, dict[str, Any]] = {}
            for k, v in txn.cursor(self._kv):
                ns, _, key = bytes(k).partition(b"\x00")
                records.setdefault(ns.decode(), {})[key.decode()] = _dec(v).to_json()
            engine: dict[str, dict[str, Any]] = {}
            for ns, key, raw in self._engine_records(txn):
                engine.setdefault(ns, {})[key] = json.loads(raw)
            return {
                "applied_index": self._meta_int(txn, META_APPLIED),
                "revision": self._meta_int(txn, META_REVISION),
                "records": records,
                "engine": engine,
            }

    def size_info(self) -> dict[str, int]:
        info = self.env.info()
        stat = self.env.stat()
        data_file = self.dir / "data.mdb"
        return {
            "file_size_bytes": data_file.stat().st_size if data_file.exists() else 0,
            "used_bytes": (info["last_pgno"] + 1) * stat["psize"],
            "map_size_bytes": info["map_size"],
        }

    # --- snapshots --------------------------------------------------------------------------

    def write_snapshot(self, path: Path, header: dict[str, Any]) -> dict[str, Any]:
        """Write a consistent copy of the state to ``path`` (fsynced), with ``header``. On the
        applying thread (a compaction snapshot) the open batch is committed first; on another (an
        online backup) the copy is of the committed state, the batch's entries still in the log."""
        tmp_dir = path.with_name(path.name + ".copy")
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
        self.flush_applied()
        with self._lock:
            self.env.sync(True)
            # Header and data from one read transaction: a batch the tick thread commits
            # meanwhile (its commit runs outside the lock) must be in neither or in both.
            with self.env.begin() as txn:
                header = {
                    **header,
                    "applied_index": self._meta_int(txn, META_APPLIED),
                    "revision": self._meta_int(txn, META_REVISION),
                }
                self.env.copy(str(tmp_dir), compact=True, txn=txn)
        try:
            with open(path, "wb") as out, open(tmp_dir / "data.mdb", "rb") as src:
                write_header(out, SNAPSHOT_MAGIC, header)
                shutil.copyfileobj(src, out, _COPY_CHUNK_BYTES)
                out.flush()
                os.fsync(out.fileno())
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        return header

    @staticmethod
    def read_snapshot_header(path: Path) -> tuple[dict[str, Any], int]:  # type: ignore[override]
        header, offset, _ = read_snapshot_header(path, SNAPSHOT_MAGIC)
        return header, offset

    def install_snapshot(self, path: Path, force: bool = False) -> bool:
        """Replace the live state with the snapshot's if the snapshot is newer (or ``force``).

        Returns True when the state was replaced."""
        header, offset = self.read_snapshot_header(path)
        self.flush_applied()
        if not force and header["applied_index"] <= self.applied_index:
            return False
        new_dir = self.dir.with_name(self.dir.name + ".new")
        old_dir = self.dir.with_name(self.dir.name + ".old")
        shutil.rmtree(new_dir, ignore_errors=True)
        new_dir.mkdir(parents=True)
        with open(path, "rb") as src, open(new_dir / "data.mdb", "wb") as dst:
            src.seek(offset)
            shutil.copyfileobj(src, dst, _COPY_CHUNK_BYTES)
            dst.flush()
            os.fsync(dst.fileno())
        with self._lock:
            self.env.close()
            shutil.rmtree(old_dir, ignore_errors=True)
            os.replace(self.dir, old_dir)
            os.replace(new_dir, self.dir)
            fsync_dir(self.dir.parent)
            shutil.rmtree(old_dir, ignore_errors=True)
            self._open()
        return True
