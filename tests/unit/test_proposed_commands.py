"""A node applies the engine commands it proposed without decoding their bytes again
(``replica.store.ProposedCommands``): decoding and checking an entry it has just encoded was about
a quarter of its apply. Every replica must still apply the same command: the round trip through the
entry's bytes gives back an equal command for every kind the node proposes, and a store that takes
the proposed command ends in exactly the state of one that decodes the bytes."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pytest

from tetherlab.chaos.bench.engine import REMOTE, _plan_text, _report, concept_record
from tetherlab.cluster.core import apply as core_apply
from tetherlab.cluster.core.engine import commands as ec
from tetherlab.cluster.core.engine.engine import Engine, with_match
from tetherlab.cluster.node.replica import encode_engine, engine_entry
from tetherlab.cluster.replica.lmdbstore import LmdbStore
from tetherlab.cluster.replica.memstore import MemoryStore
from tetherlab.cluster.replica.store import ProposedCommands

CONCEPTS = 300
NOW_MS = 1_000_000


def corpus() -> list[ec.Command]:
    """Every kind of engine command a node proposes, with the shapes real traffic has: plans
    matched by the proposer, heartbeats of many agents, change reports with symbols and hunks."""
    rng = random.Random(7)
    eng = Engine()
    cmds: list[ec.Command] = [
        ec.decode_command({"type": "init", "remote": REMOTE, "session_ttl_ms": 60_000}),
        ec.decode_command({"type": "push_registry",
                           "concepts": [concept_record(k, rng) for k in range(CONCEPTS)]}),
    ]
    for i, c in enumerate(cmds):
        eng.apply(c, index=i + 1, now_ms=NOW_MS)
    agents = [f"dev{k % 5}/a{k}" for k in range(40)]
    cmds += [ec.decode_command({"type": "open_session", "agent_id": a, "developer": a.split("/")[0],
                                "tool": "claude-code", "machine": "m", "repo_remote": REMOTE, "base_commit": "c0"})
             for a in agents]
    basis = eng.match_basis()
    submitted: dict[str, int] = {}  # agent -> the index of its submit (its intent is "i-<index>")
    for k, a in enumerate(agents):
        body = {**_plan_text(rng, CONCEPTS), **({"files": [f"src/d{k:02d}/x.py"]} if k % 3 == 0 else {})}
        if k % 5 == 0:  # a few agents on three hot concepts: some plans are stopped
            body["concepts"] = {"modify": [f"d{k % 3:02d}.c{k % 3}"], "depend": []}
        cmd = ec.decode_command({"type": "intent", "agent_id": a, "tool": "opencode",
                                 "trigger": "initial", "intent": body})
        assert isinstance(cmd, ec.SubmitIntent) and cmd.intent is not None
        cmds.append(with_match(cmd, basis.match(cmd.intent)))
        submitted[a] = len(cmds)
    for k, a in enumerate(agents):
        cmds.append(ec.decode_command({"type": "report_changes", "agent_id": a, "intent_id": f"i-{submitted[a]}",
                                       "files": _report(rng, k, CONCEPTS, 4), "truncated": k % 7 == 0}))
    cmds.append(ec.decode_command({"type": "revoke", "intent_id": f"i-{submitted[agents[3]]}", "by": "admin",
                                   "revert": True, "reason": "r"}))
    for k, a in enumerate(agents):
        if k % 4 == 0:
            plan = ec.decode_command({"type": "intent", "agent_id": a, "tool": "opencode", "trigger": "replan",
                                      "intent": _plan_text(rng, CONCEPTS)})
            assert isinstance(plan, ec.SubmitIntent) and plan.intent is not None
            cmds.append(with_match(plan, basis.match(plan.intent)))
        cmds.append(ec.decode_command({"type": "intent", "agent_id": a, "tool": "opencode",
                                       "trigger": "complete" if k % 2 else "abandon"}))
    cmds += [
        ec.decode_command({"type": "heartbeat", "agent_ids": agents}),
        ec.decode_command({"type": "expire", "now_ms": NOW_MS + 5}),
        ec.decode_command({"type": "leader_elected", "now_ms": NOW_MS + 6}),
        ec.decode_command({"type": "close_session", "agent_id": agents[0]}),
    ]
    return cmds


def test_every_command_a_node_proposes_comes_back_equal_from_its_entry() -> None:
    kinds = set()
    for cmd in corpus():
        entry = json.loads(encode_engine(cmd, NOW_MS))
        assert entry["now_ms"] == NOW_MS
        assert ec.decode_command(entry["cmd"]) == cmd, cmd.TYPE
        kinds.add(cmd.TYPE)
    assert kinds >= {"init", "push_registry", "open_session", "intent", "report_changes", "heartbeat",
                     "revoke", "expire", "leader_elected", "close_session"}


def _stream() -> list[tuple[int, ec.Command]]:
    """The corpus as a log: a submit's claims were matched against the registry the store will
    hold when it applies them, as a proposer's are."""
    return [(NOW_MS + i, cmd) for i, cmd in enumerate(corpus())]


