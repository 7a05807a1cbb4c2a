"""The load generator of ``tetherlab bench cluster``: one scenario, three backends.

Simulated developers each hold one connection (an SSH connection through
:class:`~tetherlab.shim.client.MasterClient` for Tetherlab, a unix socket for bare pysyncobj,
an HTTP connection pool for etcd) and many agents. Every agent cycles through the same
coordination steps: submit an ``initial`` intent naming the concepts it will modify and depend
on; if the verdict is ``continue`` it holds the claims until its next turn, when it completes
the intent (releasing them); after a ``stop`` its next turn submits a new intent. Each
developer heartbeats all its agents once a second, as ``tether run`` does, and every
``report_interval_s`` each agent holding an intent reports its in-flight changes (files of its
concept, now and then a shared one): Tetherlab and bare pysyncobj apply ``report_changes``
(footprints, drift, soft conflicts); the etcd design stores the report under the agent's lease.
As ``tether run``'s reporter (shim/reporter.py), an agent sends a report only when its working
state differs from the last one acknowledged for the same intent: an agent taking turns is
writing code, so each of its reports is new; the scale scenario's passive holders are idle, so
after their first report they send none (``unchanged_reports=True`` sends every one anyway).

A *verdict* is the answer to an intent command (an ``initial`` submission or a ``complete``),
as in ``tetherlab bench engine`` and the node's ``tetherlab_verdicts_total`` metric.

Two driving modes, both measured from the moment a command was *due* (so queueing in the
client counts, and a slow server cannot hide behind a slow generator):

- open loop at a fixed offered rate: commands are due at evenly spaced times, each taken by
  the agent that has waited longest;
- closed loop (saturation): ``concurrency`` commands in flight per developer, each followed
  at once by the next.

Everything here runs inside worker processes (``multiprocessing`` spawn); the parent talks to
each worker through a pipe: one phase request in, one result dict out.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import os
import random
import resource
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tetherlab.chaos.bench.engine import concept_record
from tetherlab.cluster import protocol as p
from tetherlab.shim.client import MasterClient, RequestError, masters_from_cluster_file

REMOTE = "git@example.com:bench/repo.git"
TOOL = "claude-code"
IN_FLIGHT_MAX = 56  # per connection: the protocol allows 64; heartbeats need room
HEARTBEAT_INTERVAL_S = 1.0  # tether run's interval (shim/run.py HEARTBEAT_INTERVAL_MAX_S)
HEARTBEAT_CHUNK = 256  # the protocol's list bound
REPORT_INTERVAL_S = 5.0  # tether run's interval for agents without hooks (shim/run.py)
REPORT_FILES = 4  # changed files in one report
SHARED_FILES = 500  # files outside any concept agents share (soft conflicts now and then)
REQUEST_DEADLINE_S = 20.0
SESSION_TTL_S = 30
ETCD_TXN_RETRIES = 8
_FILLER = ("then", "make", "sure", "the", "tests", "cover", "edge", "cases", "and", "keep", "public",
           "behaviour", "stable", "while", "we", "clean", "up", "naming", "logging", "around", "it")


# --- the workload ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Which concepts intents name: a few hot ones, the rest spread over a large range."""

    concepts: int
    hot: int = 16
    hot_p: float = 0.1
    depend_p: float = 0.5
    first: int = 0  # intents draw concepts from [first, concepts)

    def concept_id(self, k: int) -> str:
        return f"d{k % 100:02d}.c{k}"

    def pick(self, rng: random.Random) -> str:
        if rng.random() < self.hot_p:
            return self.concept_id(self.first + rng.randrange(self.hot))
        return self.concept_id(rng.randrange(self.first, self.concepts))

    def intent(self, rng: random.Random) -> tuple[list[str], list[str], str, list[str]]:
        modify = [self.pick(rng)]
        depend = [c for c in [self.pick(rng)] if c not in modify] if rng.random() < self.depend_p else []
        summary = " ".join(rng.sample(_FILLER, 8))
        steps = [f"Change {modify[0]} " + " ".join(rng.sample(_FILLER, 6)),
                 " ".join(rng.sample(_FILLER, 9))]
        return modify, depend, summary, steps


