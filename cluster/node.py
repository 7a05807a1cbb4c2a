"""One master node process: Raft member, HTTP endpoint and local control socket.

``tetherlab master --config FILE.toml`` runs :func:`run_node`. The asyncio loop owns the
network endpoints; pysyncobj ticks on its own thread and hands results back through
``call_soon_threadsafe``.

The control socket (``DATA_DIR/control.sock``, mode 0600) is for local tools and tests: it
takes JSON lines and performs writes and linearizable reads through Raft. Remote clients use
the SSH endpoint.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tetherlab.cluster import __version__
from tetherlab.cluster import statemachine as sm
from tetherlab.cluster.config import NodeConfig
from tetherlab.cluster.metrics import NodeCollector, NodeMetrics
from tetherlab.cluster.raft import FailReason, RaftNode
from tetherlab.cluster.store import StateStore

log = logging.getLogger("tetherlab.node")

PROPOSE_TIMEOUT_S = 5.0  # a write not committed by then is reported as indeterminate
READ_TIMEOUT_S = 5.0
CONTROL_LINE_MAX_BYTES = 256 * 1024
CONTROL_CONNECTIONS_MAX = 256
SCAN_LIMIT_MAX = 1000
MEMBERS_NS = "members"
READYZ_TIMEOUT_S = 2.0
API_LIMIT_DEFAULT = 100
API_LIMIT_MAX = 1000
LEADER_DUTY_INTERVAL_S = 0.25
EXPIRE_INTERVAL_S = 1.0
STOP_TIMEOUT_S = 5.0  # bound on waiting for the Raft thread at shutdown


class Unavailable(Exception):
    """Returned when the cluster cannot take the request now (no leader, no quorum); nothing
    was applied, so the client may retry elsewhere."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Indeterminate(Exception):
    """Returned when the outcome is unknown (timeout, leader change after the proposal was
    accepted): the command may or may not be applied."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _BarrierBatch:
    waiters: list[asyncio.Future[None]]


class MasterNode:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.started_at = time.time()
        self.loop = asyncio.get_running_loop()
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = NodeMetrics()
        self.store = StateStore(cfg.data_dir / "state", cfg.raft.state_map_size_bytes)
        self.store.on_apply = self._on_apply
        m = self.metrics
        self.raft = RaftNode(
            cfg,
            self.store,
            on_fsync=m.fsync_seconds.observe,
            on_state_changed=self._on_role_changed,
            on_rtt=lambda peer, s: m.peer_rtt_seconds.labels(peer).observe(s),
            on_apply_seconds=m.apply_seconds.observe,
        )
        self.metrics.attach(NodeCollector(self.raft.tl_status, self._lmdb_sizes, self._coordination_stats))
        # Results of proposals, handed to the event loop once per tick rather than once each.
        self._pending: set[asyncio.Future[dict[str, Any]]] = set()
        self._results: collections.deque[tuple[asyncio.Future[dict[str, Any]], Any, int]] = collections.deque()
        self.raft.addOnTickCallback(self._deliver_results)
        self._leader_seen: str | None = None
        self.version = __version__
        self._ssh_by_id = {n.id: str(n.ssh) for n in cfg.all_nodes()}
        self._load_members()
        from tetherlab.cluster.service import Service
        from tetherlab.cluster.sshserver import SshEndpoint

        self.service = Service(self)
        self.ssh = SshEndpoint(self)
        self._bootstrapped = False
        self._duties: asyncio.Task[None] | None = None
        self._barrier_running = False
        self._barrier_next: list[asyncio.Future[None]] = []
        self._runner: web.AppRunner | None = None
        self._control: asyncio.AbstractServer | None = None
        self._control_conns = 0

    # --- metrics hooks (tick thread) ---------------------------------------------------------

    def _on_apply(self, index: int, cmd: sm.Command | None, result: dict[str, Any]) -> None:
        self.metrics.proposals_applied.inc()
        # A revoked key's SSH connections end on every node, as each node applies the revoke.
        if isinstance(cmd, sm.Txn) and result.get("succeeded"):
            if any(op.ns == MEMBERS_NS for op in cmd.success):
                self.loop.call_soon_threadsafe(self._load_members)
            for op in cmd.success:
                if isinstance(op, sm.Delete) and op.ns == "keys":
                    self.loop.call_soon_threadsafe(self.ssh.drop_key, op.key, "the SSH key was revoked")

    def _on_role_changed(self, old: str, new: str) -> None:
        log.info("role %s -> %s", old, new, extra={"term": self.raft.raftCurrentTerm})

    def _lmdb_sizes(self) -> dict[str, dict[str, int]]:
        log_info = _env_sizes(self.raft._tl_journal.env, self.cfg.data_dir / "raft")
        return {"log": log_info, "state": self.store.size_info()}

    def _coordination_stats(self) -> dict[str, int]:
        stats: dict[str, int] = self.store.engine_view(lambda e: e.stats())
        return stats

    def _deliver_results(self) -> None:  # tick thread
        batch = []
        while self._results:  # deque: appends from other threads are safe meanwhile
            batch.append(self._results.popleft())
        if batch:
            self.loop.call_soon_threadsafe(_resolve_all, batch)

    # --- Raft bridge ------------------------------------------------------------------------

    async def propose(self, payload: bytes, timeout_s: float = PROPOSE_TIMEOUT_S) -> dict[str, Any]:
        """Commit one command through Raft and return its result, applied on this node."""
        fut: asyncio.Future[dict[str, Any]] = self.loop.create_future()

        def done(res: Any, err: int) -> None:  # tick thread: delivered in one batch per tick
            self._results.append((fut, res, err))

        m = self.metrics
        m.proposals_pending.inc()
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
        self.raft.tl_submit(payload, done)
        try:
            res = await asyncio.wait_for(fut, timeout_s)
            m.proposals_committed.inc()
            return res
        except TimeoutError:
            m.proposals_failed.labels("timeout").inc()
            raise Indeterminate("timeout") from None
        except (Unavailable, Indeterminate) as e:
            m.proposals_failed.labels(e.reason).inc()
            raise
        finally:
            m.proposals_pending.dec()

    async def propose_command(self, cmd: sm.Command, timeout_s: float = PROPOSE_TIMEOUT_S) -> dict[str, Any]:
        return await self.propose(sm.encode_command(cmd), timeout_s)

    async def propose_engine(self, cmd: Any, timeout_s: float = PROPOSE_TIMEOUT_S) -> dict[str, Any]:
        """An engine command, stamped with this node's clock: only the leader proposes them,
        so expiry always runs on a leader's time, never on a replica's during apply."""
        payload = {"op": "engine", "now_ms": int(time.time() * 1000), "cmd": cmd.to_json()}
        return await self.propose(json.dumps(payload, separators=(",", ":")).encode(), timeout_s)

    async def read_barrier(self, timeout_s: float = READ_TIMEOUT_S) -> None:
        """Return once every write acknowledged before this call is applied here.

        Readers that arrive while a barrier is in flight join the next one: the in-flight
        barrier may sit in the log before a write they must see."""
        fut: asyncio.Future[None] = self.loop.create_future()
        self._barrier_next.append(fut)
        if not self._barrier_running:
            self.loop.create_task(self._run_barriers(timeout_s))
        await asyncio.wait_for(asyncio.shield(fut), timeout_s + 1.0)

    async def _run_barriers(self, timeout_s: float) -> None:
        self._barrier_running = True
        try:
            while self._barrier_next:
                batch, self._barrier_next = self._barrier_next, []
                try:
                    await self.propose_command(sm.Barrier(), timeout_s)
                except (Unavailable, Indeterminate) as e:
                    for f in batch:
                        if not f.done():
                            f.set_exception(Unavailable(e.reason) if isinstance(e, Unavailable) else e)
                    continue
                for f in batch:
                    if not f.done():
                        f.set_result(None)
        finally:
            self._barrier_running = False

    def status(self) -> dict[str, Any]:
        st = dict(self.raft.tl_status())
        leader = st.get("leader")
        if leader is not None and leader != self._leader_seen:
            if self._leader_seen is not None:
                self.metrics.leader_changes.inc()
            self._leader_seen = leader
        st.update(
            {
                "version": __version__,
                "raft": str(self.cfg.node.raft),
                "ssh": str(self.cfg.node.ssh),
                "http": str(self.cfg.node.http),
                "uptime_s": round(time.time() - self.started_at, 1),
                "store": {"applied_index": self.store.applied_index, "revision": self.store.revision},
            }
        )
        st.pop("at_monotonic", None)
        return st

    # --- endpoints --------------------------------------------------------------------------

    def _load_members(self) -> None:
        """Nodes added online are in the replicated ``members`` namespace, not in node.toml."""
        for nid, rec in self.store.scan(MEMBERS_NS, limit=1000):
            m = json.loads(rec.value)
            self._ssh_by_id[nid] = m["ssh"]
            self.raft._tl_addr_to_id[m["raft"]] = nid

    def members(self) -> dict[str, dict[str, str]]:
        """Current Raft members by id, with their addresses."""
        out = {}
        addr_to_id = self.raft._tl_addr_to_id
        raft_addrs = [str(self.cfg.node.raft), *(n.address for n in self.raft.otherNodes)]
        by_id = {n.id: n for n in self.cfg.all_nodes()}
        for addr in raft_addrs:
            nid = addr_to_id.get(addr, addr)
            cfgn = by_id.get(nid)
            out[nid] = {"raft": addr, "ssh": self._ssh_by_id.get(nid, str(cfgn.ssh) if cfgn else "")}
        return out

    async def change_membership(self, add: bool, raft_addr: str, timeout_s: float = PROPOSE_TIMEOUT_S) -> None:
        """pysyncobj's dynamic membership change, committed (one at a time)."""
        fut: asyncio.Future[dict[str, Any]] = self.loop.create_future()

        def done(res: Any, err: int) -> None:  # tick thread
            self.loop.call_soon_threadsafe(_resolve, fut, {"ok": True}, err)

        if add:
            self.raft.addNodeToCluster(raft_addr, callback=done)
        else:
            self.raft.removeNodeFromCluster(raft_addr, callback=done)
        self.raft.tl_wake()
        try:
            await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise Indeterminate("timeout") from None

    def ssh_address_of(self, node_id: str) -> str | None:
        return self._ssh_by_id.get(node_id)

    async def start(self) -> None:
        await self._start_http()
        await self._start_control()
        await self.ssh.start()
        self._duties = self.loop.create_task(self._leader_duties())

    # --- leader duties ----------------------------------------------------------------------

    async def _leader_duties(self) -> None:
        """What only a quorum-backed leader does, checked every LEADER_DUTY_INTERVAL_S:
        bootstrap once; at the start of each term, extend every session by one TTL (before
        anything can expire); then sweep expired sessions every EXPIRE_INTERVAL_S."""
        from tetherlab.cluster.engine import commands as ec

        elected_term: int | None = None
        last_expire = 0.0
        while True:
            await asyncio.sleep(LEADER_DUTY_INTERVAL_S)
            st = self.raft.tl_status()
            try:
                if not st.get("quorum_backed"):
                    if elected_term is not None:
                        self._fail_pending("this node lost its quorum-backed leadership")
                    elected_term = None
                    continue
                await self._bootstrap_once()
                meta = self.store.engine_view(lambda e: dict(e._cluster or {}))
                ttl_ms = self.cfg.cluster.session_ttl_s * 1000
                if (not meta and self.cfg.cluster.remote) or (meta and meta.get("session_ttl_ms") != ttl_ms):
                    # First remote from the config, or the configured session TTL changed.
                    await self.service.engine(ec.Init(remote=meta.get("remote") or self.cfg.cluster.remote,
                                                      session_ttl_ms=ttl_ms))
                if elected_term != st.get("term"):
                    await self.propose_engine(ec.LeaderElected(now_ms=int(time.time() * 1000)))
                    elected_term = st.get("term")
                    last_expire = time.monotonic()
                    log.info("leader duties start", extra={"term": elected_term})
                elif time.monotonic() - last_expire >= EXPIRE_INTERVAL_S:
                    last_expire = time.monotonic()
                    res = await self.propose_engine(ec.Expire(now_ms=int(time.time() * 1000)))
                    if res.get("lapsed"):
                        self.metrics.sessions_expired.inc(len(res["lapsed"]))
                        log.info("sessions lapsed: %s", ", ".join(res["lapsed"]))
            except (Unavailable, Indeterminate):
                elected_term = None  # leadership moved or wobbled; extend again when it settles
            except Exception:
                log.exception("leader duty failed")

    def _fail_pending(self, reason: str) -> None:
        """A leader that lost its majority will not commit what it holds: say so now (the
        outcome is unknown: another leader may still commit it), so clients retry elsewhere
        instead of waiting out their timeouts."""
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(Indeterminate(reason))

    async def _bootstrap_once(self) -> None:
        """Register the first admin key and the git remote, once per cluster lifetime (a txn
        guarded by meta/bootstrapped, so a revoked admin key is never re-added)."""
        if self._bootstrapped or self.store.get("meta", "bootstrapped") is not None:
            self._bootstrapped = True
            return
        from tetherlab.cluster.keys import KEYS_NS, KeyError_, make_registered

        ops: list[sm.Put | sm.Delete] = [sm.Put("meta", "bootstrapped", "1")]
        for line in self.cfg.cluster.bootstrap_admin_keys:
            try:
                rk = make_registered(self.cfg.cluster.bootstrap_admin_developer, "admin", line)
            except KeyError_ as e:
                log.error("bootstrap admin key in %s is not usable: %s", self.cfg.path, e)
                continue
            ops.append(sm.Put(KEYS_NS, rk.id, rk.encode()))
        if self.cfg.cluster.remote:
            ops.append(sm.Put("meta", "remote", self.cfg.cluster.remote))
        res = await self.propose_command(sm.Txn((sm.Compare("meta", "bootstrapped", 0),), tuple(ops)))
        self._bootstrapped = True
        if res.get("succeeded"):
            log.info("cluster bootstrapped: %d admin key(s) registered", len(ops) - 1)

    async def _start_http(self) -> None:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/livez", self._h_livez)
        app.router.add_get("/readyz", self._h_readyz)
        app.router.add_get("/health", self._h_health)
        app.router.add_get("/metrics", self._h_metrics)
        app.router.add_get("/v1/status", self._h_status)
        app.router.add_get("/v1/concepts", self._h_concepts)
        app.router.add_get("/v1/intents", self._h_intents)
        app.router.add_get("/v1/agents", self._h_agents)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.node.http.host, self.cfg.node.http.port, reuse_address=True)
        await site.start()

    async def _h_livez(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True, "node": self.cfg.id})

    async def _h_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    # --- read-only JSON API (this node's applied state; ?consistent=true reads after a barrier) --

    async def _query(self, request: web.Request, allowed: dict[str, Any]) -> dict[str, Any] | web.Response:
        """Validated query parameters, or a 400 response naming the bad one."""
        q = request.query
        unknown = sorted(set(q) - set(allowed) - {"limit", "after", "consistent"})
        if unknown:
            return _bad_request(f"unknown query parameter(s) {unknown}; allowed: "
                                f"{sorted({'limit', 'after', 'consistent', *allowed})}")
        out: dict[str, Any] = {}
        try:
            limit = int(q.get("limit", API_LIMIT_DEFAULT))
        except ValueError:
            return _bad_request(f"limit must be an integer, got {q.get('limit')!r}")
        if not 1 <= limit <= API_LIMIT_MAX:
            return _bad_request(f"limit must be between 1 and {API_LIMIT_MAX}, got {limit}")
        out["limit"] = limit
        after = q.get("after")
        if after is not None and (not after or len(after) > 512):
            return _bad_request("after must be a cursor from the previous page's 'next'")
        out["after"] = after
        for name, choices in allowed.items():
            v = q.get(name)
            if v is not None and choices is not None and v not in choices:
                return _bad_request(f"{name} must be one of {sorted(choices)}, got {v!r}")
            out[name] = v
        consistent = q.get("consistent", "false")
        if consistent not in ("true", "false"):
            return _bad_request("consistent must be true or false")
        if consistent == "true":
            try:
                await self.read_barrier()
            except (Unavailable, Indeterminate, TimeoutError):
                return web.json_response({"error": "no quorum-backed read possible now", "status": 503}, status=503)
        return out

    async def _h_concepts(self, request: web.Request) -> web.Response:
        q = await self._query(request, {"prefix": None})
        if isinstance(q, web.Response):
            return q
        if q["after"] is not None and not _after_ok_concept(q["after"]):
            return _bad_request("after must be a concept id")
        body = self.store.engine_view(lambda e: e.list_concepts(prefix=q["prefix"] or "", limit=q["limit"],
                                                                after=q["after"]))
        return web.json_response(body)

    async def _h_intents(self, request: web.Request) -> web.Response:
        from tetherlab.cluster.engine.model import STATUSES

        q = await self._query(request, {"status": set(STATUSES)})
        if isinstance(q, web.Response):
            return q
        if q["after"] is not None and not re.fullmatch(r"i-\d{1,19}", q["after"]):
            return _bad_request("after must be an intent id like i-42")
        body = self.store.engine_view(lambda e: e.list_intents(status=q["status"], limit=q["limit"],
                                                               after=q["after"]))
        return web.json_response(body)

    async def _h_agents(self, request: web.Request) -> web.Response:
        q = await self._query(request, {"status": {"open", "lapsed"}})
        if isinstance(q, web.Response):
            return q
        body = self.store.engine_view(lambda e: e.list_sessions(status=q["status"], limit=q["limit"],
                                                                after=q["after"]))
        return web.json_response(body)

    async def _readiness(self) -> tuple[bool, str]:
        """etcd's meaning: a leader is known and a linearizable read succeeds."""
        st = self.raft.tl_status()
        if not st.get("leader"):
            return False, "RAFT NO LEADER"
        try:
            await self.read_barrier(READYZ_TIMEOUT_S)
        except (Unavailable, Indeterminate, TimeoutError) as e:
            return False, f"LINEARIZABLE READ FAILED: {getattr(e, 'reason', 'timeout')}"
        return True, ""

    async def _h_readyz(self, request: web.Request) -> web.Response:
        ok, reason = await self._readiness()
        body = {"ready": ok, "node": self.cfg.id, "reason": reason}
        return web.json_response(body, status=200 if ok else 503)

    async def _h_health(self, request: web.Request) -> web.Response:
        ok, reason = await self._readiness()
        body = {"health": "true" if ok else "false", "reason": reason}
        return web.json_response(body, status=200 if ok else 503)

    async def _h_metrics(self, request: web.Request) -> web.Response:
        self.status()  # notes leader changes between scrapes too
        self.metrics.shims_failing_closed.set(self.service.failing_closed())
        data = generate_latest(self.metrics.registry)
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _start_control(self) -> None:
        path = self.cfg.data_dir / "control.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._control = await asyncio.start_unix_server(
                self._control_conn, path=str(path), limit=CONTROL_LINE_MAX_BYTES
            )
        finally:
            os.umask(old_umask)

    async def _control_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._control_conns >= CONTROL_CONNECTIONS_MAX:
            writer.close()
            return
        self._control_conns += 1
        # Requests on one connection run concurrently (pipelining); the bound keeps memory flat.
        sem = asyncio.Semaphore(1024)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    writer.write(_line({"id": None, "ok": False,
                                        "error": {"code": "frame_too_large", "message": "request line too long"}}))
                    break
                if not line:
                    break
                await sem.acquire()
                task = self.loop.create_task(self._control_request(line, writer, sem))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except ConnectionError:
            pass
        finally:
            for t in list(tasks):
                with contextlib.suppress(Exception):
                    await t
            self._control_conns -= 1
            writer.close()

    async def _control_request(self, line: bytes, writer: asyncio.StreamWriter, sem: asyncio.Semaphore) -> None:
        try:
            reply = await self._handle_control(line)
            writer.write(_line(reply))
        except ConnectionError:
            pass
        finally:
            sem.release()

    async def _handle_control(self, line: bytes) -> dict[str, Any]:
        rid: Any = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise sm.CommandError("bad_request", "a request must be a JSON object")
            rid = req.get("id")
            op = req.get("op")
            if op in ("put", "delete", "cas", "txn"):
                cmd = sm.decode_command({k: v for k, v in req.items() if k != "id"})
                res = await self.propose_command(cmd)
                if "error" in res:
                    return {"id": rid, "ok": False, "error": res["error"]}
                return {"id": rid, "ok": True, "result": res}
            if op == "get":
                ns, key = req.get("ns"), req.get("key")
                sm.Delete(ns, key)  # validates the names
                if req.get("linearizable", True):
                    await self.read_barrier()
                rec = self.store.get(ns, key)
                return {"id": rid, "ok": True, "result": {"record": rec.to_json() if rec else None}}
            if op == "scan":
                ns = req.get("ns")
                sm.Delete(ns, "x")
                limit = req.get("limit", 100)
                if not isinstance(limit, int) or not 0 < limit <= SCAN_LIMIT_MAX:
                    raise sm.CommandError("bad_field", f"field 'limit' must be an integer in 1..{SCAN_LIMIT_MAX}")
                if req.get("linearizable", True):
                    await self.read_barrier()
                items = self.store.scan(ns, str(req.get("after", "")), limit)
                return {"id": rid, "ok": True, "result": {"items": [[k, r.to_json()] for k, r in items]}}
            if op == "status":
                return {"id": rid, "ok": True, "result": self.status()}
            if op == "dump":
                return {"id": rid, "ok": True, "result": self.store.dump()}
            if op == "backup":
                path = req.get("path")
                if not isinstance(path, str) or not Path(path).is_absolute():
                    raise sm.CommandError("bad_field", "field 'path' must be an absolute file path")
                await self.read_barrier()  # the backup holds every write acknowledged before it
                from tetherlab.cluster.operate import backup_header

                hdr = {**backup_header(self.store), "node": self.cfg.id,
                       "raft_commit_index": self.raft.raftCommitIndex,
                       "members": [n.to_json() for n in self.cfg.all_nodes()]}
                header = await self.loop.run_in_executor(None, self.store.write_snapshot, Path(path), hdr)
                return {"id": rid, "ok": True, "result": header}
            if op == "compact":
                self.raft.tl_compact()
                return {"id": rid, "ok": True, "result": {}}
            raise sm.CommandError("unknown_op", f"unknown op {op!r}")
        except sm.CommandError as e:
            return {"id": rid, "ok": False, "error": {"code": e.code, "message": e.message}}
        except json.JSONDecodeError as e:
            return {"id": rid, "ok": False, "error": {"code": "bad_json", "message": f"request is not JSON: {e}"}}
        except Unavailable as e:
            return {"id": rid, "ok": False, "error": {"code": "unavailable", "message": e.reason}}
        except (Indeterminate, TimeoutError) as e:
            reason = e.reason if isinstance(e, Indeterminate) else "timeout"
            return {"id": rid, "ok": False, "error": {"code": "indeterminate", "message": reason}}

    async def stop(self) -> None:
        if self._duties is not None:
            self._duties.cancel()
        await self.ssh.stop()
        if self._control is not None:
            self._control.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.loop.run_in_executor(None, self.raft.tl_destroy, STOP_TIMEOUT_S)
        self.store.close()