@pytest.mark.parametrize("kind", ["lmdb", "memory"])
def test_applying_the_proposed_command_ends_in_the_same_state_and_decodes_nothing(
        kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def store(name: str) -> Any:
        return LmdbStore(tmp_path / name) if kind == "lmdb" else MemoryStore()

    decodes = [0]
    real_decode = core_apply.decode_engine_command

    def counting(obj: Any) -> ec.Command:
        decodes[0] += 1
        return real_decode(obj)

    monkeypatch.setattr(core_apply, "decode_engine_command", counting)
    stream = _stream()
    plain, proposer = store("plain"), store("proposer")
    plain_results = [plain.apply(i, encode_engine(cmd, now)) for i, (now, cmd) in enumerate(stream, start=1)]
    assert decodes[0] == len(stream)
    decodes[0] = 0
    # The proposer's way: the entry's bytes are what goes through Raft (a copy: pysyncobj
    # unpickles a new bytes object at apply), the command is remembered by them.
    results = [proposer.apply(i, bytes(bytearray(engine_entry(proposer, cmd, now))))
               for i, (now, cmd) in enumerate(stream, start=1)]
    assert decodes[0] == 0, "the apply decoded entries its own node had proposed"
    assert len(proposer.proposed) == 0  # each taken by its apply
    assert results == plain_results
    assert proposer.dump() == plain.dump()


def test_proposed_commands_are_bounded_oldest_first_and_taken_once() -> None:
    pc = ProposedCommands(capacity=3)
    cmd = ec.Expire(now_ms=1)
    for i in range(5):
        pc.put(b"entry-%d" % i, i, cmd)
    assert len(pc) == 3
    assert pc.take(b"entry-0") is None and pc.take(b"entry-1") is None  # dropped: decoded as any entry
    assert pc.take(b"entry-4") == (4, cmd)
    assert pc.take(b"entry-4") is None
    assert len(pc) == 2


def test_with_match_is_the_checked_constructor_without_the_checks_already_made() -> None:
    # with_match builds the command without running every field's check again; it must give
    # what the constructor gives, and refuse what it refuses, with the same errors.
    plans = [c for c in corpus() if isinstance(c, ec.SubmitIntent) and c.matched is not None]
    assert plans
    for c in plans:
        bare = dataclasses.replace(c, matched=None)
        assert with_match(bare, dict(c.matched or {})) == dataclasses.replace(bare, matched=c.matched)
    bare = dataclasses.replace(plans[0], matched=None)
    bad_claims: list[Any] = [[], {"registry_version": 1, "index_version": 0, "modify": "x", "depend": []},
                             {"registry_version": "1", "index_version": 0, "modify": [], "depend": []},
                             {"registry_version": 1, "index_version": 0, "modify": [{"reasons": []}], "depend": []}]
    for claims in bad_claims:
        with pytest.raises(ec.CommandError) as slow:
            dataclasses.replace(bare, matched=claims)
        with pytest.raises(ec.CommandError) as fast:
            with_match(bare, claims)
        assert fast.value.to_json() == slow.value.to_json()
    complete = ec.SubmitIntent(agent_id=bare.agent_id, tool=bare.tool, intent=None, trigger="complete")
    with pytest.raises(ec.CommandError) as slow:
        dataclasses.replace(complete, matched={"registry_version": 1, "index_version": 0, "modify": [], "depend": []})
    with pytest.raises(ec.CommandError) as fast:
        with_match(complete, {"registry_version": 1, "index_version": 0, "modify": [], "depend": []})
    assert fast.value.to_json() == slow.value.to_json()
