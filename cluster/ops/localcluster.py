"""A local cluster of real node processes.

- :class:`LocalCluster`: start, stop, kill and observe nodes (benchmarks, drills and tests);
- :class:`Supervisor`: ``tetherlab up``: runs every node in the foreground, reports deaths and
  leader changes, and restarts a node that exited, so killing the leader shows a failover;
- :func:`wait_for_leader`.

Only processes started here are ever signalled, by PID."""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import random
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tetherlab.cluster.core.config import ClusterFile
from tetherlab.cluster.node.sockets import bind_error
from tetherlab.cluster.ops.client import ControlClient, cluster_status, node_status
from tetherlab.cluster.ops.config import load_cluster_file
from tetherlab.cluster.ops.layout import init_cluster
from tetherlab.cluster.ops.procs import start_node_process, stop_processes

# Below Linux's ephemeral range (32768 up by default): the ports a probe found free cannot be
# taken meanwhile by an outgoing connection, another cluster's or a test's.
PORT_BASE_MIN, PORT_BASE_MAX = 20000, 32000
# A base's ports are BASE+1.., +101.., +201.. (up to 99 nodes): bases this far apart never share one.
PORT_SPAN = 300
# Leases a process keeps for bases it handed out without an owner to release them (the oldest
# lapses first): a cluster started from such a base is long done by then, and the bound keeps a
# few processes side by side from holding all 40 bases.
LEASES_KEPT = 8
LEADER_POLL_S = 0.2
RESTART_DELAY_S = 2.0  # a dead node of `tetherlab up` comes back after this (say so on screen)
RESTART_DELAY_MAX_S = 30.0  # a node that keeps dying is restarted ever more slowly, up to this
CRASH_LOOP_WINDOW_S = 10.0  # dying again within this of a restart doubles the delay
SUPERVISE_POLL_S = 0.2
STATUS_POLL_S = 0.5
STATUS_TIMEOUT_S = 0.4  # a paused node must not hold up death detection for long


class PortLease:
    """A base port held by this process: an exclusive ``flock`` on a file named after it, in a
    directory every local cluster of this user shares. A probe alone is not enough: two processes
    can find one range free at once, and a cluster whose nodes are all stopped for a moment (a
    restart drill) leaves its ports free for another's probe to take. The lock goes with the
    process, so a killed test leaks nothing."""

    def __init__(self, base: int, fd: int) -> None:
        self.base = base
        self._fd: int | None = fd

    def release(self) -> None:
        with _leases_lock:
            self._close()
            if _kept.get(self.base) is self:
                del _kept[self.base]

    def _close(self) -> None:  # under _leases_lock
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_leases_lock = threading.Lock()
_kept: collections.OrderedDict[int, PortLease] = collections.OrderedDict()