def _resolve(fut: asyncio.Future[dict[str, Any]], res: Any, err: int) -> None:
    if fut.done():
        return
    if err == 0:
        fut.set_result(res if isinstance(res, dict) else {"ok": True})
    elif err in FailReason.NOT_APPLIED:
        fut.set_exception(Unavailable(FailReason.NAMES.get(err, str(err))))
    else:
        fut.set_exception(Indeterminate(FailReason.NAMES.get(err, str(err))))


def _resolve_all(batch: list[tuple[asyncio.Future[dict[str, Any]], Any, int]]) -> None:
    for fut, res, err in batch:
        _resolve(fut, res, err)


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": message, "status": 400}, status=400)


def _after_ok_concept(after: str) -> bool:
    return bool(re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,127}", after))


def _env_sizes(env: Any, directory: Path) -> dict[str, int]:
    info, stat = env.info(), env.stat()
    data_file = directory / "data.mdb"
    return {
        "file_size_bytes": data_file.stat().st_size if data_file.exists() else 0,
        "used_bytes": (info["last_pgno"] + 1) * stat["psize"],
        "map_size_bytes": info["map_size"],
    }


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


async def _serve(cfg: NodeConfig, ready_file: Path | None) -> None:
    node = MasterNode(cfg)
    await node.start()
    log.info("node %s serving: raft %s, http %s (data %s)", cfg.id, cfg.node.raft, cfg.node.http, cfg.data_dir)
    if ready_file is not None:
        ready_file.write_text(json.dumps({"pid": os.getpid(), "id": cfg.id}))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("node %s stopping", cfg.id)
    await node.stop()


def run_node(cfg: NodeConfig, ready_file: Path | None = None) -> int:
    cfg.read_secret()  # refuse to start without the secret, before anything binds
    asyncio.run(_serve(cfg, ready_file))
    return 0
