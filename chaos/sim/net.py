"""The simulated network between the Raft nodes, and pysyncobj's transport over it.

Raft traffic in production rides one TCP connection per pair of nodes, so this network models
connections, not datagrams:

- a connection is up or down; messages on it arrive in order (FIFO per direction), each after
  its own delay (never before an earlier one), so reordering happens only across connections
  and across reconnects, as with TCP;
- a partition blocks one direction or both; data in a blocked direction waits (TCP
  retransmits) and arrives after healing, unless the connection dies first: a connection with
  a direction blocked for ``connection_timeout_s`` breaks (the kernel's user timeout);
- a drop is a reset: the connection breaks, both ends are told, and what was in flight is lost;
- a node that crashes takes its connections with it; the peers notice at once (a killed
  process: the kernel sends a reset) or only after the timeout (a machine that vanished);
- a broken connection is redialled every ``connection_retry_s`` once both directions are open;
- a paused node (SIGSTOP) keeps its connections (the kernel still acknowledges) and reads what
  queued up when it resumes.

:class:`SimTransport` is a pysyncobj ``Transport``: it runs production's durability rule
(``raft.flush_before_send``, the function ``DurableTransport`` calls: nothing leaves a node before
its journal is flushed, except a leader's append-entries), stamps the lease times
(``LeaseStamps``), and hands messages to :class:`RaftNet`.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pysyncobj.node import TCPNode
from pysyncobj.transport import Transport

from tetherlab.chaos.sim.loop import Sim, SimError
from tetherlab.cluster.replica import pysyncobj_patches
from tetherlab.cluster.replica.raft import LeaseStamps, flush_before_send

HELD_MESSAGES_MAX = 10_000  # per direction: a blocked direction that queues more breaks instead
SENDS_PER_TICK_MAX = 5_000  # one tick sending more is a busy loop (it would spin on a real clock too)


def describe(msg: Any) -> str:
    """A Raft message in one short line (for traces)."""
    if not isinstance(msg, dict):
        return repr(msg)[:80]
    kind = msg.get("type")
    if kind == "append_entries":
        if "serialized" in msg:
            ser = msg["serialized"]
            part = "None" if ser is None else f"chunk first={ser[1]} last={ser[2]} {len(ser[0])}B"
            return f"append_entries term={msg['term']} commit={msg['commit_index']} serialized={part}"
        entries = msg.get("entries") or []
        span = f"{entries[0][1]}..{entries[-1][1]}" if entries else "-"
        return (f"append_entries term={msg['term']} commit={msg['commit_index']} prev={msg.get('prevLogIdx')}/"
                f"{msg.get('prevLogTerm')} entries={span}{' transmission' if 'transmission' in msg else ''}")
    if kind == "next_node_idx":
        return f"next_node_idx next={msg['next_node_idx']} success={msg['success']} reset={msg['reset']}"
    return " ".join(f"{k}={v}" for k, v in msg.items() if k not in ("command",))[:160]


class SimRaftNode(TCPNode):
    """pysyncobj's node with a hash that does not depend on PYTHONHASHSEED: pysyncobj iterates
    sets of nodes (sends, elections), and a seed must replay in any process."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._tl_hash = zlib.crc32(address.encode())

    def __hash__(self) -> int:
        return self._tl_hash


@dataclass
class LinkProfile:
    """Delays of one direction of a link, in seconds."""

    base_s: float = 0.0005
    jitter_s: float = 0.002
    spike_probability: float = 0.0
    spike_s: float = 0.2


@dataclass
class _Direction:
    last_at: float = 0.0  # when the latest message in this direction arrives (FIFO)
    blocked_since: float | None = None
    held: deque[Any] = field(default_factory=deque)


class _Conn:
    def __init__(self, a: str, b: str, epoch: int) -> None:
        self.a, self.b = a, b
        self.epoch = epoch
        self.dirs = {(a, b): _Direction(), (b, a): _Direction()}


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