def registry_toml(n: int, full: bool = True) -> str:
    """A registry of ``n`` concepts in 100 domains (the ids :class:`Workload` names), as TOML:
    each with a path glob and an alias phrase when ``full`` (about 90 bytes a concept)."""
    out = ["concept = ["]
    for k in range(n):
        cid = f"d{k % 100:02d}.c{k}"
        if full:
            out.append(f'{{id="{cid}",paths=["src/d{k % 100:02d}/c{k}/**"],aliases=["component {k}"]}},')
        else:
            out.append(f'{{id="{cid}"}},')
    out.append("]")
    return "\n".join(out) + "\n"


def registry_concepts(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """The engine benchmark's registry (aliases, paths, symbols, dependencies) as JSON concepts."""
    rng = random.Random(seed)
    return [concept_record(k, rng) for k in range(n)]


def new_agent_id(developer: str) -> str:
    return f"{developer}/{uuid.uuid4()}"


# --- backends -------------------------------------------------------------------------------------


class Refusal(Exception):
    """The backend answered with an error for this command (counted, not fatal)."""


class Backend:
    """One simulated developer's connection to the coordination service."""

    served_by: str | None = None  # the node that answered the last command, where known

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def open_session(self, agent: str) -> None:
        raise NotImplementedError

    async def submit(self, agent: str, modify: list[str], depend: list[str], summary: str,
                     steps: list[str]) -> tuple[str, str | None]:
        """(action, intent id or None)."""
        raise NotImplementedError

    async def complete(self, agent: str, intent_id: str) -> str:
        raise NotImplementedError

    async def heartbeat(self, agents: list[str]) -> int:
        """Heartbeats all ``agents``; returns how many were confirmed."""
        raise NotImplementedError

    async def report(self, agent: str, intent_id: str, files: list[dict[str, Any]]) -> None:
        """An in-flight change report of an agent holding ``intent_id``."""
        raise NotImplementedError


def report_files(rng: random.Random, concept_path: str, edits: int = 0) -> list[dict[str, Any]]:
    """What an agent working on a concept (its path prefix) has changed: a few of its files and,
    one report in ten, a shared module; ``edits`` (how many times it has edited them since its
    intent began) moves the changed lines, so a working agent's state differs report to report."""
    out = [{"path": f"{concept_path}part{j}.py", "change": "modified",
            "hunks": [[3 * j + 1, 3 * j + 2 + edits]],
            "symbols": [{"name": f"Part{j}.run", "change": "modified"}]} for j in range(REPORT_FILES)]
    if rng.random() < 0.1:
        out[-1] = {"path": f"src/shared/util{rng.randrange(SHARED_FILES)}.py", "change": "modified",
                   "hunks": [[1, 4]], "symbols": [{"name": "helper", "change": "modified"}]}
    return out


class TetherBackend(Backend):
    def __init__(self, developer: str, key_path: str, cluster_file: str) -> None:
        self.client = MasterClient(masters_from_cluster_file(cluster_file), key_path, developer)

    async def close(self) -> None:
        await self.client.close()

    async def open_session(self, agent: str) -> None:
        await self.client.call(p.OpenSession, REQUEST_DEADLINE_S, agent_id=agent, tool=TOOL, machine="bench",
                               repo_remote=REMOTE, base_commit="abcdef1")

    async def submit(self, agent: str, modify: list[str], depend: list[str], summary: str,
                     steps: list[str]) -> tuple[str, str | None]:

        intent = p.Intent(summary=summary, steps=tuple(steps),
                          concepts=p.Concepts(modify=tuple(modify), depend=tuple(depend)))
        try:
            v = await self.client.call(p.SubmitIntent, REQUEST_DEADLINE_S, agent_id=agent, tool=TOOL,
                                       intent=intent, trigger="initial")
        except RequestError as e:
            raise Refusal(e.code) from None
        self.served_by = self.client.leader_id
        return str(v.get("action")), v.get("intent_id")

    async def complete(self, agent: str, intent_id: str) -> str:
        try:
            v = await self.client.call(p.Complete, REQUEST_DEADLINE_S, agent_id=agent, intent_id=intent_id)
        except RequestError as e:
            raise Refusal(e.code) from None
        self.served_by = self.client.leader_id
        return str(v.get("action"))

    async def heartbeat(self, agents: list[str]) -> int:
        n = 0
        for i in range(0, len(agents), HEARTBEAT_CHUNK):
            chunk = agents[i : i + HEARTBEAT_CHUNK]
            res = await self.client.heartbeat(chunk, deadline_s=REQUEST_DEADLINE_S)
            n += len(chunk) - len(res.get("lapsed", [])) - len(res.get("unknown", []))
        self.served_by = self.client.leader_id
        return n

    async def report(self, agent: str, intent_id: str, files: list[dict[str, Any]]) -> None:
        reports = tuple(p.FileReport(path=f["path"], change=f["change"], hunks=tuple(tuple(h) for h in f["hunks"]),
                                     symbols=tuple(p.SymbolReport(**x) for x in f["symbols"])) for f in files)
        try:
            await self.client.call(p.ReportChanges, REQUEST_DEADLINE_S, agent_id=agent, intent_id=intent_id,
                                   files=reports)
        except RequestError as e:
            raise Refusal(e.code) from None


class BareBackend(Backend):
    """JSON lines over a unix socket to a bare pysyncobj node running the same engine
    (see :mod:`tetherlab.chaos.bench.bare`): ``{"id", "cmd"}`` in, ``{"id", "ok", "result"}`` out."""

    def __init__(self, developer: str, sock_path: str) -> None:
        self.developer = developer
        self.sock_path = sock_path
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(self.sock_path, limit=1 << 24)
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            reply = json.loads(line)
            fut = self._waiting.pop(reply["id"], None)
            if fut is not None and not fut.done():
                fut.set_result(reply)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("bare node closed the connection"))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def cmd(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self._writer is not None
        self._next += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = fut
        self._writer.write(json.dumps({"id": self._next, "cmd": cmd}, separators=(",", ":")).encode() + b"\n")
        reply = await asyncio.wait_for(fut, REQUEST_DEADLINE_S)
        if not reply.get("ok"):
            raise Refusal(str(reply.get("error")))
        res: dict[str, Any] = reply["result"]
        if "error" in res:
            raise Refusal(str(res["error"].get("code")))
        return res

    async def open_session(self, agent: str) -> None:
        await self.cmd({"type": "open_session", "agent_id": agent, "developer": self.developer, "tool": TOOL,
                        "machine": "bench", "repo_remote": REMOTE, "base_commit": "abcdef1"})

    async def submit(self, agent: str, modify: list[str], depend: list[str], summary: str,
                     steps: list[str]) -> tuple[str, str | None]:
        v = await self.cmd({"type": "intent", "agent_id": agent, "tool": TOOL, "trigger": "initial",
                            "intent": {"summary": summary, "steps": steps,
                                       "concepts": {"modify": modify, "depend": depend}}})
        return str(v.get("action")), v.get("intent_id")

    async def complete(self, agent: str, intent_id: str) -> str:
        v = await self.cmd({"type": "intent", "agent_id": agent, "tool": TOOL, "trigger": "complete",
                            "intent_id": intent_id})
        return str(v.get("action"))

    async def heartbeat(self, agents: list[str]) -> int:
        n = 0
        for i in range(0, len(agents), HEARTBEAT_CHUNK):
            res = await self.cmd({"type": "heartbeat", "agent_ids": agents[i : i + HEARTBEAT_CHUNK]})
            n += int(res.get("refreshed", 0))
        return n

    async def report(self, agent: str, intent_id: str, files: list[dict[str, Any]]) -> None:
        await self.cmd({"type": "report_changes", "agent_id": agent, "intent_id": intent_id, "files": files})


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _prefix_end(prefix: str) -> str:
    b = bytearray(prefix.encode())
    b[-1] += 1
    return _b64(bytes(b))


class EtcdBackend(Backend):
    """The same coordination built the way a team would on etcd v3 (JSON gateway over HTTP):

    - a session is a lease (TTL 30 s) plus ``s/<agent>`` under it; a heartbeat is a lease
      keepalive per agent;
    - a claim is ``c/<concept>/<agent>`` = ``m`` or ``d``, under the agent's lease;
    - submit = one read transaction over the intent's concepts' claims; if another agent holds a
      conflicting claim (modify vs anything, depend vs modify) the verdict is ``stop``; else a
      compare-and-swap transaction (every concept's claim range unchanged since the read) puts
      the claims and ``i/<agent>``; a failed compare re-reads and retries;
    - complete = one transaction deleting the agent's claims and intent; the fencing token is
      the revision of the granting transaction.
    """

    def __init__(self, developer: str, endpoint: str) -> None:
        self.developer = developer
        self.endpoint = endpoint.rstrip("/")
        self.leases: dict[str, str] = {}
        self.claims: dict[str, list[str]] = {}
        self.retries = 0
        self._session: Any = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=IN_FLIGHT_MAX + 8),
                                              timeout=aiohttp.ClientTimeout(total=REQUEST_DEADLINE_S))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self._session.post(self.endpoint + path, json=body) as r:
            out: dict[str, Any] = await r.json(content_type=None)
            if r.status != 200:
                raise Refusal(f"etcd {r.status}: {out.get('error') or out.get('message')}")
            return out

    async def open_session(self, agent: str) -> None:
        res = await self._post("/v3/lease/grant", {"TTL": SESSION_TTL_S})
        lease = str(res["ID"])
        self.leases[agent] = lease
        await self._post("/v3/kv/put", {"key": _b64(f"s/{agent}"), "value": _b64(TOOL), "lease": lease})

    async def submit(self, agent: str, modify: list[str], depend: list[str], summary: str,
                     steps: list[str]) -> tuple[str, str | None]:
        concepts = [*modify, *depend]
        for _ in range(ETCD_TXN_RETRIES):
            reads = [{"request_range": {"key": _b64(f"c/{c}/"), "range_end": _prefix_end(f"c/{c}/")}}
                     for c in concepts]
            res = await self._post("/v3/kv/txn", {"success": reads})
            rev = int(res["header"]["revision"])
            for c, r in zip(concepts, res.get("responses", []), strict=False):
                for kv in r.get("response_range", {}).get("kvs", []) or []:
                    holder = base64.b64decode(kv["key"]).decode().split("/", 2)[2]
                    kind = base64.b64decode(kv.get("value", "")).decode()
                    if holder != agent and (c in modify or kind == "m"):
                        return "stop", None
            lease = self.leases[agent]
            compare = [{"key": _b64(f"c/{c}/"), "range_end": _prefix_end(f"c/{c}/"), "target": "MOD",
                        "result": "LESS", "mod_revision": str(rev + 1)} for c in concepts]
            puts = [{"request_put": {"key": _b64(f"c/{c}/{agent}"), "value": _b64("m" if c in modify else "d"),
                                     "lease": lease}} for c in concepts]
            body = json.dumps({"summary": summary, "steps": steps, "modify": modify, "depend": depend})
            puts.append({"request_put": {"key": _b64(f"i/{agent}"), "value": _b64(body), "lease": lease}})
            res = await self._post("/v3/kv/txn", {"compare": compare, "success": puts})
            if res.get("succeeded"):
                self.claims[agent] = concepts
                return "continue", f"r-{res['header']['revision']}"
            self.retries += 1
        raise Refusal("contention: compare failed on every retry")

    async def complete(self, agent: str, intent_id: str) -> str:
        dels = [{"request_delete_range": {"key": _b64(f"c/{c}/{agent}")}} for c in self.claims.pop(agent, [])]
        dels.append({"request_delete_range": {"key": _b64(f"i/{agent}")}})
        await self._post("/v3/kv/txn", {"success": dels})
        return "continue"

    async def heartbeat(self, agents: list[str]) -> int:
        sem = asyncio.Semaphore(IN_FLIGHT_MAX)

        async def one(a: str) -> int:
            async with sem:
                res = await self._post("/v3/lease/keepalive", {"ID": self.leases[a]})
                return 1 if int(res.get("result", {}).get("TTL", 0)) > 0 else 0

        return sum(await asyncio.gather(*(one(a) for a in agents)))

    async def report(self, agent: str, intent_id: str, files: list[dict[str, Any]]) -> None:
        # What a team on etcd would keep: the agent's footprint under its lease, for others to read.
        await self._post("/v3/kv/put", {"key": _b64(f"f/{agent}"), "value": _b64(json.dumps(files)),
                                        "lease": self.leases[agent]})


