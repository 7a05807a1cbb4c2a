"""An in-memory twin of the replicated adapter, for tests and benchmarks: it numbers commands
like Raft indexes, stamps a fake leader clock, and keeps the written records in a dict, the way
the LMDB adapter keeps them in one transaction with the index."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tetherlab.cluster.core.engine.commands import SubmitIntent, decode_command
from tetherlab.cluster.core.engine.engine import Engine, Limits, prematched
from tetherlab.cluster.core.errors import CommandError

REMOTE = "git@github.com:acme/shop.git"


class Driver:
    """``prematch``: intents carry a proposer's match made against the registry as it was one
    command earlier (so a match made before a registry push arrives after it, as when a push
    commits between a leader's match and its entry). ``mirror``: every command also goes to a
    prematching twin, and the two must answer alike (``records`` compares their states)."""

    def __init__(self, limits: Limits | None = None, now_ms: int = 1_000_000, *, prematch: bool = False,
                 mirror: bool = False) -> None:
        self.engine = Engine(limits)
        self.prematch = prematch
        self._basis = self.engine.match_basis()
        self.twin = Driver(limits, now_ms, prematch=True) if mirror else None
        self.limits = limits
        self.index = 0
        self.now_ms = now_ms
        self.store: dict[tuple[str, str], bytes] = {}
        self.results: list[dict[str, Any]] = []
        self.last_writes: list[tuple[str, str, bytes | None]] = []

    def send(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Decode and apply one command as the adapter would; a decode error is returned like
        an apply error (the adapter refuses it before proposing)."""
        if self.twin is not None:
            self.twin.now_ms = self.now_ms
            mirrored = self.twin.send(obj)
        try:
            cmd = decode_command(obj)
        except CommandError as e:
            self.last_writes = []
            return e.to_json()
        if self.prematch and isinstance(cmd, SubmitIntent):
            # Through JSON, as the entry reaches every replica.
            cmd = decode_command(prematched(cmd, self._basis).to_json())
        self._basis = self.engine.match_basis()
        self.index += 1
        applied = self.engine.apply(cmd, index=self.index, now_ms=self.now_ms)
        self.last_writes = applied.writes
        for ns, key, value in applied.writes:
            if value is None:
                self.store.pop((ns, key), None)
            else:
                self.store[(ns, key)] = value
        self.results.append(applied.result)
        if self.twin is not None:
            assert mirrored == applied.result, f"a prematched intent changed the answer: {mirrored} != {applied.result}"
        return applied.result

    def advance(self, ms: int) -> None:
        self.now_ms += ms

    def records(self) -> list[tuple[str, str, bytes]]:
        out = [(ns, key, v) for (ns, key), v in sorted(self.store.items())]
        if self.twin is not None:
            assert self.twin.records() == out, "a prematched intent changed the replicated state"
        return out

    def rebuilt(self) -> Engine:
        return Engine.from_records(self.records(), self.limits)

    # --- shorthands ------------------------------------------------------------------------------

    def init(self, remote: str = REMOTE, ttl_ms: int = 30_000) -> dict[str, Any]:
        return self.send({"type": "init", "remote": remote, "session_ttl_ms": ttl_ms})

    def push(self, toml: str | None = None, concepts: Iterable[dict[str, Any]] | None = None,
             expected_version: int | None = None) -> dict[str, Any]:
        cmd: dict[str, Any] = {"type": "push_registry", "expected_version": expected_version}
        if toml is not None:
            cmd["toml"] = toml
        else:
            cmd["concepts"] = list(concepts or [])
        return self.send(cmd)

    def open(self, agent_id: str, tool: str = "claude-code", remote: str = REMOTE,
             machine: str = "laptop", base_commit: str = "0" * 40) -> dict[str, Any]:
        return self.send({"type": "open_session", "agent_id": agent_id, "developer": agent_id.split("/")[0],
                          "tool": tool, "machine": machine, "repo_remote": remote, "base_commit": base_commit})

    def intent(self, agent_id: str, summary: str = "work", steps: Iterable[str] = (), *,
               trigger: str = "initial", tool: str = "claude-code", files: Iterable[str] | None = None,
               modify: Iterable[str] | None = None, depend: Iterable[str] | None = None,
               intent_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"summary": summary, "steps": list(steps)}
        if files is not None:
            body["files"] = list(files)
        if modify is not None or depend is not None:
            body["concepts"] = {"modify": list(modify or []), "depend": list(depend or [])}
        cmd: dict[str, Any] = {"type": "intent", "agent_id": agent_id, "tool": tool, "intent": body,
                               "trigger": trigger}
        if intent_id is not None:
            cmd["intent_id"] = intent_id
        return self.send(cmd)

    def end(self, agent_id: str, trigger: str = "complete", tool: str = "claude-code") -> dict[str, Any]:
        return self.send({"type": "intent", "agent_id": agent_id, "tool": tool, "trigger": trigger})

    def heartbeat(self, *agent_ids: str) -> dict[str, Any]:
        return self.send({"type": "heartbeat", "agent_ids": list(agent_ids)})

    def expire(self) -> dict[str, Any]:
        return self.send({"type": "expire", "now_ms": self.now_ms})

    def leader_elected(self) -> dict[str, Any]:
        return self.send({"type": "leader_elected", "now_ms": self.now_ms})

    def revoke(self, intent_id: str, revert: bool = False, by: str = "ops/admin", reason: str = "") -> dict[str, Any]:
        return self.send({"type": "revoke", "intent_id": intent_id, "revert": revert, "by": by, "reason": reason})
