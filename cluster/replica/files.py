"""The files a node writes outside LMDB (snapshots), behind one small interface with a twin.

:class:`Files` is what snapshot writing, receiving and installing need. Two implementations
pass the same conformance tests (tests/unit/test_files_conformance.py):

- :class:`OsFiles`: the real file system (production);
- :class:`MemoryFiles`: in memory, for the simulator, with the durability rules of a POSIX
  file system made explicit: a file's bytes are durable once the file is fsynced; creating,
  renaming or removing a name is durable once its directory is fsynced. :meth:`MemoryFiles.crash`
  keeps exactly what was durable, as a machine crash would.

Paths are strings. pysyncobj's own snapshot I/O goes through the same interface (patch
``snapshot_files`` in ``pysyncobj_patches``), so the simulator sees every step of a snapshot's
life: written, fsynced, renamed, made durable, sent, received, installed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import IO, Protocol


class Files(Protocol):
    def open(self, path: str, mode: str) -> IO[bytes]:
        """``rb`` (read) or ``wb`` (create or truncate, then write)."""
        ...

    def fsync(self, f: IO[bytes]) -> None:
        """Make the bytes written to the open file ``f`` durable."""
        ...

    def fsync_path(self, path: str) -> None:
        """Make the bytes of the file at ``path`` durable."""
        ...

    def replace(self, src: str, dst: str) -> None:
        """Rename ``src`` over ``dst`` atomically; durable once the directory is fsynced."""
        ...

    def fsync_dir(self, path: str) -> None:
        """Make every name created, renamed or removed in directory ``path`` durable."""
        ...

    def isfile(self, path: str) -> bool: ...

    def remove(self, path: str) -> None: ...


class OsFiles:
    """The real file system."""

    def open(self, path: str, mode: str) -> IO[bytes]:
        if mode not in ("rb", "wb"):
            raise ValueError(f"files are opened 'rb' or 'wb', not {mode!r}")
        return open(path, mode)  # the caller closes it

    def fsync(self, f: IO[bytes]) -> None:
        f.flush()
        os.fsync(f.fileno())

    def fsync_path(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path)

    def remove(self, path: str) -> None:
        os.remove(path)


# --- the in-memory twin -------------------------------------------------------------------------


class _Inode:
    __slots__ = ("durable", "live")

    def __init__(self) -> None:
        self.live = b""
        self.durable = b""


class _Writer(io.BytesIO):
    """An open file: bytes reach the inode (the page cache) as they are written."""

    def __init__(self, owner: MemoryFiles, inode: _Inode) -> None:
        super().__init__()
        self._owner = owner
        self.inode = inode

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._owner.check_alive()
        n = super().write(data)
        self.inode.live = self.getvalue()
        return n


def _dir_of(path: str) -> str:
    return os.path.dirname(path)


class MemoryFiles:
    """Files in memory with explicit durability; ``step(name)`` runs before every durable step
    (a simulator raises from it to crash the machine exactly there)."""

    def __init__(self, step: Callable[[str], None] | None = None) -> None:
        self._live: dict[str, _Inode] = {}
        self._durable: dict[str, _Inode] = {}
        self.step = step
        self.dead = False  # set by a crash until revive(): a dead machine writes nothing
        self.fsyncs = 0

    def check_alive(self) -> None:
        if self.dead:
            raise FilesDead("the machine holding these files crashed")

    def _step(self, name: str) -> None:
        self.check_alive()
        if self.step is not None:
            self.step(name)

    def open(self, path: str, mode: str) -> IO[bytes]:
        self.check_alive()
        if mode == "rb":
            inode = self._live.get(path)
            if inode is None:
                raise FileNotFoundError(path)
            return io.BytesIO(inode.live)
        if mode != "wb":
            raise ValueError(f"files are opened 'rb' or 'wb', not {mode!r}")
        inode = self._live.get(path)
        if inode is None:
            inode = self._live[path] = _Inode()
        inode.live = b""  # O_TRUNC: the inode (and its durable bytes until the next fsync) stays
        return _Writer(self, inode)

    def fsync(self, f: IO[bytes]) -> None:
        self._step("fsync")
        if isinstance(f, _Writer):
            f.inode.durable = f.inode.live
            self.fsyncs += 1

    def fsync_path(self, path: str) -> None:
        self._step("fsync")
        inode = self._live.get(path)
        if inode is None:
            raise FileNotFoundError(path)
        inode.durable = inode.live
        self.fsyncs += 1

    def replace(self, src: str, dst: str) -> None:
        self._step("rename")
        inode = self._live.pop(src, None)
        if inode is None:
            raise FileNotFoundError(src)
        self._live[dst] = inode

    def fsync_dir(self, path: str) -> None:
        self._step("fsync_dir")
        for name in [n for n in self._durable if _dir_of(n) == path]:
            if name not in self._live:
                del self._durable[name]
        for name, inode in self._live.items():
            if _dir_of(name) == path:
                self._durable[name] = inode

    def isfile(self, path: str) -> bool:
        self.check_alive()
        return path in self._live

    def remove(self, path: str) -> None:
        self._step("unlink")
        if self._live.pop(path, None) is None:
            raise FileNotFoundError(path)

    # --- what a simulator needs --------------------------------------------------------------

    def crash(self) -> None:
        """Keep exactly what was durable: names whose directory was fsynced, bytes that were."""
        self._live = dict(self._durable)
        for inode in set(self._live.values()) | set(self._durable.values()):
            inode.live = inode.durable
        self.dead = True

    def revive(self) -> None:
        self.dead = False

    def listing(self) -> dict[str, int]:
        """Name -> size of every live file (for traces and tests)."""
        return {n: len(i.live) for n, i in sorted(self._live.items())}


class FilesDead(RuntimeError):
    """Returned when a crashed machine's files are used before the machine restarts."""
