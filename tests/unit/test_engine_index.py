"""The code index in the replicated engine: delivered in chunks by ``install_index``, activated
alone or with a registry push, kept in records (so a restarted replica rebuilds the same one),
and used by matching: the same registry, index and intent give the same claims everywhere."""

from __future__ import annotations

from typing import Any

from tetherlab.cluster.core.engine.codeindex import CodeIndex, Symbol, pack
from tetherlab.cluster.core.engine.testing import Driver

REGISTRY = """
[[concept]]
id = "console.core"
paths = ["rich/console.py"]
symbols = ["Console"]

[[concept]]
id = "console.export"
paths = ["rich/_export_format.py"]
symbols = ["Console.export_svg"]
depends_on = ["console.core"]
"""

INDEX = CodeIndex({
    "rich/console.py": [Symbol("Console", "class", 1, 900), Symbol("Console._caller_frame_info", "method", 40, 60),
                        Symbol("Console.export_svg", "method", 700, 800)],
    "rich/_export_format.py": [Symbol("CONSOLE_SVG_FORMAT", "variable", 1, 5)],
})
PLAN = "Use sys._getframe instead of inspect.currentframe in `_caller_frame_info`"


def install(d: Driver, idx: CodeIndex, activate: bool = True, chunk_chars: int = 100) -> dict[str, Any]:
    digest, chunks = pack(idx, chunk_chars)
    res: dict[str, Any] = {}
    for seq, data in enumerate(chunks):
        res = d.send({"type": "install_index", "digest": digest, "seq": seq, "total": len(chunks), "data": data,
                      "activate": activate})
    return res


def ready() -> Driver:
    d = Driver()
    d.init()
    assert d.push(REGISTRY)["ok"]
    d.open("alice/a1")
    return d


def claims(d: Driver, agent: str, summary: str) -> dict[str, Any]:
    v = d.intent(agent, summary)
    assert "claims" in v, v
    return v["claims"]


def test_an_index_arrives_in_chunks_then_matching_resolves_through_it() -> None:
    d = ready()
    before = claims(d, "alice/a1", PLAN)
    assert before["modify"] == [] and before["index_version"] == 0  # _caller_frame_info is not registered
    d.end("alice/a1")
    digest, chunks = pack(INDEX, 100)
    assert len(chunks) > 2
    for seq, data in enumerate(chunks[:-1]):
        r = d.send({"type": "install_index", "digest": digest, "seq": seq, "total": len(chunks), "data": data})
        assert r["ok"] and not r["complete"] and r["received"] == seq + 1
    r = d.send({"type": "install_index", "digest": digest, "seq": len(chunks) - 1, "total": len(chunks),
                "data": chunks[-1]})
    assert r["complete"] and r["active"] and r["index_version"] == 1 and r["files"] == 2
    after = claims(d, "alice/a1", PLAN)
    assert [c["concept"] for c in after["modify"]] == ["console.core"]
    assert after["index_version"] == 1
    assert d.engine.index_info()["digest"] == INDEX.digest
    # Sending the same index again changes nothing.
    assert install(d, INDEX)["unchanged"]


def test_a_staged_index_is_activated_with_a_registry_push() -> None:
    d = ready()
    r = install(d, INDEX, activate=False)
    assert r["complete"] and not r["active"]
    assert d.engine.code_index is None
    res = d.send({"type": "push_registry", "toml": REGISTRY, "index_digest": INDEX.digest})
    assert res["ok"] and res["index_version"] == 1 and res["version"] == 2
    assert d.engine.code_index is not None and d.engine.code_index.digest == INDEX.digest
    # A digest that was never sent is refused, and the registry stays as it was.
    bad = d.send({"type": "push_registry", "toml": REGISTRY, "index_digest": "f" * 64})
    assert bad["error"]["code"] == "unknown_index" and d.last_writes == []
    assert d.engine.registry is not None and d.engine.registry.version == 2


def test_bad_chunks_are_refused_without_changing_anything() -> None:
    d = ready()
    digest, chunks = pack(INDEX, 100)
    wrong = d.send({"type": "install_index", "digest": "0" * 64, "seq": 0, "total": 1, "data": chunks[0]})
    assert wrong["error"]["code"] == "invalid_index" and d.last_writes == []
    assert d.send({"type": "install_index", "digest": digest, "seq": 5, "total": 2, "data": ""})["error"]["code"] \
        == "bad_field"
    assert d.send({"type": "install_index", "digest": digest, "seq": 0, "total": 2, "data": "@@"})["error"]["code"] \
        == "bad_field"
    d.send({"type": "install_index", "digest": digest, "seq": 0, "total": len(chunks), "data": chunks[0]})
    mismatch = d.send({"type": "install_index", "digest": digest, "seq": 1, "total": len(chunks) + 1,
                       "data": chunks[1]})
    assert mismatch["error"]["code"] == "bad_field" and d.last_writes == []


def test_records_rebuild_the_same_index_and_the_same_claims() -> None:
    d = ready()
    install(d, INDEX)
    v1 = claims(d, "alice/a1", PLAN)
    rebuilt = d.rebuilt()
    assert rebuilt.code_index is not None and rebuilt.code_index.digest == INDEX.digest
    assert rebuilt._index_view() == d.engine._index_view()
    assert rebuilt.dump_records() == d.engine.dump_records()
    # A second replica fed the same log reaches the same claims.
    other = ready()
    install(other, INDEX)
    assert claims(other, "alice/a1", PLAN) == v1


def test_a_new_index_replaces_the_old_one_and_its_records() -> None:
    d = ready()
    install(d, INDEX, chunk_chars=50)
    n_old = len([k for ns, k, _ in d.records() if ns == "index" and k.startswith("chunk/")])
    smaller = CodeIndex({"rich/console.py": [Symbol("Console", "class", 1, 9)]})
    r = install(d, smaller, chunk_chars=10_000)
    assert r["index_version"] == 2
    chunk_keys = [k for ns, k, _ in d.records() if ns == "index" and k.startswith("chunk/")]
    assert len(chunk_keys) == 1 < n_old  # the old chunks are gone
    assert not [k for ns, k, _ in d.records() if ns == "index" and k.startswith("staging")]
    assert d.rebuilt().code_index is not None and d.rebuilt().code_index.digest == smaller.digest


def test_one_command_can_carry_a_whole_index() -> None:
    """What an operator proposes from a local file with the control socket's engine_file."""
    d = ready()
    digest, (data,) = pack(INDEX, chunk_chars=10**9)
    r = d.send({"type": "install_index", "digest": digest, "seq": 0, "total": 1, "data": data})
    assert r["active"] and r["index_version"] == 1
