"""`tether run` end to end: real node processes, real SSH, real git repositories, and scripted
agents that are real subprocesses printing plan blocks, writing files and waiting."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tetherlab.cluster import protocol as p
from tetherlab.cluster.ops.localcluster import LocalCluster
from tetherlab.shim.client import MasterClient, masters_from_cluster_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("ssh-keygen") is None or shutil.which("git") is None,
                       reason="needs ssh-keygen and git"),
]
REMOTE = "git@example.com:acme/shop.git"
REGISTRY = """
[[concept]]
id = "auth.session-store-contract"
title = "Session store contract"
paths = ["src/auth/session_store.py"]
aliases = ["session store"]

[[concept]]
id = "billing.invoices"
title = "Invoices"
paths = ["src/billing/**"]
aliases = ["invoice"]

[[concept]]
id = "search.index"
title = "Search index"
paths = ["src/search/**"]

[[concept]]
id = "catalog.products"
title = "Products"
paths = ["src/catalog/**"]

[[concept]]
id = "money.format"
title = "Money formatting"
symbols = ["format_money"]
"""
AGENT = textwrap.dedent('''
    import json, os, signal, sys, time
    spec = json.load(open(sys.argv[1]))
    def on_signal(signum, frame):
        open(spec["stopped_file"], "w").write(str(time.time()))
        sys.exit(130)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    open(spec["pid_file"], "w").write(str(os.getpid()))
    for chunk in spec.get("noise", []):
        sys.stdout.write(chunk)
    if spec.get("binary"):
        sys.stdout.buffer.write(bytes(range(256)) * 64)
    sys.stdout.flush()
    for block in spec.get("raw_blocks", []):
        print(block, flush=True)
    plan = json.loads(sys.stdin.readline()) if spec.get("plan_from_stdin") else spec["plan"]
    print("<<<TETHERLAB-PLAN")
    print(json.dumps(plan))
    print("TETHERLAB-PLAN>>>", flush=True)
    time.sleep(spec.get("think_s", 0.5))
    for path, text in spec.get("writes", {}).items():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(path, "w").write(text)
    if spec.get("commit"):
        os.system("git add -A >/dev/null && git -c user.email=a@b -c user.name=agent commit -qm agent-work")
    if spec.get("push"):
        rc = os.system("git push -q origin HEAD:refs/heads/main 2>" + spec["push_file"] + ".err")
        open(spec["push_file"], "w").write(str(rc))
    time.sleep(spec.get("work_s", 0))
    if spec.get("done"):
        print("<<<TETHERLAB-DONE\\n{\\"summary\\": \\"finished\\"}\\nTETHERLAB-DONE>>>", flush=True)
    sys.exit(spec.get("exit", 0))
''')


def keygen(path: Path, comment: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-C", comment, "-f", str(path)], check=True,
                   timeout=60)
    return path


def tl(c: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tetherlab.cluster.cli", *args, "--dir", str(c.dir)],
                          capture_output=True, timeout=120)


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    for args in (["init", "-q"], ["remote", "add", "origin", REMOTE]):
        subprocess.run(["git", "-C", str(path), *args], check=True, timeout=30)
    (path / "README.md").write_text("shop\n")
    (path / "src").mkdir()
    (path / "src" / "app.py").write_text("print('hi')\n")
    subprocess.run(["git", "-C", str(path), "add", "-A"], check=True, timeout=30)
    subprocess.run(["git", "-C", str(path), "-c", "user.email=a@b", "-c", "user.name=dev", "commit", "-qm", "base"],
                   check=True, timeout=30)
    return path


def setup_cluster(c: LocalCluster, tmp: Path) -> dict[str, Path]:
    c.wait_leader()
    keys = {}
    for dev in ("alice", "bob", "carol"):
        keys[dev] = keygen(tmp / dev, dev)
        for _ in range(50):  # the bootstrap admin key lands a moment after the first election
            r = tl(c, "keys", "add", dev, str(keys[dev]) + ".pub")
            if r.returncode == 0:
                break
            time.sleep(0.2)
        assert r.returncode == 0, r.stderr
    (tmp / "concepts.toml").write_text(REGISTRY)
    assert tl(c, "concepts", "push", str(tmp / "concepts.toml")).returncode == 0
    return keys


class Tether:
    """A running `tether run` around the scripted agent."""

    def __init__(self, c: LocalCluster, key: Path, dev: str, repo: Path, spec: dict, fail_closed_s: float = 5.0,
                 env: dict[str, str] | None = None, stdin: int = subprocess.DEVNULL):
        self.spec = {"pid_file": str(repo.parent / f"{dev}.pid"), "stopped_file": str(repo.parent / f"{dev}.stopped"),
                     **spec}
        for f in (self.spec["pid_file"], self.spec["stopped_file"]):
            Path(f).unlink(missing_ok=True)
        spec_file = repo.parent / f"{dev}-{repo.name}.spec.json"
        spec_file.write_text(json.dumps(self.spec))
        cmd = [sys.executable, "-m", "tetherlab.shim.cli", "run", "--cluster", str(c.dir / "shim.toml"),
               "--key", str(key), "--developer", dev, "--tool", "scripted", "--json",
               "--fail-closed-s", str(fail_closed_s), "--", sys.executable, "-c", AGENT, str(spec_file)]
        env = {**os.environ, "XDG_CACHE_HOME": str(repo.parent / "cache"), **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=repo, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env)

    def wait(self, timeout_s: float = 60) -> tuple[int, str, list[dict]]:
        out, err = self.proc.communicate(timeout=timeout_s)
        events = [json.loads(ln) for ln in err.decode().splitlines() if ln.startswith("{")]
        return self.proc.returncode, out.decode(errors="replace"), events

    def agent_pid(self, timeout_s: float = 30) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                return int(Path(self.spec["pid_file"]).read_text())
            except (FileNotFoundError, ValueError):
                time.sleep(0.05)
        raise TimeoutError("the agent never started")


def active_intent(c: LocalCluster, summary: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = json.loads(tl(c, "intents", "list", "--json").stdout)
        mine = [i for i in listed["intents"] if i["summary"] == summary]
        if mine:
            return mine[0]
        time.sleep(0.1)
    raise TimeoutError(f"no active intent {summary!r}")


def intent_status(c: LocalCluster, intent_id: str) -> str:
    listed = json.loads(tl(c, "intents", "list", "--all", "--json").stdout)
    return next(i["status"] for i in listed["intents"] if i["intent_id"] == intent_id)


def verdicts(events: list[dict]) -> list[dict]:
    return [e["verdict"] for e in events if e["event"] == "verdict"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, dict[str, Path], Path]]:
    tmp = tmp_path_factory.mktemp("tether")
    c = LocalCluster(tmp / "cluster", nodes=3)
    c.start()
    try:
        for nid in c.ids:
            c.wait_serving(nid)
        keys = setup_cluster(c, tmp)
        yield c, keys, tmp
    finally:
        c.close()


def test_continue_runs_to_completion(env: tuple[LocalCluster, dict[str, Path], Path]) -> None:
    c, keys, tmp = env
    repo = make_repo(tmp / "repo-continue")
    t = Tether(c, keys["carol"], "carol", repo, {"plan": {"summary": "Add invoice PDF export", "steps": ["render"],
                                                          "files": ["src/billing/pdf.py"]},
                                                 "writes": {"src/billing/pdf.py": "pdf\n"}, "done": True})
    code, _, events = t.wait()
    assert code == 0, events
    v = verdicts(events)
    assert v and v[0]["action"] == "continue"
    assert [cl["concept"] for cl in v[0]["claims"]["modify"]] == ["billing.invoices"]
    assert any(e["event"] == "complete" for e in events)
    assert (repo / "src/billing/pdf.py").exists()
    assert not (repo / "AGENTS.md").exists(), "the sentinel section is removed when the agent exits"
    listed = json.loads(tl(c, "intents", "list", "--all", "--json").stdout)
    mine = [i for i in listed["intents"] if i["intent_id"] == v[0]["intent_id"]]
    assert mine and mine[0]["status"] == "completed"


def test_stop_ends_the_conflicting_agent_and_names_the_holder(env: tuple[LocalCluster, dict[str, Path], Path]) -> None:
    c, keys, tmp = env
    alice_repo = make_repo(tmp / "repo-alice")
    bob_repo = make_repo(tmp / "repo-bob")
    alice = Tether(c, keys["alice"], "alice", alice_repo, {
        "plan": {"summary": "Deprecate the session store", "steps": ["rewrite the session store"],
                 "concepts": {"modify": ["auth.session-store-contract"], "depend": []}},
        "work_s": 30})
    alice.agent_pid()
    time.sleep(1.5)  # alice's plan is accepted first
    bob = Tether(c, keys["bob"], "bob", bob_repo, {
        "plan": {"summary": "Build routes on the session store", "steps": ["use the session store"],
                 "concepts": {"modify": [], "depend": ["auth.session-store-contract"]}},
        "work_s": 30})
    bob_pid = bob.agent_pid()
    t0 = time.monotonic()
    code, _, events = bob.wait(timeout_s=60)
    elapsed = time.monotonic() - t0
    assert code == 4, events
    v = verdicts(events)[0]
    assert v["action"] == "stop"
    holder = v["conflicts"][0]
    assert holder["holder_agent_id"].startswith("alice/") and holder["concept"] == "auth.session-store-contract"
    assert holder["holder_summary"] == "Deprecate the session store"
    stopping = next(e for e in events if e["event"] == "stopping")
    assert "alice/" in stopping["reason"] and "auth.session-store-contract" in stopping["reason"]
    assert not pid_alive(bob_pid)
    assert elapsed < 20  # bounded escalation: interrupt, terminate, kill
    alice_pid = alice.agent_pid()
    alice.proc.terminate()  # the developer ends tether: it ends its agent and gives up the intent
    code, _, events = alice.wait()
    assert not pid_alive(alice_pid)
    assert any(e["event"] in ("abandon", "stopping") for e in events), events


def test_revoke_with_revert_stashes_every_change_and_restores_the_base(
        env: tuple[LocalCluster, dict[str, Path], Path]) -> None:
    c, keys, tmp = env
    repo = make_repo(tmp / "repo-revert")
    base = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    t = Tether(c, keys["carol"], "carol", repo, {
        "plan": {"summary": "Rework invoices", "steps": ["change invoices"],
                 "concepts": {"modify": ["billing.invoices"], "depend": []}},
        "writes": {"src/app.py": "print('changed')\n", "src/billing/new.py": "new\n"}, "commit": True,
        "work_s": 60, "done": False})
    t.agent_pid()
    # Let the agent write and commit, then write again after the commit (uncommitted work too).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        log = subprocess.run(["git", "-C", str(repo), "log", "--oneline"], capture_output=True, text=True).stdout
        if "agent-work" in log:
            break
        time.sleep(0.1)
    (repo / "notes.txt").write_text("untracked work\n")
    (repo / "README.md").write_text("shop, edited\n")
    listed = json.loads(tl(c, "intents", "list", "--json").stdout)
    mine = [i for i in listed["intents"] if i["agent_id"].startswith("carol/") and i["summary"] == "Rework invoices"]
    assert mine, listed
    r = tl(c, "intents", "revoke", mine[0]["intent_id"], "--revert")
    assert r.returncode == 0, r.stderr
    code, _, events = t.wait()
    assert code == 5, events
    reverted = next(e for e in events if e["event"] == "reverted")["result"]
    assert mine[0]["intent_id"] in reverted["stash_message"]
    assert subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip() == base
    assert subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=all"],
                          capture_output=True, text=True).stdout.strip() == ""
    stash_files = subprocess.run(["git", "-C", str(repo), "stash", "show", "--include-untracked", "--name-only",
                                  "stash@{0}"], capture_output=True, text=True).stdout.split()
    assert set(stash_files) == {"src/app.py", "src/billing/new.py", "notes.txt", "README.md"}
    # Nothing deleted: the agent's commit is still reachable.
    assert subprocess.run(["git", "-C", str(repo), "cat-file", "-e", reverted["previous_head_ref"]]).returncode == 0


def test_malformed_huge_and_binary_output_leave_the_shim_working(
        env: tuple[LocalCluster, dict[str, Path], Path]) -> None:
    c, keys, tmp = env
    repo = make_repo(tmp / "repo-noise")
    spec = {
        "noise": ["\x1b[31mred\x1b[0m\r\n", "x" * 300_000 + "\n"],
        "binary": True,
        "raw_blocks": ["<<<TETHERLAB-PLAN\n{not json\nTETHERLAB-PLAN>>>",
                       "<<<TETHERLAB-PLAN\n{\"steps\": []}\nTETHERLAB-PLAN>>>",
                       "<<<TETHERLAB-PLAN\n" + "y" * 100_000],
        "plan": {"summary": "Add invoice totals", "steps": ["sum"], "files": ["src/billing/totals.py"]},
        "done": True,
    }
    t = Tether(c, keys["carol"], "carol", repo, spec)
    code, out, events = t.wait()
    assert code == 0, events
    reasons = [e["message"] for e in events if e["event"] == "malformed_plan"]
    assert any("not valid JSON" in r for r in reasons), reasons
    assert any("summary" in r for r in reasons), reasons
    assert verdicts(events)[-1]["action"] == "continue"
    assert len(out) > 300_000  # the agent's output still reached the developer


def test_no_quorum_at_start_means_the_agent_never_starts(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path / "cluster", nodes=3)
    c.start()
    try:
        for nid in c.ids:
            c.wait_serving(nid)
        keys = setup_cluster(c, tmp_path)
        leader = c.wait_leader()
        for nid in c.ids:
            if nid != leader:
                c.kill(nid)
        repo = make_repo(tmp_path / "repo")
        t = Tether(c, keys["alice"], "alice", repo, {"plan": {"summary": "x", "steps": ["y"]}})
        code, _, events = t.wait(timeout_s=90)
        assert code == 3, events
        assert not Path(t.spec["pid_file"]).exists(), "the agent must not start without a quorum"
        assert any(e["event"] == "unavailable" for e in events)
    finally:
        c.close()


def test_losing_quorum_stops_a_running_agent_within_the_fail_closed_bound(tmp_path: Path) -> None:
    f_s = 2.0
    c = LocalCluster(tmp_path / "cluster", nodes=3)
    c.start()
    try:
        for nid in c.ids:
            c.wait_serving(nid)
        keys = setup_cluster(c, tmp_path)
        repo = make_repo(tmp_path / "repo")
        t = Tether(c, keys["alice"], "alice", repo, {
            "plan": {"summary": "Long invoice work", "steps": ["work"],
                     "concepts": {"modify": ["billing.invoices"], "depend": []}}, "work_s": 120}, fail_closed_s=f_s)
        pid = t.agent_pid()
        time.sleep(2.0)  # running under a continue verdict
        assert pid_alive(pid)
        leader = c.wait_leader()
        others = [n for n in c.ids if n != leader]
        t0 = time.monotonic()
        c.kill(leader)
        c.kill(others[0])
        while pid_alive(pid) and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        stopped_after = time.monotonic() - t0
        assert not pid_alive(pid)
        # The safety property: stopped before the master could lapse the session (30 s TTL) and
        # grant its concepts to someone else. The exact F bound is proven over a fake clock in
        # tests/unit/test_shim_session.py; wall-clock figures belong to the shim trials.
        print(f"agent stopped {stopped_after:.2f}s after quorum loss (F={f_s})")
        assert stopped_after < 30.0, f"agent stopped {stopped_after:.2f}s after quorum loss (F={f_s})"
        code, _, events = t.wait()
        assert code == 3
        assert any(e["event"] == "fail_closed" for e in events)
        # The next run on this machine reports it; operators see it in the gauge.
        c.start(leader)
        c.start(others[0])
        for nid in (leader, others[0]):
            c.wait_serving(nid)
        new_leader = c.wait_leader()
        again = Tether(c, keys["alice"], "alice", repo, {"plan": {"summary": "tiny", "steps": ["x"]}, "done": True})
        assert again.wait()[0] == 0
        import urllib.request

        deadline = time.monotonic() + 10
        gauge = 0.0
        while time.monotonic() < deadline and gauge < 1:
            for n in c.ids:
                with urllib.request.urlopen(f"http://{c.cluster.by_id()[n].http}/metrics", timeout=5) as r:
                    for line in r.read().decode().splitlines():
                        if line.startswith("tetherlab_shims_failing_closed "):
                            gauge = max(gauge, float(line.split()[1]))
            time.sleep(0.2)
        assert gauge >= 1, f"no node counts the failed-closed shim (leader {new_leader})"
    finally:
        c.close()


def test_sigterm_abandons_the_intent_closes_the_session_and_cleans_up(
        env: tuple[LocalCluster, dict[str, Path], Path]) -> None:
    """Headless (stdin is a pipe): the agent reads its plan from tether's stdin. SIGTERM to tether
    stops the agent, abandons the intent and closes the session before tether exits 143."""
    c, keys, tmp = env
    repo = make_repo(tmp / "repo-term")
    runtime = tmp / "runtime-term"
    runtime.mkdir()
    plan = {"summary": "Reindex the search", "steps": ["reindex"],
            "concepts": {"modify": ["search.index"], "depend": []}}
    t = Tether(c, keys["bob"], "bob", repo, {"plan_from_stdin": True, "work_s": 60},
               env={"XDG_RUNTIME_DIR": str(runtime)}, stdin=subprocess.PIPE)
    assert t.proc.stdin is not None
    t.proc.stdin.write(json.dumps(plan).encode() + b"\n")
    t.proc.stdin.flush()
    intent = active_intent(c, plan["summary"])
    assert len(list(runtime.iterdir())) == 1  # tether's own folder for the hook socket
    t.proc.terminate()
    code, _, events = t.wait()
    assert code == 143, events
    kinds = [e["event"] for e in events]
    assert kinds.index("abandon") < kinds.index("closed"), kinds
    assert intent_status(c, intent["intent_id"]) == "abandoned"
    assert list(runtime.iterdir()) == [], "tether removes its temporary folder on exit"
    assert not (repo / ".tetherlab" / "world.md").exists()


def test_a_session_the_master_forgot_stops_the_agent(env: tuple[LocalCluster, dict[str, Path], Path]) -> None:
    """A heartbeat reply that lists the session as unknown (a restore from an older backup, a
    recover from a lagging node) is no confirmation: the agent stops at once."""
    c, keys, tmp = env
    repo = make_repo(tmp / "repo-forgotten")
    summary = "Rework the product catalog"
    t = Tether(c, keys["carol"], "carol", repo, {"plan": {"summary": summary, "steps": ["rework"], "concepts": {
        "modify": ["catalog.products"], "depend": []}}, "work_s": 60})
    pid = t.agent_pid()
    agent_id = active_intent(c, summary)["agent_id"]

    async def forget() -> None:
        client = MasterClient(masters_from_cluster_file(c.dir / "cluster.toml"), keys["carol"], "carol")
        try:
            await client.call(p.CloseSession, 30, agent_id=agent_id)
        finally:
            await client.close()

    asyncio.run(forget())
    code, _, events = t.wait()
    assert code == 3, events
    stopping = next(e for e in events if e["event"] == "stopping")
    assert "no session" in stopping["reason"], stopping
    assert not pid_alive(pid)


# --- the claim in commits and pushes; in-flight changes (issues 14 and 15) -----------------------------


def git_out(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30).stdout.strip()


def test_commits_carry_the_claim_and_a_push_is_verified_before_it_leaves(
        env: tuple[LocalCluster, dict[str, Path], Path]) -> None:
    c, keys, tmp = env
    remote = tmp / "remote-fence.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True, timeout=30)
    repo = make_repo(tmp / "repo-fence")
    # Pushes go to a local bare repository; the remote the cluster coordinates stays the same.
    subprocess.run(["git", "-C", str(repo), "remote", "set-url", "--push", "origin", str(remote)], check=True,
                   timeout=30)
    t = Tether(c, keys["carol"], "carol", repo, {
        "plan": {"summary": "Invoice numbering", "steps": ["renumber invoices"],
                 "concepts": {"modify": ["billing.invoices"], "depend": []}},
        "writes": {"src/billing/numbering.py": "N = 1\n"}, "commit": True, "push": True,
        "push_file": str(tmp / "fence.push"), "done": True})
    code, _, events = t.wait(timeout_s=90)
    assert code == 0, events
    v = verdicts(events)[0]
    body = git_out(repo, "log", "-1", "--format=%B")
    assert f"Tetherlab-Intent: {v['intent_id']}" in body and f"Tetherlab-Fence: {v['fencing_token']}" in body
    assert "Tetherlab-Agent: carol/" in body
    # The pre-push check ran (tetherlab git verify) and accepted it: the commit reached the remote.
    assert (tmp / "fence.push").read_text() == "0", (tmp / "fence.push.err").read_text()
    assert git_out(remote, "rev-parse", "main") == git_out(repo, "rev-parse", "HEAD")
    # Nothing of the run's hooks is left in the repository or its config.
    assert git_out(repo, "config", "--get", "core.hooksPath") == ""
    (repo / "later.txt").write_text("x\n")
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True, timeout=30)
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=a@b", "-c", "user.name=dev", "commit", "-qm", "later"],
                   check=True, timeout=30)
    assert "Tetherlab-" not in git_out(repo, "log", "-1", "--format=%B")


def conflicts(c: LocalCluster) -> list[dict]:
    r = tl(c, "conflicts", "list", "--json")
    assert r.returncode == 0, r.stderr
    out: list[dict] = json.loads(r.stdout)
    return out


def test_two_agents_changing_one_file_hear_of_the_soft_conflict(
        env: tuple[LocalCluster, dict[str, Path], Path]) -> None:
    c, keys, tmp = env
    shared = "src/shared/money.py"
    a_repo, b_repo = make_repo(tmp / "repo-soft-a"), make_repo(tmp / "repo-soft-b")
    fast = {"TETHER_REPORT_INTERVAL_S": "0.5"}
    a = Tether(c, keys["alice"], "alice", a_repo, {
        "plan": {"summary": "Round invoice totals", "steps": ["round totals"],
                 "concepts": {"modify": ["billing.invoices"], "depend": []}},
        "writes": {shared: "def rnd(x):\n    return round(x, 2)\n", "src/billing/total.py": "T = 1\n"},
        "work_s": 25}, env=fast)
    b = Tether(c, keys["bob"], "bob", b_repo, {
        "plan": {"summary": "Product prices in cents", "steps": ["prices in cents"],
                 "concepts": {"modify": ["catalog.products"], "depend": []}},
        "writes": {shared: "def cents(x):\n    return int(x * 100)\n", "src/catalog/price.py": "P = 1\n"},
        "work_s": 25}, env=fast)
    try:
        deadline = time.monotonic() + 40
        found: list[dict] = []
        while time.monotonic() < deadline and not found:
            found = [x for x in conflicts(c) if x["state"] == "current" and x["kind"] == "file"
                     and x["path"] == shared]
            time.sleep(0.3)
        if not found:
            for t in (a, b):
                t.proc.terminate()
            raise AssertionError(f"no soft conflict: {conflicts(c)}; {a.wait()[2]}; {b.wait()[2]}")
        agents = {found[0]["agent_id"].split("/")[0], found[0]["other_agent_id"].split("/")[0]}
        assert agents == {"alice", "bob"}
    finally:
        for t in (a, b):
            t.proc.terminate()
    for t in (a, b):
        code, _, events = t.wait()
        assert code == 143, events
        told = [e for e in events if e["event"] == "soft_conflict"]
        assert told and shared in json.dumps(told[0]["soft_conflicts"]), events
        assert all(e["event"] != "verdict" or e["verdict"]["action"] == "continue" for e in events)


def test_changes_reaching_a_concept_another_agent_modifies_revert_the_drifting_agent(
        env: tuple[LocalCluster, dict[str, Path], Path]) -> None:
    c, keys, tmp = env
    a_repo, b_repo = make_repo(tmp / "repo-drift-a"), make_repo(tmp / "repo-drift-b")
    holder = Tether(c, keys["alice"], "alice", a_repo, {
        "plan": {"summary": "Index products by tag", "steps": ["index tags"],
                 "concepts": {"modify": ["search.index"], "depend": []}}, "work_s": 40})
    active_intent(c, "Index products by tag")
    drifter = Tether(c, keys["bob"], "bob", b_repo, {
        "plan": {"summary": "Catalog product badges", "steps": ["add badges"],
                 "concepts": {"modify": ["catalog.products"], "depend": []}},
        "writes": {"src/catalog/badge.py": "B = 1\n", "src/search/boost.py": "BOOST = 2\n"}, "work_s": 40},
        env={"TETHER_REPORT_INTERVAL_S": "0.5"})
    code, _, events = drifter.wait(timeout_s=60)
    holder.proc.terminate()
    holder.wait()
    assert code == 5, events  # stopped, its changes stashed
    stop = [v for v in verdicts(events) if v["action"] == "revert"]
    assert stop and stop[0]["drift"]["blocked"] == ["search.index"], events
    assert stop[0]["conflicts"][0]["holder_agent_id"].startswith("alice/")
    assert git_out(b_repo, "status", "--porcelain", "--untracked-files=all") == ""
    drifts = [x for x in conflicts(c) if x["kind"] == "drift_revert"]
    assert drifts and drifts[0]["concept"] == "search.index"


def test_changes_reaching_a_free_concept_claim_it_with_a_new_fencing_token(
        env: tuple[LocalCluster, dict[str, Path], Path]) -> None:
    c, keys, tmp = env
    repo = make_repo(tmp / "repo-drift-free")
    t = Tether(c, keys["carol"], "carol", repo, {
        "plan": {"summary": "Tidy app start-up", "steps": ["tidy"],
                 "concepts": {"modify": ["catalog.products"], "depend": []}},
        "writes": {"src/catalog/x.py": "X = 1\n", "src/auth/session_store.py": "S = 1\n"}, "work_s": 6,
        "done": True}, env={"TETHER_REPORT_INTERVAL_S": "0.5"})
    code, _, events = t.wait(timeout_s=60)
    assert code == 0, events
    vs = verdicts(events)
    claimed = [v for v in vs if (v.get("drift") or {}).get("claimed")]
    assert claimed, vs
    assert claimed[0]["drift"]["claimed"] == ["auth.session-store-contract"]
    assert claimed[0]["fencing_token"] > vs[0]["fencing_token"]
    assert "auth.session-store-contract" in {m["concept"] for m in claimed[0]["claims"]["modify"]}


def test_renaming_a_function_another_intent_depends_on_is_reported_and_stops_the_renamer(
        env: tuple[LocalCluster, dict[str, Path], Path]) -> None:
    c, keys, tmp = env
    a_repo, b_repo = make_repo(tmp / "repo-rename-a"), make_repo(tmp / "repo-rename-b")
    for repo in (a_repo, b_repo):
        (repo / "src" / "util").mkdir(parents=True)
        (repo / "src" / "util" / "money.py").write_text("def format_money(cents):\n    return f'{cents / 100:.2f}'\n")
        subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True, timeout=30)
        subprocess.run(["git", "-C", str(repo), "-c", "user.email=a@b", "-c", "user.name=dev", "commit", "-qm",
                        "money"], check=True, timeout=30)
    user = Tether(c, keys["alice"], "alice", a_repo, {
        "plan": {"summary": "Show prices on receipts", "steps": ["call format_money"],
                 "concepts": {"modify": ["billing.invoices"], "depend": ["money.format"]}}, "work_s": 40})
    active_intent(c, "Show prices on receipts")
    renamer = Tether(c, keys["bob"], "bob", b_repo, {
        "plan": {"summary": "Catalog price labels", "steps": ["labels"],
                 "concepts": {"modify": ["catalog.products"], "depend": []}},
        "writes": {"src/util/money.py": "def format_amount(cents):\n    return f'{cents / 100:.2f}'\n"},
        "work_s": 40}, env={"TETHER_REPORT_INTERVAL_S": "0.5"})
    code, _, events = renamer.wait(timeout_s=60)
    user.proc.terminate()
    user.wait()
    assert code == 4, events  # stopped: it changes what alice's intent relies on (dependents = "stop")
    stop = [v for v in verdicts(events) if v["action"] == "stop"]
    assert stop and stop[0]["drift"]["blocked"] == ["money.format"], events
    assert stop[0]["conflicts"][0]["holder_agent_id"].startswith("alice/")
    assert stop[0]["conflicts"][0]["kind"] == "modify_depended"
    logged = [x for x in conflicts(c) if x["kind"] == "drift_stop" and x["concept"] == "money.format"]
    assert logged and "format_money" in json.dumps(logged[0]), logged


def test_a_git_remote_with_the_pre_receive_hook_and_two_tether_run_agents(
        env: tuple[LocalCluster, dict[str, Path], Path]) -> None:
    """Issue 14 end to end: a bare repository with `tetherlab git install-hook`, two clones whose
    agents run under `tether run`. Work under a valid claim lands; after the first agent's claim
    is revoked and granted to the second, the first's commits are refused naming the new holder;
    a commit made outside any claim that touches a held concept is refused; one that touches no
    concept lands."""
    c, keys, tmp = env
    bare = tmp / "shop-fenced.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True, timeout=30)
    verifier = keygen(tmp / "git-server", "git-server")
    r = tl(c, "keys", "add", "git-server", str(verifier) + ".pub", "--role", "verifier")
    assert r.returncode == 0, r.stderr
    seed = make_repo(tmp / "repo-fenced-seed")
    subprocess.run(["git", "-C", str(seed), "push", "-q", str(bare), "HEAD:main"], check=True, timeout=30)
    r = subprocess.run([sys.executable, "-m", "tetherlab.cluster.cli", "git", "install-hook", "--repo", str(bare),
                        "--cluster", str(c.dir / "cluster.toml"), "--key", str(verifier), "--developer", "git-server"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr

    def clone(name: str) -> Path:
        repo = tmp / name
        subprocess.run(["git", "clone", "-q", str(bare), str(repo)], check=True, timeout=30)
        # The cluster coordinates REMOTE; pushes go to the local bare repository.
        for args in (["remote", "set-url", "origin", REMOTE], ["remote", "set-url", "--push", "origin", str(bare)]):
            subprocess.run(["git", "-C", str(repo), *args], check=True, timeout=30)
        return repo

    def push(repo: Path, ref: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(repo), "push", "origin", f"HEAD:refs/heads/{ref}"],
                              capture_output=True, text=True, timeout=120)

    def commit(repo: Path, path: str, text: str) -> None:
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
        subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True, timeout=30)
        subprocess.run(["git", "-C", str(repo), "-c", "user.email=d@e", "-c", "user.name=dev", "commit", "-qm",
                        f"edit {path}"], check=True, timeout=30)

    a_repo, b_repo = clone("clone-fenced-a"), clone("clone-fenced-b")
    summary_a = "Invoice rounding rules"
    alice = Tether(c, keys["alice"], "alice", a_repo, {
        "plan": {"summary": summary_a, "steps": ["round"], "concepts": {"modify": ["billing.invoices"], "depend": []}},
        "writes": {"src/billing/rounding.py": "R = 2\n"}, "commit": True, "work_s": 60})
    intent_a = active_intent(c, summary_a)
    deadline = time.monotonic() + 30
    while "agent-work" not in git_out(a_repo, "log", "--oneline") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "Tetherlab-Fence:" in git_out(a_repo, "log", "-1", "--format=%B")
    r = tl(c, "intents", "revoke", intent_a["intent_id"])
    assert r.returncode == 0, r.stderr
    code, _, events = alice.wait()
    assert code == 4, events  # stopped by the revoke; its commit stays in the clone

    bob = Tether(c, keys["bob"], "bob", b_repo, {
        "plan": {"summary": "Invoice numbering v2", "steps": ["renumber"],
                 "concepts": {"modify": ["billing.invoices"], "depend": []}},
        "writes": {"src/billing/numbering.py": "N = 2\n"}, "commit": True, "push": True,
        "push_file": str(tmp / "fenced-bob.push"), "work_s": 30})
    try:
        bob.agent_pid()
        deadline = time.monotonic() + 30
        while not (tmp / "fenced-bob.push").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        # Work under a valid claim lands (the pre-push check and the remote's pre-receive agree).
        assert (tmp / "fenced-bob.push").read_text() == "0", (tmp / "fenced-bob.push.err").read_text()
        assert git_out(bare, "rev-parse", "main") == git_out(b_repo, "rev-parse", "HEAD")
        # The first agent's commit, pushed by its developer later: refused, naming the new holder.
        refused = push(a_repo, "alice-rounding")
        assert refused.returncode != 0
        assert "claim_revoked" in refused.stderr and "held_by_other" in refused.stderr, refused.stderr
        assert "bob/" in refused.stderr and "billing.invoices" in refused.stderr, refused.stderr
        # A commit outside any claim touching the held concept: refused too.
        plain = clone("clone-fenced-c")
        commit(plain, "src/billing/hotfix.py", "H = 1\n")
        hotfix = push(plain, "hotfix")
        assert hotfix.returncode != 0 and "held_by_other" in hotfix.stderr, hotfix.stderr
        # One that touches no concept lands (uncoordinated commits are accepted by default).
        docs = clone("clone-fenced-d")
        commit(docs, "docs/notes.md", "notes\n")
        assert push(docs, "docs").returncode == 0
    finally:
        bob.proc.terminate()
        bob.wait()
