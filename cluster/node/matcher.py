"""Where a proposer matches plans: on the event loop, or in a worker process beside the node.

Matching a plan's text against the registry (``match_intent``) was the largest share of a busy
leader's time (a third of it at saturation: docs/performance.md), and it ran on the event loop,
under the one GIL the Raft thread needs as well. :class:`ProcessMatcher` moves it into a child
process: the loop sends the plan and awaits the claims, and the node's own interpreter is left
with SSH, the protocol, proposing and applying.

Nothing about correctness rests on the worker. The claims travel in the log entry tagged with
the registry and code index versions they were computed against, and every replica re-matches
when those are not current as it applies (``Engine._claims_for``). The worker rebuilds the
registry from the same concept list and the code index from its canonical bytes, so a plan gets
the same claims either way (tests/unit/test_matcher.py compares the two on the matching
benchmark's plans). When the worker is missing, starting, slow, dead or busy, or has not yet
built the registry version the plan is matched against (it says when it has), the plan is
matched on the loop as before: a request never waits on the worker for more than ``timeout_s``.

``[node] match_worker``: ``"auto"`` (the default) starts the worker once matching has taken more
than ``AUTO_START_BUSY_S`` of the loop's time within a second, on a machine with at least
``AUTO_MIN_CPUS`` CPUs, so small and idle clusters run no extra process; ``"on"`` starts it with
the node; ``"off"`` never does. The worker pays when the machine has CPU the node's own
interpreter cannot use: a busy leader is bound by its one GIL (SSH, the protocol, matching and
the Raft thread's applies) long before the machine's cores are. On the 2-core benchmark machine
(three nodes and the load generators on two cores) it raised saturation from 1,402 to 1,507
verdicts/s (means of three interleaved runs) once the simulated shims had stopped writing one SSH
packet per request; before that, with the cores busy, it had lowered it (1,021 to 857). It is
started early (2% of the loop busy matching) so its start-up, a second of CPU with a large
registry, does not land on a node already at its limit, and ``"auto"`` sends it plans only while
``OFFLOAD_MIN_QUEUED`` proposals wait at the node (below that the loop answers sooner); on one
core it only adds IPC.

The child speaks length-prefixed pickles over a socketpair (it is this node's own child:
nothing else can write to the socket) and exits when the node closes it or dies. Both sides
write in bursts: the plans asked for in one step of the loop go out in one write, and the
worker's replies every couple of milliseconds. One write and one wake-up per plan cost the node
nearly as much of its loop as matching the plan there (140 to 200 against 62 to 97 µs of the loop's CPU per
plan offloaded, 6,000 plans 200 at a time, interleaved runs of each); one timer watches the
requests' deadlines (``deadlines.Expiry``) instead of a timer per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from tetherlab.cluster.core.config import MATCH_WORKER_MODES
from tetherlab.cluster.core.engine import IntentBody, MatchBasis, SubmitIntent, needs_match, prematched, with_match
from tetherlab.cluster.core.engine.codeindex import CodeIndex
from tetherlab.cluster.core.engine.registry import Registry, concept_from_json
from tetherlab.cluster.core.errors import CommandError
from tetherlab.cluster.node.deadlines import Expired, Expiry
from tetherlab.cluster.protocol import jsoncodec

log = logging.getLogger("tetherlab.matcher")

AUTO_START_BUSY_S = 0.02  # matching time on the loop within one second that starts the worker ("auto")
AUTO_MIN_CPUS = 2  # "auto" starts no worker on a single-core machine (see above)
REQUEST_TIMEOUT_S = 2.0  # longer than this and the plan is matched on the loop (and the worker restarted)
IN_FLIGHT_MAX = 1024  # plans at the worker at once; more are matched on the loop
# Below this many proposals waiting for their commit the node is not queueing: the loop matches
# (no round trip to the worker, so the lowest latency); above it the worker does (throughput).
OFFLOAD_MIN_QUEUED = 32
RESTART_BACKOFF_S = 5.0  # between starts of a worker that died or hung
READY_TIMEOUT_S = 30.0  # a worker that has not said it is ready by then is stopped
STOP_WAIT_S = 2.0  # for the child to exit after its socket closes, before SIGKILL
FRAME_MAX_BYTES = 64 * 1024 * 1024  # a basis with a 10,000-concept registry and a large code index fits
# A reply waits at most this long for others to go out with it (about eight plans' matching).
REPLY_EVERY_S = 0.002
RECV_BYTES = 256 * 1024  # read at most this much at once (a burst of plans; a basis takes several reads)
_LEN = struct.Struct(">I")


class Matcher(Protocol):
    async def prematch(self, cmd: SubmitIntent, basis: MatchBasis) -> SubmitIntent:
        """``cmd`` with the proposer's claims (``prematched``'s contract)."""
        ...

    async def close(self) -> None: ...


class InlineMatcher:
    """Matches on the calling thread (the event loop): the twin, and the worker's fallback."""

    async def prematch(self, cmd: SubmitIntent, basis: MatchBasis) -> SubmitIntent:
        return prematched(cmd, basis)

    async def close(self) -> None:
        return None


