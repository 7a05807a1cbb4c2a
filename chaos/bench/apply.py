"""``tetherlab bench apply``: a replica's apply path, as a follower and as the leader.

Set-up (not timed): the cluster benchmark's workload written as a log: a registry of
``--concepts`` concepts, 800 sessions, then ``--entries`` entries of its mix (plans matched by the
proposer as a leader does, completions, a 100-agent heartbeat every 60 entries), each encoded as
the node encodes it. Timed, in CPU time: applying the log to a fresh ``LmdbStore`` with batched
commits (one commit every ``--batch`` entries, as a Raft tick does), either

- as a **follower**: every entry decoded from its bytes (JSON and every field check), or
- as the **leader**: each command remembered when it was proposed (``ProposedCommands``) and
  taken by its apply, so it is not decoded again.

The two alternate for ``--passes`` pairs (this host's speed drifts; alternating keeps it out of
the difference). Progress goes to stderr; ``--json`` prints the result object on stdout.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tetherlab.chaos.bench import load as bl
from tetherlab.chaos.bench.figures import print_figures
from tetherlab.cluster.core.engine import commands as ec
from tetherlab.cluster.core.engine.engine import with_match
from tetherlab.cluster.core.engine.registry import load_toml
from tetherlab.cluster.node.replica import encode_engine
from tetherlab.cluster.replica.lmdbstore import LmdbStore

REMOTE = "git@example.com:bench/repo.git"
DEVELOPERS = 8
AGENTS_PER_DEVELOPER = 100
HEARTBEAT_EVERY = 60  # entries between two heartbeats (800 agents a second at ~1,000 entries/s)

Entry = tuple[bytes, int, ec.Command]  # the bytes in the log, the proposer's clock, the command


def record(concepts: int, entries: int, seed: int) -> tuple[list[Entry], int]:
    """The log (set-up entries first) and how many set-up entries it starts with."""
    rng = random.Random(seed)
    tmp = tempfile.TemporaryDirectory(prefix="tetherlab-bench-apply-")  # was left behind on every run
    store = LmdbStore(Path(tmp.name))
    log: list[Entry] = []
    now_ms = 1_000_000

    def add(cmd: ec.Command) -> dict[str, Any]:
        payload = encode_engine(cmd, now_ms)
        log.append((payload, now_ms, cmd))
        return store.apply(len(log), payload)

    try:
        add(ec.decode_command({"type": "init", "remote": REMOTE, "session_ttl_ms": 3_600_000}))
        add(ec.decode_command({"type": "push_registry", "concepts": load_toml(bl.registry_toml(concepts))}))
        devs = [f"dev{i}" for i in range(DEVELOPERS)]
        # Agent ids as shims make them (uuid4, dashed), from the seed.
        agents = [f"{d}/{uuid.UUID(int=rng.getrandbits(128), version=4)}" for d in devs
                  for _ in range(AGENTS_PER_DEVELOPER)]
        for a in agents:
            add(ec.decode_command({"type": "open_session", "agent_id": a, "developer": a.split("/")[0],
                                   "tool": "claude-code", "machine": "m", "repo_remote": REMOTE,
                                   "base_commit": "c0"}))
        setup = len(log)
        workload = bl.Workload(concepts=concepts)
        holding: set[str] = set()
        for step in range(entries):
            now_ms += 1
            if step % HEARTBEAT_EVERY == 0:
                dev = devs[(step // HEARTBEAT_EVERY) % len(devs)]
                add(ec.decode_command({"type": "heartbeat",
                                       "agent_ids": [a for a in agents if a.startswith(dev + "/")]}))
            a = agents[rng.randrange(len(agents))]
            if a in holding:
                holding.discard(a)
                add(ec.decode_command({"type": "intent", "agent_id": a, "tool": "claude-code",
                                       "trigger": "complete"}))
                continue
            modify, depend, summary, steps = workload.intent(rng)
            cmd = ec.decode_command({"type": "intent", "agent_id": a, "tool": "claude-code", "trigger": "initial",
                                     "intent": {"summary": summary, "steps": steps,
                                                "concepts": {"modify": modify, "depend": depend}}})
            assert isinstance(cmd, ec.SubmitIntent) and cmd.intent is not None
            if add(with_match(cmd, store.engine.match_basis().match(cmd.intent))).get("action") == "continue":
                holding.add(a)
        return log, setup
    finally:
        store.close()
        tmp.cleanup()


def apply_pass(log: list[Entry], setup: int, batch: int, as_leader: bool) -> float:
    """CPU µs per timed entry of applying ``log`` to a fresh store."""
    with tempfile.TemporaryDirectory(prefix="tetherlab-bench-apply-") as tmp:
        store = LmdbStore(Path(tmp), batch_applies=True)
        try:
            for i, (payload, _, _) in enumerate(log[:setup], start=1):
                store.apply(i, payload)
            store.flush_applied()
            # What the Raft layer hands the apply: equal bytes in another object (unpickled).
            copies = [bytes(bytearray(payload)) for payload, _, _ in log]
            t0 = time.process_time()
            for i in range(setup, len(log)):
                payload, now_ms, cmd = log[i]
                if as_leader:
                    store.proposed.put(payload, now_ms, cmd)
                store.apply(i + 1, copies[i])
                if (i - setup) % batch == batch - 1:
                    store.flush_applied()
            store.flush_applied()
            return 1e6 * (time.process_time() - t0) / max(1, len(log) - setup)
        finally:
            store.close()


def run_bench(concepts: int = 2000, entries: int = 20_000, batch: int = 70, passes: int = 3,
              seed: int = 1) -> dict[str, Any]:
    print(f"bench apply: recording {entries:,} entries over {concepts:,} concepts", file=sys.stderr)
    log, setup = record(concepts, entries, seed)
    follower: list[float] = []
    leader: list[float] = []
    for n in range(1, passes + 1):
        follower.append(round(apply_pass(log, setup, batch, as_leader=False), 1))
        leader.append(round(apply_pass(log, setup, batch, as_leader=True), 1))
        print(f"bench apply: pass {n}/{passes}: follower {follower[-1]} µs/entry, leader {leader[-1]} µs/entry",
              file=sys.stderr)
    saved = [round(100 * (f - ld) / f, 1) for f, ld in zip(follower, leader, strict=True)]
    return {
        "follower_us_per_entry": statistics.median_high(follower),
        "leader_us_per_entry": statistics.median_high(leader),
        "leader_saved_pct": statistics.median_high(saved),
        "passes": {"follower_us_per_entry": follower, "leader_us_per_entry": leader, "leader_saved_pct": saved},
        "entries": len(log) - setup,
        "concepts": concepts,
        "batch": batch,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tetherlab bench apply", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", type=int, default=2000, help="registry size (default 2000, as bench cluster)")
    p.add_argument("--entries", type=int, default=20_000, help="timed entries (default 20000)")
    p.add_argument("--batch", type=int, default=70, help="entries per commit, as one Raft tick (default 70)")
    p.add_argument("--passes", type=int, default=3, help="follower/leader pairs, alternating (default 3)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the result object on stdout")
    a = p.parse_args(argv)
    for name in ("concepts", "entries", "batch", "passes"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    print_figures(run_bench(a.concepts, a.entries, a.batch, a.passes, a.seed), a.json, 22)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
