"""The node's service over the in-memory replica and a fake clock: what used to need three
processes, real SSH and real time (authorisation, routing, batching, membership, revocation)
runs here in milliseconds."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tetherlab.cluster import protocol as p
from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.core.config import ClusterSettings, LoadLimits
from tetherlab.cluster.core.engine import commands as ec
from tetherlab.cluster.node.clock import FakeClock
from tetherlab.cluster.node.duties import EXPIRE_INTERVAL_S, LeaderDuties
from tetherlab.cluster.node.errors import Indeterminate, Unavailable
from tetherlab.cluster.node.fake import FakeReplica
from tetherlab.cluster.node.keys import KEYS_NS, make_registered
from tetherlab.cluster.node.metrics import NodeMetrics
from tetherlab.cluster.node.replica import encode_command
from tetherlab.cluster.node.service import Identity, Peer, Service, ServiceSettings, authenticate

REGISTRY = """
[[concept]]
id = "auth.session-store-contract"
title = "Session store contract"
paths = ["src/auth/session_store.py"]
aliases = ["session store"]

[[concept]]
id = "api.routes"
title = "Route handlers"
paths = ["src/api/routes/"]
aliases = ["route handlers"]
depends_on = ["auth.session-store-contract"]
"""
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl dana@example"
ADMIN = Identity("admin", "admin", "SHA256:admin")
ALICE = Identity("alice", "developer", "SHA256:alice")
BOB = Identity("bob", "developer", "SHA256:bob")


class FakeConnections:
    def __init__(self) -> None:
        self.pushed: list[tuple[str, p.Message]] = []
        self.dropped: list[str] = []

    def push(self, agent_id: str, msg: p.Message) -> int:
        self.pushed.append((agent_id, msg))
        return 1

    def drop_key(self, key_id: str, reason: str) -> None:
        self.dropped.append(key_id)


class Rig:
    def __init__(self, members: int = 3, limits: LoadLimits | None = None) -> None:
        self.replica = FakeReplica("n1", {f"n{i}": {"raft": f"10.0.0.{i}:7100", "ssh": f"10.0.0.{i}:7200"}
                                          for i in range(1, members + 1)})
        for i in range(2, members + 1):
            self.replica.set_peer(f"n{i}", 0.1)
        # The identities the tests act as hold registered keys (the service checks them once the
        # cluster is bootstrapped); written at index 1, below every proposal.
        self.replica.store.apply(1, encode_command(sm.Txn((), tuple(
            sm.Put(KEYS_NS, who.key_id, json.dumps({"id": who.key_id, "developer": who.developer, "role": who.role,
                                                    "public_key": "ssh-ed25519 AAAA", "comment": ""}))
            for who in (ADMIN, ALICE, BOB)))))
        self.clock = FakeClock()
        self.conns = FakeConnections()
        self.metrics = NodeMetrics()
        self.service = Service(self.replica, self.clock, ServiceSettings("n1", "test", remote="git@x:acme/shop.git",
                                                                         healthy_window_s=1.0,
                                                                         limits=limits or LoadLimits()),
                               self.metrics, self.conns)
        self._ids = 0

    async def call(self, who: Identity, cls: type[p.Request], peer: Peer | None = None, **fields: Any) -> p.Message:
        self._ids += 1
        return await self.service.handle(who, cls(id=self._ids, **fields), peer)

    async def ok(self, who: Identity, cls: type[p.Request], **fields: Any) -> dict[str, Any]:
        reply = await self.call(who, cls, **fields)
        assert isinstance(reply, p.Result), reply
        return reply.payload

    async def session(self, who: Identity) -> str:
        agent = f"{who.developer}/{uuid.uuid4()}"
        await self.ok(who, p.OpenSession, agent_id=agent, tool="claude-code", machine="laptop",
                      repo_remote="git@x:acme/shop.git", base_commit="abcdef1")
        return agent


def run(body: Callable[[Rig], Awaitable[None]], members: int = 3, limits: LoadLimits | None = None) -> None:
    asyncio.run(body(Rig(members, limits)))


def test_ping_and_status_are_answered_by_any_node() -> None:
    async def body(r: Rig) -> None:
        r.replica.set_role("follower", leader=None)
        assert isinstance(await r.call(ALICE, p.Ping), p.Result)
        status = await r.ok(ALICE, p.Status)
        assert status["role"] == "follower" and status["quorum_backed"] is False
    run(body)


def test_a_developer_acts_only_for_their_own_agents() -> None:
    async def body(r: Rig) -> None:
        reply = await r.call(BOB, p.OpenSession, agent_id=f"alice/{uuid.uuid4()}", tool="t", machine="m",
                             repo_remote="git@x:acme/shop.git", base_commit="abcdef1")
        assert isinstance(reply, p.Error) and reply.code == "forbidden" and "alice" in reply.message
        agent = await r.session(ALICE)
        reply = await r.call(BOB, p.Heartbeat, agent_ids=(agent,))
        assert isinstance(reply, p.Error) and reply.code == "forbidden"
    run(body)


def test_admin_requests_need_an_admin_key() -> None:
    async def body(r: Rig) -> None:
        for cls, fields in [(p.KeysList, {}), (p.ConceptsPush, {"toml": REGISTRY}),
                            (p.IntentsRevoke, {"intent_id": "i-1"}), (p.ClusterRemove, {"node_id": "n2"})]:
            reply = await r.call(ALICE, cls, **fields)
            assert isinstance(reply, p.Error) and reply.code == "forbidden", (cls, reply)
            assert "admin key" in reply.message
        assert r.replica.log == []  # nothing reached the log
    run(body)


def test_a_follower_redirects_to_the_leaders_ssh_address() -> None:
    async def body(r: Rig) -> None:
        r.replica.set_role("follower", leader="n2")
        reply = await r.call(ALICE, p.Heartbeat, agent_ids=(f"alice/{uuid.uuid4()}",))
        assert isinstance(reply, p.Redirect) and reply.leader_id == "n2" and reply.leader_address == "10.0.0.2:7200"
    run(body)


def test_without_a_quorum_backed_leader_every_request_is_unavailable() -> None:
    async def body(r: Rig) -> None:
        r.replica.set_role("follower", leader=None)
        reply = await r.call(ALICE, p.WorldSlice, agent_id=f"alice/{uuid.uuid4()}")
        assert isinstance(reply, p.Unavailable) and reply.reason == "no_leader"
        r.replica.set_role("leader", quorum_backed=False)  # a leader cut off from its majority
        reply = await r.call(ALICE, p.WorldSlice, agent_id=f"alice/{uuid.uuid4()}")
        assert isinstance(reply, p.Unavailable) and reply.reason == "no_quorum"
        assert r.replica.log == []
    run(body)


def test_a_proposal_that_fails_or_times_out_becomes_unavailable_never_a_verdict() -> None:
    async def body(r: Rig) -> None:
        agent = await r.session(ALICE)
        intent = p.Intent(summary="Rework the session store", steps=("x",))
        r.replica.fail_next(Unavailable("not_leader"))
        reply = await r.call(ALICE, p.SubmitIntent, agent_id=agent, tool="t", intent=intent, trigger="initial")
        assert isinstance(reply, p.Unavailable) and reply.reason == "no_leader"
        r.replica.fail_next(Indeterminate("timeout"))
        reply = await r.call(ALICE, p.SubmitIntent, agent_id=agent, tool="t", intent=intent, trigger="initial")
        assert isinstance(reply, p.Unavailable) and reply.reason == "timeout" and "retrying is safe" in reply.message
    run(body)


def test_verdicts_through_the_service_continue_then_stop_naming_the_holder() -> None:
    async def body(r: Rig) -> None:
        await r.ok(ADMIN, p.ConceptsPush, toml=REGISTRY)
        alice, bob = await r.session(ALICE), await r.session(BOB)
        v1 = await r.ok(ALICE, p.SubmitIntent, agent_id=alice, tool="t", trigger="initial",
                        intent=p.Intent(summary="Deprecate the session store", steps=("replace it",)))
        assert v1["action"] == "continue" and v1["fencing_token"] > 0
        v2 = await r.ok(BOB, p.SubmitIntent, agent_id=bob, tool="t", trigger="initial",
                        intent=p.Intent(summary="Add route handlers on top of the session store", steps=("x",)))
        assert v2["action"] == "stop"
        assert any(c["holder_agent_id"] == alice for c in v2["conflicts"])
    run(body)


def test_verdicts_are_logged_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    # One line per verdict at info cost a busy leader a twentieth of its CPU (docs/operator-guide.md).
    async def body(r: Rig) -> None:
        await r.ok(ADMIN, p.ConceptsPush, toml=REGISTRY)
        alice = await r.session(ALICE)
        await r.ok(ALICE, p.SubmitIntent, agent_id=alice, tool="t", trigger="initial",
                   intent=p.Intent(summary="Deprecate the session store", steps=("replace it",)))

    with caplog.at_level(logging.DEBUG, logger="tetherlab"):
        run(body)
    lines = [rec for rec in caplog.records if rec.getMessage().startswith("verdict ")]
    assert lines and all(rec.levelno == logging.DEBUG for rec in lines)
    assert getattr(lines[0], "agent_id", "").startswith("alice/")


def test_concurrent_heartbeats_share_one_log_entry() -> None:
    async def body(r: Rig) -> None:
        agents = [await r.session(ALICE) for _ in range(20)]
        before = len(r.replica.commands("heartbeat"))
        replies = await asyncio.gather(*(r.ok(ALICE, p.Heartbeat, agent_ids=(a,)) for a in agents))
        assert all(rep["lapsed"] == [] and rep["unknown"] == [] for rep in replies)
        assert len(r.replica.commands("heartbeat")) - before == 1
    run(body)


def test_a_heartbeat_for_a_forgotten_session_says_unknown() -> None:
    async def body(r: Rig) -> None:
        ghost = f"alice/{uuid.uuid4()}"
        rep = await r.ok(ALICE, p.Heartbeat, agent_ids=(ghost,))
        assert rep["unknown"] == [ghost]
    run(body)


def test_a_heartbeat_confirms_only_the_sessions_it_kept_alive_and_carries_the_ttl() -> None:
    async def body(r: Rig) -> None:
        alive, ghost = await r.session(ALICE), f"alice/{uuid.uuid4()}"
        rep = await r.ok(ALICE, p.Heartbeat, agent_ids=(alive, ghost))
        assert rep["confirmed"] == [alive] and rep["unknown"] == [ghost]
        assert rep["session_ttl_ms"] == 30_000  # the cluster's TTL now, for the shim's margin check
        await r.service.engine(ec.Init(remote="git@x:acme/shop.git", session_ttl_ms=10_000))
        rep = await r.ok(ALICE, p.Heartbeat, agent_ids=(alive,))
        assert rep["confirmed"] == [alive] and rep["session_ttl_ms"] == 10_000  # lowered: the renewal's TTL
    run(body)


def test_closing_a_session_abandons_its_intent_and_frees_the_concept() -> None:
    async def body(r: Rig) -> None:
        await r.ok(ADMIN, p.ConceptsPush, toml=REGISTRY)
        alice, bob = await r.session(ALICE), await r.session(BOB)
        peer = Peer()
        v = await r.ok(ALICE, p.SubmitIntent, agent_id=alice, tool="t", trigger="initial",
                       intent=p.Intent(summary="Deprecate the session store", steps=("x",)))
        assert v["action"] == "continue"
        reply = await r.call(BOB, p.CloseSession, agent_id=alice)
        assert isinstance(reply, p.Error) and reply.code == "forbidden"
        peer.agent_ids.add(alice)
        reply = await r.call(ALICE, p.CloseSession, peer, agent_id=alice)
        assert isinstance(reply, p.Result) and reply.payload["abandoned"] == v["intent_id"]
        assert alice not in peer.agent_ids
        rep = await r.ok(ALICE, p.Heartbeat, agent_ids=(alice,))
        assert rep["unknown"] == [alice] and rep["confirmed"] == []
        v2 = await r.ok(BOB, p.SubmitIntent, agent_id=bob, tool="t", trigger="initial",
                        intent=p.Intent(summary="Add route handlers on top of the session store", steps=("x",)))
        assert v2["action"] == "continue"
    run(body)


def test_revoking_a_key_closes_its_connections() -> None:
    async def body(r: Rig) -> None:
        added = await r.ok(ADMIN, p.KeysAdd, developer="dana", public_key=PUBKEY)
        key_id = added["key"]["id"]
        await r.ok(ADMIN, p.KeysRevoke, key_id=key_id[:20])  # a unique prefix is enough
        assert r.conns.dropped == [key_id]
        reply = await r.call(ADMIN, p.KeysRevoke, key_id=key_id)
        assert isinstance(reply, p.Error) and reply.code == "unknown_key"
    run(body)


def test_revoking_an_intent_notifies_the_agents_connection() -> None:
    async def body(r: Rig) -> None:
        await r.ok(ADMIN, p.ConceptsPush, toml=REGISTRY)
        alice = await r.session(ALICE)
        v = await r.ok(ALICE, p.SubmitIntent, agent_id=alice, tool="t", trigger="initial",
                       intent=p.Intent(summary="Deprecate the session store", steps=("x",)))
        await r.ok(ADMIN, p.IntentsRevoke, intent_id=v["intent_id"], revert=True)
        (agent, msg), = r.conns.pushed
        assert agent == alice and isinstance(msg, p.Revoked) and msg.revert and msg.intent_id == v["intent_id"]
    run(body)


def test_membership_changes_that_would_lose_quorum_are_refused() -> None:
    async def body(r: Rig) -> None:
        r.replica.set_peer("n2", None)  # n2 and n3 stopped answering: 1 healthy of 3
        r.replica.set_peer("n3", None)
        reply = await r.call(ADMIN, p.ClusterAdd, node_id="n4", raft="10.0.0.4:7100", ssh="10.0.0.4:7200",
                             http="10.0.0.4:7300")
        assert isinstance(reply, p.Error) and reply.code == "would_lose_quorum"
        r.replica.set_peer("n2", 0.1)  # 2 healthy of 3: removing a healthy member leaves 1 of 2
        reply = await r.call(ADMIN, p.ClusterRemove, node_id="n2")
        assert isinstance(reply, p.Error) and reply.code == "would_lose_quorum"
        assert r.replica.membership_changes == []
        # removing the dead one keeps 2 of 2
        assert (await r.ok(ADMIN, p.ClusterRemove, node_id="n3"))["removed"] == "n3"
        assert r.replica.membership_changes == [(False, "10.0.0.3:7100")]
    run(body)


def test_removing_the_leader_hands_leadership_over_first() -> None:
    async def body(r: Rig) -> None:
        reply = await r.call(ADMIN, p.ClusterRemove, node_id="n1")
        assert isinstance(reply, p.Error) and reply.code == "leader_moving"
        assert r.replica.transfers == 1 and r.replica.membership_changes == []
    run(body)


def test_adding_a_member_records_its_addresses_then_changes_membership() -> None:
    async def body(r: Rig) -> None:
        out = await r.ok(ADMIN, p.ClusterAdd, node_id="n4", raft="10.0.0.4:7100", ssh="10.0.0.4:7200",
                         http="10.0.0.4:7300")
        assert out["members"] == ["n1", "n2", "n3", "n4"]
        assert r.replica.membership_changes == [(True, "10.0.0.4:7100")]
        assert r.replica.store.get("members", "n4") is not None
    run(body)


def test_failed_closed_reports_count_for_five_minutes_of_clock() -> None:
    async def body(r: Rig) -> None:
        agent = f"alice/{uuid.uuid4()}"
        await r.ok(ALICE, p.ShimReport, agent_id=agent, event="failed_closed", at_unix_ms=1, detail="cut off")
        assert r.service.failing_closed() == 1
        r.clock.advance(301)
        assert r.service.failing_closed() == 0
    run(body)


# --- leader duties ----------------------------------------------------------------------------


def _duties(r: Rig, admin_key: str = PUBKEY) -> tuple[LeaderDuties, list[str]]:
    lost: list[str] = []
    d = LeaderDuties(r.replica, r.clock, ClusterSettings("git@x:acme/shop.git", (admin_key,), "admin", 30),
                     NodeMetrics(), on_lost_leadership=lost.append)
    return d, lost


def test_leader_duties_bootstrap_once_then_extend_sessions_once_per_term() -> None:
    async def body(r: Rig) -> None:
        d, _ = _duties(r)
        await d.step()
        key = make_registered("admin", "admin", PUBKEY)
        assert r.replica.store.get(KEYS_NS, key.id) is not None
        assert r.replica.store.get("meta", "bootstrapped") is not None
        assert len(r.replica.commands("leader_elected")) == 1
        await d.step()
        await d.step()
        assert len(r.replica.commands("leader_elected")) == 1
        assert len(r.replica.commands("txn")) == 1  # bootstrap ran once
        r.replica.set_role("leader", term=2)
        await d.step()
        assert len(r.replica.commands("leader_elected")) == 2
    run(body)


def test_a_revoked_bootstrap_admin_key_is_never_re_added() -> None:
    async def body(r: Rig) -> None:
        d, _ = _duties(r)
        await d.step()
        key = make_registered("admin", "admin", PUBKEY)
        await r.replica.propose(encode_command(sm.Delete(KEYS_NS, key.id)))
        d2, _ = _duties(r)  # a new leader (or a restart) runs its duties from scratch
        await d2.step()
        assert r.replica.store.get(KEYS_NS, key.id) is None
    run(body)


def test_expiry_sweeps_run_every_interval_of_the_injected_clock() -> None:
    async def body(r: Rig) -> None:
        d, _ = _duties(r)
        await d.step()
        await d.step()
        assert r.replica.commands("expire") == []
        r.clock.advance(EXPIRE_INTERVAL_S)
        await d.step()
        assert len(r.replica.commands("expire")) == 1
    run(body)


def test_sessions_lapse_on_the_leaders_clock_only_after_the_ttl() -> None:
    async def body(r: Rig) -> None:
        d, _ = _duties(r)
        await d.step()
        agent = await r.session(ALICE)
        for _ in range(3):
            r.clock.advance(10.0)
            await d.step()
        assert r.replica.store.engine_view(lambda e: e.get_session(agent))["status"] == "open"
        r.clock.advance(10.0)
        await d.step()
        assert r.replica.store.engine_view(lambda e: e.get_session(agent))["status"] == "lapsed"
    run(body)


def test_losing_quorum_backing_fails_pending_proposals_and_restarts_the_term() -> None:
    async def body(r: Rig) -> None:
        d, lost = _duties(r)
        await d.step()
        r.replica.set_role("leader", quorum_backed=False)
        await d.step()
        assert lost and "lost its quorum-backed leadership" in lost[0]
        r.replica.set_role("leader")
        await d.step()
        assert len(r.replica.commands("leader_elected")) == 2
    run(body)


@pytest.mark.parametrize("seconds", [0.0, 0.5])
def test_the_fake_clock_only_moves_when_told(seconds: float) -> None:
    c = FakeClock()
    t0, ms0 = c.monotonic(), c.now_ms()
    asyncio.run(c.sleep(seconds))
    assert c.monotonic() - t0 == seconds and c.now_ms() - ms0 == int(seconds * 1000)
    with pytest.raises(ValueError):
        c.advance(-1)


def test_in_flight_changes_go_through_the_service_for_the_agents_owner_only() -> None:
    async def body(r: Rig) -> None:
        await r.ok(ADMIN, p.ConceptsPush, toml=REGISTRY)
        alice, bob = await r.session(ALICE), await r.session(BOB)
        va = await r.ok(ALICE, p.SubmitIntent, agent_id=alice, tool="t", trigger="initial",
                        intent=p.Intent(summary="Deprecate the session store", steps=("x",)))
        vb = await r.ok(BOB, p.SubmitIntent, agent_id=bob, tool="t", trigger="initial",
                        intent=p.Intent(summary="Tidy the build", steps=("x",)))
        files = (p.FileReport(path="Makefile"),)
        denied = await r.call(BOB, p.ReportChanges, agent_id=alice, intent_id=va["intent_id"], files=files)
        assert isinstance(denied, p.Error) and denied.code == "forbidden"
        await r.ok(ALICE, p.ReportChanges, agent_id=alice, intent_id=va["intent_id"], files=files)
        out = await r.ok(BOB, p.ReportChanges, agent_id=bob, intent_id=vb["intent_id"], files=files)
        assert out["action"] == "continue" and out["soft_conflicts"][0]["other_agent_id"] == alice
        # Bob's changes reach the route handlers, which depend on what Alice modifies: stopped.
        out = await r.ok(BOB, p.ReportChanges, agent_id=bob, intent_id=vb["intent_id"],
                         files=(p.FileReport(path="src/api/routes/orders.py"),))
        assert out["action"] == "stop" and out["conflicts"][0]["holder_agent_id"] == alice
        listed = await r.ok(ALICE, p.ConflictsList)
        assert {e["kind"] for e in listed["recent"]} >= {"soft_file", "drift_stop"}
        bad = await r.call(ALICE, p.ReportChanges, agent_id=alice, intent_id=va["intent_id"],
                           files=(p.FileReport(path="/etc/passwd"),))
        assert isinstance(bad, p.Error) and bad.code == "bad_field" and "files[0].path" in bad.message
    run(body)


# --- quotas ([limits]) ------------------------------------------------------------------------


def _refusals(r: Rig, limit: str) -> float:
    return r.metrics.registry.get_sample_value("tetherlab_quota_refusals_total", {"limit": limit}) or 0.0


def test_a_connection_over_its_request_rate_is_refused_naming_the_limit() -> None:
    async def body(r: Rig) -> None:
        conn, other = Peer(), Peer()
        replies = [await r.call(ALICE, p.Ping, conn) for _ in range(12)]
        assert all(isinstance(x, p.Result) for x in replies[:10])  # the burst
        refused = replies[10]
        assert isinstance(refused, p.Error) and refused.code == p.ErrorCode.RATE_LIMITED
        assert "[limits].requests_per_s_per_connection = 5" in refused.message
        assert isinstance(await r.call(ALICE, p.Ping, other), p.Result)  # another connection is not affected
        r.clock.advance(0.2)  # one token back at 5/s
        assert isinstance(await r.call(ALICE, p.Ping, conn), p.Result)
        assert isinstance(await r.call(ALICE, p.Ping, conn), p.Error)
        assert _refusals(r, "requests_per_s_per_connection") == 3
        r.clock.advance(10.0)  # the bucket refills to the burst, no further
        after = [await r.call(ALICE, p.Ping, conn) for _ in range(12)]
        assert sum(isinstance(x, p.Result) for x in after) == 10
    run(body, limits=LoadLimits(requests_per_s_per_connection=5.0, request_burst_per_connection=10))


def test_a_developer_over_the_session_quota_is_refused_and_nothing_is_written() -> None:
    async def body(r: Rig) -> None:
        agents = [await r.session(ALICE) for _ in range(3)]
        before = len(r.replica.log)
        reply = await r.call(ALICE, p.OpenSession, agent_id=f"alice/{uuid.uuid4()}", tool="t", machine="m",
                             repo_remote="git@x:acme/shop.git", base_commit="abcdef1")
        assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.QUOTA_EXCEEDED
        assert "[limits].sessions_per_developer = 3" in reply.message and "'alice'" in reply.message
        assert len(r.replica.log) == before
        # Reopening a session that is open (a shim reconnecting) is not a new session.
        await r.ok(ALICE, p.OpenSession, agent_id=agents[0], tool="t", machine="m",
                   repo_remote="git@x:acme/shop.git", base_commit="abcdef1")
        await r.session(BOB)  # another developer has a quota of their own
        # Sessions that lapse free their room (counted again after the recount interval).
        r.clock.advance(31.0)
        await r.service.engine(ec.Expire(now_ms=r.clock.now_ms()))
        await r.session(ALICE)
        assert _refusals(r, "sessions_per_developer") == 1
    run(body, limits=LoadLimits(sessions_per_developer=3))


def test_a_burst_of_opens_cannot_overshoot_the_session_quota_between_recounts() -> None:
    async def body(r: Rig) -> None:
        replies = await asyncio.gather(*(
            r.call(ALICE, p.OpenSession, agent_id=f"alice/{uuid.uuid4()}", tool="t", machine="m",
                   repo_remote="git@x:acme/shop.git", base_commit="abcdef1") for _ in range(10)))
        assert sum(isinstance(x, p.Result) for x in replies) == 4
        assert all(x.code == p.ErrorCode.QUOTA_EXCEEDED for x in replies if isinstance(x, p.Error))
        counts = r.replica.store.engine_view(lambda e: e.open_sessions_by_developer())
        assert counts == {"alice": 4}
    run(body, limits=LoadLimits(sessions_per_developer=4))


def test_a_developer_over_the_in_flight_intent_quota_is_refused_until_verdicts_come_back() -> None:
    async def body(r: Rig) -> None:
        await r.ok(ADMIN, p.ConceptsPush, toml=REGISTRY)
        agents = [await r.session(ALICE) for _ in range(4)]
        bob = await r.session(BOB)
        gate = asyncio.Event()
        propose = r.replica.propose

        async def slow_propose(payload: bytes, timeout_s: float = 5.0) -> dict[str, Any]:
            await gate.wait()
            return await propose(payload, timeout_s)

        r.replica.propose = slow_propose  # type: ignore[method-assign]
        intent = p.Intent(summary="Tidy the route handlers", steps=("x",))
        tasks = [asyncio.create_task(r.call(ALICE, p.SubmitIntent, agent_id=a, tool="t", intent=intent,
                                            trigger="initial")) for a in agents]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert r.service.quotas.intents.of("alice") == 2
        assert r.metrics.registry.get_sample_value("tetherlab_intents_in_flight") == 2  # read when scraped
        refused = [t.result() for t in tasks if t.done()]
        assert len(refused) == 2 and all(isinstance(x, p.Error) and x.code == p.ErrorCode.QUOTA_EXCEEDED
                                         and "[limits].intents_in_flight_per_developer" in x.message
                                         for x in refused)
        bob_task = asyncio.create_task(r.call(BOB, p.SubmitIntent, agent_id=bob, tool="t", intent=intent,
                                              trigger="initial"))
        gate.set()
        results = await asyncio.gather(*tasks, bob_task)
        assert sum(isinstance(x, p.Result) for x in results) == 3  # alice's two and bob's
        assert r.service.quotas.intents.of("alice") == 0 and r.service.quotas.intents.total() == 0
        assert r.metrics.registry.get_sample_value("tetherlab_intents_in_flight") == 0
        assert _refusals(r, "intents_in_flight_per_developer") == 2
    run(body, limits=LoadLimits(intents_in_flight_per_developer=2))


def test_the_configured_limits_are_exported() -> None:
    async def body(r: Rig) -> None:
        v = r.metrics.registry.get_sample_value("tetherlab_quota_limit", {"limit": "sessions_per_developer"})
        assert v == 7
    run(body, limits=LoadLimits(sessions_per_developer=7))


def test_opens_under_way_at_a_recount_still_count_against_the_session_quota() -> None:
    async def body(r: Rig) -> None:
        gate = asyncio.Event()
        propose = r.replica.propose

        async def slow_propose(payload: bytes, timeout_s: float = 5.0) -> dict[str, Any]:
            await gate.wait()
            return await propose(payload, timeout_s)

        await r.session(ALICE)  # the cluster is initialised before the proposals are held
        r.replica.propose = slow_propose  # type: ignore[method-assign]

        def opens(n: int) -> list[asyncio.Task[p.Message]]:
            return [asyncio.create_task(r.call(ALICE, p.OpenSession, agent_id=f"alice/{uuid.uuid4()}", tool="t",
                                               machine="m", repo_remote="git@x:acme/shop.git", base_commit="abcdef1"))
                    for _ in range(n)]

        first = opens(2)
        await asyncio.sleep(0)
        r.clock.advance(5.0)  # the next open recounts while the first two are not applied yet
        second = opens(3)
        await asyncio.sleep(0)
        gate.set()
        replies = await asyncio.gather(*first, *second)
        assert sum(isinstance(x, p.Result) for x in replies) == 3  # 1 + 3 = the quota of 4
        assert r.replica.store.engine_view(lambda e: e.open_sessions_by_developer()) == {"alice": 4}
    run(body, limits=LoadLimits(sessions_per_developer=4))


def test_a_key_revoked_after_its_connection_opened_is_refused_at_the_next_request() -> None:
    # The SSH layer checked the key when the connection opened, against that node's state then
    # (a follower, or a new leader that had not applied its backlog): the service checks again.
    async def body(r: Rig) -> None:
        await r.replica.propose(encode_command(sm.Put("meta", "bootstrapped", "1")))
        agent = await r.session(ALICE)
        await r.replica.propose(encode_command(sm.Delete(KEYS_NS, ALICE.key_id)))
        reply = await r.call(ALICE, p.Heartbeat, agent_ids=(agent,))
        assert isinstance(reply, p.Error) and reply.code == "key_revoked"
        assert isinstance(await r.call(ALICE, p.Ping), p.Result)  # ping and status stay open
    run(body)


def test_a_registered_key_is_read_from_the_store_once_per_leader_term() -> None:
    async def body(r: Rig) -> None:
        await r.replica.propose(encode_command(sm.Put("meta", "bootstrapped", "1")))
        agent = await r.session(ALICE)
        reads: list[tuple[str, str]] = []
        real_get = r.replica.store.get

        def get(ns: str, key: str) -> Any:
            reads.append((ns, key))
            return real_get(ns, key)

        r.replica.store.get = get  # type: ignore[method-assign]
        for _ in range(5):
            assert isinstance(await r.call(ALICE, p.Heartbeat, agent_ids=(agent,)), p.Result)
        assert (KEYS_NS, ALICE.key_id) not in reads
        r.replica.set_role("leader", term=7)  # a new term: checked again
        assert isinstance(await r.call(ALICE, p.Heartbeat, agent_ids=(agent,)), p.Result)
        assert reads.count((KEYS_NS, ALICE.key_id)) == 1
    run(body)


def test_a_key_revoked_by_a_snapshot_is_refused_once_the_node_leads_again() -> None:
    # A follower that fell behind installs a snapshot holding the revocation: no entry is applied,
    # so no listener hears of it; what this node remembered from its last term must not count.
    async def body(r: Rig) -> None:
        await r.replica.propose(encode_command(sm.Put("meta", "bootstrapped", "1")))
        agent = await r.session(ALICE)
        r.replica.set_role("follower", leader="n2")
        listener, r.replica.store.on_apply = r.replica.store.on_apply, None
        r.replica.store.apply(r.replica.store.applied_index + 1, encode_command(sm.Delete(KEYS_NS, ALICE.key_id)))
        r.replica.store.on_apply = listener
        r.replica.set_role("leader", term=9)
        reply = await r.call(ALICE, p.Heartbeat, agent_ids=(agent,))
        assert isinstance(reply, p.Error) and reply.code == "key_revoked"
    run(body)


def test_authenticate_reads_the_key_registry() -> None:
    r = Rig()
    who = authenticate(r.replica.store, "alice", ALICE.key_id)
    assert who == ALICE
    assert authenticate(r.replica.store, "bob", ALICE.key_id) == "wrong_user"
    assert authenticate(r.replica.store, "alice", "SHA256:nope") == "unknown_key"
