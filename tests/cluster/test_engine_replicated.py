"""The coordination engine inside the replicated state machine: every replica that applies
the same log ends with identical state (full LMDB dumps compared), across restarts too."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tetherlab.cluster import protocol as p
from tetherlab.cluster.ops.keys import generate_key_pair
from tetherlab.cluster.ops.localcluster import LocalCluster
from tetherlab.shim.client import MasterClient, masters_from_cluster_file

from conftest import running_cluster

pytestmark = pytest.mark.slow
REGISTRY = "".join(
    f'[[concept]]\nid = "area.c{i}"\ntitle = "C{i}"\naliases = ["thing {i}"]\n'
    + (f'depends_on = ["area.c{i - 1}"]\n' if i % 3 else "")
    + ("dependents = \"continue\"\n" if i % 5 == 0 else "")
    + "\n"
    for i in range(12)
)


def full_dumps(c: LocalCluster, timeout_s: float = 20.0) -> dict[str, dict]:
    """Every live replica's dump, all taken at one applied index (the leader keeps appending
    entries, so dumps are retaken until they agree on the index): replicas are only ever
    compared with each other at the same index, never with an earlier dump."""
    deadline = time.monotonic() + timeout_s
    while True:
        dumps = {n: c.dump(n) for n in c.ids if c.alive(n)}
        if len({d["applied_index"] for d in dumps.values()}) == 1:
            return dumps
        if time.monotonic() > deadline:
            raise AssertionError(f"replicas never agreed on an applied index: "
                                 f"{ {n: d['applied_index'] for n, d in dumps.items()} }")
        time.sleep(0.1)


async def workload(c: LocalCluster, keys: dict[str, Path]) -> list[dict]:
    masters = masters_from_cluster_file(c.dir / "cluster.toml")
    admin = MasterClient(masters, c.dir / "admin_ed25519", "admin")
    for dev, key in keys.items():
        pub = (key.parent / (key.name + ".pub")).read_text().strip()
        await admin.call(p.KeysAdd, 20, developer=dev, public_key=pub)
    await admin.call(p.ConceptsPush, 20, toml=REGISTRY)
    verdicts: list[dict] = []
    clients = {dev: MasterClient(masters, key, dev) for dev, key in keys.items()}
    agents = []
    for i, (dev, cl) in enumerate(sorted(clients.items()) * 3):
        aid = f"{dev}/{uuid.uuid4()}"
        agents.append((cl, aid))
        await cl.call(p.OpenSession, 20, agent_id=aid, tool="t", machine="m", repo_remote="git@x:y/z.git",
                      base_commit="abcdef1")
        v = await cl.call(p.SubmitIntent, 20, agent_id=aid, tool="t", trigger="initial",
                          intent=p.Intent(summary=f"work on thing {i % 6} and thing {(i * 5) % 12}", steps=("x",)))
        verdicts.append(v)
    for cl, aid in agents[::2]:
        await cl.heartbeat([aid])
    granted = [(cl, aid, v) for (cl, aid), v in zip(agents, verdicts, strict=True) if v["action"] == "continue"]
    for cl, aid, v in granted[:2]:
        await cl.call(p.Complete, 20, agent_id=aid, intent_id=v["intent_id"])
    if len(granted) > 2:
        await admin.call(p.IntentsRevoke, 20, intent_id=granted[2][2]["intent_id"], revert=True)
    for cl in [admin, *clients.values()]:
        await cl.close()
    return verdicts


async def one_more_plan(c: LocalCluster, key: Path, i: int) -> None:
    cl = MasterClient(masters_from_cluster_file(c.dir / "cluster.toml"), key, "ann")
    aid = f"ann/{uuid.uuid4()}"
    await cl.call(p.OpenSession, 20, agent_id=aid, tool="t", machine="m", repo_remote="git@x:y/z.git",
                  base_commit="abcdef1")
    await cl.call(p.SubmitIntent, 20, agent_id=aid, tool="t", trigger="initial",
                  intent=p.Intent(summary=f"work on thing {i % 12}", steps=("x",)))
    await cl.close()


def wait_bootstrapped(c: LocalCluster, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all("keys" in c.dump(n)["records"] for n in c.ids):
            return
        time.sleep(0.1)
    raise AssertionError("the bootstrap admin key never appeared")


@pytest.fixture
def cluster3_worker(tmp_path: Path) -> Iterator[LocalCluster]:
    """Three nodes whose leader matches plans in its match worker process (cluster/node/matcher.py)."""
    with running_cluster(tmp_path, extra_toml='[matching]\nworker = "on"\n') as c:
        yield c


def metrics_text(c: LocalCluster, nid: str) -> str:
    node = next(n for n in c.cluster.nodes if n.id == nid)
    with urllib.request.urlopen(f"http://{node.http}/metrics", timeout=5) as r:
        return r.read().decode()


def proposer_matches(c: LocalCluster, nid: str) -> dict[str, float]:
    found = re.finditer(r'^tetherlab_proposer_matches_total\{where="(\w+)"\} (\S+)$', metrics_text(c, nid), re.M)
    return {m.group(1): float(m.group(2)) for m in found}


def wait_match_worker(c: LocalCluster, nid: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while "tetherlab_match_worker_up 1.0" not in metrics_text(c, nid):
        assert time.monotonic() < deadline, f"{nid}'s match worker never came up"
        time.sleep(0.1)


def test_replicas_end_with_identical_state_and_survive_restart(cluster3_worker: LocalCluster, tmp_path: Path) -> None:
    """With the leader's plans matched in its worker process: the claims it put in the log make
    the same verdicts and the same state on every replica."""
    cluster3 = cluster3_worker
    leader = cluster3.wait_leader()
    wait_match_worker(cluster3, leader)
    wait_bootstrapped(cluster3)
    keys = {}
    for dev in ("ann", "ben", "cat"):
        generate_key_pair(tmp_path / dev, dev)
        keys[dev] = tmp_path / dev
    verdicts = asyncio.run(workload(cluster3, keys))
    actions = {v["action"] for v in verdicts}
    assert {"continue", "stop"} <= actions, actions
    tokens = [v["fencing_token"] for v in verdicts if v["action"] == "continue"]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    # The worker is sent the registry with the first plan and matches once it has built it (the
    # loop matches meanwhile): more plans until one was matched there, then every replica is
    # compared with claims the worker made in the log.
    submitted = len(verdicts)
    deadline = time.monotonic() + 30
    while (matched := proposer_matches(cluster3, leader)).get("worker", 0) < 1 or sum(matched.values()) < submitted:
        assert time.monotonic() < deadline, matched
        if sum(matched.values()) >= submitted:
            asyncio.run(one_more_plan(cluster3, keys["ann"], submitted))
            submitted += 1
        time.sleep(0.3)  # /metrics is cached for a moment ([limits] http_cache_s)
    assert sum(matched.values()) == submitted, matched
    dumps = full_dumps(cluster3)
    a, b, c = (dumps[n] for n in cluster3.ids)
    assert a["engine"]["intents"] and a == b == c
    # Kill one replica and restart it: it rebuilds its engine from its records and the log.
    victim = cluster3.ids[0]
    cluster3.kill(victim)
    cluster3.start(victim)
    cluster3.wait_serving(victim)
    dumps2 = full_dumps(cluster3)
    # Compared with each other at one applied index (the cluster moved on meanwhile: its clock,
    # expiry sweeps), and nothing the victim held before is missing.
    assert len({str(d) for d in dumps2.values()}) == 1
    assert dumps2[victim]["applied_index"] >= a["applied_index"]
    assert set(a["engine"]["intents"]) <= set(dumps2[victim]["engine"]["intents"])


def test_a_code_index_pushed_with_the_registry_reaches_every_replica(cluster3: LocalCluster, tmp_path: Path) -> None:
    """``tetherlab concepts push --index`` sends the index in chunks (more than one frame's
    worth here), every replica installs the same one, matching uses it, and a restarted replica
    rebuilds it from its records."""
    import json
    import random
    import subprocess
    import sys

    from tetherlab.cluster.core.engine.codeindex import CodeIndex, Symbol

    cluster3.wait_leader()
    wait_bootstrapped(cluster3)
    rng = random.Random(7)
    files = {f"src/pkg{i % 40}/m{rng.getrandbits(48):x}.py": [Symbol(f"C{rng.getrandbits(64):x}", "class", 1, 9),
                                                             Symbol(f"f{rng.getrandbits(64):x}", "function", 10, 19)]
             for i in range(8000)}
    files["src/core/engine.py"] = [Symbol("Engine", "class", 1, 300), Symbol("Engine._tick", "method", 40, 60)]
    idx = CodeIndex(files)
    (tmp_path / "index.json").write_bytes(idx.canonical())
    (tmp_path / "concepts.toml").write_text('[[concept]]\nid = "core.engine"\npaths = ["src/core/"]\n')
    tetherlab = [sys.executable, "-m", "tetherlab.cluster.cli"]
    r = subprocess.run([*tetherlab, "concepts", "push", str(tmp_path / "concepts.toml"), "--index",
                        str(tmp_path / "index.json"), "--cluster", str(cluster3.dir / "cluster.toml"), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["index_version"] == 1

    async def plan() -> dict:
        masters = masters_from_cluster_file(cluster3.dir / "cluster.toml")
        admin = MasterClient(masters, cluster3.dir / "admin_ed25519", "admin")
        aid = f"admin/{uuid.uuid4()}"
        await admin.call(p.OpenSession, 20, agent_id=aid, tool="t", machine="m", repo_remote="git@x:y/z.git",
                         base_commit="abcdef1")
        v = await admin.call(p.SubmitIntent, 20, agent_id=aid, tool="t", trigger="initial",
                             intent=p.Intent(summary="Make `Engine._tick` cheaper", steps=()))
        await admin.close()
        return dict(v)

    v = asyncio.run(plan())
    assert [c["concept"] for c in v["claims"]["modify"]] == ["core.engine"] and v["claims"]["index_version"] == 1
    dumps = full_dumps(cluster3)
    chunks = {n: sorted(k for k in d["engine"].get("index", {}) if k.startswith("chunk/")) for n, d in dumps.items()}
    assert len(next(iter(chunks.values()))) >= 2 and len({str(c) for c in chunks.values()}) == 1
    assert len({str(d) for d in dumps.values()}) == 1
    victim = cluster3.ids[1]
    cluster3.kill(victim)
    cluster3.start(victim)
    cluster3.wait_serving(victim)
    assert len({str(d) for d in full_dumps(cluster3).values()}) == 1