def make_backend(spec: dict[str, Any], developer: str, index: int) -> Backend:
    kind = spec["kind"]
    if kind == "tetherlab":
        return TetherBackend(developer, spec["keys"][developer], spec["cluster_file"])
    if kind == "bare":
        return BareBackend(developer, spec["sock"])
    if kind == "etcd":
        eps = spec["endpoints"]
        return EtcdBackend(developer, eps[index % len(eps)])
    raise ValueError(f"unknown backend {kind!r}")


# --- one developer and its agents ---------------------------------------------------------------


@dataclass
class Agent:
    id: str
    intent_id: str | None = None  # an active intent to complete on the next turn
    concept: str = ""  # the concept that intent modifies (its files are what the agent changes)
    edits: int = 0  # times a working agent has changed its files since its intent began
    # The intent whose state an idle agent reported and the master answered: an idle agent's
    # files follow from its intent, so it has nothing new to report until its intent changes.
    reported_intent: str | None = None


@dataclass
class Stats:
    verdict_lat: list[float] = field(default_factory=list)  # seconds, from due time to answer
    initial_lat: list[float] = field(default_factory=list)
    actions: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    hb_agents: int = 0
    hb_rpcs: int = 0
    hb_lat: list[float] = field(default_factory=list)
    reports: int = 0
    reports_unchanged: int = 0  # due reports not sent: the agent's state was already acknowledged
    report_lat: list[float] = field(default_factory=list)
    dropped: int = 0  # due commands that found no idle agent
    # (monotonic time answered, node that answered) of every verdict, for failover timing
    verdict_times: list[tuple[float, str | None]] = field(default_factory=list)
    # (monotonic time answered, node that answered) of every successful heartbeat
    hb_ok: list[tuple[float, str | None]] = field(default_factory=list)


