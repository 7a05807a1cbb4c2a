"""Kernel partitions: nftables rules that silently drop packets between chosen endpoints.

Where a drill runs
------------------
Tests (and ``tetherlab drill --netns``) re-execute the drill runner under ``unshare --net``: a
private network namespace with only a loopback interface, brought up by the runner. The cluster
and the workload both live in it, each node on its own 127.0.0.x address (127.0.0.0/8 routes on
lo). Nothing outside the namespace is touched, and the namespace dies with the run: node
processes get ``PR_SET_PDEATHSIG`` so they cannot outlive the runner that holds it.

Against a cluster someone already runs (``tetherlab up`` on 127.0.0.1, in the root namespace),
the same rules go into a table of our own in that namespace (``inet tetherlab_drill_<pid>``),
and are deleted when the drill ends.

Why rules follow sockets, not just addresses
--------------------------------------------
On loopback the kernel picks 127.0.0.1 as the source of every connection, whatever address the
dialling process listens on (checked here: a socket connecting to 127.0.0.12 gets 127.0.0.1 as
its local address). So a packet names its listener (address and port) but not which node dialled
it, and pysyncobj's rule (the node whose address string is greater dials) makes every node both
dialler and listener. The partitioner therefore tracks connections: it reads ``/proc/net/tcp``
(every socket whose peer is a node's raft or SSH endpoint) and maps each socket to its owner
through ``/proc/PID/fd`` of the node processes (anything else is the "client" side: the
simulated shims). An nftables table drops every packet to or from a guarded endpoint unless
its 4-tuple is in an allow-set for that direction; a thread refreshes the sets every
``RECONCILE_INTERVAL_S``. A new connection between two sides that are not cut loses its first
SYN (the allow entry is added within ``RECONCILE_INTERVAL_S``) and connects on the SYN's first
retransmission, about 1 s later; a connection between cut sides never gets an entry, so a
partition looks like a cut cable to TCP keepalives and SSH sessions from the first packet.
One-way cuts drop one direction only.

Only TCP over IPv4 on the nodes' configured addresses is guarded; HTTP status stays reachable so
the drill can watch the cluster while it is cut.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

CLIENT = "client"  # the location of every process that is not a node (the simulated shims)
ENV_IN_NETNS = "TETHERLAB_DRILL_NETNS"  # set by reexec_in_netns: the namespace inode it started from
NFT_TIMEOUT_S = 10.0
RECONCILE_INTERVAL_S = 0.02
PROC_TCP = "/proc/net/tcp"
TCP_LISTEN = 0x0A
TCP_TIME_WAIT = 0x06
_PR_SET_PDEATHSIG = 1

Endpoint = tuple[str, int]
Tuple4 = tuple[str, int, str, int]  # dialler ip, dialler port, listener ip, listener port
Drops = frozenset[tuple[str, str]]  # (from location, to location): packets that way are dropped


# --- what the machine allows ----------------------------------------------------------------------


def nft_unavailable_reason() -> str | None:
    """None when nftables rules can be used in this namespace, else why not."""
    if os.geteuid() != 0:
        return "kernel partitions need root (nftables); run as root or use --toxiproxy"
    if shutil.which("nft") is None:
        return "nft (nftables) is not installed"
    return None


def netns_unavailable_reason() -> str | None:
    """None when a private network namespace with nftables can be made here, else why not."""
    reason = nft_unavailable_reason()
    if reason:
        return reason
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux / iproute2)"
    try:
        r = subprocess.run(["unshare", "--net", "--", "nft", "list", "tables"], capture_output=True,
                           timeout=NFT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot create a network namespace: {e}"
    if r.returncode != 0:
        return f"cannot create a network namespace with nftables: {r.stderr.decode(errors='replace').strip()}"
    return None


def netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def in_private_netns() -> bool:
    """True in the child that :func:`reexec_in_netns` started: the marker names the namespace it was
    started from, and ours must be another."""
    parent = os.environ.get(ENV_IN_NETNS, "")
    return parent.isdigit() and int(parent) != netns_inode()


def setup_private_netns() -> None:
    """Bring up lo in the fresh namespace (it starts down): 127.0.0.0/8 then routes on it."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True, timeout=NFT_TIMEOUT_S)
    if not in_private_netns():  # a guard against changing the caller's namespace by mistake
        raise RuntimeError("expected a private network namespace made by reexec_in_netns")


