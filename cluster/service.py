"""What a node does with each protocol request: authorisation, leader routing, and the
translation to replicated commands (key registry in the state machine's KV, coordination in
the engine). Transport-free: the SSH endpoint hands requests in and writes replies out.

Routing rule: only a quorum-backed leader answers anything but ``ping`` and ``status``; a
follower answers ``redirect`` to the leader's SSH address, and a node that knows no
quorum-backed leader answers ``unavailable``. Writes are acknowledged only once committed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from tetherlab.cluster import statemachine as sm
from tetherlab.cluster.keys import KEYS_NS, KeyError_, RegisteredKey, make_registered
from tetherlab.shim import protocol as p

if TYPE_CHECKING:
    from tetherlab.cluster.node import MasterNode
    from tetherlab.cluster.sshserver import Channel, Identity

log = logging.getLogger("tetherlab.service")

RETRY_NO_LEADER_MS = 500
RETRY_TIMEOUT_MS = 1000
KEYS_LIST_MAX = 10_000


class Refused(Exception):
    """A request refused for the caller's fault: becomes an ``error`` reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Service:
    def __init__(self, node: MasterNode) -> None:
        self.node = node

    async def handle(self, who: Identity, req: p.Request, channel: Channel | None = None) -> p.Message:
        from tetherlab.cluster.node import Indeterminate, Unavailable

        try:
            if isinstance(req, p.Ping):
                return p.Result(id=req.id, payload={"pong": True, "node": self.node.cfg.id})
            if isinstance(req, p.Status):
                return p.Result(id=req.id, payload=self._public_status())
            if req.admin and not who.is_admin:
                raise Refused("forbidden", f"{req.type} needs an admin key; {who.developer}'s key is a developer key")
            routed = self._route(req)
            if routed is not None:
                return routed
            handler = getattr(self, f"_h_{req.type}", None)
            if handler is None:
                raise Refused("not_implemented", f"{req.type} is not served by this node version")
            payload: dict[str, Any] = await handler(who, req, channel)
            return p.Result(id=req.id, payload=payload)
        except Refused as e:
            return p.Error(id=req.id, code=e.code, message=e.message)
        except Unavailable as e:
            reason = "no_leader" if e.reason in ("no_leader", "not_leader") else "no_quorum"
            return p.Unavailable(id=req.id, reason=reason, retry_after_ms=RETRY_NO_LEADER_MS,
                                 message=f"the cluster cannot commit now ({e.reason})")
        except Indeterminate as e:
            return p.Unavailable(id=req.id, reason="timeout", retry_after_ms=RETRY_TIMEOUT_MS,
                                 message=f"outcome unknown ({e.reason}); retrying is safe")
        except TimeoutError:
            return p.Unavailable(id=req.id, reason="timeout", retry_after_ms=RETRY_TIMEOUT_MS,
                                 message="no quorum-backed answer in time")

    def _public_status(self) -> dict[str, Any]:
        st = self.node.raft.tl_status()
        return {
            "node": self.node.cfg.id,
            "role": st.get("role"),
            "term": st.get("term"),
            "leader": st.get("leader"),
            "quorum_backed": bool(st.get("quorum_backed")),
            "version": self.node.version,
        }

    def _route(self, req: p.Request) -> p.Message | None:
        st = self.node.raft.tl_status()
        if st.get("quorum_backed"):
            return None
        leader = st.get("leader")
        if st.get("role") != "leader" and leader and leader != self.node.cfg.id:
            addr = self.node.ssh_address_of(leader)
            if addr is not None:
                self.node.metrics.ssh_redirects.inc()
                return p.Redirect(id=req.id, leader_id=leader, leader_address=addr)
        reason = "no_quorum" if st.get("role") == "leader" else "no_leader"
        return p.Unavailable(id=req.id, reason=reason, retry_after_ms=RETRY_NO_LEADER_MS,
                             message="this node knows no quorum-backed leader")

    # --- key registry (state machine KV, namespace "keys") -----------------------------------

    async def _h_keys_add(self, who: Identity, req: p.KeysAdd, ch: Channel | None) -> dict[str, Any]:
        try:
            rk = make_registered(req.developer, req.role, req.public_key)
        except KeyError_ as e:
            raise Refused("bad_key", str(e)) from None
        res = await self.node.propose_command(
            sm.Txn((sm.Compare(KEYS_NS, rk.id, 0),), (sm.Put(KEYS_NS, rk.id, rk.encode()),))
        )
        if not res.get("succeeded"):
            existing = self.node.store.get(KEYS_NS, rk.id)
            owner = RegisteredKey.decode(existing.value).developer if existing else "?"
            raise Refused("key_exists", f"key {rk.id} is already registered (to {owner})")
        log.info("key %s added for %s (%s) by %s", rk.id, rk.developer, rk.role, who.developer)
        return {"key": rk.to_json()}

    async def _h_keys_list(self, who: Identity, req: p.KeysList, ch: Channel | None) -> dict[str, Any]:
        await self.node.read_barrier()
        keys = [RegisteredKey.decode(r.value).to_json() for _, r in self.node.store.scan(KEYS_NS, limit=KEYS_LIST_MAX)]
        return {"keys": keys}

    async def _h_keys_revoke(self, who: Identity, req: p.KeysRevoke, ch: Channel | None) -> dict[str, Any]:
        await self.node.read_barrier()
        key_id = self._resolve_key_id(req.key_id)
        rec = self.node.store.get(KEYS_NS, key_id)
        if rec is None:
            raise Refused("unknown_key", f"no registered key {req.key_id!r}")
        res = await self.node.propose_command(
            sm.Txn((sm.Compare(KEYS_NS, key_id, rec.mod_revision),), (sm.Delete(KEYS_NS, key_id),))
        )
        if not res.get("succeeded"):
            raise Refused("conflict", f"key {key_id} changed while revoking it; try again")
        log.info("key %s revoked by %s", key_id, who.developer)
        return {"revoked": RegisteredKey.decode(rec.value).to_json()}

    def _resolve_key_id(self, given: str) -> str:
        """Accept the full fingerprint, or a unique prefix of it (with or without SHA256:)."""
        if self.node.store.get(KEYS_NS, given) is not None:
            return given
        want = given if given.startswith("SHA256:") else "SHA256:" + given
        matches = [k for k, _ in self.node.store.scan(KEYS_NS, limit=KEYS_LIST_MAX) if k.startswith(want)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise Refused("ambiguous_key", f"{given!r} matches {len(matches)} keys; give more of the fingerprint")
        raise Refused("unknown_key", f"no registered key {given!r}")