class Developer:
    def __init__(self, name: str, backend: Backend, agents: list[str], workload: Workload, seed: int,
                 idle: bool = False) -> None:
        self.name = name
        self.idle = idle  # takes no turns: its agents hold their intents and change nothing
        self.backend = backend
        self.agents = [Agent(a) for a in agents]
        self.ready: collections.deque[Agent] = collections.deque(self.agents)
        self.workload = workload
        self.rng = random.Random(seed)
        self.sem = asyncio.Semaphore(IN_FLIGHT_MAX)
        self.stats = Stats()
        self.measuring = False
        self.t_measure = 0.0

    async def open_sessions(self, concurrency: int = 32) -> int:
        sem = asyncio.Semaphore(concurrency)

        async def one(a: Agent) -> None:
            async with sem:
                await self.backend.open_session(a.id)

        await asyncio.gather(*(one(a) for a in self.agents))
        return len(self.agents)

    async def hold(self, base: int, concurrency: int = 32) -> int:
        """Set-up for the scale run: every agent submits an intent modifying a concept of its own
        (concepts ``base``, ``base + 1``, ...)."""
        sem = asyncio.Semaphore(concurrency)
        granted = 0

        async def one(k: int, a: Agent) -> None:
            nonlocal granted
            async with sem:
                cid = self.workload.concept_id(k)
                action, iid = await self.backend.submit(a.id, [cid], [], f"own work {k}", [f"Change {cid}"])
                if action == "continue":
                    a.intent_id, a.concept = iid, cid
                    granted += 1

        await asyncio.gather(*(one(base + i, a) for i, a in enumerate(self.agents)))
        return granted

    async def turn(self, due: float) -> None:
        """The next coordination step of the agent that has waited longest."""
        if not self.ready:
            self.stats.dropped += 1
            return
        a = self.ready.popleft()
        try:
            async with self.sem:
                if a.intent_id is not None:
                    kind = "complete"
                    action = await self.backend.complete(a.id, a.intent_id)
                    a.intent_id = None
                else:
                    kind = "initial"
                    modify, depend, summary, steps = self.workload.intent(self.rng)
                    action, iid = await self.backend.submit(a.id, modify, depend, summary, steps)
                    a.intent_id = iid if action == "continue" else None
                    a.concept, a.edits = modify[0], 0
            now = time.monotonic()
            self.stats.verdict_times.append((now, self.backend.served_by))
            if self.measuring and due >= self.t_measure:
                self.stats.verdict_lat.append(now - due)
                if kind == "initial":
                    self.stats.initial_lat.append(now - due)
                self.stats.actions[f"{kind}:{action}"] += 1
        except Refusal as e:
            if self.measuring:
                self.stats.errors[str(e)[:60]] += 1
        except Exception as e:  # a lost connection, a timeout: counted, the agent goes on
            if self.measuring:
                self.stats.errors[type(e).__name__] += 1
        finally:
            self.ready.append(a)

    async def heartbeats(self, stop: asyncio.Event, interval_s: float) -> None:
        ids = [a.id for a in self.agents]
        next_t = time.monotonic() + self.rng.random() * interval_s
        while not stop.is_set():
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            next_t += interval_s
            if stop.is_set():
                break
            t0 = time.monotonic()
            try:
                n = await self.backend.heartbeat(ids)
            except Exception as e:
                if self.measuring:
                    self.stats.errors[f"heartbeat:{type(e).__name__}"] += 1
                continue
            t1 = time.monotonic()
            self.stats.hb_ok.append((t1, self.backend.served_by))
            if self.measuring and t0 >= self.t_measure:
                self.stats.hb_agents += n
                self.stats.hb_rpcs += (len(ids) + HEARTBEAT_CHUNK - 1) // HEARTBEAT_CHUNK
                self.stats.hb_lat.append(t1 - t0)


    async def reports(self, stop: asyncio.Event, interval_s: float, unchanged: bool = False) -> None:
        """Every ``interval_s``, each agent holding an intent collects its changes (spread over the
        interval, as independent shims would) and reports them if they differ from what the
        master last acknowledged for that intent (``unchanged``: report them anyway). A working
        agent edits between two reports, so its state always differs; an idle agent's is fixed
        by its intent, so it differs only for an intent not yet reported."""
        while not stop.is_set():
            holding = [a for a in self.agents if a.intent_id is not None]
            if self.idle and not unchanged:
                # An idle agent's state is what it was at its acknowledged report: nothing to send
                # (checked here, not by a wake-up per agent: the generator shares the servers' cores).
                waiting = len(holding)
                holding = [a for a in holding if a.reported_intent != a.intent_id]
                if self.measuring and time.monotonic() >= self.t_measure:
                    self.stats.reports_unchanged += waiting - len(holding)
            gap_s = interval_s / max(1, len(holding))
            for a in holding:
                if stop.is_set():
                    return
                await asyncio.sleep(gap_s)
                iid = a.intent_id
                if iid is None:
                    continue
                k = a.concept.rsplit(".c", 1)[-1]
                prefix = f"src/{a.concept.split('.')[0]}/c{k}/"
                if self.idle:  # the same files every time: what it changed before going idle
                    files = report_files(random.Random(iid), prefix)
                else:
                    a.edits += 1
                    files = report_files(self.rng, prefix, a.edits)
                t0 = time.monotonic()
                try:
                    async with self.sem:
                        await self.backend.report(a.id, iid, files)
                    a.reported_intent = iid  # answered: a lost report goes again next round
                except Refusal as e:  # the intent ended meanwhile (completed by its own turn): counted
                    if self.measuring:
                        self.stats.errors[f"report:{str(e)[:40]}"] += 1
                    continue
                except Exception as e:
                    if self.measuring:
                        self.stats.errors[f"report:{type(e).__name__}"] += 1
                    continue
                if self.measuring and t0 >= self.t_measure:
                    self.stats.reports += 1
                    self.stats.report_lat.append(time.monotonic() - t0)
            if not holding:
                await asyncio.sleep(interval_s)


