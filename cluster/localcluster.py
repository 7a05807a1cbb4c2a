"""A local cluster of real node processes: used by ``tetherlab up``-style tools, benchmarks,
drills and tests. Only processes started here are ever signalled, by PID."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from tetherlab.cluster.cli import init_cluster, start_node_process
from tetherlab.cluster.client import ControlClient, cluster_status, node_status
from tetherlab.cluster.config import ClusterFile, load_cluster_file

PORT_PROBE_TRIES = 50
STOP_GRACE_S = 10.0


def stop_processes(procs: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM every process we started, then SIGKILL what is still there after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _ports_free(host: str, ports: list[int]) -> bool:
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_base_port(nodes: int, host: str = "127.0.0.1") -> int:
    """A base port whose raft/ssh/http ports (BASE+1.., +101.., +201..) are all free now."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(PORT_PROBE_TRIES):
        base = rng.randrange(20000, 40000, 10)
        ports = [base + off + i for off in (1, 101, 201) for i in range(nodes)]
        if _ports_free(host, ports):
            return base
    raise RuntimeError(f"no free port range found on {host}")


class LocalCluster:
    def __init__(self, directory: Path, nodes: int = 3, host: str = "127.0.0.1", base_port: int | None = None,
                 extra_toml: str = "") -> None:
        self.dir = Path(directory).resolve()
        self.host = host
        if not (self.dir / "cluster.toml").exists():
            init_cluster(self.dir, nodes, host, base_port or free_base_port(nodes, host))
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
        targets = [nid] if nid else list(self.procs)
        for n in targets:
            self.signal(n, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for n in targets:
            p = self.procs.get(n)
            if p is None:
                continue
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def alive(self, nid: str) -> bool:
        p = self.procs.get(nid)
        return p is not None and p.poll() is None

    def close(self) -> None:
        self.stop()

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
        """The id of a leader that the other live nodes agree on."""
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
