"""The bounded chaos suite: seeded drills covering every nemesis, each with every checker.

Each drill runs a fresh 3-node cluster and its simulated agents in a private network namespace
that the drill makes for itself (``--netns``: ``unshare --net``) and that dies with it, so nothing
outside is touched. One test runs ``tetherlab up`` and attaches a drill to it, inside a namespace
the test makes. Skipped, with the reason, where namespaces or nftables are not available (not
root, tools missing).

A failure prints the drill's report, its seed and the command that replays it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from tetherlab.chaos.netns import netns_unavailable_reason

_REASON = netns_unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=f"chaos drills: {_REASON}")]

DRILL_TIMEOUT_S = 240.0
SETTLE_S = "20"  # how long a drill waits after healing for nodes to catch up (the CLI's default is 90)

# Product failures the drills found, reported and not yet fixed. A drill that hits one of these
# still has to pass every safety check; then it is marked xfail with the reason, not hidden.
# (The first finding, slow rejoin after a silent partition, is fixed in cluster/raft.py with
# TCP_USER_TIMEOUT and TCP_SYNCNT on Raft sockets; its check now has to pass.)
KNOWN_PRODUCT_FAILURES: dict[str, str] = {}
# What such a failure takes with it: a node that has not rejoined cannot converge.
CONSEQUENCES = {"rejoin_after_heal": {"convergence"}}

# (test id, drill arguments). Seeds are fixed so a failure here replays anywhere.
DRILLS: list[tuple[str, list[str]]] = [
    ("isolate-leader", ["partition", "--isolate", "leader", "--duration", "6", "--seed", "101"]),
    # Longer than the session TTL (12 s here): one group of shims with the minority fails closed,
    # its sessions lapse, the other group takes its concepts over, and learns of lapses after healing.
    ("split-agents-past-session-ttl", ["partition", "--split", "agents", "--session-ttl-s", "12", "--duration", "18",
                                       "--seed", "115"]),
    ("split-2-1-shims-with-minority", ["partition", "--split", "2-1", "--client", "minority", "--duration", "8",
                                       "--seed", "102"]),
    ("split-1-1-1", ["partition", "--split", "1-1-1", "--duration", "6", "--seed", "103"]),
    ("one-way-from-leader", ["partition", "--one-way", "leader", "--direction", "out", "--duration", "6",
                             "--seed", "104"]),
    ("bridge", ["partition", "--bridge", "leader", "--duration", "6", "--seed", "105"]),
    ("flapping-leader-link", ["partition", "--flap", "leader", "--period-s", "0.5", "--duration", "6",
                              "--seed", "106"]),
    ("shims-cut-off", ["partition", "--isolate", "client", "--duration", "8", "--seed", "107"]),
    ("latency-with-jitter", ["latency", "--latency-ms", "100", "--jitter-ms", "50", "--duration", "6",
                             "--seed", "108"]),
    ("kill-leader", ["kill", "--node", "leader", "--duration", "5", "--seed", "109"]),
    ("kill-majority", ["kill", "--nodes", "n1,n2", "--duration", "4", "--seed", "110"]),
    ("pause-leader", ["pause", "--node", "leader", "--duration", "6", "--seed", "111"]),
    ("rolling-restart", ["restart", "--seed", "112"]),
    ("full-restart", ["restart", "--full", "--duration", "2", "--seed", "113"]),
    ("schedule-through-toxiproxy", ["schedule", "--proxied", "--nemesis",
                                    "isolate-leader,one-way,split-2-1,latency,pause", "--duration", "24",
                                    "--fault-s", "3,5", "--gap-s", "1,2", "--seed", "114"]),
]


def _explain(proc: subprocess.CompletedProcess[str], report: dict[str, Any] | None) -> str:
    if report is None:
        return f"drill printed no report (exit {proc.returncode}); stderr:\n{proc.stderr[-4000:]}"
    failed = {k: v["detail"] for k, v in report["checks"].items() if not v["passed"]}
    return (f"drill failed (exit {proc.returncode}); seed {report['seed']}; replay: {report['replay']}\n"
            f"failed checks: {json.dumps(failed, indent=2)}\nfaults: {json.dumps(report['faults'], indent=2)}\n"
            f"stderr tail:\n{proc.stderr[-2000:]}")


def _report(proc: subprocess.CompletedProcess[str]) -> dict[str, Any] | None:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            report: dict[str, Any] = json.loads(line)
            return report
    return None


@pytest.mark.timeout(DRILL_TIMEOUT_S + 30)
@pytest.mark.parametrize("argv", [a for _, a in DRILLS], ids=[i for i, _ in DRILLS])
def test_drill(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "tetherlab.chaos.drill", *argv, "--netns", "--json", "--quiet",
                           "--settle-s", SETTLE_S], capture_output=True, text=True, timeout=DRILL_TIMEOUT_S)
    report = _report(proc)
    _assert_passed(proc, report)
    if "--session-ttl-s" in argv:
        # The drill is about sessions lapsing while cut off: it must have made some lapse.
        assert report is not None and report["shims"]["lapsed"] > 0, _explain(proc, report)


def _assert_passed(proc: subprocess.CompletedProcess[str], report: dict[str, Any] | None) -> None:
    assert report is not None, _explain(proc, report)
    assert report["ops"]["ok"] > 0 and report["faults"], _explain(proc, report)
    failed = {k for k, v in report["checks"].items() if not v["passed"]}
    known = failed & set(KNOWN_PRODUCT_FAILURES)
    excused = known | {c for k in known for c in CONSEQUENCES.get(k, set())}
    assert not failed - excused, _explain(proc, report)
    if known:
        pytest.xfail("; ".join(f"{k}: {report['checks'][k]['detail']} -- known product failure: "
                               f"{KNOWN_PRODUCT_FAILURES[k]} (seed {report['seed']}; replay: {report['replay']})"
                               for k in sorted(known)))
    assert proc.returncode == 0 and report["passed"], _explain(proc, report)


def test_every_nemesis_is_in_the_suite() -> None:
    from tetherlab.chaos.nemesis import NEMESES

    covered = {"isolate-leader", "split-2-1", "split-1-1-1", "one-way", "bridge", "flap", "isolate-client",
               "split-agents", "latency", "kill", "kill-several", "pause", "rolling-restart", "full-restart"}
    # isolate-node is isolate-leader with a fixed node, isolate-agents split-agents without the node
    # split (same code paths, other targets).
    assert set(NEMESES) - covered == {"isolate-node", "isolate-agents"}


ATTACH_SCRIPT = textwrap.dedent("""
    import subprocess, sys, time, tempfile, pathlib, signal, shutil
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    d = pathlib.Path(tempfile.mkdtemp(prefix="tetherlab-up-")) / "c"
    up = subprocess.Popen([sys.executable, "-m", "tetherlab.cluster.cli", "up", "--dir", str(d)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from tetherlab.cluster.ops.localcluster import wait_for_leader
        from tetherlab.cluster.ops.config import load_cluster_file
        deadline = time.monotonic() + 30
        while not (d / "cluster.toml").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert wait_for_leader(load_cluster_file(d / "cluster.toml"), 30) is not None, "no leader"
        r = subprocess.run([sys.executable, "-m", "tetherlab.chaos.drill", "partition", "--isolate", "leader",
                            "--duration", "10", "--json", "--quiet", "--seed", "120", "--settle-s", "20",
                            "--dir", str(d)], timeout=200)
        code = r.returncode
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(30)
        shutil.rmtree(d.parent, ignore_errors=True)
    sys.exit(code)
""")


@pytest.mark.timeout(DRILL_TIMEOUT_S + 30)
def test_drill_attaches_to_a_cluster_from_tetherlab_up() -> None:
    """The documented command against ``tetherlab up``'s cluster (processes not started by the
    drill, all on 127.0.0.1), inside a namespace this test makes for it."""
    proc = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", ATTACH_SCRIPT], capture_output=True,
                          text=True, timeout=DRILL_TIMEOUT_S)
    report = _report(proc)
    assert report is not None, _explain(proc, report)
    assert report["mode"] == "attached" and report["leader_changes"] >= 1, _explain(proc, report)
    assert report["time_to_new_leader_s"] is not None, _explain(proc, report)
    _assert_passed(proc, report)
