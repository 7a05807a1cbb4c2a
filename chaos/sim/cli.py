"""``tetherlab sim``: run seeded schedules of the simulated cluster and check every one.

    tetherlab sim [--seeds N | --seed S] [--nodes 3|5] [--first-seed K] [--jobs J]
                  [--inject NAME | --inject list] [--apply-stalls] [--stop-on-violation] [--trace FILE]
                  [--json]

Seeds run in ``--jobs`` processes (default: 2, or 1 on a one-core machine). Without ``--nodes``,
even seeds run 3 nodes and odd seeds 5. Progress goes to stderr; the report to stdout
(``--json``: ``{"seeds", "schedules_per_s", "violations": [{"seed", "check", "detail", "replay"}]}``).
Every violation names the command that replays it; ``--trace FILE`` writes the replayed
schedule's event trace (the first violating seed's, or ``--seed``'s).

Exit status: 0 no violation; 1 a violation; 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from tetherlab.chaos.sim.inject import INJECTIONS
from tetherlab.chaos.sim.schedule import run_seed
from tetherlab.cluster.core.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE

PROGRESS_EVERY_S = 2.0
PROGRESS_IDLE_EVERY_S = 15.0  # the same count again only after this long
CHUNK_SEEDS = 25  # seeds per task: few round trips to the workers, and progress stays live
IN_FLIGHT_PER_JOB = 2


def nodes_for(seed: int, nodes: int | None) -> int:
    return nodes if nodes is not None else (3 if seed % 2 == 0 else 5)


def _flags(inject: str | None, stalls: bool) -> str:
    return (f" --inject {inject}" if inject else "") + (" --apply-stalls" if stalls else "")


def replay_command(seed: int, nodes: int, inject: str | None, stalls: bool = False) -> str:
    return f"tetherlab sim --seed {seed} --nodes {nodes}{_flags(inject, stalls)} --trace sim-trace.txt"


def _run_chunk(seeds: list[int], nodes: int | None, inject: str | None, stalls: bool = False) -> list[dict[str, Any]]:
    out = []
    for seed in seeds:
        n = nodes_for(seed, nodes)
        r = run_seed(seed, n, inject, trace=False, apply_stalls=stalls)
        out.append({"seed": seed, "nodes": n, "wall_s": r.wall_s,
                    "violations": [{"check": v.check, "detail": v.detail} for v in r.violations]})
    return out


def _chunks(first: int, count: int) -> Iterator[list[int]]:
    for start in range(first, first + count, CHUNK_SEEDS):
        yield list(range(start, min(first + count, start + CHUNK_SEEDS)))


def write_trace(path: Path, seed: int, nodes: int, inject: str | None, stalls: bool = False) -> list[dict[str, str]]:
    """Replay one seed with tracing on and write its trace; returns its violations."""
    r = run_seed(seed, nodes, inject, trace=True, apply_stalls=stalls)
    lines = [f"# tetherlab sim --seed {seed} --nodes {nodes}{_flags(inject, stalls)}",
             f"# {len(r.violations)} violation(s); stats {json.dumps(r.stats, sort_keys=True)}"]
    lines += [f"# VIOLATION {v.check}: {v.detail}" for v in r.violations]
    lines += [f"{t:10.4f}  {who:<10} {what}" for t, who, what in r.trace]
    path.write_text("\n".join(lines) + "\n")
    return [{"check": v.check, "detail": v.detail} for v in r.violations]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tetherlab sim",
        description="Deterministic simulation of the master cluster: every seed is a schedule of faults "
                    "(partitions, crashes at any durable step, pauses, restarts, membership changes) "
                    "against the real Raft, engine and state machine code; every schedule is checked.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--seeds", type=int, default=100, help="how many seeds to run (default 100)")
    g.add_argument("--seed", type=int, help="run this one seed (replay)")
    p.add_argument("--first-seed", type=int, default=1, help="with --seeds: the first seed (default 1)")
    p.add_argument("--nodes", type=int, choices=(3, 5), help="cluster size (default: 3 for even seeds, 5 for odd)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes (default %(default)s)")
    p.add_argument("--inject", metavar="NAME",
                   help="re-enable one known-bad behaviour (the run must then report a violation); "
                        "'list' prints them")
    p.add_argument("--apply-stalls", action="store_true",
                   help="nodes stall in applies as real ones do (a registry push keeps a node busy for up to "
                        "3 s, now and then any entry for up to 1.5 s): Raft's timers under long applies")
    p.add_argument("--stop-on-violation", action="store_true", help="stop at the first violating seed")
    p.add_argument("--trace", metavar="FILE", help="write the event trace of --seed, or of the first violating seed")
    p.add_argument("--json", action="store_true", help='print {"seeds", "schedules_per_s", "violations"} as JSON')
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.inject == "list":
        for name, what in INJECTIONS.items():
            print(f"{name}\t{what}")
        return EXIT_OK
    if args.inject is not None and args.inject not in INJECTIONS:
        print(f"tetherlab sim: no injection {args.inject!r}; 'tetherlab sim --inject list' names them",
              file=sys.stderr)
        return EXIT_USAGE
    if args.seeds < 1 or args.jobs < 1:
        print("tetherlab sim: --seeds and --jobs must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.seed is not None:
        return _one(args)
    return _many(args)


def _report(args: argparse.Namespace, seeds: int, elapsed_s: float, violations: list[dict[str, Any]]) -> int:
    rate = round(seeds / elapsed_s, 2) if elapsed_s > 0 else 0.0
    if args.json:
        print(json.dumps({"seeds": seeds, "schedules_per_s": rate, "violations": violations}, indent=2))
    else:
        print(f"{seeds} seeds in {elapsed_s:.1f} s ({rate} schedules/s): "
              f"{len(violations)} violation(s)" + (f", injected: {args.inject}" if args.inject else ""))
        for v in violations:
            print(f"seed {v['seed']}: {v['check']}: {v['detail']}\n  replay: {v['replay']}")
    return EXIT_FAILED if violations else EXIT_OK


def _one(args: argparse.Namespace) -> int:
    seed = args.seed
    nodes = nodes_for(seed, args.nodes)
    t0 = time.perf_counter()
    if args.trace:
        found = write_trace(Path(args.trace), seed, nodes, args.inject, args.apply_stalls)
        print(f"trace written to {args.trace}", file=sys.stderr)
    else:
        found = _run_chunk([seed], nodes, args.inject, args.apply_stalls)[0]["violations"]
    violations = [{"seed": seed, **v, "replay": replay_command(seed, nodes, args.inject, args.apply_stalls)}
                  for v in found]
    return _report(args, 1, time.perf_counter() - t0, violations)


def _many(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    violations: list[dict[str, Any]] = []
    done = 0
    last_progress = t0
    chunks = _chunks(args.first_seed, args.seeds)
    stop = False

    def take(results: list[dict[str, Any]]) -> None:
        nonlocal done, stop
        for r in results:
            done += 1
            for v in r["violations"]:
                replay = replay_command(r["seed"], r["nodes"], args.inject, args.apply_stalls)
                violations.append({"seed": r["seed"], **v, "replay": replay})
                if args.stop_on_violation:
                    stop = True

    last_done = -1

    def progress(final: bool = False) -> None:
        # A line when the count moved, or now and then while a chunk runs (still alive); not the
        # same count every PROGRESS_EVERY_S.
        nonlocal last_progress, last_done
        now = time.perf_counter()
        due = now - last_progress >= (PROGRESS_EVERY_S if done != last_done else PROGRESS_IDLE_EVERY_S)
        if final or due:
            last_progress, last_done = now, done
            rate = done / (now - t0) if now > t0 else 0.0
            print(f"sim: {done}/{args.seeds} seeds, {rate:.1f}/s, {len(violations)} violation(s)",
                  file=sys.stderr, flush=True)

    if args.jobs == 1:
        for chunk in chunks:
            take(_run_chunk(chunk, args.nodes, args.inject, args.apply_stalls))
            progress()
            if stop:
                break
    else:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            pending: set[Future[list[dict[str, Any]]]] = set()
            exhausted = False
            while True:
                while not exhausted and not stop and len(pending) < args.jobs * IN_FLIGHT_PER_JOB:
                    chunk = next(chunks, None)
                    if chunk is None:
                        exhausted = True
                        break
                    pending.add(pool.submit(_run_chunk, chunk, args.nodes, args.inject, args.apply_stalls))
                if not pending:
                    break
                finished, pending = wait(pending, timeout=PROGRESS_EVERY_S, return_when=FIRST_COMPLETED)
                for fut in finished:
                    take(fut.result())
                progress()
                if stop:
                    for fut in pending:
                        fut.cancel()
                    pending = {f for f in pending if not f.cancelled()}
    progress(final=True)
    violations.sort(key=lambda v: v["seed"])
    if violations and args.trace:
        first = violations[0]
        write_trace(Path(args.trace), first["seed"], nodes_for(first["seed"], args.nodes), args.inject,
                    args.apply_stalls)
        print(f"trace of seed {first['seed']} written to {args.trace}", file=sys.stderr)
    return _report(args, done, time.perf_counter() - t0, violations)


if __name__ == "__main__":
    sys.exit(main())
