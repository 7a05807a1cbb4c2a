"""The cluster a drill runs against, and what the drill needs from it.

Either the drill starts its own nodes (:class:`DrillCluster`: a fresh cluster in a private network
namespace, or one in ``--dir`` when nothing runs there), and may then kill, pause and restart
them; or it attaches to nodes someone else runs (``tetherlab up``, a deployment), whose processes
it never signals.

Setup for the workload, over the admin API: one SSH key per simulated developer (kept in
``DIR/drill/``), and the drill's concepts added to the concept registry (merged with whatever is
there). The cluster's git remote is read from a replica; a drill-owned cluster is created with
:data:`DRILL_REMOTE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tetherlab.chaos.checkers import first_differences
from tetherlab.chaos.netns import die_with_parent
from tetherlab.cluster import protocol as p
from tetherlab.cluster.core.config import ClusterFile
from tetherlab.cluster.ops.client import ControlClient, cluster_status, node_status
from tetherlab.cluster.ops.config import load_cluster_file, load_node_config
from tetherlab.cluster.ops.keys import generate_key_pair, public_line_of
from tetherlab.cluster.ops.localcluster import LocalCluster
from tetherlab.shim.client import MasterClient, RequestError, masters_from_cluster_file

DRILL_REMOTE = "git@example.invalid:tetherlab/drill.git"
SETUP_DEADLINE_S = 30.0
DUMP_TIMEOUT_S = 5.0
CATCH_UP_TIMEOUT_S = 20.0

# The drill's registry: alpha and delta stop dependents; beta depends on alpha (so modifying beta
# claims a dependency on alpha); gamma lets dependents continue. Small, so agents contend.
DRILL_CONCEPTS: dict[str, dict[str, Any]] = {
    "drill.alpha": {"title": "Drill concept alpha"},
    "drill.beta": {"title": "Drill concept beta", "depends_on": ["drill.alpha"]},
    "drill.gamma": {"title": "Drill concept gamma", "dependents": "continue"},
    "drill.delta": {"title": "Drill concept delta"},
}


def drill_policies() -> dict[str, str]:
    return {cid: str(c.get("dependents", "stop")) for cid, c in DRILL_CONCEPTS.items()}


class DrillCluster(LocalCluster):
    """A LocalCluster whose nodes die with the drill runner (PR_SET_PDEATHSIG) when asked to."""

    def __init__(self, directory: Path, die_with_runner: bool = False) -> None:
        super().__init__(directory)
        self.die_with_runner = die_with_runner

    def _spawn(self, nid: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "tetherlab.cluster.cli", "master", "--config", str(self.config_path(nid))]
        with open(self.dir / nid / "node.log", "ab") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=die_with_parent if self.die_with_runner else None)

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items() if p.poll() is None}


def rewrite_hosts(cluster_dir: Path, nodes: Sequence[Any], host_of: Mapping[str, str]) -> None:
    """Move each node to its own loopback address (ports are unique, so "host:port" strings are)."""
    files = [cluster_dir / n.id / "node.toml" for n in nodes] + [cluster_dir / "cluster.toml",
                                                                  cluster_dir / "shim.toml"]
    for f in files:
        if not f.exists():
            continue
        text = f.read_text()
        for n in nodes:
            for addr in (n.raft, n.ssh, n.http):
                text = text.replace(f'"{addr}"', f'"{host_of[n.id]}:{addr.port}"')
        f.write_text(text)


@dataclass
class Target:
    """A cluster under drill: addresses, control sockets, and (if ours) its processes."""

    dir: Path
    cluster: ClusterFile
    admin_key: Path
    owned: DrillCluster | None = None
    control: dict[str, Path] = field(default_factory=dict)  # node id -> control socket

    @property
    def ids(self) -> list[str]:
        return [n.id for n in self.cluster.nodes]

    @classmethod
    def attach(cls, directory: Path, owned: DrillCluster | None = None) -> Target:
        cf = load_cluster_file(directory / "cluster.toml")
        if cf.admin_key is None:
            raise RuntimeError(f"{directory / 'cluster.toml'} names no admin_key: the drill needs it to register "
                               "its developers' keys")
        control: dict[str, Path] = {}
        for n in cf.nodes:
            cfg = directory / n.id / "node.toml"
            if cfg.exists():
                control[n.id] = load_node_config(cfg).data_dir / "control.sock"
        return cls(directory, cf, cf.admin_key, owned, control)

    def running_nodes(self) -> list[str]:
        return [n.id for n in self.cluster.nodes if node_status(n, 1.0) is not None]

    def status(self, timeout_s: float = 0.5) -> dict[str, Any]:
        return cluster_status(self.cluster, timeout_s=timeout_s)

    def leader(self, timeout_s: float = 0.5) -> str | None:
        """The quorum-backed leader, or None."""
        st = self.status(timeout_s)
        lead = st.get("leader")
        if lead is None:
            return None
        s = node_status(self.cluster.by_id()[lead], timeout_s)
        return lead if s is not None and s.get("quorum_backed") else None

    def wait_leader(self, timeout_s: float) -> str | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            lead = self.leader()
            if lead is not None:
                return lead
            time.sleep(0.1)
        return None

    def applied_index(self, nid: str) -> int:
        st = node_status(self.cluster.by_id()[nid], 0.5) or {}
        return int(st.get("store", {}).get("applied_index", -1))

    def wait_caught_up(self, nid: str, timeout_s: float = CATCH_UP_TIMEOUT_S) -> bool:
        """Until ``nid`` has applied what the leader had committed when we asked."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            lead = self.leader()
            if lead is not None:
                target = self.applied_index(lead)
                if target >= 0 and self.applied_index(nid) >= target:
                    return True
            time.sleep(0.1)
        return False

    def dump(self, nid: str) -> dict[str, Any]:
        path = self.control.get(nid)
        if path is None:
            raise RuntimeError(f"no control socket known for {nid} (its node.toml is not under {self.dir})")
        with ControlClient(path, DUMP_TIMEOUT_S) as c:
            reply = c.call("dump")
        if not reply.get("ok"):
            raise RuntimeError(f"dump of {nid} refused: {reply}")
        result: dict[str, Any] = reply["result"]
        return result

    def converged_dumps(self, timeout_s: float, log: Any = None) -> tuple[dict[str, dict[str, Any]], str]:
        """Dumps of every node taken at one applied index (the leader writes an entry a second, so
        retry until all nodes are caught up at the same moment); (dumps, note). ``log`` hears
        why it is still waiting, every couple of seconds."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        last: dict[str, dict[str, Any]] = {}
        note = ""
        said = t0
        while time.monotonic() < deadline:
            last = {}
            for nid in self.ids:
                try:
                    last[nid] = self.dump(nid)
                except (OSError, RuntimeError, ValueError) as e:
                    note = f"{nid}: {e}"
            indexes = {n: d.get("applied_index") for n, d in last.items()}
            if len(last) == len(self.ids) and len(set(indexes.values())) == 1:
                first = next(iter(last.values()))
                if all(d == first for d in last.values()):
                    return last, f"converged at applied index {first.get('applied_index')} after " \
                                 f"{time.monotonic() - t0:.1f} s"
                diffs = {n: first_differences(first, d, 2) for n, d in last.items() if d != first}
                note = f"equal indexes, different states: {diffs}"
            elif len(last) == len(self.ids):
                note = f"applied indexes {indexes}"
            if log is not None and time.monotonic() - said >= 2.0:
                said = time.monotonic()
                log(f"waiting for replicas to converge: {note}")
            time.sleep(0.05)
        return last, note or "replicas did not reach one applied index in time"

    def remote(self) -> str:
        for nid in self.ids:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                cl = self.dump(nid).get("engine", {}).get("meta", {}).get("cluster")
                if cl and cl.get("remote"):
                    return str(cl["remote"])
        return DRILL_REMOTE


# --- setup over the admin API ------------------------------------------------------------------------


def developer_keys(directory: Path, developers: Sequence[str]) -> dict[str, Path]:
    """One ed25519 key per simulated developer, made once and kept in DIR/drill/."""
    out: dict[str, Path] = {}
    kdir = directory / "drill"
    kdir.mkdir(parents=True, exist_ok=True)
    for dev in developers:
        path = kdir / f"{dev}_ed25519"
        if not path.exists():
            generate_key_pair(path, f"{dev}@tetherlab-drill")
        out[dev] = path
    return out


def _toml_str(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def registry_toml(concepts: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for cid, c in concepts.items():
        lines = ["[[concept]]", f"id = {_toml_str(cid)}"]
        for k, v in c.items():
            if k in ("id",):
                continue
            if isinstance(v, str):
                lines.append(f"{k} = {_toml_str(v)}")
            elif isinstance(v, list | tuple):
                lines.append(f"{k} = [{', '.join(_toml_str(str(x)) for x in v)}]")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


async def setup_cluster(target: Target, developers: Mapping[str, Path], log: Any) -> None:
    """Register the developers' keys and make sure the drill's concepts are in the registry."""
    assert target.cluster.path is not None
    client = MasterClient(masters_from_cluster_file(target.cluster.path), target.admin_key,
                          target.cluster.developer or "admin", client_name="tetherlab-drill")
    try:
        for dev, key in developers.items():
            try:
                await client.call(p.KeysAdd, SETUP_DEADLINE_S, idempotent=False, developer=dev,
                                  public_key=public_line_of(key), role="developer")
            except RequestError as e:
                if e.code != "key_exists":
                    raise
        listed = await client.call(p.ConceptsList, SETUP_DEADLINE_S)
        have = {c["id"] for c in listed.get("concepts", [])}
        if set(DRILL_CONCEPTS) <= have:
            return
        # Keep whatever the registry holds: fetch each concept whole and push it back with ours.
        merged: dict[str, dict[str, Any]] = {}
        for cid in sorted(have - set(DRILL_CONCEPTS)):
            shown = (await client.call(p.ConceptsShow, SETUP_DEADLINE_S, concept_id=cid))["concept"]
            merged[cid] = {k: shown[k] for k in ("title", "description", "paths", "symbols", "aliases",
                                                 "depends_on", "dependents") if shown.get(k) not in (None, "", [])}
        merged.update({k: dict(v) for k, v in DRILL_CONCEPTS.items()})
        if have:
            log(f"adding the drill's concepts to the registry's {len(have)} concept(s)")
        await client.call(p.ConceptsPush, SETUP_DEADLINE_S, idempotent=False, toml=registry_toml(merged))
    finally:
        await client.close()


def run_setup(target: Target, developers: Mapping[str, Path], log: Any) -> None:
    asyncio.run(asyncio.wait_for(setup_cluster(target, developers, log), SETUP_DEADLINE_S * 3))