# --- a worker process -----------------------------------------------------------------------------


async def _run_phase(all_devs: list[Developer], passive: set[str], req: dict[str, Any]) -> dict[str, Any]:
    op = req["op"]
    devs = [d for d in all_devs if d.name not in passive]  # the ones that take turns
    t0 = time.monotonic()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    if op == "open":
        n = sum(await asyncio.gather(*(d.open_sessions() for d in all_devs)))
        return {"sessions": n, "seconds": time.monotonic() - t0}
    if op == "hold":
        bases: dict[str, int] = req["holders"]
        n = sum(await asyncio.gather(*(d.hold(bases[d.name]) for d in all_devs if d.name in bases)))
        return {"granted": n, "seconds": time.monotonic() - t0}
    if op != "load":
        raise ValueError(f"unknown phase {op!r}")
    warmup, duration = float(req["warmup_s"]), float(req["duration_s"])
    rate: float | None = req.get("rate")  # per this worker; None = closed loop
    concurrency = int(req.get("concurrency", 32))
    start = t0
    t_measure = start + warmup
    t_end = t_measure + duration
    for d in all_devs:
        d.stats = Stats()
        d.measuring = True
        d.t_measure = t_measure
    stop = asyncio.Event()
    hb_tasks = [asyncio.create_task(d.heartbeats(stop, float(req.get("hb_interval_s", HEARTBEAT_INTERVAL_S))))
                for d in all_devs]
    report_interval_s = float(req.get("report_interval_s", REPORT_INTERVAL_S))
    if report_interval_s > 0:
        unchanged = bool(req.get("unchanged_reports", False))
        hb_tasks += [asyncio.create_task(d.reports(stop, report_interval_s, unchanged)) for d in all_devs]
    tasks: set[asyncio.Task[None]] = set()
    if rate:
        # Open loop: due times are fixed in advance; round-robin over developers.
        interval = 1.0 / rate
        due = start
        i = 0
        while due < t_end:
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            # Issue everything that is due (after a stall, at once: it is all late already).
            while due <= time.monotonic() and due < t_end:
                t = asyncio.create_task(devs[i % len(devs)].turn(due))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                i += 1
                due += interval
    else:

        async def loop(d: Developer) -> None:
            while time.monotonic() < t_end:
                await d.turn(time.monotonic())

        loops = [asyncio.create_task(loop(d)) for d in devs for _ in range(concurrency)]
        await asyncio.gather(*loops)
    if tasks:
        await asyncio.wait(list(tasks), timeout=REQUEST_DEADLINE_S + 5)
    stop.set()
    for t in hb_tasks:
        t.cancel()
    for t in hb_tasks:
        with contextlib.suppress(BaseException):
            await t
    for d in all_devs:
        d.measuring = False
    devs = all_devs
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out: dict[str, Any] = {
        "verdict_lat": [x for d in devs for x in d.stats.verdict_lat],
        "initial_lat": [x for d in devs for x in d.stats.initial_lat],
        "actions": dict(sum((d.stats.actions for d in devs), collections.Counter())),
        "errors": dict(sum((d.stats.errors for d in devs), collections.Counter())),
        "hb_agents": sum(d.stats.hb_agents for d in devs),
        "hb_rpcs": sum(d.stats.hb_rpcs for d in devs),
        "hb_lat": [x for d in devs for x in d.stats.hb_lat],
        "reports": sum(d.stats.reports for d in devs),
        "reports_unchanged": sum(d.stats.reports_unchanged for d in devs),
        "report_lat": [x for d in devs for x in d.stats.report_lat],
        "dropped": sum(d.stats.dropped for d in devs),
        "duration_s": duration,
        "cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
        "etcd_retries": sum(getattr(d.backend, "retries", 0) for d in devs),
        # Verdicts answered in each second from the phase's start, warm-up included: a phase
        # whose rate is still climbing when measuring starts shows it here.
        "by_second": _by_second([t for d in devs for t, _ in d.stats.verdict_times], t0, warmup + duration),
    }
    if req.get("timeline"):
        out["verdict_times"] = {d.name: d.stats.verdict_times for d in devs}
        out["hb_ok"] = {d.name: d.stats.hb_ok for d in devs}
    return out


