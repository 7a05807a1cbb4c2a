"""``tetherlab bench push``: large registry pushes on a real three-node cluster, and whether
each kept its leader.

Applying a push runs on every node's Raft thread, which answers nothing meanwhile: a 10,000-concept
push applied for over a second, longer than an election timeout. For each size of ``--concepts``
(pushed in turn, each replacing the last), this starts from a quorum-backed leader, pushes the
benchmark's registry of that size through the leader's control socket, waits ``--settle-s``, and
reads every node's term and leader (asking again while a node is still too busy to answer).
Kept: the same leader, in the same term, on every node. Progress goes to stderr; ``--json``
prints the result object on stdout. Exit 0 when every push was answered and kept its leader,
1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tetherlab.chaos.bench import load as bl
from tetherlab.chaos.bench.cluster import BenchCluster
from tetherlab.chaos.bench.figures import print_figures

STATUS_WAIT_S = 60.0  # how long a node busy applying may take to answer a status request


def _say(msg: str) -> None:
    print(f"bench push: {msg}", file=sys.stderr, flush=True)


def _views(c: BenchCluster) -> dict[str, tuple[int | None, str | None]]:
    """(term, leader) as each node sees it, asked until every node answers."""
    views: dict[str, tuple[int | None, str | None]] = {}
    deadline = time.monotonic() + STATUS_WAIT_S
    while len(views) < len(c.ids) and time.monotonic() < deadline:
        for nid in c.ids:
            if nid not in views:
                st = c.node_status(nid)
                if st is not None:
                    views[nid] = (st.get("term"), st.get("leader"))
        if len(views) < len(c.ids):
            time.sleep(0.2)
    return {nid: views.get(nid, (None, None)) for nid in c.ids}


def push_once(c: BenchCluster, concepts: int, settle_s: float) -> dict[str, Any]:
    leader = c.wait_leader()
    before = _views(c)
    term = before[leader][0]
    _say(f"{concepts:,} concepts: pushing through {leader} (term {term})")
    t0 = time.monotonic()
    reply = c.bench_engine(leader, {"type": "push_registry", "concepts": bl.registry_concepts(concepts)})
    push_s = round(time.monotonic() - t0, 2)
    time.sleep(settle_s)
    after = _views(c)
    kept = all(v == (term, leader) for v in after.values())
    _say(f"{concepts:,} concepts: answered {'ok' if reply.get('ok') else reply.get('error')} in {push_s} s; "
         f"leader {'kept' if kept else 'NOT kept'} ({after})")
    return {"concepts": concepts, "ok": bool(reply.get("ok")), "error": reply.get("error"), "push_s": push_s,
            "leader_before": leader, "term_before": term,
            "after": {nid: {"term": t, "leader": ld} for nid, (t, ld) in after.items()}, "leader_kept": kept}


def run_bench(sizes: list[int], settle_s: float, work: Path) -> dict[str, Any]:
    c = BenchCluster(work / "cluster", nodes=3)
    c.start()
    try:
        for nid in c.ids:
            c.wait_serving(nid)
        runs = [push_once(c, n, settle_s) for n in sizes]
    finally:
        c.close()
    return {"pushes": runs, "all_kept": all(r["ok"] and r["leader_kept"] for r in runs)}


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concepts takes sizes like 10000,30000, got {text!r}") from None
    if not sizes or any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"--concepts takes positive sizes, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tetherlab bench push", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", type=_sizes, default=[10_000, 30_000],
                   help="registry sizes to push in turn, comma-separated (default 10000,30000)")
    p.add_argument("--settle-s", type=float, default=4.0,
                   help="seconds to wait after each answer before reading terms (default 4)")
    p.add_argument("--json", action="store_true", help="print the result object on stdout")
    a = p.parse_args(argv)
    if a.settle_s < 0:
        p.error("--settle-s must not be negative")
    with tempfile.TemporaryDirectory(prefix="tetherlab-bench-push-") as tmp:
        result = run_bench(a.concepts, a.settle_s, Path(tmp))
    print_figures(result, a.json, 10)
    return 0 if result["all_kept"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
