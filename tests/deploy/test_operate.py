"""Deploying and operating: three-host bundles started with the systemd unit's command line,
the unit itself, backup and restore, and disaster recovery from one surviving node."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tetherlab.cluster import protocol as p
from tetherlab.cluster.ops.config import load_cluster_file
from tetherlab.cluster.ops.keys import generate_key_pair
from tetherlab.cluster.ops.localcluster import LocalCluster, free_base_port
from tetherlab.shim.client import MasterClient, masters_from_cluster_file

from conftest import until_available

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "tetherlab.service"
TL = [sys.executable, "-m", "tetherlab.cluster.cli"]


def exec_start() -> list[str]:
    line = next(ln for ln in UNIT.read_text().splitlines() if ln.startswith("ExecStart="))
    return line.removeprefix("ExecStart=").split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    tetherlab = shutil.which("tetherlab") or str(Path(sys.executable).parent / "tetherlab")
    unit = tmp_path / "tetherlab.service"
    # verify checks that ExecStart's program exists: point it at this installation's.
    unit.write_text(UNIT.read_text().replace(exec_start()[0], tetherlab))
    p_ = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, timeout=60)
    assert p_.returncode == 0, p_.stderr.decode()
    text = UNIT.read_text()
    for option in ("NoNewPrivileges=true", "ProtectSystem=strict", "User=tetherlab", "Restart=on-failure"):
        assert option in text


def test_three_host_bundles_start_with_the_unit_command_and_a_shim_gets_a_verdict(tmp_path: Path) -> None:
    hosts = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]  # three loopback addresses play the hosts
    base = free_base_port(1, "127.0.0.11")
    out = tmp_path / "bundles"
    r = subprocess.run([*TL, "init", "--hosts", ",".join(hosts), "--out", str(out), "--data-dir", "data", "--json"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for h in hosts:
        b = out / h
        assert {x.name for x in b.iterdir()} >= {"node.toml", "cluster.secret", "ssh_host_ed25519_key"}
        assert oct((b / "cluster.secret").stat().st_mode & 0o777) == "0o600"
    shim = load_cluster_file(out / "shim.toml")
    assert len(shim.nodes) == 3 and len(shim.host_keys) == 3 and shim.admin_key is None
    # Move the default ports to free ones (the test machine is shared), as an operator might.
    for b in [out / h for h in hosts] + [out / "admin", out]:
        for f in ("node.toml", "cluster.toml", "shim.toml"):
            if (b / f).exists():
                t = (b / f).read_text()
                for std, off in ((":7100", 1), (":7200", 101), (":7300", 201)):
                    t = t.replace(std + '"', f":{base + off}\"")
                (b / f).write_text(t)
    argv = exec_start()
    procs = []
    try:
        for h in hosts:
            cmd = [sys.executable, "-m", "tetherlab.cluster.cli", *argv[1:]]
            cmd[cmd.index("/etc/tetherlab/node.toml")] = str(out / h / "node.toml")
            with open(out / f"{h}.log", "wb") as log:
                procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log))
        admin_file = out / "admin" / "cluster.toml"
        deadline = time.monotonic() + 60
        st: dict = {}
        while time.monotonic() < deadline:
            s = subprocess.run([*TL, "status", "--cluster", str(admin_file), "--json"], capture_output=True, timeout=30)
            st = json.loads(s.stdout) if s.stdout else {}
            if st.get("leader"):
                break
            time.sleep(0.3)
        assert st.get("leader"), st
        assert {n["raft"].split(":")[0] for n in st["nodes"]} == set(hosts)
        key = tmp_path / "dana"
        generate_key_pair(key, "dana")

        async def go() -> dict:
            admin = MasterClient(masters_from_cluster_file(admin_file), out / "admin" / "admin_ed25519", "admin")
            for _ in range(100):  # the bootstrap admin key lands just after the first election
                try:
                    await admin.call(p.KeysAdd, 5, developer="dana",
                                     public_key=(tmp_path / "dana.pub").read_text().strip())
                    break
                except Exception:
                    await asyncio.sleep(0.2)
            await admin.close()
            c = MasterClient(masters_from_cluster_file(out / "shim.toml"), key, "dana")
            aid = f"dana/{uuid.uuid4()}"
            await c.call(p.OpenSession, 30, agent_id=aid, tool="t", machine="m", repo_remote="git@x:y/z.git",
                         base_commit="abcdef1")
            v = await c.call(p.SubmitIntent, 30, agent_id=aid, tool="t", trigger="initial",
                             intent=p.Intent(summary="anything", steps=("x",)))
            await c.close()
            return v

        verdict = asyncio.run(go())
        assert verdict["action"] == "continue" and verdict["fencing_token"] > 0
        assert res["shim"].endswith("shim.toml")
    finally:
        for pr in procs:
            pr.send_signal(signal.SIGTERM)
        for pr in procs:
            try:
                pr.wait(20)
            except subprocess.TimeoutExpired:
                pr.kill()


def _workload(c: LocalCluster, tmp: Path) -> None:
    assert subprocess.run([*TL, "demo", "--dir", str(c.dir), "--json"], capture_output=True,
                          timeout=240).returncode == 0


def _comparable(dump: dict) -> dict:
    """State that must survive a backup and restore unchanged: the KV records and the
    engine's registry, intents and history. (A new leader extends sessions and advances the
    clock, by design.)"""
    eng = dump["engine"]
    # A restored state records where its new log starts (meta/restore): the rest is identical.
    records = {ns: {k: v for k, v in recs.items() if (ns, k) != ("meta", "restore")}
               for ns, recs in dump["records"].items()}
    return {"records": records, "concepts": eng.get("concepts"), "registry": eng.get("registry"),
            "intents": eng.get("intents"), "history": eng.get("history")}


def _dump_file(snapshot: Path, tmp: Path) -> dict:
    from tetherlab.cluster.replica.lmdbstore import LmdbStore

    s = LmdbStore(tmp / f"check-{uuid.uuid4()}")
    s.install_snapshot(snapshot, force=True)
    d = s.dump()
    s.close()
    return d


def test_backup_from_a_running_cluster_restores_to_identical_state(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path / "a", nodes=3)
    c.start()
    try:
        for nid in c.ids:
            c.wait_serving(nid)
        c.wait_leader()
        _workload(c, tmp_path)
        backup = tmp_path / "backup.tls"
        r = subprocess.run([*TL, "backup", "--dir", str(c.dir), "--out", str(backup), "--json"], capture_output=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        header = json.loads(r.stdout)
        assert header["applied_index"] > 0 and header["registry_version"] == 1
        backed_up = _dump_file(backup, tmp_path)
        assert backed_up["engine"]["intents"]
    finally:
        c.close()
    r = subprocess.run([*TL, "restore", str(backup), "--dir", str(tmp_path / "b"), "--base-port",
                        str(free_base_port(3)), "--admin-key", str(tmp_path / "a" / "admin_ed25519"), "--json"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    b = LocalCluster(tmp_path / "b")
    b.start()
    try:
        for nid in b.ids:
            b.wait_serving(nid)
        b.wait_leader()
        for nid in b.ids:
            assert _comparable(b.dump(nid)) == _comparable(backed_up)
        # The restored cluster takes writes, and its admin is the backup's admin.
        keys = subprocess.run([*TL, "keys", "list", "--dir", str(b.dir), "--json"], capture_output=True, timeout=60)
        assert keys.returncode == 0, keys.stderr
        assert {k["developer"] for k in json.loads(keys.stdout)["keys"]} >= {"admin", "alice", "bob", "carol"}
        leader = b.wait_leader()
        with b.client(leader) as cl:
            r2 = cl.put("t", "after-restore", "x")
        assert r2["ok"] and r2["result"]["index"] > header["applied_index"]
    finally:
        b.close()


def test_disaster_recovery_from_the_one_surviving_node(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path / "a", nodes=3)
    c.start()
    try:
        for nid in c.ids:
            c.wait_serving(nid)
        leader = c.wait_leader()
        _workload(c, tmp_path)
        with c.client(leader) as cl:
            for i in range(50):
                r = until_available(lambda: cl.put("t", f"k{i}", "v"))  # noqa: B023 (called at once)
                assert r["ok"], r
        survivor = next(n for n in c.ids if n != leader)
        c.wait_applied(r["result"]["index"], [survivor])
        for nid in c.ids:
            if nid != survivor:
                c.kill(nid)
        c.stop(survivor)  # the operator stops the survivor before recovering from its data
        from tetherlab.cluster.replica.lmdbstore import LmdbStore

        s = LmdbStore(c.data_dir(survivor) / "state")
        survivor_state = s.dump()
        s.close()
    finally:
        c.close()
    r = subprocess.run([*TL, "recover", "--config", str(tmp_path / "a" / survivor / "node.toml"), "--dir",
                        str(tmp_path / "r"), "--base-port", str(free_base_port(1)),
                        "--admin-key", str(tmp_path / "a" / "admin_ed25519"), "--json"], capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    rc = LocalCluster(tmp_path / "r")
    rc.start()
    try:
        rc.wait_serving("n1")
        rc.wait_leader()
        recovered = rc.dump("n1")
        assert _comparable(recovered) == _comparable(survivor_state)
        assert all(f"k{i}" in recovered["records"]["t"] for i in range(50))
        with rc.client("n1") as cl:
            assert until_available(lambda: cl.put("t", "after-recovery", "x"))["ok"]
    finally:
        rc.close()
