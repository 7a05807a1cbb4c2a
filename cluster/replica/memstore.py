"""The state store in memory: the twin of :class:`~tetherlab.cluster.replica.lmdbstore.LmdbStore`.

It passes the same conformance tests as the LMDB store and adds what a simulation needs: an
explicit split between the state applied so far and the state made durable by :meth:`sync`
(or by writing a snapshot), and :meth:`crash`, which drops everything that was not durable,
like a machine crash with an un-synced LMDB environment. ``step(name)`` runs before each
durable step (a simulator raises from it to crash the machine exactly there).

Snapshots are files like the LMDB store's, with magic ``TLSNAPM1`` and a JSON body, written and
read through a ``replica.files.Files`` (the real file system unless a simulator gives its own).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.core.apply import apply as core_apply
from tetherlab.cluster.core.engine.engine import Engine
from tetherlab.cluster.replica.files import Files, OsFiles
from tetherlab.cluster.replica.store import OnApply, ProposedCommands, read_snapshot_header, write_header

SNAPSHOT_MAGIC = b"TLSNAPM1"  # the body is the memory store's JSON image


class _Image:
    """Everything the store holds, as plain data."""

    def __init__(self) -> None:
        self.applied = 0
        self.revision = 0
        self.kv: dict[tuple[str, str], sm.Record] = {}
        self.engine: dict[tuple[str, str], bytes] = {}

    def copy(self) -> _Image:
        # Records are frozen and engine values are bytes: copying the dicts copies the state.
        c = _Image()
        c.applied, c.revision, c.kv, c.engine = self.applied, self.revision, dict(self.kv), dict(self.engine)
        return c

    def to_json(self) -> dict[str, Any]:
        return {
            "applied_index": self.applied,
            "revision": self.revision,
            "kv": [[ns, k, r.to_json()] for (ns, k), r in sorted(self.kv.items())],
            "engine": [[ns, k, v.decode()] for (ns, k), v in sorted(self.engine.items())],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> _Image:
        img = cls()
        img.applied = int(obj["applied_index"])
        img.revision = int(obj["revision"])
        img.kv = {(ns, k): sm.Record.from_json(r) for ns, k, r in obj["kv"]}
        img.engine = {(ns, k): v.encode() for ns, k, v in obj["engine"]}
        return img


class MemoryStore:
    """The state in memory (see ``replica.store.Store``)."""

    def __init__(self, files: Files | None = None, step: Callable[[str], None] | None = None) -> None:
        self._lock = threading.RLock()
        self._live = _Image()
        self._durable = _Image()
        self.engine = Engine()
        self.on_apply: OnApply | None = None
        self.proposed = ProposedCommands()
        self.syncs = 0
        self.files = files or OsFiles()
        self.step = step
        self._unsynced = False
        self._unsynced_kv = False  # the unsynced applies wrote a key-value record or reset the engine

    # --- StateView (read by core.apply) -------------------------------------------------------

    def applied_index_now(self) -> int:
        return self._live.applied

    def revision_now(self) -> int:
        return self._live.revision

    def read(self, ns: str, key: str) -> sm.Record | None:
        return self._live.kv.get((ns, key))

    # --- Store ---------------------------------------------------------------------------------

    @property
    def applied_index(self) -> int:
        with self._lock:
            return self._live.applied

    @property
    def revision(self) -> int:
        with self._lock:
            return self._live.revision

    def apply(self, index: int, payload: bytes) -> dict[str, Any]:
        with self._lock:
            out = core_apply(index, payload, self, self.proposed.take(payload))
            if out.replayed:
                return out.result
            live = self._live
            for ns, key, rec in out.kv_writes:
                if rec is None:
                    live.kv.pop((ns, key), None)
                else:
                    live.kv[(ns, key)] = rec
            for ns, key, value in out.engine_writes:
                if value is None:
                    live.engine.pop((ns, key), None)
                else:
                    live.engine[(ns, key)] = value
            live.applied = index
            live.revision = out.revision
            self._unsynced = True
            self._unsynced_kv = self._unsynced_kv or not out.engine_only
            if out.reset_engine:
                self.engine = self._engine_from(live)
        if self.on_apply is not None:
            self.on_apply(out)
        return out.result

    @staticmethod
    def _engine_from(img: _Image) -> Engine:
        return Engine.from_records((ns, k, v) for (ns, k), v in sorted(img.engine.items()))

    def get(self, ns: str, key: str) -> sm.Record | None:
        with self._lock:
            return self._live.kv.get((ns, key))

    def scan(self, ns: str, after: str = "", limit: int = 100) -> list[tuple[str, sm.Record]]:
        with self._lock:
            keys = sorted(k for (n, k) in self._live.kv if n == ns and k > after)
            return [(k, self._live.kv[(ns, k)]) for k in keys[:limit]]

    def engine_view(self, fn: Callable[[Engine], Any]) -> Any:
        with self._lock:
            return fn(self.engine)

    def engine_peek(self, fn: Callable[[Engine], Any]) -> Any:
        return fn(self.engine)

    def dump(self) -> dict[str, Any]:
        with self._lock:
            records: dict[str, dict[str, Any]] = {}
            for (ns, key), rec in sorted(self._live.kv.items()):
                records.setdefault(ns, {})[key] = rec.to_json()
            engine: dict[str, dict[str, Any]] = {}
            for (ns, key), raw in sorted(self._live.engine.items()):
                engine.setdefault(ns, {})[key] = json.loads(raw)
            return {"applied_index": self._live.applied, "revision": self._live.revision,
                    "records": records, "engine": engine}

    def flush_applied(self, before_commit: Callable[[], None] | None = None) -> None:
        """The LMDB store commits a batch of applies with fsync here: make them durable, with
        ``before_commit`` on the same side of it as there (Store.flush_applied)."""
        early = before_commit is not None and self._unsynced and not self._unsynced_kv
        if early:
            before_commit()  # type: ignore[misc]
        if self._unsynced:
            self.sync()
        if before_commit is not None and not early:
            before_commit()

    def sync(self) -> None:
        with self._lock:
            if self.step is not None:
                self.step("state_sync")
            self._durable = self._live.copy()
            self._unsynced = self._unsynced_kv = False
            self.syncs += 1

    def close(self) -> None:
        self.sync()

    def crash(self) -> None:
        """Lose everything applied since the last sync, as a machine crash would."""
        with self._lock:
            self._live = self._durable.copy()
            self.engine = self._engine_from(self._live)

    def write_snapshot(self, path: Path, header: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.sync()  # like the LMDB store: the state is durable before its snapshot exists
            header = {**header, "applied_index": self._live.applied, "revision": self._live.revision}
            body = json.dumps(self._live.to_json(), sort_keys=True).encode()
        with self.files.open(str(path), "wb") as out:
            write_header(out, SNAPSHOT_MAGIC, header)
            out.write(body)
            self.files.fsync(out)
        return header

    def read_snapshot_header(self, path: Path) -> tuple[dict[str, Any], int]:
        header, offset, _ = read_snapshot_header(path, SNAPSHOT_MAGIC, self.files)
        return header, offset

    def install_snapshot(self, path: Path, force: bool = False) -> bool:
        header, offset = self.read_snapshot_header(path)
        with self._lock:
            if not force and header["applied_index"] <= self._live.applied:
                return False
            with self.files.open(str(path), "rb") as f:
                f.seek(offset)
                img = _Image.from_json(json.loads(f.read()))
            if self.step is not None:
                self.step("state_install")
            self._live = img
            self._durable = img.copy()
            self.engine = self._engine_from(img)
        return True
