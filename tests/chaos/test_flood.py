"""The flood suite: ``tetherlab drill flood`` against real node processes on loopback.

Every phase (Raft idle/slow/random floods, SSH half-open and authenticated floods, HTTP
slowloris with rapid GETs, protocol abuse with a valid key) runs beside a writer measuring the
commit path, and fails on a node death, quorum lost over 5 s, writes stalled over 10 s, or a
node's anonymous memory growing over 32 MiB (docs/hardening.md). Sizes are the drill's defaults
except the GET count and phase lengths, to keep the suite near a minute and a half on two cores.

The suite can fail: the second test plants the bug the Raft patches fix (pysyncobj's own read
loop) and expects the drill to fail the cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tetherlab.cluster.ops.localcluster import LocalCluster

pytestmark = pytest.mark.slow

SUITE_TIMEOUT_S = 240.0
CI_ARGS = ["--phase-s", "4", "--baseline-s", "2", "--settle-s", "1", "--http-gets", "800"]


def drill(*args: str, timeout_s: float = SUITE_TIMEOUT_S) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = subprocess.run([sys.executable, "-m", "tetherlab.cluster.cli", "drill", "flood", "--json", *args],
                          capture_output=True, text=True, timeout=timeout_s)
    report: dict[str, Any] = {}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            report = json.loads(line)
            break
    return proc, report


def _figures(report: dict[str, Any]) -> str:
    rows = []
    for ph in report.get("phases", []):
        w = ph.get("writer", {})
        rows.append(f"{ph['name']}: passed={ph['passed']} writer {w.get('ops_per_s')} ops/s "
                    f"(x{w.get('throughput_ratio')}), gap {w.get('max_gap_s')} s, no-quorum "
                    f"{ph.get('quorum_lost_max_s')} s, RssAnon +{ph.get('rss_growth_mib')} MiB; failed: "
                    f"{ {k: v['detail'] for k, v in ph['checks'].items() if not v['passed']} }")
    return "\n".join(rows)


def test_every_flood_phase_leaves_the_cluster_serving(tmp_path: Path) -> None:
    proc, report = drill("--dir", str(tmp_path / "cluster"), *CI_ARGS)
    print(_figures(report))  # the figures, in the test log
    assert report, f"no report (exit {proc.returncode}); stderr:\n{proc.stderr[-4000:]}"
    assert [ph["name"] for ph in report["phases"]] == ["raft-idle", "raft-slow", "raft-random", "ssh-half-open",
                                                        "ssh-auth", "http", "abuse"]
    assert proc.returncode == 0 and report["passed"], f"{_figures(report)}\nstderr:\n{proc.stderr[-3000:]}"
    abuse = next(ph for ph in report["phases"] if ph["name"] == "abuse")["attack"]
    assert abuse["sessions"]["replies"].get("error:quota_exceeded", 0) > 0  # the quota did refuse
    assert abuse["oversized_frame"]["then_ping"] == "result"


class _UnpatchedCluster(LocalCluster):
    """Nodes that read Raft sockets with pysyncobj's own loop (the ``bounded_read`` patch undone
    after install, so the node still starts): the bug the flood suite must catch."""

    CODE = ("import sys\n"
            "from tetherlab.cluster.replica import pysyncobj_patches as p\n"
            "p.install()\n"
            "next(x for x in p.PATCHES if x.name == 'bounded_read').revert()\n"
            "from tetherlab.cluster.cli.main import main\n"
            "sys.exit(main(sys.argv[1:]))\n")

    def _spawn(self, nid: str) -> subprocess.Popen[bytes]:
        with open(self.dir / nid / "node.log", "ab") as out:
            return subprocess.Popen([sys.executable, "-c", self.CODE, "master", "--config",
                                     str(self.config_path(nid))],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_the_suite_fails_a_cluster_that_buffers_a_strangers_bytes(tmp_path: Path) -> None:
    c = _UnpatchedCluster(tmp_path / "cluster")
    c.start()
    try:
        for nid in c.ids:
            c.wait_serving(nid)
        proc, report = drill("--dir", str(c.dir), "--phases", "raft-random", "--phase-s", "10", "--baseline-s", "2",
                             "--raft-burst-mib", "64")
        print(_figures(report))
        assert proc.returncode == 1 and report and not report["passed"], proc.stderr[-3000:]
        failed = {k for k, v in report["phases"][0]["checks"].items() if not v["passed"]}
        assert failed & {"memory", "writes", "quorum", "nodes_alive"}, failed
    finally:
        c.close()
