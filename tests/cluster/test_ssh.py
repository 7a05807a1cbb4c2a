"""The SSH endpoint with OpenSSH's own client and keys made by ssh-keygen, and the shim client
library: authentication, host key pinning, roles, bad input, redirects, no-quorum answers."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tetherlab.cluster import protocol as p
from tetherlab.cluster.ops.localcluster import LocalCluster
from tetherlab.shim.client import (
    ClusterUnavailable,
    HostKeyMismatch,
    Master,
    MasterClient,
    RequestError,
    masters_from_cluster_file,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("ssh") is None or shutil.which("ssh-keygen") is None,
                       reason="OpenSSH client not installed (make test installs it)"),
]
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]
HELLO = {"type": "hello", "id": 1, "versions": [1], "client_name": "openssh-test", "client_version": "1"}


def keygen(path: Path, kind: str, comment: str) -> Path:
    args = ["ssh-keygen", "-q", "-N", "", "-C", comment, "-f", str(path), "-t", kind]
    if kind == "ecdsa":
        args += ["-b", "256"]
    if kind == "rsa":
        args += ["-b", "2048"]
    subprocess.run(args, check=True, timeout=60)
    return path


def openssh(c: LocalCluster, nid: str, key: Path, user: str, lines: list[str | dict]) -> subprocess.CompletedProcess:
    ssh = c.cluster.by_id()[nid].ssh
    data = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    return subprocess.run(["ssh", *SSH_OPTS, "-p", str(ssh.port), "-i", str(key), "-s", f"{user}@{ssh.host}",
                           "tetherlab"], input=data.encode(), capture_output=True, timeout=60)


def replies(proc: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(ln) for ln in proc.stdout.decode().splitlines() if ln.strip()]


def admin(c: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "tetherlab.cluster.cli", *args, "--dir", str(c.dir)],
                          capture_output=True, timeout=120)


@pytest.fixture
def leader(cluster3: LocalCluster) -> str:
    nid = cluster3.wait_leader()
    # The first leader registers the bootstrap admin key; wait for it to be applied everywhere.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if all("keys" in cluster3.dump(n)["records"] for n in cluster3.ids):
            return nid
        time.sleep(0.2)
    raise AssertionError("bootstrap admin key never appeared")


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_openssh_client_with_registered_key_exchanges_hello(cluster3: LocalCluster, leader: str, tmp_path: Path,
                                                            kind: str) -> None:
    key = keygen(tmp_path / f"dev_{kind}", kind, f"dana-{kind}")
    added = admin(cluster3, "keys", "add", "dana", str(key) + ".pub")
    assert added.returncode == 0, added.stderr.decode()
    for nid in cluster3.ids:  # every node authenticates from its replicated registry
        proc = openssh(cluster3, nid, key, "dana", [HELLO, {"type": "ping", "id": 2}])
        assert proc.returncode == 0, proc.stderr.decode()
        got = replies(proc)
        assert got[0]["type"] == "hello_ok" and got[0]["version"] == 1 and got[0]["node_id"] == nid
        assert got[1] == {"type": "result", "id": 2, "payload": {"pong": True, "node": nid}}


def test_unregistered_key_is_refused_at_authentication(cluster3: LocalCluster, leader: str, tmp_path: Path) -> None:
    key = keygen(tmp_path / "stranger", "ed25519", "stranger")
    proc = openssh(cluster3, leader, key, "stranger", [HELLO])
    assert proc.returncode == 255
    assert b"Permission denied (publickey)" in proc.stderr
    # A registered key under another developer's name is refused too.
    proc = openssh(cluster3, leader, cluster3.dir / "admin_ed25519", "mallory", [HELLO])
    assert b"Permission denied (publickey)" in proc.stderr


def test_only_the_tetherlab_subsystem_is_served(cluster3: LocalCluster, leader: str) -> None:
    ssh = cluster3.cluster.by_id()[leader].ssh
    proc = subprocess.run(["ssh", *SSH_OPTS, "-p", str(ssh.port), "-i", str(cluster3.dir / "admin_ed25519"),
                           f"admin@{ssh.host}", "id"], capture_output=True, timeout=60)
    assert proc.returncode != 0
    assert b"only the 'tetherlab' subsystem" in proc.stderr


def test_bad_input_gets_errors_and_changes_nothing(cluster3: LocalCluster, leader: str) -> None:
    before = {n: cluster3.dump(n)["records"] for n in cluster3.ids}
    huge = '{"type":"ping","id":9,"pad":"' + "x" * (p.MAX_FRAME_BYTES + 10) + '"}'
    flood = [{"type": "ping", "id": 1000 + i} for i in range(200)]
    lines: list[str | dict] = [
        HELLO, "garbage", '{"type": "ping", "id": 2', "[1,2]", {"type": "launch_missiles", "id": 3},
        {"type": "keys_add", "id": 4, "developer": 7, "public_key": "x"}, {"type": "keys_revoke", "id": 5},
        huge, "\xff\xfe", *flood, {"type": "ping", "id": 6},
    ]
    proc = openssh(cluster3, leader, cluster3.dir / "admin_ed25519", "admin", lines)
    got = replies(proc)
    codes = [r.get("code") for r in got if r["type"] == "error"]
    for code in ("bad_json", "not_object", "unknown_type", "bad_field", "missing_field", "frame_too_large",
                 "too_many_requests"):
        assert code in codes, (code, codes)
    answered = {r.get("id") for r in got}
    assert all(1000 + i in answered for i in range(200)) and 6 in answered  # a flood is refused, not dropped
    assert all(cluster3.alive(n) for n in cluster3.ids)
    again = replies(openssh(cluster3, leader, cluster3.dir / "admin_ed25519", "admin",
                            [HELLO, {"type": "ping", "id": 2}]))
    assert again[1] == {"type": "result", "id": 2, "payload": {"pong": True, "node": leader}}
    assert {n: cluster3.dump(n)["records"] for n in cluster3.ids} == before


def test_developer_key_cannot_run_admin_commands(cluster3: LocalCluster, leader: str, tmp_path: Path) -> None:
    key = keygen(tmp_path / "dev", "ed25519", "erin")
    assert admin(cluster3, "keys", "add", "erin", str(key) + ".pub").returncode == 0
    proc = openssh(cluster3, leader, key, "erin", [HELLO, {"type": "keys_list", "id": 2},
                                                   {"type": "concepts_push", "id": 3, "toml": "[[concept]]"},
                                                   {"type": "intents_revoke", "id": 4, "intent_id": "i-1"}])
    errs = {r["id"]: r["code"] for r in replies(proc) if r["type"] == "error"}
    assert errs == {2: "forbidden", 3: "forbidden", 4: "forbidden"}


def test_followers_redirect_to_the_leader(cluster3: LocalCluster, leader: str) -> None:
    leader_ssh = str(cluster3.cluster.by_id()[leader].ssh)
    for nid in cluster3.ids:
        if nid == leader:
            continue
        got = replies(openssh(cluster3, nid, cluster3.dir / "admin_ed25519", "admin",
                              [HELLO, {"type": "keys_list", "id": 2}]))
        assert got[1] == {"type": "redirect", "id": 2, "leader_id": leader, "leader_address": leader_ssh}


def test_revoking_a_key_ends_its_open_sessions(cluster3: LocalCluster, leader: str, tmp_path: Path) -> None:
    key = keygen(tmp_path / "dev", "ed25519", "fay")
    out = admin(cluster3, "keys", "add", "fay", str(key) + ".pub", "--json")
    key_id = json.loads(out.stdout)["key"]["id"]
    ssh = cluster3.cluster.by_id()[leader].ssh
    proc = subprocess.Popen(["ssh", *SSH_OPTS, "-p", str(ssh.port), "-i", str(key), "-s", f"fay@{ssh.host}",
                             "tetherlab"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write((json.dumps(HELLO) + "\n").encode())
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline())["type"] == "hello_ok"
    assert admin(cluster3, "keys", "revoke", key_id).returncode == 0
    proc.wait(timeout=20)  # the node closed the connection
    assert openssh(cluster3, leader, key, "fay", [HELLO]).returncode == 255


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_client_refuses_a_node_with_the_wrong_host_key(cluster3: LocalCluster, leader: str) -> None:
    masters = masters_from_cluster_file(cluster3.dir / "cluster.toml")
    other = cluster3.cluster.host_keys[next(n for n in cluster3.ids if n != masters[0].id)]
    wrong = [Master(masters[0].id, masters[0].host, masters[0].port, other)]

    async def go() -> None:
        c = MasterClient(wrong, cluster3.dir / "admin_ed25519", "admin")
        try:
            await c.call(p.Ping, 10)
        finally:
            await c.close()

    with pytest.raises(HostKeyMismatch):
        run(go())


def test_client_follows_the_leader_and_survives_its_death(cluster3: LocalCluster, leader: str) -> None:
    masters = masters_from_cluster_file(cluster3.dir / "cluster.toml")
    follower_first = sorted(masters, key=lambda m: m.id == leader)  # start on a follower

    async def go() -> tuple[str | None, str | None, int]:
        c = MasterClient(follower_first, cluster3.dir / "admin_ed25519", "admin")
        c._rr = 0
        try:
            keys = await c.call(p.KeysList, 20)
            first = c.leader_id
            # The shim asks for AES-GCM first (one AEAD call per packet; ChaCha20 costs 6x more).
            ciphers = {link.conn.get_extra_info("send_cipher") for link in c._links.values()}
            assert ciphers == {"aes128-gcm@openssh.com"}, ciphers
            cluster3.kill(leader)
            keys2 = await c.call(p.KeysList, 30)
            assert keys2 == keys
            return first, c.leader_id, len(keys["keys"])
        finally:
            await c.close()

    first, second, n = run(go())
    assert first == leader and second not in (None, leader) and n == 1


def test_without_quorum_every_request_is_unavailable_within_a_bound(cluster3: LocalCluster, leader: str) -> None:
    survivor = next(n for n in cluster3.ids if n != leader)
    for n in cluster3.ids:
        if n != survivor:
            cluster3.kill(n)
    masters = [m for m in masters_from_cluster_file(cluster3.dir / "cluster.toml") if m.id == survivor]

    async def go() -> float:
        c = MasterClient(masters, cluster3.dir / "admin_ed25519", "admin")
        t0 = time.monotonic()
        try:
            with pytest.raises(ClusterUnavailable):
                await c.call(p.KeysList, 8)
            return time.monotonic() - t0
        finally:
            await c.close()

    elapsed = run(go())
    assert elapsed < 20
    # And on the wire: the survivor answers `unavailable`, never a result.
    got = replies(openssh(cluster3, survivor, cluster3.dir / "admin_ed25519", "admin",
                          [HELLO, {"type": "keys_list", "id": 2}]))
    assert got[1]["type"] == "unavailable" and got[1]["reason"] in ("no_leader", "no_quorum")


def test_refusals_name_what_was_wrong(cluster3: LocalCluster, leader: str) -> None:
    async def go() -> RequestError:
        c = MasterClient(masters_from_cluster_file(cluster3.dir / "cluster.toml"), cluster3.dir / "admin_ed25519",
                         "admin")
        try:
            with pytest.raises(RequestError) as e:
                await c.call(p.KeysAdd, 20, developer="gus", public_key="ssh-ed25519 not-base64")
            return e.value
        finally:
            await c.close()

    err = run(go())
    assert err.code == "bad_key" and "ssh-ed25519" in err.message
