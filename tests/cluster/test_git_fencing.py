"""Push-time fencing end to end: a real cluster, a real bare repository with the pre-receive hook
`tetherlab git install-hook` writes, two clones whose commits carry claims through the hooks
`tether run` gives its agent (shim/githooks.py), real SSH keys (a verifier key on the "server")."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tetherlab.cluster import protocol as p
from tetherlab.cluster.ops.localcluster import LocalCluster
from tetherlab.shim.client import MasterClient, masters_from_cluster_file
from tetherlab.shim.githooks import RunHooks

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")]
REMOTE = "git@example.com:acme/shop.git"
REGISTRY = """
[[concept]]
id = "auth.sessions"
title = "Session store"
paths = ["src/auth/"]

[[concept]]
id = "billing.invoices"
title = "Invoices"
paths = ["src/billing/"]
"""
TL = [sys.executable, "-m", "tetherlab.cluster.cli"]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-f", str(path)], check=True, timeout=60)
    return path


def git(repo: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        raise AssertionError(f"git {args}: {r.stdout}{r.stderr}")
    return r


class Dev:
    """A developer: a key, a session for one agent, a clone, and the hooks tether gives it."""

    def __init__(self, world: World, name: str) -> None:
        self.w = world
        self.name = name
        self.key = keygen(world.tmp / name)
        self.agent = f"{name}/{uuid.uuid4()}"
        self.clone = world.tmp / f"clone-{name}"
        git(world.tmp, "clone", "-q", str(world.bare), str(self.clone))
        git(self.clone, "config", "user.email", f"{name}@example.com")
        git(self.clone, "config", "user.name", name)
        verify = [*TL, "git", "verify", "--pre-push", "--cluster", str(world.shim_toml), "--key", str(self.key),
                  "--developer", name]
        self.hooks = RunHooks(self.clone, world.tmp / f"hooks-{name}", verify)
        self.env: dict[str, str] = {}

    def commit(self, path: str, text: str = "x\n") -> str:
        f = self.clone / path
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
        git(self.clone, "add", path, env=self.env)
        git(self.clone, "commit", "-qm", f"change {path}", env=self.env)
        return git(self.clone, "rev-parse", "HEAD").stdout.strip()

    def push(self, no_verify: bool = True) -> subprocess.CompletedProcess:
        """Pushes skip the client-side check by default, so the server's hook is what is tested."""
        git(self.clone, "pull", "-q", "--rebase", "origin", "main", env=self.env, check=False)
        return git(self.clone, "push", *(["--no-verify"] if no_verify else []), "origin", "HEAD:main",
                   env=self.env, check=False)


class World:
    def __init__(self, c: LocalCluster, tmp: Path) -> None:
        self.c, self.tmp = c, tmp
        self.cluster_toml = c.dir / "cluster.toml"
        self.shim_toml = c.dir / "shim.toml"
        self.bare = tmp / "shop.git"
        git(tmp, "init", "-q", "--bare", "-b", "main", str(self.bare))
        seed = tmp / "seed"
        git(tmp, "clone", "-q", str(self.bare), str(seed))
        (seed / "README.md").write_text("shop\n")
        git(seed, "add", "README.md")
        git(seed, "-c", "user.email=s@e", "-c", "user.name=s", "commit", "-qm", "base")
        git(seed, "push", "-q", "origin", "HEAD:main")
        self.verifier = keygen(tmp / "git-server")

    async def admin(self, cls: type[p.Request], **fields: Any) -> dict[str, Any]:
        client = MasterClient(masters_from_cluster_file(self.cluster_toml), self.c.dir / "admin_ed25519", "admin")
        try:
            return dict(await client.call(cls, 30, **fields))
        finally:
            await client.close()

    async def as_dev(self, dev: Dev, cls: type[p.Request], **fields: Any) -> dict[str, Any]:
        client = MasterClient(masters_from_cluster_file(self.cluster_toml), dev.key, dev.name)
        try:
            return dict(await client.call(cls, 30, **fields))
        finally:
            await client.close()