def reexec_in_netns(module: str, argv: list[str], timeout_s: float) -> int:
    """Run ``python -m module argv...`` in a new network namespace; its stdout/stderr pass through.
    Returns its exit status; on timeout it is killed (its nodes die with it) and 124 is returned."""
    env = {**os.environ, ENV_IN_NETNS: str(netns_inode())}
    cmd = ["unshare", "--net", "--", sys.executable, "-m", module, *argv]
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return 124
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return 130


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the thread that started it exits, so no node can
    outlive the runner (and keep a private namespace alive)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# --- /proc ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcpEntry:
    local: Endpoint
    remote: Endpoint
    state: int
    inode: int


def _hex_endpoint(text: str) -> Endpoint:
    addr, port = text.split(":")
    return socket.inet_ntoa(struct.pack("<I", int(addr, 16))), int(port, 16)


def parse_proc_tcp(text: str) -> list[TcpEntry]:
    """Parse ``/proc/net/tcp`` (IPv4; addresses are little-endian hex on the machines we run on)."""
    out: list[TcpEntry] = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        try:
            out.append(TcpEntry(_hex_endpoint(f[1]), _hex_endpoint(f[2]), int(f[3], 16), int(f[9])))
        except ValueError:
            continue
    return out


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds open (empty if it is gone)."""
    out: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return out
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def find_listener_pids(endpoints: Mapping[str, Endpoint]) -> dict[str, int]:
    """Which process listens on each node's endpoint: for clusters this drill did not start.
    One pass over /proc (bounded by the number of processes)."""
    entries = parse_proc_tcp(Path(PROC_TCP).read_text())
    want = {e.inode: nid for nid, ep in endpoints.items() for e in entries
            if e.state == TCP_LISTEN and e.local == ep}
    found: dict[str, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or not want:
            continue
        hit = socket_inodes(int(d)) & set(want)
        for inode in hit:
            found[want.pop(inode)] = int(d)
    return found


def classify(entries: Iterable[TcpEntry], listeners: Mapping[Endpoint, str], owners: Mapping[int, str],
             drops: Drops, groups: Mapping[str, str] | None = None) -> tuple[set[Tuple4], set[Tuple4]]:
    """The connections allowed each way: (dialler to listener, listener to dialler) 4-tuples.

    ``listeners`` maps a guarded endpoint to its node; ``owners`` a socket inode to the node
    holding it; other sockets belong to the client side: the group named by their source address
    in ``groups``, else ``client``."""
    fwd: set[Tuple4] = set()
    rev: set[Tuple4] = set()
    for e in entries:
        dst = listeners.get(e.remote)
        if dst is None or e.state in (TCP_LISTEN, TCP_TIME_WAIT) or e.inode == 0:
            continue
        src = owners.get(e.inode) or (groups or {}).get(e.local[0], CLIENT)
        key = (e.local[0], e.local[1], e.remote[0], e.remote[1])
        if (src, dst) not in drops:
            fwd.add(key)
        if (dst, src) not in drops:
            rev.add(key)
    return fwd, rev


# --- the partitioner ------------------------------------------------------------------------------


def _elements(keys: Iterable[Tuple4]) -> str:
    return ", ".join(f"{a} . {p} . {b} . {q}" for a, p, b, q in sorted(keys))


class NftPartitioner:
    """Drops packets between locations (node ids and ``client``) by nftables, as described above.

    ``listeners``: node id -> its guarded endpoints (raft and SSH). ``pids``: called on every
    refresh for the node processes' current PIDs (restarts change them). ``client_groups``: source
    address -> location, for shims that connect from their own address (a drop naming ``client``
    applies to every group too)."""

    name = "nftables"
    supports_latency = False
    supports_groups = True

    def __init__(self, listeners: Mapping[str, Iterable[Endpoint]], pids: Callable[[], Mapping[str, int]],
                 log: Callable[[str], None] | None = None, client_groups: Mapping[str, str] | None = None) -> None:
        reason = nft_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self.table = f"tetherlab_drill_{os.getpid()}"
        remove_stale_tables(log)
        self._listeners = {ep: nid for nid, eps in listeners.items() for ep in eps}
        self._pids = pids
        self._groups = dict(client_groups or {})
        self._log = log or (lambda s: None)
        self._drops: Drops = frozenset()
        self._installed: tuple[set[Tuple4], set[Tuple4]] | None = None  # None: no table
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="nft-partitioner", daemon=True)
        self._thread.start()

    # -- public --

    def cut(self, drops: Drops) -> None:
        """Replace the set of dropped directions; an empty set heals everything."""
        expanded = set(drops)
        for a, b in drops:
            for g in set(self._groups.values()):
                if a == CLIENT:
                    expanded.add((g, b))
                if b == CLIENT:
                    expanded.add((a, g))
        with self._lock:
            self._drops = frozenset(expanded)
            self._reconcile()

    def heal(self) -> None:
        self.cut(frozenset())

    def set_latency(self, latency_ms: int, jitter_ms: int) -> None:
        raise RuntimeError("nftables cannot delay packets and tc netem is not available in this kernel: "
                           "latency drills run through toxiproxy proxies (--latency in a --netns drill, or "
                           "--toxiproxy URL)")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drops = frozenset()
            self._reconcile()
        self._wake.set()
        self._thread.join(5.0)

    # -- internals --

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(RECONCILE_INTERVAL_S)
            with self._lock:
                if self._closed:
                    return
                if self._drops:
                    try:
                        self._reconcile()
                    except Exception as e:  # keep refreshing: a missed round only delays an allow entry
                        self._log(f"nft refresh failed: {e}")

    def _owners(self) -> dict[int, str]:
        owners: dict[int, str] = {}
        for nid, pid in self._pids().items():
            for inode in socket_inodes(pid):
                owners[inode] = nid
        return owners

    def _reconcile(self) -> None:
        if not self._drops:
            if self._installed is not None:
                _nft(f"delete table inet {self.table}\n")  # raises if the rules could not be removed
                self._installed = None
            return
        # The TCP table first, then the owners: a socket listed must already be in its owner's fds.
        entries = parse_proc_tcp(Path(PROC_TCP).read_text())
        fwd, rev = classify(entries, self._listeners, self._owners(), self._drops, self._groups)
        if self._installed is None:
            self._create(fwd, rev)
            return
        old_fwd, old_rev = self._installed
        script = ""
        for name, old, new in (("fwd_ok", old_fwd, fwd), ("rev_ok", old_rev, rev)):
            if old - new:
                script += f"delete element inet {self.table} {name} {{ {_elements(old - new)} }}\n"
            if new - old:
                script += f"add element inet {self.table} {name} {{ {_elements(new - old)} }}\n"
        if script:
            if _nft(script, check=False) != 0:
                # Out of step (a race with a socket closing): rebuild the sets from scratch, atomically.
                script = (f"flush set inet {self.table} fwd_ok\nflush set inet {self.table} rev_ok\n"
                          + (f"add element inet {self.table} fwd_ok {{ {_elements(fwd)} }}\n" if fwd else "")
                          + (f"add element inet {self.table} rev_ok {{ {_elements(rev)} }}\n" if rev else ""))
                _nft(script)
            self._installed = (fwd, rev)

    def _create(self, fwd: set[Tuple4], rev: set[Tuple4]) -> None:
        guarded = ", ".join(f"{ip} . {port}" for ip, port in sorted(self._listeners))
        t4 = "ipv4_addr . inet_service . ipv4_addr . inet_service"

        def with_elements(keys: set[Tuple4]) -> str:
            return f" elements = {{ {_elements(keys)} }};" if keys else ""

        script = f"""