# --- the wire between node and worker ------------------------------------------------------------


def basis_key(basis: MatchBasis) -> tuple[int, int]:
    """What identifies a basis: replicated state has one registry and one index per version."""
    return basis.registry_version, basis.index_version


def encode_basis(basis: MatchBasis) -> tuple[Any, ...]:
    reg, code = basis.registry, basis.code
    concepts = jsoncodec.dumps([c.to_json() for c in reg.concepts.values()]) if reg is not None else None
    return ("basis", basis_key(basis), reg.version if reg is not None else 0, concepts, basis.index_version,
            code.canonical() if code is not None else None)


def decode_basis(msg: tuple[Any, ...]) -> MatchBasis:
    _, _key, version, concepts, index_version, code = msg
    reg = Registry([concept_from_json(o) for o in json.loads(concepts)], version) if concepts is not None else None
    return MatchBasis(reg, CodeIndex.from_bytes(code) if code is not None else None, index_version)


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


def answer(bases: dict[tuple[int, int], MatchBasis], msg: tuple[Any, ...]) -> tuple[Any, ...]:
    """The worker's reply to one message: a basis is acknowledged once it is built."""
    if msg[0] == "basis":
        bases.clear()  # only the newest is asked for; an older one would only hold memory
        bases[msg[1]] = decode_basis(msg)
        return ("basis_ready", msg[1])
    _, rid, key, body = msg
    basis = bases.get(key)
    if basis is None:
        return (rid, "no_basis", None)
    try:
        return (rid, "ok", basis.match(body))
    except CommandError:
        return (rid, "refused", None)
    except Exception as e:  # a bug in matching: the node matches this plan itself and says so
        return (rid, "error", f"{type(e).__name__}: {e}")


def _frames(buf: bytearray) -> list[Any]:
    """The whole frames at the front of ``buf``, removed from it (a partial one stays)."""
    out: list[Any] = []
    at = 0
    while len(buf) - at >= _LEN.size:
        (n,) = _LEN.unpack_from(buf, at)
        if n > FRAME_MAX_BYTES:
            raise ValueError(f"frame of {n} bytes is over {FRAME_MAX_BYTES}")
        end = at + _LEN.size + n
        if len(buf) < end:
            break
        out.append(pickle.loads(memoryview(buf)[at + _LEN.size:end]))
        at = end
    del buf[:at]
    return out


