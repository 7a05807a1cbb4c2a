"""LMDB as the store of the replicated state machine, and snapshots as LMDB copies.

Each applied command is written in one LMDB transaction together with the Raft index it came
from, so replaying the log after a restart skips what is already applied (idempotent apply).

The state environment is written without fsync per transaction: the Raft log is the durable
record (it is fsynced before anything is applied) and a restart replays from it. The state is
fsynced once a second, and always before a snapshot, so the log can be compacted safely.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb

from tetherlab.cluster import statemachine as sm
from tetherlab.cluster.engine.commands import decode_command as decode_engine_command
from tetherlab.cluster.engine.engine import Engine
from tetherlab.cluster.engine.errors import EngineError
from tetherlab.cluster.journal import fsync_dir

log = logging.getLogger("tetherlab.store")

_REC = struct.Struct(">QQQ")  # create_revision, mod_revision, version
_SNAP_MAGIC = b"TLSNAP01"
_HDR_LEN = struct.Struct(">I")
_COPY_CHUNK_BYTES = 1 << 20

META_APPLIED = b"applied_index"
META_REVISION = b"revision"


class SnapshotError(RuntimeError):
    """Returned when a snapshot file is not one of ours or is truncated."""


def _kv_key(ns: str, key: str) -> bytes:
    return ns.encode() + b"\x00" + key.encode()


def _enc(rec: sm.Record) -> bytes:
    return _REC.pack(rec.create_revision, rec.mod_revision, rec.version) + rec.value.encode()


def _dec(raw: bytes) -> sm.Record:
    c, m, v = _REC.unpack_from(raw)
    return sm.Record(bytes(raw[_REC.size :]).decode(), c, m, v)


class StateStore:
    def __init__(self, path: str | Path, map_size_bytes: int = 1 << 30) -> None:
        self.dir = Path(path)
        self.map_size_bytes = map_size_bytes
        self._lock = threading.RLock()  # env swaps (snapshot install) exclude readers
        self.env: lmdb.Environment
        self._open()
        self.on_apply: Callable[[int, sm.Command | None, dict[str, Any]], None] | None = None

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(self.dir), map_size=self.map_size_bytes, max_dbs=4, sync=False, metasync=False, readahead=False
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
            self.env.sync(True)
            self.env.close()

    def sync(self) -> None:
        with self._lock:
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

    def apply(self, index: int, payload: bytes) -> dict[str, Any]:
        """Apply the command at Raft ``index``; a replayed index changes nothing."""
        with self._lock, self.env.begin(write=True) as txn:
            applied = self._meta_int(txn, META_APPLIED)
            if index <= applied:
                return {"ok": True, "replayed": True, "index": index}
            revision = self._meta_int(txn, META_REVISION)
            cmd: sm.Command | None
            obj: Any = None
            parse_error: str | None = None
            try:
                obj = json.loads(payload)
            except (ValueError, UnicodeDecodeError) as e:
                parse_error = str(e)
            if isinstance(obj, dict) and obj.get("op") == "engine":
                result = self._apply_engine(txn, index, obj)
                txn.put(META_APPLIED, str(index).encode(), db=self._meta)
                result = {**result, "index": index}
                if self.on_apply is not None:
                    self.on_apply(index, None, result)
                return result
            try:
                if parse_error is not None:
                    raise sm.CommandError("bad_json", f"command is not JSON: {parse_error}")
                cmd = sm.decode_command(obj)
            except sm.CommandError as e:
                cmd, result, writes, new_rev = None, e.to_json(), (), revision
            else:

                def read(ns: str, key: str) -> sm.Record | None:
                    raw = txn.get(_kv_key(ns, key), db=self._kv)
                    return _dec(raw) if raw is not None else None

                out = sm.apply(cmd, revision=revision, read=read)
                result, writes, new_rev = out.result, out.writes, out.revision
            for ns, key, rec in writes:
                if rec is None:
                    txn.delete(_kv_key(ns, key), db=self._kv)
                else:
                    txn.put(_kv_key(ns, key), _enc(rec), db=self._kv)
            txn.put(META_APPLIED, str(index).encode(), db=self._meta)
            if new_rev != revision:
                txn.put(META_REVISION, str(new_rev).encode(), db=self._meta)
        result = {**result, "index": index}
        if self.on_apply is not None:
            self.on_apply(index, cmd, result)
        return result

    def _apply_engine(self, txn: lmdb.Transaction, index: int, obj: dict[str, Any]) -> dict[str, Any]:
        now_ms = obj.get("now_ms")
        if not isinstance(now_ms, int) or isinstance(now_ms, bool) or now_ms < 0:
            msg = "engine command needs an integer 'now_ms' (the leader's clock)"
            return {"error": {"code": "bad_field", "message": msg}}
        try:
            cmd = decode_engine_command(obj.get("cmd"))
        except EngineError as e:
            return e.to_json()
        try:
            applied = self.engine.apply(cmd, index=index, now_ms=now_ms)
        except Exception:
            # A bug in the engine must not split the replicas: every node hits it on the same
            # entry, so each answers the same error and rebuilds from its unchanged records.
            log.exception("engine failed on raft index %d; rebuilding it from its records", index)
            self.engine = Engine.from_records(self._engine_records(txn))
            return {"error": {"code": "internal", "message": "the engine failed on this command; nothing changed"}}
        for ns, key, value in applied.writes:
            k = _kv_key(ns, key)
            if value is None:
                txn.delete(k, db=self._engine_db)
            else:
                txn.put(k, value, db=self._engine_db)
        return applied.result

    # --- reads ------------------------------------------------------------------------------

    def get(self, ns: str, key: str) -> sm.Record | None:
        with self._lock, self.env.begin() as txn:
            raw = txn.get(_kv_key(ns, key), db=self._kv)
            return _dec(raw) if raw is not None else None

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

    def dump(self) -> dict[str, Any]:
        """The whole replicated state as plain data (to compare replicas)."""
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
        """Write a consistent copy of the state to ``path`` (fsynced), with ``header``."""
        tmp_dir = path.with_name(path.name + ".copy")
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
        with self._lock:
            self.env.sync(True)
            with self.env.begin() as txn:
                header = {
                    **header,
                    "applied_index": self._meta_int(txn, META_APPLIED),
                    "revision": self._meta_int(txn, META_REVISION),
                }
            self.env.copy(str(tmp_dir), compact=True)
        try:
            hdr = json.dumps(header, sort_keys=True).encode()
            with open(path, "wb") as out, open(tmp_dir / "data.mdb", "rb") as src:
                out.write(_SNAP_MAGIC + _HDR_LEN.pack(len(hdr)) + hdr)
                shutil.copyfileobj(src, out, _COPY_CHUNK_BYTES)
                out.flush()
                os.fsync(out.fileno())
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        return header

    @staticmethod
    def read_snapshot_header(path: Path) -> tuple[dict[str, Any], int]:
        with open(path, "rb") as f:
            head = f.read(len(_SNAP_MAGIC) + _HDR_LEN.size)
            if len(head) < len(_SNAP_MAGIC) + _HDR_LEN.size or not head.startswith(_SNAP_MAGIC):
                raise SnapshotError(f"{path} is not a Tetherlab snapshot")
            (n,) = _HDR_LEN.unpack_from(head, len(_SNAP_MAGIC))
            raw = f.read(n)
            if len(raw) != n:
                raise SnapshotError(f"{path} is truncated")
            return json.loads(raw), len(head) + n

    def install_snapshot(self, path: Path, force: bool = False) -> bool:
        """Replace the live state with the snapshot's if the snapshot is newer (or ``force``).

        Returns True when the state was replaced."""
        header, offset = self.read_snapshot_header(path)
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


def entry_to_json(entry: tuple[bytes, int, int]) -> list[Any]:
    return [base64.b64encode(bytes(entry[0])).decode(), entry[1], entry[2]]


def entry_from_json(obj: list[Any]) -> tuple[bytes, int, int]:
    return (base64.b64decode(obj[0]), int(obj[1]), int(obj[2]))
