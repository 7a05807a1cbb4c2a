"""The node's local control socket: ``DATA_DIR/control.sock`` (mode 0600, this host's operator).

One JSON request per line, answered with ``{"id", "ok", "result" | "error": {"code", "message"}}``;
requests on one connection run concurrently (pipelining), bounded. Each request is parsed into a
typed command validated by ``core``'s validators before anything runs; a bad one is answered
with an error naming the field, and nothing changes.

Operations: ``put``, ``delete``, ``cas``, ``txn`` (writes through Raft); ``get``, ``scan``
(linearizable unless ``"linearizable": false``); ``status``; ``dump`` (this replica's whole
state); ``backup`` (a consistent snapshot to an absolute path, after a read barrier); ``compact``
(snapshot and compact the log now); ``engine_file`` (propose the engine command in a local JSON
file: for commands too large for the shim protocol's frame, such as a registry of thousands of
concepts). More operations can be registered by the node (:meth:`ControlServer.register`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.core.engine.commands import decode_command as decode_engine_command
from tetherlab.cluster.core.errors import CommandError
from tetherlab.cluster.node.errors import Indeterminate, Unavailable
from tetherlab.cluster.node.replica import Replica, encode_command
from tetherlab.cluster.node.sockets import usable_path

CONTROL_LINE_MAX_BYTES = 256 * 1024
CONTROL_CONNECTIONS_MAX = 256
CONTROL_IN_FLIGHT_MAX = 1024  # per connection: pipelined requests beyond this wait
SCAN_LIMIT_MAX = 1000
ENGINE_FILE_MAX_BYTES = 64 * 1024 * 1024
ENGINE_FILE_TIMEOUT_S = 60.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Get:
    ns: str
    key: str
    linearizable: bool


@dataclass(frozen=True)
class Scan:
    ns: str
    after: str
    limit: int
    linearizable: bool


def _bool(req: dict[str, Any], field: str, default: bool) -> bool:
    v = req.get(field, default)
    if not isinstance(v, bool):
        raise CommandError("bad_field", f"field {field!r} must be true or false")
    return v


def parse_get(req: dict[str, Any]) -> Get:
    return Get(sm.check_name(req.get("ns"), "ns", sm.NS_MAX_CHARS), sm.check_name(req.get("key"), "key",
               sm.KEY_MAX_CHARS), _bool(req, "linearizable", True))


def parse_scan(req: dict[str, Any]) -> Scan:
    limit = req.get("limit", 100)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= SCAN_LIMIT_MAX:
        raise CommandError("bad_field", f"field 'limit' must be an integer in 1..{SCAN_LIMIT_MAX}")
    after = req.get("after", "")
    if not isinstance(after, str) or len(after) > sm.KEY_MAX_CHARS:
        raise CommandError("bad_field", f"field 'after' must be a key of at most {sm.KEY_MAX_CHARS} characters")
    return Scan(sm.check_name(req.get("ns"), "ns", sm.NS_MAX_CHARS), after, limit, _bool(req, "linearizable", True))


def parse_path(req: dict[str, Any]) -> Path:
    path = req.get("path")
    if not isinstance(path, str) or not Path(path).is_absolute():
        raise CommandError("bad_field", "field 'path' must be an absolute file path")
    return Path(path)


class ControlServer:
    def __init__(self, path: Path, replica: Replica, status: Callable[[], dict[str, Any]],
                 backup: Callable[[Path], Awaitable[dict[str, Any]]], compact: Callable[[], None],
                 now_ms: Callable[[], int]) -> None:
        self.path = path
        self.replica = replica
        self.status = status
        self.backup = backup
        self.compact = compact
        self.now_ms = now_ms
        self._server: asyncio.AbstractServer | None = None
        self._conns = 0
        self._ops: dict[str, Handler] = {
            "put": self._write, "delete": self._write, "cas": self._write, "txn": self._write,
            "get": self._get, "scan": self._scan, "status": self._status, "dump": self._dump,
            "backup": self._backup, "compact": self._compact, "engine_file": self._engine_file,
        }

    def register(self, op: str, handler: Handler) -> None:
        """Add an operation (a node feature's, or a benchmark's); an existing one is refused."""
        if op in self._ops:
            raise ValueError(f"control operation {op!r} exists already")
        self._ops[op] = handler

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            with usable_path(self.path) as path:  # a deep data_dir is longer than a socket path may be
                self._server = await asyncio.start_unix_server(self._conn, path=path, limit=CONTROL_LINE_MAX_BYTES)
        finally:
            os.umask(old_umask)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._conns >= CONTROL_CONNECTIONS_MAX:
            writer.close()
            return
        self._conns += 1
        sem = asyncio.Semaphore(CONTROL_IN_FLIGHT_MAX)
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
                task = asyncio.get_running_loop().create_task(self._request(line, writer, sem))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except ConnectionError:
            pass
        finally:
            for t in list(tasks):
                with contextlib.suppress(Exception):
                    await t
            self._conns -= 1
            writer.close()

    async def _request(self, line: bytes, writer: asyncio.StreamWriter, sem: asyncio.Semaphore) -> None:
        try:
            writer.write(_line(await self.handle(line)))
        except ConnectionError:
            pass
        finally:
            sem.release()

    async def handle(self, line: bytes) -> dict[str, Any]:
        rid: Any = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise CommandError("bad_request", "a request must be a JSON object")
            rid = req.get("id")
            op = req.get("op")
            handler = self._ops.get(op) if isinstance(op, str) else None
            if handler is None:
                raise CommandError("unknown_op", f"unknown op {op!r}; expected one of {sorted(self._ops)}")
            res = await handler(req)
            if "error" in res:
                return {"id": rid, "ok": False, "error": res["error"]}
            return {"id": rid, "ok": True, "result": res}
        except CommandError as e:
            return {"id": rid, "ok": False, "error": {"code": e.code, "message": e.message}}
        except json.JSONDecodeError as e:
            return {"id": rid, "ok": False, "error": {"code": "bad_json", "message": f"request is not JSON: {e}"}}
        except Unavailable as e:
            return {"id": rid, "ok": False, "error": {"code": "unavailable", "message": e.reason}}
        except (Indeterminate, TimeoutError) as e:
            reason = e.reason if isinstance(e, Indeterminate) else "timeout"
            return {"id": rid, "ok": False, "error": {"code": "indeterminate", "message": reason}}

    # --- operations -------------------------------------------------------------------------------

    async def _write(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = sm.decode_command({k: v for k, v in req.items() if k != "id"})
        return await self.replica.propose(encode_command(cmd))

    async def _get(self, req: dict[str, Any]) -> dict[str, Any]:
        g = parse_get(req)
        if g.linearizable:
            await self.replica.read_barrier()
        rec = self.replica.store.get(g.ns, g.key)
        return {"record": rec.to_json() if rec else None}

    async def _scan(self, req: dict[str, Any]) -> dict[str, Any]:
        s = parse_scan(req)
        if s.linearizable:
            await self.replica.read_barrier()
        return {"items": [[k, r.to_json()] for k, r in self.replica.store.scan(s.ns, s.after, s.limit)]}

    async def _status(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    async def _dump(self, req: dict[str, Any]) -> dict[str, Any]:
        # Off the loop: the dump waits for a batch being committed (its results may be out).
        out: dict[str, Any] = await asyncio.get_running_loop().run_in_executor(None, self.replica.store.dump)
        return out

    async def _backup(self, req: dict[str, Any]) -> dict[str, Any]:
        path = parse_path(req)
        await self.replica.read_barrier()  # the backup holds every write acknowledged before it
        return await self.backup(path)

    async def _compact(self, req: dict[str, Any]) -> dict[str, Any]:
        self.compact()
        return {}

    async def _engine_file(self, req: dict[str, Any]) -> dict[str, Any]:
        path = parse_path(req)
        try:
            if path.stat().st_size > ENGINE_FILE_MAX_BYTES:
                raise CommandError("too_large", f"{path} is larger than {ENGINE_FILE_MAX_BYTES} bytes")
            obj = json.loads(path.read_text())
        except OSError as e:
            raise CommandError("bad_field", f"cannot read {path}: {e.strerror}") from None
        except ValueError as e:
            raise CommandError("bad_json", f"{path} is not JSON: {e}") from None
        cmd = decode_engine_command(obj)
        return await self.replica.propose_engine(cmd, self.now_ms(), ENGINE_FILE_TIMEOUT_S)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