class RaftNet:
    def __init__(self, sim: Sim, connection_timeout_s: float, connection_retry_s: float,
                 on_deliver: Callable[[str], None]) -> None:
        self.sim = sim
        self.rng = sim.rng("raft-net")
        self.timeout_s = connection_timeout_s
        self.retry_s = connection_retry_s
        self.on_deliver = on_deliver  # the receiving node should tick now
        self.transports: dict[str, SimTransport] = {}
        self.paused: dict[str, list[tuple[str, Any, int]]] = {}  # node -> deliveries waiting for resume
        self.sends_held_until: dict[str, float] = {}  # node -> when its sends leave (a stall: SimNode.stall)
        self.conns: dict[tuple[str, str], _Conn] = {}
        self.blocked: set[tuple[str, str]] = set()  # directed: src cannot reach dst
        self.profiles: dict[tuple[str, str], LinkProfile] = {}
        self.default_profile = LinkProfile()
        self._next_dial: dict[tuple[str, str], float] = {}
        # Connections of a machine that vanished, until the peer's timeout notices: no redial before.
        self._dead_conns: dict[tuple[str, str], int] = {}
        self._epoch = 0
        self.delivered = 0
        self.resets = 0
        self.trace_messages = False

    # --- nodes -----------------------------------------------------------------------------------

    def attach(self, addr: str, transport: SimTransport) -> None:
        self.transports[addr] = transport
        self.sim.after(0.0, self.maintain)

    def detach(self, addr: str, reset: bool) -> None:
        """The node's process is gone: its connections die (peers told at once if ``reset``)."""
        self.transports.pop(addr, None)
        self.paused.pop(addr, None)
        self.sends_held_until.pop(addr, None)
        for key in [k for k in self.conns if addr in k]:
            conn = self.conns.pop(key)
            other = conn.b if conn.a == addr else conn.a
            if reset:
                self.sim.after(self._delay(other, addr), self._tell_disconnected, other, addr, conn.epoch)
            else:
                self.sim.after(self.timeout_s, self._tell_disconnected, other, addr, conn.epoch)
                self._dead_conns[key] = conn.epoch

    def pause(self, addr: str) -> None:
        self.paused.setdefault(addr, [])

    def resume(self, addr: str) -> None:
        waiting = self.paused.pop(addr, [])
        for src, msg, epoch in waiting:
            self._deliver(src, addr, msg, epoch)

    # --- faults ----------------------------------------------------------------------------------

    def block(self, src: str, dst: str) -> None:
        if (src, dst) in self.blocked:
            return
        self.blocked.add((src, dst))
        conn = self.conns.get(_pair(src, dst))
        if conn is not None:
            d = conn.dirs[(src, dst)]
            d.blocked_since = self.sim.now
            self.sim.after(self.timeout_s, self._check_timeout, _pair(src, dst), conn.epoch)

    def unblock(self, src: str, dst: str) -> None:
        self.blocked.discard((src, dst))
        conn = self.conns.get(_pair(src, dst))
        if conn is None:
            return
        d = conn.dirs[(src, dst)]
        d.blocked_since = None
        while d.held:
            self._schedule(conn, src, dst, d.held.popleft())

    def heal_all(self) -> None:
        for src, dst in sorted(self.blocked):
            self.unblock(src, dst)

    def reset(self, a: str, b: str) -> None:
        """A connection reset (the network dropped it): in-flight messages are lost."""
        conn = self.conns.pop(_pair(a, b), None)
        if conn is None:
            return
        self.resets += 1
        self.sim.note("net", f"reset {a}<->{b}")
        self._tell_disconnected(a, b, conn.epoch)
        self._tell_disconnected(b, a, conn.epoch)

    def _check_timeout(self, key: tuple[str, str], epoch: int) -> None:
        conn = self.conns.get(key)
        if conn is None or conn.epoch != epoch:
            return
        for (src, dst), d in conn.dirs.items():
            if d.blocked_since is not None and self.sim.now - d.blocked_since >= self.timeout_s - 1e-9:
                self.sim.note("net", f"timeout {src}->{dst}")
                self.reset(src, dst)
                return

    # --- connections -----------------------------------------------------------------------------

    def connectable(self, a: str, b: str) -> bool:
        return a in self.transports and b in self.transports and (a, b) not in self.blocked \
            and (b, a) not in self.blocked and _pair(a, b) not in self._dead_conns

    def maintain(self) -> None:
        """Redial broken connections (bounded rate). As pysyncobj does, the node with the greater
        address dials, and only nodes it knows; the other end accepts a dialler it knows (or any,
        with patch ``accept_unknown_peers``), else it hangs up."""
        now = self.sim.now
        addrs = sorted(self.transports)
        for i, a in enumerate(addrs):
            for b in addrs[i + 1:]:
                key = (a, b)
                if key in self.conns or a not in self.transports[b].peer_addrs:
                    continue  # b (the greater address) dials a
                if not self.connectable(a, b) or now < self._next_dial.get(key, 0.0):
                    continue
                self._next_dial[key] = now + self.retry_s
                self.sim.after(self._delay(b, a) + self._delay(a, b), self._establish, b, a)

    def _establish(self, dialler: str, acceptor: str) -> None:
        if _pair(dialler, acceptor) in self.conns or not self.connectable(dialler, acceptor):
            return
        t_acc = self.transports[acceptor]
        if dialler not in t_acc.peer_addrs and not t_acc.accept_unknown:
            return  # the acceptor hangs up on an address it does not know
        self._epoch += 1
        conn = _Conn(dialler, acceptor, self._epoch)
        self.conns[_pair(dialler, acceptor)] = conn
        self.transports[dialler].peer_connected(acceptor)
        t_acc.peer_connected(dialler)

    def _tell_disconnected(self, who: str, peer: str, epoch: int) -> None:
        key = _pair(who, peer)
        if self._dead_conns.get(key) == epoch:
            del self._dead_conns[key]
        t = self.transports.get(who)
        current = self.conns.get(key)
        if t is None or (current is not None and current.epoch != epoch):
            return  # gone, or already on a newer connection
        t.peer_disconnected(peer)

    def is_up(self, a: str, b: str) -> bool:
        return _pair(a, b) in self.conns

    # --- messages --------------------------------------------------------------------------------

    def _delay(self, src: str, dst: str) -> float:
        p = self.profiles.get((src, dst), self.default_profile)
        d = p.base_s + self.rng.random() * p.jitter_s
        if p.spike_probability and self.rng.random() < p.spike_probability:
            d += self.rng.random() * p.spike_s
        return d

    def send(self, src: str, dst: str, msg: Any) -> bool:
        conn = self.conns.get(_pair(src, dst))
        if conn is None:
            return False
        d = conn.dirs[(src, dst)]
        if (src, dst) in self.blocked:
            if len(d.held) >= HELD_MESSAGES_MAX:
                self.reset(src, dst)
                return False
            d.held.append(msg)
            return True
        self._schedule(conn, src, dst, msg)
        return True

    def hold_sends(self, addr: str, until: float) -> None:
        """What ``addr`` sends before ``until`` leaves then (it is still busy in its tick)."""
        self.sends_held_until[addr] = until

    def _schedule(self, conn: _Conn, src: str, dst: str, msg: Any) -> None:
        d = conn.dirs[(src, dst)]
        at = max(self.sim.now, self.sends_held_until.get(src, 0.0)) + self._delay(src, dst)
        at = max(at, d.last_at)
        d.last_at = at
        self.sim.at(at, self._arrive, src, dst, msg, conn.epoch)

    def _arrive(self, src: str, dst: str, msg: Any, epoch: int) -> None:
        conn = self.conns.get(_pair(src, dst))
        if conn is None or conn.epoch != epoch:
            return  # the connection died with this message in flight
        if dst in self.paused:
            self.paused[dst].append((src, msg, epoch))
            return
        self._deliver(src, dst, msg, epoch)

    def _deliver(self, src: str, dst: str, msg: Any, epoch: int) -> None:
        conn = self.conns.get(_pair(src, dst))
        t = self.transports.get(dst)
        if conn is None or conn.epoch != epoch or t is None:
            return
        self.delivered += 1
        self.sim.current = t.node_id
        if self.trace_messages:
            self.sim.note(t.node_id, f"<- {src} {describe(msg)}")
        t.receive(src, msg)
        self.on_deliver(dst)


