"""An in-memory :class:`~tetherlab.cluster.node.replica.Replica` built on ``core``: the twin
that lets the service, the leader duties and the front doors be tested in milliseconds.

One replica, no consensus: a proposal is applied at once to a
:class:`~tetherlab.cluster.replica.memstore.MemoryStore` through the same ``core.apply`` as
production, at the next log index. A test sets what consensus would decide: this node's role,
the leader it knows and whether it is quorum-backed (:meth:`FakeReplica.set_role`), which peers
answer (:meth:`FakeReplica.set_peer`), and failures of the next proposals or read barriers
(:meth:`FakeReplica.fail_next`). Every proposal is recorded in :attr:`FakeReplica.log`.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable
from typing import Any

from tetherlab.cluster.core.apply import Outcome
from tetherlab.cluster.core.engine.commands import Command as EngineCommand
from tetherlab.cluster.node.errors import Indeterminate, Unavailable
from tetherlab.cluster.node.replica import (
    MEMBERS_NS,
    PROPOSE_TIMEOUT_S,
    READ_TIMEOUT_S,
    ApplyListener,
    engine_entry,
)
from tetherlab.cluster.replica.memstore import MemoryStore

FAULTS_MAX = 1000  # queued failures: a test that queues more has a bug


class FakeReplica:
    def __init__(self, node_id: str = "n1", members: dict[str, dict[str, str]] | None = None) -> None:
        self.node_id = node_id
        self.store = MemoryStore()
        self.log: list[bytes] = []  # every entry proposed, in order
        self._index = 1  # pysyncobj's log starts with a no-op at index 1
        self._role = "leader"
        self._leader: str | None = node_id
        self._quorum_backed = True
        self._term = 1
        self._members = members or {node_id: {"raft": "127.0.0.1:1", "ssh": "127.0.0.1:2"}}
        self._peer_age_s: dict[str, float | None] = {n: 0.0 for n in self._members if n != node_id}
        self._faults: deque[BaseException] = deque()
        self._barrier_faults: deque[BaseException] = deque()
        self._listeners: list[ApplyListener] = []
        self.membership_changes: list[tuple[bool, str]] = []
        self.transfers = 0
        self.barriers = 0
        self.store.on_apply = self._on_apply

    # --- what a test controls -------------------------------------------------------------------

    def set_role(self, role: str, leader: str | None = None, quorum_backed: bool | None = None,
                 term: int | None = None) -> None:
        """``role`` is leader, follower or candidate; ``leader`` the id this node believes in."""
        self._role = role
        self._leader = leader if leader is not None or role != "leader" else self.node_id
        self._quorum_backed = (role == "leader") if quorum_backed is None else quorum_backed
        if term is not None:
            self._term = term

    def set_peer(self, node_id: str, last_response_age_s: float | None,
                 raft: str = "", ssh: str = "") -> None:
        """A member that answered this leader ``last_response_age_s`` ago (None: never)."""
        self._peer_age_s[node_id] = last_response_age_s
        if node_id not in self._members:
            self._members[node_id] = {"raft": raft or f"127.0.0.1:{10 + len(self._members)}",
                                      "ssh": ssh or f"127.0.0.1:{20 + len(self._members)}"}

    def fail_next(self, error: BaseException, count: int = 1, barrier: bool = False) -> None:
        """The next ``count`` proposals (or read barriers) raise ``error`` without applying."""
        q = self._barrier_faults if barrier else self._faults
        if len(q) + count > FAULTS_MAX:
            raise ValueError(f"at most {FAULTS_MAX} queued faults")
        q.extend([error] * count)

    def commands(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The proposed entries as JSON (engine commands unwrapped), optionally one engine type."""
        out = []
        for raw in self.log:
            obj = json.loads(raw)
            if obj.get("op") == "engine":
                obj = obj["cmd"]
            if kind is None or obj.get("type") == kind or obj.get("op") == kind:
                out.append(obj)
        return out

    # --- Replica --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        peers = {nid: {"address": self._members.get(nid, {}).get("raft", ""), "connected": age is not None,
                       "match_index": self._index if self._role == "leader" else None,
                       "last_response_age_s": age if self._role == "leader" else None}
                 for nid, age in self._peer_age_s.items()}
        following = self._role == "follower" and self._leader is not None
        return {
            "id": self.node_id, "role": self._role, "term": self._term, "leader": self._leader,
            "leader_raft": self._members.get(self._leader or "", {}).get("raft"),
            "commit_index": self._index, "applied_index": self._index, "peers": peers,
            "quorum_backed": self._quorum_backed and self._role == "leader",
            "quorum_ok": (self._quorum_backed and self._role == "leader") or following,
        }

    async def propose(self, payload: bytes, timeout_s: float = PROPOSE_TIMEOUT_S) -> dict[str, Any]:
        await asyncio.sleep(0)  # a real proposal always yields to the loop
        if self._faults:
            raise self._faults.popleft()
        if not (self._role == "leader" and self._quorum_backed):
            raise Unavailable("not_leader")
        self._index += 1
        self.log.append(bytes(payload))
        return self.store.apply(self._index, payload)

    async def propose_engine(self, cmd: EngineCommand, now_ms: int,
                             timeout_s: float = PROPOSE_TIMEOUT_S) -> dict[str, Any]:
        return await self.propose(engine_entry(self.store, cmd, now_ms), timeout_s)

    async def read_barrier(self, timeout_s: float = READ_TIMEOUT_S) -> None:
        await asyncio.sleep(0)
        self.barriers += 1
        if self._barrier_faults:
            raise self._barrier_faults.popleft()
        if not (self._role == "leader" and self._quorum_backed):
            raise Unavailable("not_leader")

    def members(self) -> dict[str, dict[str, str]]:
        return {nid: dict(m) for nid, m in self._members.items()}

    def ssh_address_of(self, node_id: str) -> str | None:
        return self._members.get(node_id, {}).get("ssh")

    async def change_membership(self, add: bool, raft_addr: str, timeout_s: float = PROPOSE_TIMEOUT_S) -> None:
        await asyncio.sleep(0)
        if self._faults:
            raise self._faults.popleft()
        self.membership_changes.append((add, raft_addr))
        if add:
            for key, rec in self.store.scan(MEMBERS_NS, limit=1000):
                m = json.loads(rec.value)
                if m["raft"] == raft_addr:
                    self._members[key] = {"raft": m["raft"], "ssh": m["ssh"]}
                    self._peer_age_s.setdefault(key, 0.0)
        else:
            for nid, m in list(self._members.items()):
                if m["raft"] == raft_addr:
                    del self._members[nid]
                    self._peer_age_s.pop(nid, None)

    def transfer_leadership(self) -> None:
        self.transfers += 1

    def add_apply_listener(self, fn: ApplyListener) -> None:
        self._listeners.append(fn)

    def _on_apply(self, out: Outcome) -> None:
        for fn in list(self._listeners):
            fn(out)


def run(coro_fn: Callable[[], Any]) -> Any:
    """Run one async test body on a fresh loop (for tests without an asyncio plugin)."""
    return asyncio.run(coro_fn())


__all__ = ["FakeReplica", "Indeterminate", "Unavailable", "run"]
