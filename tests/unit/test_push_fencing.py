"""Push-time fencing, the engine's rules (``Engine.verify_commits``), and the service's request.

A commit may land when the claim its trailers name still holds on every concept its paths
touch; a commit without a claim may land when it touches nothing another agent holds (and the
cluster accepts uncoordinated commits)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tetherlab.cluster import protocol as p
from tetherlab.cluster.core.engine.engine import Engine
from tetherlab.cluster.core.engine.testing import REMOTE, Driver
from tetherlab.cluster.core.errors import CommandError
from tetherlab.cluster.node.clock import FakeClock
from tetherlab.cluster.node.fake import FakeReplica
from tetherlab.cluster.node.metrics import NodeMetrics
from tetherlab.cluster.node.service import Identity, Service, ServiceSettings

REGISTRY = """
[[concept]]
id = "auth.sessions"
title = "Session store"
paths = ["src/auth/"]

[[concept]]
id = "billing.invoices"
title = "Invoices"
paths = ["src/billing/**/*.py"]
"""
ALICE = "alice/4b2e0000-0000-4000-8000-0000000000a1"
BOB = "bob/4b2e0000-0000-4000-8000-0000000000b0"
SHA = "a" * 40


def driver(policy: str = "accept") -> Driver:
    d = Driver()
    assert d.send({"type": "init", "remote": REMOTE, "session_ttl_ms": 30_000,
                   "uncoordinated_commits": policy})["ok"]
    assert d.push(toml=REGISTRY)["ok"]
    d.open(ALICE)
    d.open(BOB)
    return d


def verify(e: Engine, paths: list[str], agent: str | None = None, intent: str | None = None,
           fence: int | None = None) -> dict[str, Any]:
    out = e.verify_commits([{"commit": SHA, "paths": paths, "agent": agent, "intent": intent, "fence": fence}])
    result: dict[str, Any] = out["results"][0]
    return result


def grant(d: Driver, agent: str, concept: str) -> dict[str, Any]:
    v = d.intent(agent, f"work on {concept}", modify=[concept])
    assert v["action"] == "continue", v
    return v


def codes(r: dict[str, Any]) -> list[str]:
    return [x["code"] for x in r["reasons"]]


def test_work_under_a_valid_claim_lands() -> None:
    d = driver()
    v = grant(d, ALICE, "auth.sessions")
    r = verify(d.engine, ["src/auth/store.py"], ALICE, v["intent_id"], v["fencing_token"])
    assert r["ok"] and r["concepts"] == ["auth.sessions"] and not r["uncoordinated"]
    d.end(ALICE)  # completing does not invalidate what was done under the claim
    r = verify(d.engine, ["src/auth/store.py"], ALICE, v["intent_id"], v["fencing_token"])
    assert r["ok"]


def test_a_claim_lost_and_granted_to_another_refuses_the_push_naming_the_new_holder() -> None:
    d = driver()
    va = grant(d, ALICE, "auth.sessions")
    d.revoke(va["intent_id"])
    vb = grant(d, BOB, "auth.sessions")
    r = verify(d.engine, ["src/auth/store.py"], ALICE, va["intent_id"], va["fencing_token"])
    assert not r["ok"]
    assert "claim_revoked" in codes(r)
    held = next(x for x in r["reasons"] if x["code"] == "held_by_other")
    assert held["holder_agent_id"] == BOB and held["holder_intent_id"] == vb["intent_id"]
    d.end(BOB)  # once Bob is done, Alice's token is still older than his grant
    r = verify(d.engine, ["src/auth/store.py"], ALICE, va["intent_id"], va["fencing_token"])
    sup = next(x for x in r["reasons"] if x["code"] == "claim_superseded")
    assert sup["holder_agent_id"] == BOB and not r["ok"]


def test_a_commit_without_a_claim_on_a_held_concept_is_refused_naming_the_holder() -> None:
    d = driver()
    v = grant(d, ALICE, "auth.sessions")
    r = verify(d.engine, ["README.md", "src/auth/store.py"])
    assert not r["ok"] and r["uncoordinated"]
    (reason,) = r["reasons"]
    assert reason["code"] == "held_by_other" and reason["holder_intent_id"] == v["intent_id"]
    assert reason["path"] == "src/auth/store.py" and ALICE in reason["message"]


def test_commits_that_touch_no_held_concept_land_and_are_reported_as_uncoordinated() -> None:
    d = driver()
    grant(d, ALICE, "auth.sessions")
    r = verify(d.engine, ["README.md", "src/billing/x/pay.py"])
    assert r["ok"] and r["uncoordinated"] and r["concepts"] == ["billing.invoices"]


def test_a_cluster_can_refuse_uncoordinated_commits() -> None:
    d = driver(policy="refuse")
    r = verify(d.engine, ["README.md"])
    assert not r["ok"] and codes(r) == ["uncoordinated"]
    assert d.engine.verify_commits([])["uncoordinated_commits"] == "refuse"


def test_a_claim_must_cover_every_concept_the_commit_touches() -> None:
    d = driver()
    v = grant(d, ALICE, "auth.sessions")
    r = verify(d.engine, ["src/auth/a.py", "src/billing/b.py"], ALICE, v["intent_id"], v["fencing_token"])
    assert not r["ok"] and codes(r) == ["not_claimed"] and r["reasons"][0]["concept"] == "billing.invoices"


def test_trailers_must_match_the_grant() -> None:
    d = driver()
    v = grant(d, ALICE, "auth.sessions")
    assert codes(verify(d.engine, ["src/auth/a.py"], BOB, v["intent_id"], v["fencing_token"]))[:1] == \
        ["trailer_mismatch"]
    assert "not_granted" in codes(verify(d.engine, ["src/auth/a.py"], ALICE, v["intent_id"], 10**6))
    assert codes(verify(d.engine, ["src/auth/a.py"], ALICE, v["intent_id"], None)) == ["bad_trailers"]


def test_commits_made_under_an_earlier_grant_of_the_same_intent_still_land_after_a_replan() -> None:
    d = driver()
    v1 = grant(d, ALICE, "auth.sessions")
    v2 = d.intent(ALICE, "more work", modify=["auth.sessions"], trigger="replan")
    assert v2["intent_id"] == v1["intent_id"] and v2["fencing_token"] > v1["fencing_token"]
    assert verify(d.engine, ["src/auth/a.py"], ALICE, v1["intent_id"], v1["fencing_token"])["ok"]


def test_grants_survive_a_rebuild_from_records_and_leave_with_their_concept() -> None:
    d = driver()
    va = grant(d, ALICE, "auth.sessions")
    d.revoke(va["intent_id"])
    grant(d, BOB, "auth.sessions")
    d.end(BOB)
    rebuilt = d.rebuilt()
    assert codes(verify(rebuilt, ["src/auth/a.py"], ALICE, va["intent_id"], va["fencing_token"])) == \
        codes(verify(d.engine, ["src/auth/a.py"], ALICE, va["intent_id"], va["fencing_token"]))
    d.push(toml=REGISTRY.split("[[concept]]")[0] + "[[concept]]" + REGISTRY.split("[[concept]]")[2])
    assert ("grants", "auth.sessions") not in d.store


def test_a_forgotten_intent_is_judged_by_its_token_alone() -> None:
    d = driver()
    r = verify(d.engine, ["src/auth/a.py"], ALICE, "i-999999", 999999)
    assert r["ok"] and r["reasons"] == []


def test_too_many_commits_or_paths_are_refused_naming_the_bound() -> None:
    d = driver()
    with pytest.raises(CommandError, match="at most 256 commits"):
        d.engine.verify_commits([{"commit": SHA, "paths": []}] * 257)
    with pytest.raises(CommandError, match="paths per query"):
        verify(d.engine, ["x"] * 5000)


def test_the_service_answers_from_linearizable_state_for_any_key_and_a_verifier_may_do_nothing_else() -> None:
    async def body() -> None:
        replica = FakeReplica()
        svc = Service(replica, FakeClock(), ServiceSettings("n1", "t", remote=REMOTE), NodeMetrics(),
                      _NoConnections())
        git = Identity("git-server", "verifier", "SHA256:git")
        req = p.VerifyCommits(id=1, commits=(p.CommitClaim(commit=SHA, paths=("README.md",)),))
        reply = await svc.handle(git, req)
        assert isinstance(reply, p.Result) and reply.payload["results"][0]["ok"]
        assert replica.barriers == 1
        for other in (p.WorldSlice(id=2, agent_id=ALICE), p.KeysList(id=3)):
            denied = await svc.handle(git, other)
            assert isinstance(denied, p.Error) and denied.code == "forbidden" and "verifier" in denied.message
        dev = await svc.handle(Identity("alice", "developer", "SHA256:a"), req)
        assert isinstance(dev, p.Result)  # a developer's pre-push hook verifies too

    asyncio.run(body())


class _NoConnections:
    def push(self, agent_id: str, msg: p.Message) -> int:
        return 0

    def drop_key(self, key_id: str, reason: str) -> None:
        pass
