"""The two baselines of ``tetherlab bench cluster``.

- Bare pysyncobj: three nodes of pysyncobj as shipped (memory journal, no fsync, no
  encryption, default timing) whose replicated state is the same coordination
  :class:`~tetherlab.cluster.core.engine.engine.Engine`, fed the same engine commands. Clients
  reach the leader over a local unix socket with JSON lines (no SSH, no protocol layer), so
  the difference to Tetherlab is everything we add: SSH, the shim protocol, Raft encryption,
  the fsynced LMDB log and the LMDB state.
- etcd: a three-member cluster of Debian's ``etcd-server`` on loopback with its default
  durability (WAL fsync), driven through its v3 JSON gateway (see
  :class:`~tetherlab.chaos.bench.load.EtcdBackend` for the coordination design).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.pipe_notifier import PipeNotifier

from tetherlab.chaos.bench.raft import bare_leader_sock
from tetherlab.cluster.core.engine.commands import decode_command
from tetherlab.cluster.core.engine.engine import Engine
from tetherlab.cluster.core.errors import CommandError
from tetherlab.cluster.ops.localcluster import free_base_port
from tetherlab.cluster.ops.procs import stop_processes

ETCD_START_TIMEOUT_S = 30.0


# --- bare pysyncobj running the engine -------------------------------------------------------------


def bare_engine_node_main(self_addr: str, peers: list[str], sock_path: str, as_shipped: bool = False) -> None:
    """One bare node. ``as_shipped``: pysyncobj's own timing (a command waits for the next
    tick, entries go out on the append-entries period); otherwise with the two latency fixes
    Tetherlab's RaftNode also has, so that the comparison isolates durability and transport."""
    class BareEngine(SyncObj):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(self_addr, peers, SyncObjConf(bindAddress=self_addr))
            self.engine = Engine()
            self.notifier: PipeNotifier | None = None
            self.last_sent: tuple[int, int] = (-1, -1)
            if not as_shipped:
                self.addOnTickCallback(self.on_tick)

        def on_tick(self) -> None:
            # The two latency fixes RaftNode has that do not touch durability: wake the tick
            # thread when a command arrives, and send new entries and a new commit index at once.
            if self.notifier is None:
                self.notifier = PipeNotifier(self._poller)
            sent = (self._SyncObj__getCurrentLogIndex(), self.raftCommitIndex)
            if self._isLeader() and sent != self.last_sent:
                self.last_sent = sent
                self._SyncObj__sendAppendEntries()

        def submit(self, payload: bytes, callback: Any) -> None:
            self.apply_cmd(payload, callback=callback)
            if self.notifier is not None:
                with contextlib.suppress(BlockingIOError):
                    self.notifier.notify()

        @replicated
        def apply_cmd(self, payload: bytes) -> dict[str, Any]:
            obj = json.loads(payload)
            index = self.raftLastApplied + 1
            try:
                cmd = decode_command(obj["cmd"])
            except CommandError as e:
                return e.to_json()
            result: dict[str, Any] = self.engine.apply(cmd, index=index, now_ms=obj["now_ms"]).result
            return result

    node = BareEngine()

    async def serve() -> None:
        loop = asyncio.get_running_loop()

        async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while line := await reader.readline():
                req = json.loads(line)
                rid = req.get("id")
                if req.get("op") == "status":
                    leader = node._getLeader()
                    writer.write(json.dumps({"id": rid, "ok": True, "result": {
                        "leader": leader.address if leader else None, "self": self_addr}}).encode() + b"\n")
                    continue
                payload = json.dumps({"now_ms": int(time.time() * 1000), "cmd": req["cmd"]},
                                     separators=(",", ":")).encode()

                def done(res: Any, err: int, rid: Any = rid) -> None:
                    reply = {"id": rid, "ok": err == 0, "result": res if err == 0 else None, "error": err}
                    data = json.dumps(reply, separators=(",", ":")).encode() + b"\n"
                    loop.call_soon_threadsafe(writer.write, data)

                node.submit(payload, done)

        await asyncio.start_unix_server(conn, path=sock_path, limit=1 << 24)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    asyncio.run(serve())
    node.destroy()