def _lease_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"tetherlab-port-leases-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _try_lease(directory: Path, base: int) -> PortLease | None:
    fd = os.open(directory / str(base), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another process (or this one, for another cluster) holds it
        os.close(fd)
        return None
    return PortLease(base, fd)


def _ports_free(host: str, ports: list[int]) -> bool:
    return all(bind_error(host, port) is None for port in ports)


def lease_base_port(nodes: int, host: str = "127.0.0.1") -> PortLease:
    """A base port whose raft/ssh/http ports (BASE+1.., +101.., +201..) are all free now and that
    no other local cluster holds; the caller releases it when its cluster is done."""
    if not 0 < nodes < 100:
        raise ValueError(f"nodes must be 1 to 99 for a base's port span, got {nodes}")
    directory = _lease_dir()
    bases = list(range(PORT_BASE_MIN, PORT_BASE_MAX - PORT_SPAN + 1, PORT_SPAN))
    random.Random(os.getpid() ^ time.monotonic_ns()).shuffle(bases)
    for base in bases:
        lease = _try_lease(directory, base)
        if lease is None:
            continue
        if _ports_free(host, [base + off + i for off in (1, 101, 201) for i in range(nodes)]):
            return lease
        lease.release()
    raise RuntimeError(f"no free port range found on {host}: all {len(bases)} bases from {PORT_BASE_MIN} "
                       f"are held by other local clusters or in use")


def free_base_port(nodes: int, host: str = "127.0.0.1") -> int:
    """A base port as :func:`lease_base_port` finds it, for callers that start a cluster from a
    number: this process keeps its lease until ``LEASES_KEPT`` newer ones are handed out."""
    lease = lease_base_port(nodes, host)
    with _leases_lock:
        _kept[lease.base] = lease
        while len(_kept) > LEASES_KEPT:
            _, oldest = _kept.popitem(last=False)
            oldest._close()
    return lease.base


class LocalCluster:
    def __init__(self, directory: Path, nodes: int = 3, host: str = "127.0.0.1", base_port: int | None = None,
                 extra_toml: str = "") -> None:
        self.dir = Path(directory).resolve()
        self.host = host
        self._lease: PortLease | None = None
        if not (self.dir / "cluster.toml").exists():
            if base_port is None:
                # Held until close(): other clusters' probes must not take our ports while our
                # nodes are down for a restart.
                self._lease = lease_base_port(nodes, host)
                base_port = self._lease.base
            init_cluster(self.dir, nodes, host, base_port)
            if extra_toml:
                for n in load_cluster_file(self.dir / "cluster.toml").nodes:
                    cfg = self.dir / n.id / "node.toml"
                    cfg.write_text(cfg.read_text() + "\n" + extra_toml)
        self.cluster: ClusterFile = load_cluster_file(self.dir / "cluster.toml")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def ids(self) -> list[str]:
        return [n.id for n in self.cluster.nodes]

    def config_path(self, nid: str) -> Path:
        return self.dir / nid / "node.toml"

    def data_dir(self, nid: str) -> Path:
        return self.dir / nid / "data"

    def control_path(self, nid: str) -> Path:
        return self.data_dir(nid) / "control.sock"

    def client(self, nid: str, timeout_s: float = 10.0) -> ControlClient:
        return ControlClient(self.control_path(nid), timeout_s)

    # --- processes --------------------------------------------------------------------------

    def start(self, nid: str | None = None) -> None:
        for n in [nid] if nid else self.ids:
            p = self.procs.get(n)
            if p is not None and p.poll() is None:
                continue
            with contextlib.suppress(FileNotFoundError):
                self.control_path(n).unlink()
            self.procs[n] = self._spawn(n)

    def _spawn(self, nid: str) -> subprocess.Popen[bytes]:
        """Start one node process (subclasses change how)."""
        return start_node_process(self.config_path(nid), self.dir / nid / "node.log")

    def wait_serving(self, nid: str, timeout_s: float = 20.0) -> None:
        node = self.cluster.by_id()[nid]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            p = self.procs.get(nid)
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"node {nid} exited with {p.returncode}; log:\n{self.log_tail(nid)}")
            if self.control_path(nid).exists() and node_status(node, 0.5) is not None:
                return
            time.sleep(0.05)
        raise TimeoutError(f"node {nid} not serving after {timeout_s}s; log:\n{self.log_tail(nid)}")

    def log_tail(self, nid: str, lines: int = 30) -> str:
        try:
            return "\n".join((self.dir / nid / "node.log").read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def signal(self, nid: str, sig: int) -> None:
        p = self.procs.get(nid)
        if p is not None and p.poll() is None:
            os.kill(p.pid, sig)

    def kill(self, nid: str) -> None:
        """SIGKILL: the node gets no chance to flush anything."""
        p = self.procs.get(nid)
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()

    def stop(self, nid: str | None = None) -> None:
        stop_processes([self.procs[n] for n in ([nid] if nid else list(self.procs)) if n in self.procs])

    def alive(self, nid: str) -> bool:
        p = self.procs.get(nid)
        return p is not None and p.poll() is None

    def close(self) -> None:
        self.stop()
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- observation ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return cluster_status(self.cluster, timeout_s=1.0)

    def node_status(self, nid: str) -> dict[str, Any] | None:
        return node_status(self.cluster.by_id()[nid], 1.0)

    def wait_leader(self, timeout_s: float = 20.0, among: list[str] | None = None,
                    exclude: str | None = None) -> str:
        """The id of a leader backed by a quorum (``quorum_backed``); a node outside that quorum
        may not have heard of it yet, so a request through a follower can still meet
        ``unavailable`` for a moment and should be retried."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = self.status()
            roles = {n["id"]: n for n in st["nodes"]}
            for nid in among or self.ids:
                if nid == exclude:
                    continue
                s = self.node_status(nid) if roles[nid]["role"] == "leader" else None
                if s and s.get("role") == "leader" and s.get("quorum_backed"):
                    return nid
            time.sleep(0.1)
        raise TimeoutError(f"no leader within {timeout_s}s: {self.status()}")

    def wait_applied(self, index: int, nids: list[str] | None = None, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(nids or self.ids)
        while pending and time.monotonic() < deadline:
            pending = [n for n in pending if self._applied(n) < index]
            if pending:
                time.sleep(0.05)
        if pending:
            raise TimeoutError(f"nodes {pending} did not apply index {index} within {timeout_s}s")

    def _applied(self, nid: str) -> int:
        return int((self.node_status(nid) or {}).get("store", {}).get("applied_index", -1))

    def dump(self, nid: str) -> dict[str, Any]:
        with self.client(nid) as c:
            reply = c.call("dump")
        assert reply["ok"], reply
        result: dict[str, Any] = reply["result"]
        return result


def wait_for_leader(cluster: ClusterFile, timeout_s: float,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The cluster status once some node is leader, or None after ``timeout_s``; ``progress``
    hears each new line of roles while waiting."""
    deadline = time.monotonic() + timeout_s
    last_line = ""
    while time.monotonic() < deadline:
        st = cluster_status(cluster, timeout_s=1.0)
        if st["leader"] is not None:
            return st
        if progress is not None:
            line = ", ".join(f"{n['id']}={n['role']}" for n in st["nodes"])
            if line != last_line:
                progress(f"waiting for a leader: {line}")
                last_line = line
        time.sleep(LEADER_POLL_S)
    return None


@dataclass
class _Child:
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    delay_s: float = RESTART_DELAY_S


class Supervisor:
    """``tetherlab up``: every node of a local cluster as a child process, in the foreground.

    A node that exits (killed, crashed) is reported and restarted after ``restart_delay_s``;
    the others keep running, so the cluster fails over and the dead node rejoins. A node that
    dies again soon after each restart is restarted ever more slowly (a crash loop must not
    spin). Leader changes are reported as they are seen."""

    def __init__(self, directory: Path, cluster: ClusterFile, say: Callable[[str], None],
                 restart_delay_s: float = RESTART_DELAY_S) -> None:
        self.dir = directory
        self.cluster = cluster
        self.say = say
        self.restart_delay_s = restart_delay_s
        self.children: dict[str, _Child] = {n.id: _Child(delay_s=restart_delay_s) for n in cluster.nodes}
        self._leader: tuple[str | None, int | None] = (None, None)
        self._status_at = 0.0

    def log_path(self, nid: str) -> Path:
        return self.dir / nid / "node.log"

    def start(self, nid: str) -> None:
        child = self.children[nid]
        with contextlib.suppress(FileNotFoundError):
            (self.dir / nid / "data" / "control.sock").unlink()
        child.proc = start_node_process(self.dir / nid / "node.toml", self.log_path(nid))
        child.started_at = time.monotonic()
        child.restart_at = None

    def start_all(self) -> None:
        for n in self.cluster.nodes:
            self.start(n.id)
            pid = self.children[n.id].proc.pid  # type: ignore[union-attr]
            self.say(f"started {n.id} (pid {pid}): raft {n.raft}  ssh {n.ssh}  http {n.http}  "
                     f"log {self.log_path(n.id)}")

    def step(self, now: float) -> None:
        """One round: notice deaths, restart what is due, report a new leader."""
        for nid, child in self.children.items():
            p = child.proc
            if p is not None and p.poll() is not None:
                if now - child.started_at < CRASH_LOOP_WINDOW_S and child.started_at > 0:
                    child.delay_s = min(child.delay_s * 2, RESTART_DELAY_MAX_S)
                else:
                    child.delay_s = self.restart_delay_s
                child.proc = None
                child.restart_at = now + child.delay_s
                self.say(f"node {nid} (pid {p.pid}) exited with status {p.returncode}; restarting it in "
                         f"{child.delay_s:.0f} s (log {self.log_path(nid)})")
            elif child.proc is None and child.restart_at is not None and now >= child.restart_at:
                self.start(nid)
                self.say(f"restarted {nid} (pid {child.proc.pid})")  # type: ignore[union-attr]
        if now - self._status_at >= STATUS_POLL_S:
            self._status_at = now
            st = cluster_status(self.cluster, timeout_s=STATUS_TIMEOUT_S)
            leader = st["leader"]
            term = next((n["term"] for n in st["nodes"] if n["id"] == leader), None)
            if leader is not None and (leader, term) != self._leader:
                self._leader = (leader, term)
                self.say(f"leader: {leader} (term {term})")

    def run(self, should_stop: Callable[[], bool]) -> None:
        while not should_stop():
            self.step(time.monotonic())
            time.sleep(SUPERVISE_POLL_S)

    def stop(self) -> None:
        procs = [c.proc for c in self.children.values() if c.proc is not None]
        stop_processes(procs, on_kill=lambda p: self.say(f"pid {p.pid} did not stop in time; killing it"))
        if procs:
            self.say("all nodes stopped")