def worker_main(fd: int) -> int:
    """The child: answer match requests until the node closes the socket. Replies go out
    together, every ``REPLY_EVERY_S`` of matching and when the requests that have arrived are
    all answered: a burst of plans costs the node a few wake-ups, not one per plan, and no reply
    waits behind a whole burst (the node sends bursts: see ``ProcessMatcher._send``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on `tetherlab up` is the node's to handle
    sock = socket.socket(fileno=fd)
    sock.sendall(_frame(("ready", os.getpid())))
    bases: dict[tuple[int, int], MatchBasis] = {}
    buf = bytearray()
    while True:
        try:
            chunk = sock.recv(RECV_BYTES)
            if not chunk:
                return 0
            buf += chunk
            msgs = _frames(buf)
        except (OSError, ValueError, pickle.UnpicklingError):
            return 1
        replies: list[bytes] = []
        since = time.monotonic()
        try:
            for msg in msgs:
                replies.append(_frame(answer(bases, msg)))
                if time.monotonic() - since >= REPLY_EVERY_S:
                    sock.sendall(b"".join(replies))
                    replies.clear()
                    since = time.monotonic()
            if replies:
                sock.sendall(b"".join(replies))
        except OSError:
            return 0


# --- the node's side -------------------------------------------------------------------------------


class _Worker:
    """One running child and the requests it has not answered."""

    def __init__(self, proc: subprocess.Popen[bytes], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proc = proc
        self.reader = reader
        self.writer = writer
        self.ready = asyncio.get_running_loop().create_future()
        self.pending: dict[int, asyncio.Future[tuple[str, Any]]] = {}
        self.outbox: list[bytes] = []  # frames written together once the loop's current step ends
        self.sent_key: tuple[int, int] | None = None  # the basis sent last
        self.held_key: tuple[int, int] | None = None  # the basis the worker said it has built
        self.task: asyncio.Task[None] | None = None


class ProcessMatcher:
    """Matches in a child process when ``mode`` says so; on the loop otherwise (see the module)."""

    def __init__(self, mode: str = "auto", *, timeout_s: float = REQUEST_TIMEOUT_S,
                 auto_start_busy_s: float = AUTO_START_BUSY_S, cpus: int | None = None,
                 python: str = sys.executable, queued: Callable[[], int] | None = None,
                 offload_min_queued: int = OFFLOAD_MIN_QUEUED,
                 on_match: Any = None, on_up: Any = None) -> None:
        if mode not in MATCH_WORKER_MODES:
            raise ValueError(f"match_worker must be one of {', '.join(MATCH_WORKER_MODES)}, got {mode!r}")
        self.mode = mode
        self.timeout_s = timeout_s
        self.auto_start_busy_s = auto_start_busy_s
        self.cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
        self.python = python
        self.queued = queued  # proposals waiting for their commit ("auto"; None: always offload)
        self.offload_min_queued = offload_min_queued
        self.on_match = on_match  # called with "worker" or "loop" for each plan matched (metrics)
        self.on_up = on_up  # called with True when a worker is ready, False when it is gone (metrics)
        self._worker: _Worker | None = None
        self._starting = False  # a child was spawned and is not attached yet: start no other
        self._next_start = 0.0
        self._rid = 0
        self._busy_window = (0.0, 0.0)  # (window start, seconds spent matching on the loop in it)
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()  # kept until done (the loop holds tasks weakly)
        self._expiry: Expiry | None = None  # made on the loop, at the first request
        self.starts = 0

    # -- public ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker now when the mode is "on" (otherwise it starts when needed)."""
        if self.mode == "on":
            self._start()

    def holds(self, basis: MatchBasis) -> bool:
        """Whether a running worker has built ``basis`` (plans matched against it go there)."""
        w = self._worker
        return w is not None and w.held_key == basis_key(basis)

    @property
    def worker_pid(self) -> int | None:
        w = self._worker
        return w.proc.pid if w is not None and w.ready.done() and not w.ready.exception() else None

    async def prematch(self, cmd: SubmitIntent, basis: MatchBasis) -> SubmitIntent:
        if not needs_match(cmd):
            return cmd
        assert cmd.intent is not None
        if self._worker is None and self.mode == "on":
            self._start()
        w = self._worker
        if w is not None and w.ready.done() and not w.ready.exception() and len(w.pending) < IN_FLIGHT_MAX \
                and self._holds(w, basis) and self._queueing():
            got = await self._ask(w, cmd.intent, basis)
            if got is not None:
                status, claims = got
                self._count("worker")
                return with_match(cmd, claims) if status == "ok" else cmd
        return self._inline(cmd, basis)

    async def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            w, self._worker = self._worker, None
            self._lost(w, "the node is stopping")
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- matching ----------------------------------------------------------------------------------

    def _inline(self, cmd: SubmitIntent, basis: MatchBasis) -> SubmitIntent:
        t0 = time.monotonic()
        out = prematched(cmd, basis)
        now = time.monotonic()
        self._count("loop")
        start, busy = self._busy_window
        if now - start > 1.0:
            start, busy = now, 0.0
        busy += now - t0
        self._busy_window = (start, busy)
        if (self.mode == "auto" and self._worker is None and busy > self.auto_start_busy_s
                and self.cpus >= AUTO_MIN_CPUS):
            self._start()
        return out

    def _queueing(self) -> bool:
        """Whether a plan goes to the worker: always when the mode is "on" (the operator gave it a
        core); with "auto" only while requests queue at this node, so the round trip costs less
        than the loop's time it frees (a node that keeps up answers sooner matching on the loop)."""
        return self.mode == "on" or self.queued is None or self.queued() >= self.offload_min_queued

    def _holds(self, w: _Worker, basis: MatchBasis) -> bool:
        """Whether the worker has built ``basis``; if not, it is sent (once) and the loop matches
        until the worker says it is built (a 10,000-concept registry takes it a second or two,
        which must not count against a plan's timeout)."""
        key = basis_key(basis)
        if w.held_key == key:
            return True
        if w.sent_key != key:
            w.sent_key = key
            self._spawn(self._send_basis(w, basis))
        return False

    async def _send_basis(self, w: _Worker, basis: MatchBasis) -> None:
        # Encoding a 10,000-concept registry takes ~0.1 s: on a thread, so the loop serves
        # requests meanwhile (it still shares the GIL, but in slices, not one stall).
        try:
            data = await asyncio.get_running_loop().run_in_executor(None, lambda: _frame(encode_basis(basis)))
            if w.sent_key == basis_key(basis):  # not overtaken by a newer basis meanwhile
                w.writer.write(data)
        except (OSError, RuntimeError, pickle.PicklingError) as e:
            self._lost(w, f"cannot send it the registry: {e}")

    async def _ask(self, w: _Worker, body: IntentBody, basis: MatchBasis) -> tuple[str, Any] | None:
        """The worker's (status, claims) for ``body``; None to match on the loop instead."""
        loop = asyncio.get_running_loop()
        try:
            self._rid += 1
            rid = self._rid
            fut: asyncio.Future[tuple[str, Any]] = loop.create_future()
            frame = _frame(("match", rid, basis_key(basis), body))
        except (pickle.PicklingError, TypeError) as e:
            log.error("cannot send a plan to the match worker (matched here instead): %s", e)
            return None
        w.pending[rid] = fut
        self._send(w, frame)
        if self._expiry is None:
            self._expiry = Expiry(loop)
        self._expiry.add(fut, self.timeout_s)
        try:
            status, claims = await fut
        except Expired:
            if self._worker is w:  # the first of its requests to expire: it hangs
                self._lost(w, f"no answer within {self.timeout_s} s")
            return None
        except ConnectionError:
            return None  # the worker went away; _lost said why
        finally:
            w.pending.pop(rid, None)
        if status in ("ok", "refused"):
            return status, claims
        if status == "error":
            log.error("match worker failed on a plan (matched here instead): %s", claims)
        return None  # "no_basis" (a newer basis crossed this request): match here

    def _send(self, w: _Worker, frame: bytes) -> None:
        """Queue ``frame``: the plans asked for within one step of the loop (a burst of SSH
        packets) go out in one write, after it, instead of one system call each."""
        w.outbox.append(frame)
        if len(w.outbox) == 1:
            asyncio.get_running_loop().call_soon(self._flush, w)

    def _flush(self, w: _Worker) -> None:
        data = b"".join(w.outbox)
        w.outbox.clear()
        if self._worker is not w:
            return  # lost meanwhile: its requests have already gone to the loop
        try:
            w.writer.write(data)
        except (OSError, RuntimeError) as e:
            self._lost(w, f"cannot write to it: {e}")

    def _count(self, where: str) -> None:
        if self.on_match is not None:
            self.on_match(where)

    # -- the child's life --------------------------------------------------------------------------

    def _start(self) -> None:
        now = time.monotonic()
        if self._closed or self._starting or self._worker is not None or now < self._next_start:
            return
        self._next_start = now + RESTART_BACKOFF_S
        parent, child = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [self.python, "-m", "tetherlab.cluster.node.matcher", "--fd", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as e:
            log.error("cannot start the match worker (matching stays on the event loop): %s", e)
            parent.close()
            return
        finally:
            child.close()
        self.starts += 1
        self._starting = True
        self._spawn(self._attach(proc, parent))

    async def _attach(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=FRAME_MAX_BYTES + _LEN.size)
        finally:
            self._starting = False
        w = _Worker(proc, reader, writer)
        self._worker = w
        if self._closed:  # closed while it was starting
            self._lost(w, "the node is stopping")
            return
        w.task = asyncio.get_running_loop().create_task(self._read(w))
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await asyncio.shield(w.ready)
            log.info("match worker %d ready: plans are matched there", proc.pid)
            if self.on_up is not None:
                self.on_up(True)
        except TimeoutError:
            self._lost(w, f"not ready within {READY_TIMEOUT_S} s")
        except ConnectionError:
            pass

    async def _read(self, w: _Worker) -> None:
        buf = bytearray()
        try:
            while True:
                chunk = await w.reader.read(RECV_BYTES)
                if not chunk:
                    raise ConnectionResetError("closed by the worker")
                buf += chunk
                for msg in _frames(buf):
                    if msg[0] == "ready":
                        if not w.ready.done():
                            w.ready.set_result(None)
                        continue
                    if msg[0] == "basis_ready":
                        w.held_key = msg[1]
                        continue
                    rid, status, claims = msg
                    fut = w.pending.get(rid)
                    if fut is not None and not fut.done():
                        fut.set_result((status, claims))
        except asyncio.CancelledError:
            raise
        except (OSError, ValueError, pickle.UnpicklingError) as e:
            self._lost(w, f"its socket ended: {type(e).__name__}")

    def _lost(self, w: _Worker, why: str) -> None:
        """Stop using ``w``: its requests are matched on the loop; a new worker may start later."""
        if w.ready.done() and not w.ready.exception() and self.on_up is not None:
            self.on_up(False)
        if self._worker is w:
            self._worker = None
            if not self._closed:
                log.warning("match worker %d stopped (%s): matching on the event loop until it is restarted",
                            w.proc.pid, why)
        err = ConnectionError(why)
        if not w.ready.done():
            w.ready.set_exception(err)
            w.ready.exception()  # retrieved: nobody else may be waiting
        for fut in w.pending.values():
            if not fut.done():
                fut.set_exception(err)
        w.pending.clear()
        w.outbox.clear()
        self._spawn(self._stop(w))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop(self, w: _Worker) -> None:
        if w.task is not None and w.task is not asyncio.current_task():
            w.task.cancel()
        with contextlib.suppress(OSError, RuntimeError):
            w.writer.close()
        loop = asyncio.get_running_loop()
        # The child exits when its socket closes; one that does not is killed (only our own child).
        try:
            async with asyncio.timeout(STOP_WAIT_S):
                await loop.run_in_executor(None, w.proc.wait)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            await loop.run_in_executor(None, w.proc.wait)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tetherlab.cluster.node.matcher",
                                 description="A node's plan-matching worker (started by the node itself).")
    ap.add_argument("--fd", type=int, required=True, help="the socket the node hands over")
    return worker_main(ap.parse_args(argv).fd)


if __name__ == "__main__":
    sys.exit(main())
