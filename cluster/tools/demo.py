"""``tetherlab demo``: the seed's walkthrough with three scripted agents run by real ``tether``
processes against a local cluster (started here if none is running).

Alice's agent migrates auth to JWT and deprecates the session store contract; Bob's builds
route handlers on that contract and is stopped, naming Alice's agent and the concept; Carol's
adds invoice export and continues with a world slice of her concepts only.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tetherlab.cluster import protocol as p
from tetherlab.cluster.core.config import ConfigError
from tetherlab.cluster.core.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from tetherlab.cluster.ops.client import cluster_status
from tetherlab.cluster.ops.config import load_cluster_file
from tetherlab.cluster.ops.keys import generate_key_pair
from tetherlab.cluster.ops.localcluster import LocalCluster
from tetherlab.shim.client import MasterClient, RequestError, masters_from_cluster_file

DEMO_REMOTE = "git@example.com:acme/shop.git"
STEP_TIMEOUT_S = 60.0

REGISTRY = """\
[[concept]]
id = "auth.session-store-contract"
title = "Session store contract"
description = "The interface every session store implements; route handlers and middleware rely on it."
paths = ["src/auth/session_store.py"]
symbols = ["SessionStore"]
aliases = ["session store", "session cookies", "session middleware"]

[[concept]]
id = "auth.jwt"
title = "JWT verification"
paths = ["src/auth/jwt/**"]
aliases = ["jwt", "json web token"]
depends_on = ["auth.session-store-contract"]

[[concept]]
id = "api.routes"
title = "Route handlers"
paths = ["src/api/routes/**"]
aliases = ["route handlers", "route handler"]
depends_on = ["auth.session-store-contract"]

[[concept]]
id = "billing.invoices"
title = "Invoices"
paths = ["src/billing/**"]
aliases = ["invoice", "invoices"]

[[concept]]
id = "billing.pdf"
title = "PDF rendering"
paths = ["src/billing/pdf/**"]
aliases = ["pdf export", "pdf"]
depends_on = ["billing.invoices"]

[[concept]]
id = "search.index"
title = "Search index"
paths = ["src/search/**"]
aliases = ["search index"]
"""

AGENTS: dict[str, dict[str, Any]] = {
    "alice": {"tool": "claude-code", "plan": {
        "summary": "Refactor auth layer to use JWT instead of session cookies",
        "steps": ["Replace cookie-based session middleware with JWT verification",
                  "Deprecate the in-memory session store"]}},
    "bob": {"tool": "opencode", "plan": {
        "summary": "Add order route handlers",
        "steps": ["Write route handlers for /orders that read the user from the session store"]}},
    "carol": {"tool": "claude-code", "plan": {
        "summary": "Add invoice PDF export",
        "steps": ["Render each invoice as PDF", "Add a download link"], "files": ["src/billing/export.py"]}},
}

SCRIPTED_AGENT = textwrap.dedent('''
    import json, os, sys, time
    spec = json.load(open(sys.argv[1]))
    print("<<<TETHERLAB-PLAN")
    print(json.dumps(spec["plan"]))
    print("TETHERLAB-PLAN>>>", flush=True)
    deadline = time.time() + spec["max_s"]
    while time.time() < deadline and not os.path.exists(spec["release_file"]):
        time.sleep(0.1)
    print("<<<TETHERLAB-DONE\\n{}\\nTETHERLAB-DONE>>>", flush=True)
    time.sleep(0.3)
''')


class _Run:
    def __init__(self, name: str, cmd: list[str], cwd: Path, t0: float, say: Any) -> None:
        self.name = name
        self.events: list[dict[str, Any]] = []
        self.verdict: dict[str, Any] | None = None
        self.world: dict[str, Any] | None = None
        self.got_verdict = threading.Event()
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self._t0 = t0
        self._say = say
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("{"):
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            self.events.append(ev)
            kind = ev.get("event")
            if kind == "verdict" and self.verdict is None:
                self.verdict = ev["verdict"]
                self.got_verdict.set()
                self._say(self._t0, self.name, describe_verdict(ev["verdict"]))
            elif kind == "world":
                self.world = ev.get("world")
            elif kind in ("session", "stopping", "complete", "exited", "unavailable", "refused", "error"):
                self._say(self._t0, self.name, ev.get("message", kind))
        self.got_verdict.set()

    def wait(self, timeout_s: float) -> int:
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            code = self.proc.wait(10)
        self._reader.join(5)
        return code


def describe_verdict(v: dict[str, Any]) -> str:
    claims = v.get("claims", {})
    mods = ", ".join(c["concept"] for c in claims.get("modify", []))
    deps = ", ".join(c["concept"] for c in claims.get("depend", []))
    text = f"verdict {v.get('action').upper()} for {v.get('intent_id')} (modify: {mods or '-'}; depend: {deps or '-'})"
    for c in v.get("conflicts", [])[:2]:
        text += (f"\n{'':>12}conflict on {c['concept']} [{c['kind']}]: held by {c['holder_agent_id']} "
                 f"— \"{c['holder_summary']}\"")
    return text


# (tmp folder, cluster folder, keys folder, git remote, --json, say) -> exit code
Walkthrough = Callable[[Path, Path, Path, str, bool, Callable[[float, str, str], None]], int]


def run_demo(directory: Path, as_json: bool, walkthrough: Walkthrough | None = None) -> int:
    """Start (or find) the cluster, register the demo's developers and registry, then run the
    walkthrough: the scripted agents here, or another (``tetherlab demo --agents real``)."""
    out = sys.stderr

    def say(t0: float, who: str, msg: str) -> None:
        if not as_json:
            print(f"[{time.monotonic() - t0:5.1f}s] {who:>5}: {msg}", file=out, flush=True)

    directory = directory.resolve()
    cluster_file = directory / "cluster.toml"
    started: LocalCluster | None = None
    if not cluster_file.exists() or _leader(cluster_file) is None:
        if not as_json:
            print(f"no running cluster in {directory}: starting a local three-node cluster", file=out)
        started = LocalCluster(directory, nodes=3)
    try:
        if started is not None:  # inside the try: nodes that never elect a leader are stopped too
            started.start()
            for nid in started.ids:
                started.wait_serving(nid)
            started.wait_leader()
        cf = load_cluster_file(cluster_file)
        if cf.admin_key is None:
            raise ConfigError(f"{cluster_file} names no admin_key")
        keys_dir = directory / "demo-keys"
        keys_dir.mkdir(exist_ok=True)
        for dev in AGENTS:
            key = keys_dir / dev
            if not key.exists():
                generate_key_pair(key, f"{dev}@demo")
        remote = asyncio.run(_prepare(cluster_file, cf.admin_key, cf.developer or "admin", keys_dir))
        with tempfile.TemporaryDirectory(prefix="tetherlab-demo-") as tmp:
            return (walkthrough or _walkthrough)(Path(tmp), directory, keys_dir, remote, as_json, say)
    finally:
        if started is not None:
            started.close()


def _leader(cluster_file: Path) -> str | None:
    try:
        leader: str | None = cluster_status(load_cluster_file(cluster_file), timeout_s=1.0)["leader"]
        return leader
    except ConfigError:
        return None


async def _prepare(cluster_file: Path, admin_key: Path, admin_name: str, keys_dir: Path) -> str:
    """Register the three developers and push the registry; return the cluster's git remote."""
    c = MasterClient(masters_from_cluster_file(cluster_file), admin_key, admin_name, client_name="tetherlab-demo")
    try:
        for dev in AGENTS:
            try:
                await c.call(p.KeysAdd, 30, developer=dev, public_key=(keys_dir / f"{dev}.pub").read_text().strip())
            except RequestError as e:
                if e.code != "key_exists":
                    raise
        await c.call(p.ConceptsPush, 30, toml=REGISTRY)
        status = await c.call(p.Status, 30)
        return str(status.get("remote") or DEMO_REMOTE)
    finally:
        await c.close()


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=demo@tetherlab", "-c", "user.name=demo", *args],
                   check=True, capture_output=True, timeout=30)


