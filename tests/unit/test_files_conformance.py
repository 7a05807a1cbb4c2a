"""The files contract (snapshots outside LMDB), run against the real file system and the
in-memory twin; and the twin's crash rules: bytes are durable once fsynced, names once their
directory is fsynced."""

from __future__ import annotations

from pathlib import Path

import pytest

from tetherlab.cluster.replica.files import Files, FilesDead, MemoryFiles, OsFiles


@pytest.fixture(params=["os", "memory"])
def files(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Files, str]:
    if request.param == "os":
        return OsFiles(), str(tmp_path)
    return MemoryFiles(), "mem:/d"


def test_write_read_replace_remove(files: tuple[Files, str]) -> None:
    fs, d = files
    with fs.open(f"{d}/a.tmp", "wb") as f:
        f.write(b"hello ")
        f.write(b"world")
        fs.fsync(f)
    fs.replace(f"{d}/a.tmp", f"{d}/a")
    fs.fsync_dir(d)
    assert fs.isfile(f"{d}/a") and not fs.isfile(f"{d}/a.tmp")
    with fs.open(f"{d}/a", "rb") as f:
        f.seek(6)
        assert f.read() == b"world"
    fs.fsync_path(f"{d}/a")
    fs.remove(f"{d}/a")
    assert not fs.isfile(f"{d}/a")
    with pytest.raises(FileNotFoundError):
        fs.open(f"{d}/a", "rb")
    with pytest.raises(ValueError):
        fs.open(f"{d}/b", "ab")


def _write(fs: MemoryFiles, path: str, data: bytes, fsync: bool) -> None:
    with fs.open(path, "wb") as f:
        f.write(data)
        if fsync:
            fs.fsync(f)


def test_the_twin_keeps_only_fsynced_bytes_under_durable_names() -> None:
    fs = MemoryFiles()
    _write(fs, "m:/d/kept", b"durable", fsync=True)
    fs.fsync_dir("m:/d")
    _write(fs, "m:/d/kept", b"overwritten, not synced", fsync=False)
    _write(fs, "m:/d/new", b"synced, name not", fsync=True)
    fs.crash()
    fs.revive()
    assert fs.listing() == {"m:/d/kept": 7}


def test_the_twin_a_rename_without_a_directory_fsync_is_undone_by_a_crash() -> None:
    fs = MemoryFiles()
    _write(fs, "m:/d/snap", b"old", fsync=True)
    fs.fsync_dir("m:/d")
    _write(fs, "m:/d/snap.tmp", b"new", fsync=True)
    fs.replace("m:/d/snap.tmp", "m:/d/snap")
    fs.crash()
    fs.revive()
    with fs.open("m:/d/snap", "rb") as f:
        assert f.read() == b"old"


def test_the_twin_crash_points_and_a_dead_machine() -> None:
    steps: list[str] = []

    def step(name: str) -> None:
        steps.append(name)
        if name == "rename":
            raise RuntimeError("crash here")

    fs = MemoryFiles(step=step)
    _write(fs, "m:/d/a", b"x", fsync=True)
    with pytest.raises(RuntimeError):
        fs.replace("m:/d/a", "m:/d/b")
    assert steps == ["fsync", "rename"]
    fs.crash()
    with pytest.raises(FilesDead):
        fs.open("m:/d/a", "rb")