class SimTransport(LeaseStamps, Transport):
    """pysyncobj's transport over :class:`RaftNet` (built by SyncObj with these arguments)."""

    net: RaftNet  # set on the class by the simulator before a node starts (one per node)

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        super().__init__(syncObj, selfNode, otherNodes)
        self._syncObj = syncObj
        self.addr = selfNode.address
        self.node_id = syncObj._tl_cfg.id
        self.nodes: dict[str, Any] = {n.address: n for n in otherNodes}
        self.peer_addrs = set(self.nodes)
        self._connected: set[str] = set()
        self.sent_in_tick = 0
        self.node_class = type(selfNode)
        self.accept_unknown = "accept_unknown_peers" in pysyncobj_patches.installed()
        self.net.attach(self.addr, self)

    # --- pysyncobj's Transport -----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return True

    def tryGetReady(self) -> None:
        pass

    def waitReady(self) -> None:
        pass

    def addNode(self, node: Any) -> None:
        self.nodes[node.address] = node
        self.peer_addrs.add(node.address)
        if self.net.is_up(self.addr, node.address):
            self.peer_connected(node.address)
        else:
            self.net.sim.after(0.0, self.net.maintain)

    def dropNode(self, node: Any) -> None:
        self.nodes.pop(node.address, None)
        self.peer_addrs.discard(node.address)
        if node.address in self._connected:
            self.net.reset(self.addr, node.address)  # TCPTransport disconnects a dropped node
        self._connected.discard(node.address)

    def send(self, node: Any, message: Any) -> bool:
        so = self._syncObj
        if node.address not in self._connected:
            return False
        self.sent_in_tick += 1
        if self.sent_in_tick > SENDS_PER_TICK_MAX:
            raise SimError(f"{self.addr} sent more than {SENDS_PER_TICK_MAX} messages in one tick (a busy loop); "
                           f"the last: {str(message)[:200]}")
        flush_before_send(so, message)  # DurableTransport's rule, the same function
        self._tl_stamp(message)
        return self.net.send(self.addr, node.address, message)

    def destroy(self) -> None:
        pass

    # --- from the network ------------------------------------------------------------------------

    def peer_connected(self, addr: str) -> None:
        if addr in self._connected:
            return
        if addr not in self.nodes:
            self.nodes[addr] = self.node_class(addr)  # an accepted stranger: connected, not a member
        self._connected.add(addr)
        self._onNodeConnected(self.nodes[addr])

    def peer_disconnected(self, addr: str) -> None:
        if addr not in self._connected:
            return
        self._connected.discard(addr)
        node = self.nodes.get(addr)
        if node is not None:
            self._onNodeDisconnected(node)

    def peer_is_connected(self, addr: str) -> bool:
        return addr in self._connected

    def receive(self, src: str, message: Any) -> None:
        node = self.nodes.get(src)
        if node is None:
            # A node this one does not know (yet): pysyncobj drops such connections too.
            return
        self._tl_receive(node, message, self._onMessageReceived)
