"""``core.apply`` tells a failure of this node from a fault of the entry, completely.

A node failure (out of memory, the storage failing under a read) is raised: the node stops and
replays the entry after a restart, instead of diverging from its peers. Anything else raised
while decoding or applying a command is a property of the entry, which every replica holds byte
for byte: it is answered with the same ``internal`` refusal everywhere and changes nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tetherlab.cluster.core import apply as core_apply
from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.core.engine import commands as ec
from tetherlab.cluster.replica.memstore import MemoryStore


def put(key: str) -> bytes:
    return sm.encode_command(sm.Put("a", key, "v"))


def engine(cmd: ec.Command) -> bytes:
    return json.dumps({"op": "engine", "now_ms": 1000, "cmd": cmd.to_json()}).encode()


class BrokenReads(MemoryStore):
    """A store whose storage fails under reads (LMDB raising, a disk error)."""

    def read(self, ns: str, key: str) -> sm.Record | None:
        raise RuntimeError("MDB_CORRUPTED: located page was wrong type")


def test_a_storage_failure_while_reading_stops_the_node() -> None:
    s = BrokenReads()
    with pytest.raises(core_apply.NodeFailure, match="MDB_CORRUPTED"):
        s.apply(1, put("k"))
    assert s.applied_index == 0


@pytest.mark.parametrize("exc", [MemoryError(), OSError(28, "No space left on device")])
def test_out_of_memory_or_disk_stops_the_node(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    s = MemoryStore()

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(sm, "apply", fail)
    with pytest.raises(type(exc)):
        s.apply(1, put("k"))
    assert s.applied_index == 0


@pytest.mark.parametrize("where", ["decode_command", "apply"])
def test_a_bug_in_the_state_machine_is_the_same_refusal_on_every_replica(monkeypatch: pytest.MonkeyPatch,
                                                                      where: str) -> None:
    def bug(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a bug every replica hits alike")

    monkeypatch.setattr(sm, where, bug)
    a, b = MemoryStore(), MemoryStore()
    ra, rb = a.apply(1, put("k")), b.apply(1, put("k"))
    assert ra == rb and ra["error"]["code"] == "internal"
    assert a.dump() == b.dump() and a.get("a", "k") is None and a.applied_index == 1


def test_a_bug_in_the_engine_is_refused_alike_and_the_engine_rebuilt(monkeypatch: pytest.MonkeyPatch) -> None:
    s = MemoryStore()
    s.apply(1, engine(ec.Init(remote="git@x:y/z.git", session_ttl_ms=30_000)))

    def bug(self: Any, cmd: Any, *, index: int, now_ms: int) -> Any:
        self._cluster["remote"] = "half-changed"  # fails midway, after touching its memory
        raise TypeError("a bug")

    monkeypatch.setattr(type(s.engine), "apply", bug)
    res = s.apply(2, engine(ec.Init(remote="git@x:y/z.git", session_ttl_ms=10_000)))
    assert res["error"]["code"] == "internal"
    monkeypatch.undo()
    assert s.engine_view(lambda e: e.cluster_settings())["remote"] == "git@x:y/z.git"


def test_a_deeply_nested_command_is_bad_json_everywhere_not_a_node_failure() -> None:
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    res = MemoryStore().apply(1, deep)
    assert res["error"]["code"] == "bad_json"