class BareCluster:
    def __init__(self, workdir: Path, as_shipped: bool = False) -> None:
        self.workdir = workdir
        self.as_shipped = as_shipped
        workdir.mkdir(parents=True, exist_ok=True)
        base = free_base_port(3)
        self.addrs = [f"127.0.0.1:{base + 1 + i}" for i in range(3)]
        self.socks = [str(workdir / f"bare{i}.sock") for i in range(3)]
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        code = ("import sys, json; from tetherlab.chaos.bench.baselines import bare_engine_node_main; "
                "bare_engine_node_main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4] == '1')")
        for i, a in enumerate(self.addrs):
            peers = [p for p in self.addrs if p != a]
            log = open(self.workdir / f"bare{i}.log", "ab")  # noqa: SIM115 - handed to the child
            self.procs.append(subprocess.Popen([sys.executable, "-c", code, a, json.dumps(peers), self.socks[i],
                                                "1" if self.as_shipped else "0"],
                                               stdout=log, stderr=subprocess.STDOUT))

    def leader_sock(self) -> str:
        return bare_leader_sock(self.addrs, self.socks)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        stop_processes(self.procs, grace_s=5.0)


# --- etcd ---------------------------------------------------------------------------------------


def etcd_binary() -> str | None:
    return shutil.which("etcd") or (("/usr/bin/etcd") if os.path.exists("/usr/bin/etcd") else None)


def ensure_etcd(install: bool = True) -> tuple[str | None, str]:
    """The etcd binary, installing Debian's ``etcd-server`` when missing and allowed (root and
    apt-get). Returns (path or None, a note saying what happened)."""
    path = etcd_binary()
    if path:
        return path, "etcd found"
    if not install:
        return None, "etcd is not installed (apt-get install etcd-server); etcd baseline skipped"
    script = Path(__file__).resolve().parents[1] / "deploy" / "scripts" / "install-etcd.sh"
    if not script.exists():  # installed as a package: the script is not beside us
        script = Path.cwd() / "deploy" / "scripts" / "install-etcd.sh"
    try:
        if script.exists():
            subprocess.run(["bash", str(script)], check=False, timeout=900,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elif os.geteuid() == 0 and shutil.which("apt-get"):
            subprocess.run(["apt-get", "install", "-y", "-qq", "etcd-server"], check=False, timeout=900,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"etcd install failed ({e}); etcd baseline skipped"
    path = etcd_binary()
    if path:
        return path, "etcd installed from Debian's etcd-server"
    return None, "etcd is not installed and could not be (needs root, apt-get and etcd-server); baseline skipped"


class EtcdCluster:
    """Three etcd members on loopback, defaults otherwise (WAL fsync on)."""

    def __init__(self, workdir: Path, binary: str) -> None:
        self.workdir = workdir
        self.binary = binary
        base = free_base_port(3)
        self.client_ports = [base + 1 + i for i in range(3)]
        self.peer_ports = [base + 101 + i for i in range(3)]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    def start(self) -> None:
        initial = ",".join(f"e{i + 1}=http://127.0.0.1:{p}" for i, p in enumerate(self.peer_ports))
        for i in range(3):
            name = f"e{i + 1}"
            data = self.workdir / name
            data.mkdir(parents=True, exist_ok=True)
            cmd = [
                self.binary, "--name", name, "--data-dir", str(data),
                "--listen-client-urls", self.endpoints[i], "--advertise-client-urls", self.endpoints[i],
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"tetherlab-bench-{os.getpid()}",
                "--logger", "zap", "--log-level", "error",
            ]
            log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))

    def wait_healthy(self, timeout_s: float = ETCD_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ok = 0
            for ep in self.endpoints:
                with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(ep + "/health", timeout=1) as r:
                    ok += json.loads(r.read()).get("health") == "true"
            if ok == 3:
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"etcd exited with {p.returncode}; see {self.workdir}")
            time.sleep(0.2)
        raise TimeoutError(f"etcd cluster not healthy within {timeout_s}s")

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        stop_processes(self.procs, grace_s=10.0)