def setup(c: LocalCluster, tmp: Path) -> tuple[World, Dev, Dev]:
    c.wait_leader()
    w = World(c, tmp)
    alice, bob = Dev(w, "alice"), Dev(w, "bob")

    async def go() -> None:
        for d in (alice, bob):
            pub = (d.key.parent / (d.key.name + ".pub")).read_text().strip()
            await w.admin(p.KeysAdd, developer=d.name, public_key=pub)
        await w.admin(p.KeysAdd, developer="git-server", role="verifier",
                      public_key=(w.verifier.parent / "git-server.pub").read_text().strip())
        await w.admin(p.ConceptsPush, toml=REGISTRY)
        for d in (alice, bob):
            await w.as_dev(d, p.OpenSession, agent_id=d.agent, tool="test", machine="m", repo_remote=REMOTE,
                           base_commit="abcdef1")

    asyncio.run(go())
    r = subprocess.run([*TL, "git", "install-hook", "--repo", str(w.bare), "--cluster", str(w.cluster_toml),
                        "--key", str(w.verifier), "--developer", "git-server"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    for d in (alice, bob):
        d.env = d.hooks.install()
    return w, alice, bob


def grant(w: World, d: Dev, concept: str) -> dict[str, Any]:
    v = asyncio.run(w.as_dev(d, p.SubmitIntent, agent_id=d.agent, tool="test", trigger="initial",
                             intent=p.Intent(summary=f"work on {concept}", steps=("x",),
                                             concepts=p.Concepts(modify=(concept,)))))
    assert v["action"] == "continue", v
    d.hooks.set_claim(d.agent, v["intent_id"], v["fencing_token"])
    return v


def test_pushes_land_only_under_a_claim_that_still_holds(cluster3: LocalCluster, tmp_path: Path) -> None:
    w, alice, bob = setup(cluster3, tmp_path)
    # Work done under a valid claim lands.
    va = grant(w, alice, "auth.sessions")
    alice.commit("src/auth/store.py", "v1\n")
    r = alice.push()
    assert r.returncode == 0, r.stderr
    assert "commit(s) verified" in r.stderr
    # A commit made before any verdict that touches a held concept is refused, naming the holder.
    bob.commit("src/auth/bob.py")
    r = bob.push()
    assert r.returncode != 0 and "held_by_other" in r.stderr and alice.agent in r.stderr, r.stderr
    assert "src/auth/bob.py belongs to auth.sessions" in r.stderr
    git(bob.clone, "reset", "-q", "--hard", "origin/main")
    # The claim is revoked and granted to Bob: Alice's next push is refused, naming the new holder.
    alice.commit("src/auth/store.py", "v2\n")
    asyncio.run(w.admin(p.IntentsRevoke, intent_id=va["intent_id"]))
    grant(w, bob, "auth.sessions")
    r = alice.push()
    assert r.returncode != 0 and bob.agent in r.stderr, r.stderr
    assert "claim_revoked" in r.stderr
    # The client-side check says the same before anything is sent.
    r = alice.push(no_verify=False)
    assert r.returncode != 0 and "failed to push" in r.stderr and bob.agent in r.stderr
    # CI's check of a range: JSON on stdout, exit 1 for a refusal.
    r = subprocess.run([*TL, "git", "verify", "origin/main..HEAD", "--repo", str(alice.clone), "--cluster",
                        str(w.shim_toml), "--key", str(alice.key), "--developer", "alice", "--json"],
                       capture_output=True, text=True, timeout=60)
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["ok"] is False, (r.stdout, r.stderr)
    assert {x["code"] for x in out["commits"][0]["reasons"]} >= {"claim_revoked", "held_by_other"}
    git(alice.clone, "reset", "-q", "--hard", "origin/main")
    alice.hooks.clear_claim()
    # Commits that touch no concept land.
    alice.commit("docs/notes.md")
    r = alice.push()
    assert r.returncode == 0, r.stderr


def test_a_push_while_the_quorum_is_lost_is_refused(cluster3: LocalCluster, tmp_path: Path) -> None:
    w, alice, _bob = setup(cluster3, tmp_path)
    grant(w, alice, "auth.sessions")
    alice.commit("src/auth/store.py")
    leader = cluster3.wait_leader()
    for nid in cluster3.ids:
        if nid != leader:
            cluster3.kill(nid)
    r = alice.push()
    assert r.returncode != 0
    assert "quorum cannot be reached" in r.stderr and "fails closed" in r.stderr, r.stderr
    bare_head = git(w.bare, "rev-parse", "main").stdout.strip()
    assert bare_head != git(alice.clone, "rev-parse", "HEAD").stdout.strip()