def _walkthrough(tmp: Path, directory: Path, keys_dir: Path, remote: str, as_json: bool, say: Any) -> int:
    release = tmp / "release"
    runs: dict[str, _Run] = {}
    t0 = time.monotonic()
    for name in ("alice", "bob", "carol"):
        repo = tmp / f"{name}-laptop" / "shop"
        repo.mkdir(parents=True)
        _git(repo, "init", "-q")
        _git(repo, "remote", "add", "origin", remote)
        (repo / "README.md").write_text("shop\n")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-qm", "base")
        spec = {**AGENTS[name], "release_file": str(release), "max_s": STEP_TIMEOUT_S}
        spec_file = tmp / f"{name}.json"
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "tetherlab.shim.cli", "run", "--cluster", str(directory / "shim.toml"),
               "--key", str(keys_dir / name), "--developer", name, "--tool", AGENTS[name]["tool"], "--json",
               "--", sys.executable, "-c", SCRIPTED_AGENT, str(spec_file)]
        runs[name] = _Run(name, cmd, repo, t0, say)
        if not runs[name].got_verdict.wait(STEP_TIMEOUT_S):
            break
        if name == "bob":
            runs[name].wait(STEP_TIMEOUT_S)  # Bob's agent is stopped; his tether exits
    # Give Carol's tether a moment to write her world slice, then let every agent finish.
    deadline = time.monotonic() + 5
    while runs.get("carol") and runs["carol"].world is None and time.monotonic() < deadline:
        time.sleep(0.1)
    release.write_text("done")
    for r in runs.values():
        r.wait(STEP_TIMEOUT_S)
    result: dict[str, Any] = {name: r.verdict for name, r in runs.items()}
    result["world"] = {name: sorted(c["id"] for c in (r.world or {}).get("concepts", [])) for name, r in runs.items()
                       if r.world is not None}
    ok = (
        (result.get("alice") or {}).get("action") == "continue"
        and (result.get("bob") or {}).get("action") == "stop"
        and (result.get("carol") or {}).get("action") == "continue"
    )
    if as_json:
        print(json.dumps(result))
    else:
        print(f"\ncarol's world slice: {', '.join(result['world'].get('carol', [])) or '(none)'}", file=sys.stderr)
        print("walkthrough " + ("as expected" if ok else "NOT as expected"), file=sys.stderr)
    return EXIT_OK if ok else EXIT_FAILED


def main(directory: str, as_json: bool) -> int:
    try:
        return run_demo(Path(directory), as_json)
    except (ConfigError, OSError, subprocess.CalledProcessError) as e:
        print(f"tetherlab demo: {e}", file=sys.stderr)
        return EXIT_USAGE