def _by_second(times: list[float], t0: float, span_s: float) -> list[int]:
    """Counts per second from ``t0``: the phase's seconds, and more if answers came after it."""
    ks = [int(t - t0) for t in times if t >= t0]
    out = [0] * max(int(span_s + 0.999), max(ks, default=-1) + 1, 1)
    for k in ks:
        out[k] += 1
    return out


async def _worker_async(conn: Any, spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    wl = Workload(**spec["workload"])
    devs: list[Developer] = []
    for i, (name, agents) in enumerate(spec["developers"].items()):
        b = make_backend(spec["backend"], name, spec["index"] * 100 + i)
        devs.append(Developer(name, b, agents, wl, seed=hash((spec["index"], i)) & 0xFFFF,
                              idle=name in spec.get("passive", [])))
    for d in devs:
        await d.backend.start()
    conn.send({"ready": True, "pid": os.getpid()})
    try:
        while True:
            req = await loop.run_in_executor(None, conn.recv)
            if req is None or req.get("op") == "exit":
                break
            if req.get("op") == "set_workload":
                for d in devs:
                    d.workload = Workload(**req["workload"])
                conn.send({"ok": True})
                continue
            try:
                conn.send(await _run_phase(devs, set(spec.get("passive", [])), req))
            except Exception as e:
                conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        for d in devs:
            with contextlib.suppress(Exception):
                await d.backend.close()


def worker_main(conn: Any, spec: dict[str, Any]) -> None:
    """Entry point of a load-generator process (spawned)."""
    try:
        asyncio.run(_worker_async(conn, spec))
    except Exception as e:
        with contextlib.suppress(Exception):
            conn.send({"error": f"{type(e).__name__}: {e}"})
