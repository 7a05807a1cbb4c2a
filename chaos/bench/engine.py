"""Benchmark of the pure engine: verdicts per second with a large registry and many active
intents (``tetherlab bench engine [--json]``, or ``python -m tetherlab.chaos.bench.engine``).

Set-up (not timed): a registry of ``concepts`` concepts in 100 domains, each with two alias
phrases, a path glob, a symbol and up to three dependencies on earlier concepts; then
``active_intents`` agents each granted an intent modifying its own concept. Timed: ``verdicts``
intent commands from a further pool of agents, each decoded from JSON and applied: an initial
plan, a replan or a completion in turn, with text that names a few random concepts by alias,
symbol or path, so verdicts are a realistic mix of continue and stop.

Then, timed separately: ``reports`` in-flight change reports (``report_changes``) from the
set-up agents, each naming ``report_files`` changed files with their symbols and hunks: mostly
files of the agent's own concept, some shared by many agents (soft conflicts), now and then one
of a free concept (drift, claimed), the mix a busy team produces.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from tetherlab.chaos.bench.figures import print_figures
from tetherlab.cluster.core.engine.commands import decode_command
from tetherlab.cluster.core.engine.engine import Engine

_WORDS = (
    "ledger", "invoice", "cart", "checkout", "session", "token", "cache", "queue", "worker",
    "search", "index", "profile", "avatar", "billing", "refund", "coupon", "catalog", "pricing",
    "inventory", "shipment", "tracking", "email", "webhook", "audit", "report", "export", "import",
    "schema", "migration", "gateway", "router", "throttle", "quota", "tenant", "role", "permission",
    "policy",
)
_FILLER = (
    "then", "make", "sure", "the", "tests", "cover", "edge", "cases", "and", "keep", "the",
    "public", "behaviour", "stable", "while", "we", "clean", "up", "naming", "and", "logging",
    "around", "it",
)
POOL_AGENTS = 500
SHARED_FILES = 500  # files outside any concept that agents' reports share (soft conflicts)
REMOTE = "git@example.com:bench/repo.git"


def concept_record(k: int, rng: random.Random) -> dict[str, Any]:
    dom = f"d{k % 100:02d}"
    a, b = _WORDS[k % len(_WORDS)], _WORDS[(k // len(_WORDS)) % len(_WORDS)]
    deps: list[str] = []
    if k >= 5000:  # the first 5000 stay independent so the set-up intents can all be granted
        deps = sorted({f"d{j % 100:02d}.c{j}" for j in rng.sample(range(k), rng.randint(0, 3))})
    return {
        "id": f"{dom}.c{k}",
        "title": f"{a} {b} {k}",
        "aliases": [f"{a} {b} {k}", f"component {k}"],
        "paths": [f"src/{dom}/c{k}/**"],
        "symbols": [f"C{k}Service"],
        "depends_on": deps,
        "dependents": "continue" if rng.random() < 0.2 else "stop",
    }


def _plan_text(rng: random.Random, concepts: int) -> dict[str, Any]:
    steps = []
    for _ in range(rng.randint(1, 3)):
        k = rng.randrange(concepts)
        how = rng.random()
        if how < 0.5:
            ref = f"the {_WORDS[k % len(_WORDS)]} {_WORDS[(k // len(_WORDS)) % len(_WORDS)]} {k}"
        elif how < 0.75:
            ref = f"`C{k}Service`"
        else:
            ref = f"src/d{k % 100:02d}/c{k}/main.py"
        verb = rng.choice(["Refactor", "Build on top of", "Update", "Use", "Rewrite", "Read from"])
        steps.append(f"{verb} {ref}, " + " ".join(rng.sample(_FILLER, 8)))
    return {"summary": " ".join(rng.sample(_FILLER, 10)), "steps": steps}


def _report(rng: random.Random, k: int, concepts: int, files: int) -> list[dict[str, Any]]:
    """One agent's working state: its own concept's files, a shared file or two, rarely a file of
    another (free) concept."""
    dom = f"d{k % 100:02d}"
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for j in range(files):
        roll = rng.random()
        if roll < 0.10:  # shared modules: each one changed by a handful of agents at a time
            path, symbol = f"src/shared/util{rng.randrange(SHARED_FILES)}.py", f"helper_{rng.randrange(5)}"
        elif roll < 0.12:
            other = rng.randrange(5000, concepts) if concepts > 5000 else rng.randrange(concepts)
            path, symbol = f"src/d{other % 100:02d}/c{other}/extra.py", f"C{other}Service"
        else:
            path, symbol = f"src/{dom}/c{k}/part{j}.py", f"C{k}Service"
        if path in seen:
            continue
        seen.add(path)
        out.append({"path": path, "change": "modified", "hunks": [[10 * j + 1, 10 * j + 6]],
                    "symbols": [{"name": symbol, "change": "modified"}, {"name": f"{symbol}.run", "change": "added"}]})
    return out


def run_bench(concepts: int = 10000, active_intents: int = 5000, verdicts: int = 20000, seed: int = 1,
              reports: int = 5000, report_files: int = 6) -> dict:
    """Returns ``{"verdicts_per_s", "p99_us", "concepts", "active_intents"}`` (plus a few
    figures for context); ``active_intents`` is the number active when timing starts."""
    rng = random.Random(seed)
    eng = Engine()
    index = 0
    now = 1_000_000

    def apply(obj: dict[str, Any]) -> dict[str, Any]:
        nonlocal index
        index += 1
        return eng.apply(decode_command(obj), index=index, now_ms=now).result

    apply({"type": "init", "remote": REMOTE, "session_ttl_ms": 3_600_000})
    res = apply({"type": "push_registry", "concepts": [concept_record(k, rng) for k in range(concepts)]})
    assert res.get("ok"), res
    n_setup = min(active_intents, concepts)
    for k in range(n_setup + POOL_AGENTS):
        apply({"type": "open_session", "agent_id": f"dev{k % 50}/a{k}", "developer": f"dev{k % 50}",
               "tool": "claude-code", "machine": "m", "repo_remote": REMOTE, "base_commit": "c0"})
    for k in range(n_setup):
        v = apply({"type": "intent", "agent_id": f"dev{k % 50}/a{k}", "tool": "claude-code", "trigger": "initial",
                   "intent": {"summary": f"own work {k}", "steps": [],
                              "concepts": {"modify": [f"d{k % 100:02d}.c{k}"]}}})
        assert v["action"] == "continue", v
    active_at_start = eng.stats()["active_intents"]

    pool = [f"dev{k % 50}/a{k}" for k in range(n_setup, n_setup + POOL_AGENTS)]
    has_active = dict.fromkeys(pool, False)
    plans = [_plan_text(rng, concepts) for _ in range(verdicts)]  # text generation is not timed
    coin = [rng.random() < 0.5 for _ in range(verdicts)]
    times_ns: list[int] = []
    actions: dict[str, int] = {}
    t_start = time.perf_counter_ns()
    for i in range(verdicts):
        agent = pool[i % len(pool)]
        trigger = "initial" if not has_active[agent] else ("replan" if coin[i] else "complete")
        cmd: dict[str, Any] = {"type": "intent", "agent_id": agent, "tool": "opencode", "trigger": trigger}
        if trigger != "complete":
            cmd["intent"] = plans[i]
        t0 = time.perf_counter_ns()
        index += 1
        out = eng.apply(decode_command(cmd), index=index, now_ms=now).result
        times_ns.append(time.perf_counter_ns() - t0)
        action = out.get("action", "error")
        actions[f"{trigger}:{action}"] = actions.get(f"{trigger}:{action}", 0) + 1
        has_active[agent] = action == "continue" and trigger != "complete"
    elapsed_s = (time.perf_counter_ns() - t_start) / 1e9
    times_ns.sort()
    p99 = times_ns[min(len(times_ns) - 1, int(len(times_ns) * 0.99))]
    report_stats = _time_reports(eng, rng, concepts, n_setup, reports, report_files, index, now)
    return {
        "verdicts_per_s": round(verdicts / elapsed_s),
        "p99_us": round(p99 / 1000, 1),
        "concepts": concepts,
        "active_intents": active_at_start,
        "p50_us": round(times_ns[len(times_ns) // 2] / 1000, 1),
        "actions": dict(sorted(actions.items())),
        **report_stats,
    }


def _time_reports(eng: Engine, rng: random.Random, concepts: int, n_setup: int, reports: int, files: int,
                  index: int, now: int) -> dict[str, Any]:
    """The cost of in-flight change reports against the same engine (set-up agents that still
    hold their intent)."""
    sessions = eng.view_sessions([f"dev{k % 50}/a{k}" for k in range(n_setup)])
    live = [(k, s["intent_id"]) for k in range(n_setup)
            if (s := sessions.get(f"dev{k % 50}/a{k}")) is not None and s.get("intent_id")]
    if not live or reports <= 0:
        return {"reports": 0}
    cmds = []
    for i in range(reports):
        k, intent = live[i % len(live)]
        cmds.append({"type": "report_changes", "agent_id": f"dev{k % 50}/a{k}", "intent_id": intent,
                     "files": _report(rng, k, concepts, files), "truncated": False})
    times_ns: list[int] = []
    outcomes: dict[str, int] = {}
    t_start = time.perf_counter_ns()
    for cmd in cmds:
        t0 = time.perf_counter_ns()
        index += 1
        try:
            out = eng.apply(decode_command(cmd), index=index, now_ms=now).result
            kind = out.get("action", "error") + ("+drift" if (out.get("drift") or {}).get("claimed") else "") + \
                ("+soft" if out.get("soft_conflicts") else "")
        except Exception as e:  # an intent the mix stopped earlier: counted, not fatal
            kind = f"refused:{getattr(e, 'code', type(e).__name__)}"
        times_ns.append(time.perf_counter_ns() - t0)
        outcomes[kind] = outcomes.get(kind, 0) + 1
    elapsed_s = (time.perf_counter_ns() - t_start) / 1e9
    times_ns.sort()
    return {
        "reports": reports,
        "report_files": files,
        "reports_per_s": round(reports / elapsed_s),
        "report_p50_us": round(times_ns[len(times_ns) // 2] / 1000, 1),
        "report_p99_us": round(times_ns[min(len(times_ns) - 1, int(len(times_ns) * 0.99))] / 1000, 1),
        "report_outcomes": dict(sorted(outcomes.items())),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tetherlab bench engine", description="the pure coordination engine at scale")
    p.add_argument("--concepts", type=int, default=10000)
    p.add_argument("--active-intents", type=int, default=5000)
    p.add_argument("--verdicts", type=int, default=20000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--reports", type=int, default=5000, help="in-flight change reports timed after the verdicts")
    p.add_argument("--report-files", type=int, default=6, help="changed files per report")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    result = run_bench(a.concepts, a.active_intents, a.verdicts, a.seed, a.reports, a.report_files)
    print_figures(result, a.json, 16)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