table inet {self.table} {{
  set guarded {{ type ipv4_addr . inet_service; elements = {{ {guarded} }}; }}
  set fwd_ok {{ type {t4};{with_elements(fwd)} }}
  set rev_ok {{ type {t4};{with_elements(rev)} }}
  chain out {{
    type filter hook output priority filter; policy accept;
    ip daddr . tcp dport @guarded ip saddr . tcp sport . ip daddr . tcp dport != @fwd_ok drop
    ip saddr . tcp sport @guarded ip daddr . tcp dport . ip saddr . tcp sport != @rev_ok drop
  }}
}}
"""
        _nft(script)
        self._installed = (fwd, rev)


def _nft(script: str, check: bool = True) -> int:
    r = subprocess.run(["nft", "-f", "-"], input=script.encode(), capture_output=True, timeout=NFT_TIMEOUT_S)
    if check and r.returncode != 0:
        raise RuntimeError(f"nft failed: {r.stderr.decode(errors='replace').strip()}\n{script}")
    return r.returncode


def remove_stale_tables(log: Callable[[str], None] | None = None) -> list[str]:
    """Delete the tables of drills that died without cleaning up (their PID is gone), so a killed
    drill cannot leave a cluster's ports blocked. Returns the tables removed."""
    try:
        r = subprocess.run(["nft", "list", "tables", "inet"], capture_output=True, text=True, timeout=NFT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return []
    removed = []
    for m in re.finditer(r"table inet (tetherlab_drill_(\d+))", r.stdout):
        if not Path(f"/proc/{m.group(2)}").exists():
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                _nft(f"delete table inet {m.group(1)}\n", check=False)
            removed.append(m.group(1))
    if removed and log is not None:
        log(f"removed the rules of drills that died: {', '.join(removed)}")
    return removed
