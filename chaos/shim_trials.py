"""Repeated trials of `tether run`'s lifecycle against a local three-node cluster (issue 17).

    python -m tetherlab.chaos.shim_trials revert  --trials 50
    python -m tetherlab.chaos.shim_trials sigterm --trials 20
    python -m tetherlab.chaos.shim_trials pause   --trials 20 --fail-closed-s 5

Each trial runs a real ``tether run`` (real SSH, real git) around a scripted agent that plans,
takes a concept, writes, commits, writes again and then works until it is stopped:

- ``revert``: an admin revokes the intent with ``--revert``. Goal: tether exits 5, a stash named
  for the intent holds the work, HEAD and the tree are back at the base, the agent's old HEAD is
  kept under refs/tetherlab/reverted/<intent>.
- ``sigterm``: tether gets SIGTERM. Goal: it exits 143 after abandoning the intent, and another
  developer's plan on the same concept gets ``continue`` within 2 s of the signal.
- ``pause``: the leader is paused (SIGSTOP) for ``--pause-s`` while two nodes stay healthy.
  Goal: the agent is not stopped (no fail-closed) although the pause outlasts F.

One line per trial, then a summary; ``--json`` prints the trials and the summary as JSON. Exit
0 when every trial met its goal, 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tetherlab.cluster import protocol as p
from tetherlab.cluster.core.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from tetherlab.cluster.ops.config import load_cluster_file
from tetherlab.cluster.ops.keys import generate_key_pair
from tetherlab.cluster.ops.localcluster import LocalCluster
from tetherlab.shim.client import MasterClient, RequestError, masters_from_cluster_file

REMOTE = "git@example.com:acme/trials.git"
CONCEPTS = ("trial.revert", "trial.sigterm", "trial.pause")
REGISTRY = "".join(f'[[concept]]\nid = "{c}"\ntitle = "{c}"\npaths = ["src/{c.split(".")[1]}/**"]\n\n'
                   for c in CONCEPTS)
DEVELOPERS = ("alice", "bob")
STEP_TIMEOUT_S = 30.0
ADMIN_RETRIES = 100  # the bootstrap admin key lands a moment after the first election
ADMIN_RETRY_S = 0.2
FREE_GOAL_S = 2.0  # sigterm: the concept is free this soon after the signal
PROBE_INTERVAL_S = 0.05
SETTLE_S = 2.0  # pause: running under continue before the fault, and watched after it
AGENT = textwrap.dedent('''
    import json, os, signal, subprocess, sys, time
    spec = json.load(open(sys.argv[1]))
    signal.signal(signal.SIGINT, lambda *a: sys.exit(130))
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    print("<<<TETHERLAB-PLAN")
    print(json.dumps({"summary": spec["summary"], "steps": ["work"],
                      "concepts": {"modify": [spec["concept"]], "depend": []}}))
    print("TETHERLAB-PLAN>>>", flush=True)
    while not os.path.exists(spec["go_file"]):
        time.sleep(0.02)
    area = "src/" + spec["concept"].split(".")[1]
    os.makedirs(area, exist_ok=True)
    open(area + "/work.py", "w").write("committed\\n")
    open("README.md", "a").write("edited\\n")
    git = ["git", "-c", "user.email=agent@trial", "-c", "user.name=agent"]
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "agent work"], check=True)
    open(area + "/later.py", "w").write("uncommitted\\n")
    open("notes.txt", "w").write("untracked\\n")
    open(spec["ready_file"], "w").write(subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                       text=True).stdout.strip())
    time.sleep(spec["work_s"])
''')


def git(repo: Path, *args: str) -> str:
    r = subprocess.run(["git", "-C", str(repo), "-c", "user.email=dev@trial", "-c", "user.name=dev", *args],
                       capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    return r.stdout.strip() if r.returncode == 0 else ""


class Tether:
    """One `tether run` around the trial agent; its --json events read by a thread."""

    def __init__(self, rig: Rig, dev: str, concept: str, name: str, fail_closed_s: float) -> None:
        self.repo = rig.tmp / name / "repo"
        self.repo.mkdir(parents=True)
        for args in (("init", "-q"), ("remote", "add", "origin", REMOTE)):
            git(self.repo, *args)
        (self.repo / "README.md").write_text("trial\n")
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "-qm", "base")
        self.base = git(self.repo, "rev-parse", "HEAD")
        self.go_file = rig.tmp / name / "go"
        self.ready_file = rig.tmp / name / "ready"
        spec = {"summary": f"{name}: work on {concept}", "concept": concept, "go_file": str(self.go_file),
                "ready_file": str(self.ready_file), "work_s": 120}
        (rig.tmp / name / "spec.json").write_text(json.dumps(spec))
        self.summary = spec["summary"]
        self.events: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        cmd = [sys.executable, "-m", "tetherlab.shim.cli", "run", "--cluster", str(rig.cluster.dir / "shim.toml"),
               "--key", str(rig.keys[dev]), "--developer", dev, "--tool", "trial", "--json",
               "--fail-closed-s", str(fail_closed_s), "--", sys.executable, "-c", AGENT,
               str(rig.tmp / name / "spec.json")]
        env = {**os.environ, "XDG_CACHE_HOME": str(rig.tmp / name / "cache"),
               "XDG_RUNTIME_DIR": str(rig.tmp / name)}
        self.proc = subprocess.Popen(cmd, cwd=self.repo, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with contextlib.suppress(ValueError):
                ev = json.loads(raw)
                if isinstance(ev, dict):
                    with self.changed:
                        self.events.append(ev)
                        self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def event(self, kind: str, timeout_s: float = STEP_TIMEOUT_S) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while True:
                found = next((e for e in self.events if e.get("event") == kind), None)
                left = deadline - time.monotonic()
                if found is not None or left <= 0 or not self._reader.is_alive():
                    return found
                self.changed.wait(min(left, 0.2))

    def kinds(self) -> list[str]:
        with self.changed:
            return [str(e.get("event")) for e in self.events]

    def granted(self) -> dict[str, Any]:
        """Wait for the continue verdict, let the agent work, and return the verdict."""
        ev = self.event("verdict")
        if ev is None or ev["verdict"].get("action") != "continue":
            raise RuntimeError(f"no continue verdict: {self.events[-5:]}")
        self.go_file.write_text("go")
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while not self.ready_file.exists() or not self.ready_file.read_text():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the agent did not get to work: {self.events[-5:]}")
            time.sleep(0.02)
        return dict(ev["verdict"])

    def agent_alive(self) -> bool:
        started = next((e for e in self.events if e.get("event") == "started"), None)
        if started is None:
            return False
        try:
            os.kill(int(started["pid"]), 0)
        except ProcessLookupError:
            return False
        with contextlib.suppress(OSError):
            return "Z" not in Path(f"/proc/{started['pid']}/stat").read_text().split()[2]
        return False

    def wait(self, timeout_s: float = STEP_TIMEOUT_S) -> int | None:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            if self.wait(STEP_TIMEOUT_S) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STEP_TIMEOUT_S)
        started = next((e for e in self.events if e.get("event") == "started"), None)
        if started is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(started["pid"]), signal.SIGKILL)
        self._reader.join(5)


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cluster = LocalCluster(tmp / "cluster", nodes=3)
        try:
            self._set_up(tmp)
        except BaseException:  # no one else holds the nodes yet: stop them here
            self.cluster.close()
            raise

    def _set_up(self, tmp: Path) -> None:
        self.cluster.start()
        for nid in self.cluster.ids:
            self.cluster.wait_serving(nid)
        self.cluster.wait_leader()
        self.keys: dict[str, Path] = {}
        for dev in DEVELOPERS:
            self.keys[dev] = tmp / "keys" / dev
            self.keys[dev].parent.mkdir(exist_ok=True)
            generate_key_pair(self.keys[dev], f"{dev}@trial")
        self.masters = masters_from_cluster_file(self.cluster.dir / "cluster.toml")
        cf = load_cluster_file(self.cluster.dir / "cluster.toml")
        assert cf.admin_key is not None
        self.admin_key, self.admin_name = cf.admin_key, cf.developer or "admin"
        asyncio.run(self._prepare())

    async def _prepare(self) -> None:
        admin = MasterClient(self.masters, self.admin_key, self.admin_name, client_name="tetherlab-trials")
        try:
            for dev in DEVELOPERS:
                for attempt in range(ADMIN_RETRIES):
                    try:
                        await admin.call(p.KeysAdd, STEP_TIMEOUT_S, developer=dev,
                                         public_key=self.keys[dev].with_suffix(".pub").read_text().strip())
                        break
                    except RequestError as e:
                        if e.code == "key_exists":
                            break
                        if attempt == ADMIN_RETRIES - 1:
                            raise
                        await asyncio.sleep(ADMIN_RETRY_S)
            await admin.call(p.ConceptsPush, STEP_TIMEOUT_S, toml=REGISTRY)
        finally:
            await admin.close()

    async def admin_call(self, cls: type[p.Request], **fields: Any) -> dict[str, Any]:
        admin = MasterClient(self.masters, self.admin_key, self.admin_name, client_name="tetherlab-trials")
        try:
            return await admin.call(cls, STEP_TIMEOUT_S, **fields)
        finally:
            await admin.close()

    def close(self) -> None:
        self.cluster.close()


# --- the trials ------------------------------------------------------------------------------------


def trial_revert(rig: Rig, i: int, fail_closed_s: float) -> dict[str, Any]:
    t = Tether(rig, "alice", "trial.revert", f"revert-{i}", fail_closed_s)
    try:
        verdict = t.granted()
        old_head = t.ready_file.read_text().strip()
        t0 = time.monotonic()
        asyncio.run(rig.admin_call(p.IntentsRevoke, intent_id=verdict["intent_id"], revert=True))
        code = t.wait()
        took = time.monotonic() - t0
        reverted = t.event("reverted", 0) or {}
        result = reverted.get("result") or {}
        stash = git(t.repo, "rev-parse", "--verify", "-q", "stash@{0}")
        stash_message = git(t.repo, "log", "-1", "--format=%s", "stash@{0}")
        checks = {
            "exit_5": code == 5,
            "stash_present": bool(stash) and stash == result.get("stash") and verdict["intent_id"] in stash_message,
            "tree_at_base": git(t.repo, "rev-parse", "HEAD") == t.base
            and git(t.repo, "status", "--porcelain", "--untracked-files=all") == "",
            "old_head_kept": git(t.repo, "rev-parse", "-q", "--verify",
                                 f"refs/tetherlab/reverted/{verdict['intent_id']}") == old_head,
            "stash_holds_all": set(git(t.repo, "stash", "show", "--include-untracked", "--name-only",
                                       "stash@{0}").split())
            == {"src/revert/work.py", "src/revert/later.py", "README.md", "notes.txt"},
        }
        return {"trial": i, "ok": all(checks.values()), "exit": code, "revoke_to_exit_s": round(took, 3), **checks}
    finally:
        t.close()


def trial_sigterm(rig: Rig, i: int, fail_closed_s: float) -> dict[str, Any]:
    t = Tether(rig, "alice", "trial.sigterm", f"sigterm-{i}", fail_closed_s)
    try:
        verdict = t.granted()
        free_s, code = asyncio.run(_sigterm_and_probe(rig, t))
        kinds = t.kinds()
        checks = {
            "exit_143": code == 143,
            "abandoned_then_closed": "abandon" in kinds and "closed" in kinds
            and kinds.index("abandon") < kinds.index("closed"),
            "free_within_2s": free_s is not None and free_s <= FREE_GOAL_S,
        }
        return {"trial": i, "ok": all(checks.values()), "exit": code, "intent": verdict["intent_id"],
                "concept_free_after_s": None if free_s is None else round(free_s, 3), **checks}
    finally:
        t.close()


async def _sigterm_and_probe(rig: Rig, t: Tether) -> tuple[float | None, int | None]:
    """SIGTERM to tether, then bob plans on the same concept until he gets continue."""
    bob = MasterClient(rig.masters, rig.keys["bob"], "bob", client_name="tetherlab-trials")
    agent = f"bob/{uuid.uuid4()}"
    free_s: float | None = None
    try:
        await bob.call(p.OpenSession, STEP_TIMEOUT_S, agent_id=agent, tool="probe", machine="trials",
                       repo_remote=REMOTE, base_commit=t.base)
        intent = p.Intent(summary="probe", steps=("probe",), concepts=p.Concepts(modify=("trial.sigterm",)))
        t0 = time.monotonic()
        t.proc.send_signal(signal.SIGTERM)
        while time.monotonic() - t0 < STEP_TIMEOUT_S:
            v = await bob.call(p.SubmitIntent, STEP_TIMEOUT_S, agent_id=agent, tool="probe", intent=intent,
                               trigger="initial")
            if v.get("action") == "continue":
                free_s = time.monotonic() - t0
                await bob.call(p.Complete, STEP_TIMEOUT_S, agent_id=agent, intent_id=v["intent_id"])
                break
            await asyncio.sleep(PROBE_INTERVAL_S)
        code = await asyncio.get_running_loop().run_in_executor(None, t.wait)
        with contextlib.suppress(RequestError):
            await bob.call(p.CloseSession, STEP_TIMEOUT_S, agent_id=agent)
        return free_s, code
    finally:
        await bob.close()


def trial_pause(rig: Rig, i: int, fail_closed_s: float, pause_s: float) -> dict[str, Any]:
    t = Tether(rig, "alice", "trial.pause", f"pause-{i}", fail_closed_s)
    c = rig.cluster
    leader: str | None = None
    try:
        t.granted()
        time.sleep(SETTLE_S)
        leader = c.wait_leader()
        t0 = time.monotonic()
        c.signal(leader, signal.SIGSTOP)
        elected_s: float | None = None
        others = [n for n in c.ids if n != leader]
        with contextlib.suppress(TimeoutError):
            c.wait_leader(timeout_s=pause_s, among=others)
            elected_s = time.monotonic() - t0
        while time.monotonic() - t0 < pause_s:
            time.sleep(0.05)
        alive_during = t.agent_alive() and t.proc.poll() is None
        c.signal(leader, signal.SIGCONT)
        leader = None
        time.sleep(SETTLE_S)
        kinds = t.kinds()
        stopped = not alive_during or not t.agent_alive() or "fail_closed" in kinds or "stopping" in kinds
        return {"trial": i, "ok": not stopped, "paused_s": pause_s, "new_leader_after_s":
                None if elected_s is None else round(elected_s, 3), "agent_stopped": stopped,
                "fail_closed": "fail_closed" in kinds}
    finally:
        if leader is not None:
            c.signal(leader, signal.SIGCONT)
        t.close()
        with contextlib.suppress(TimeoutError):
            c.wait_leader()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tetherlab.chaos.shim_trials",
                                 description="Repeated trials of tether run's lifecycle (issue 17).",
                                 epilog="Exit codes: 0 every trial met its goal, 1 some did not, 2 usage.")
    ap.add_argument("kind", choices=("revert", "sigterm", "pause"))
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--fail-closed-s", type=float, default=5.0)
    ap.add_argument("--pause-s", type=float, default=8.0, help="pause: how long the leader stays stopped")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.trials < 1:
        ap.error("--trials must be at least 1")
    with tempfile.TemporaryDirectory(prefix="tl-trials-") as tmp:
        try:
            rig = Rig(Path(tmp))
        except (RuntimeError, TimeoutError, OSError, RequestError) as e:
            print(f"shim_trials: cannot start the cluster: {e}", file=sys.stderr)
            return EXIT_USAGE
        results = []
        t_start = time.monotonic()
        try:
            for i in range(1, args.trials + 1):
                try:
                    if args.kind == "revert":
                        r = trial_revert(rig, i, args.fail_closed_s)
                    elif args.kind == "sigterm":
                        r = trial_sigterm(rig, i, args.fail_closed_s)
                    else:
                        r = trial_pause(rig, i, args.fail_closed_s, args.pause_s)
                except (RuntimeError, OSError, RequestError, TimeoutError) as e:
                    r = {"trial": i, "ok": False, "error": f"{type(e).__name__}: {e}"}
                results.append(r)
                if not args.json:
                    print(json.dumps(r), flush=True)
        finally:
            rig.close()
    ok = sum(1 for r in results if r["ok"])
    summary: dict[str, Any] = {"kind": args.kind, "trials": len(results), "met_goal": ok,
                               "fail_closed_s": args.fail_closed_s, "elapsed_s": round(time.monotonic() - t_start, 1)}
    for key in ("revoke_to_exit_s", "concept_free_after_s", "new_leader_after_s"):
        values = sorted(r[key] for r in results if r.get(key) is not None)
        if values:
            summary[key] = {"median": values[len(values) // 2], "max": values[-1]}
    if args.json:
        print(json.dumps({"summary": summary, "trials": results}))
    else:
        print(json.dumps(summary))
    return EXIT_OK if ok == len(results) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
