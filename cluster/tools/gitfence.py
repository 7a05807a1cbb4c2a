"""Push-time fencing on the git side: which commits a push brings, what they touch and claim,
and the master's judgement of them (``tetherlab git pre-receive|verify|install-hook``).

A commit made under ``tether run`` carries trailers naming its agent, intent and fencing token
(``Tetherlab-Agent``, ``Tetherlab-Intent``, ``Tetherlab-Fence``). The master says for each commit
whether that claim still holds on every concept the commit's paths touch (docs/git-fencing.md).
Everything here fails closed: when the master's quorum cannot be reached, every commit is
refused, with a message saying so.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tetherlab.cluster import protocol as p
from tetherlab.shim.client import MasterClient, masters_from_cluster_file

TRAILER_AGENT = "Tetherlab-Agent"
TRAILER_INTENT = "Tetherlab-Intent"
TRAILER_FENCE = "Tetherlab-Fence"
ZERO = re.compile(r"^0+$")
GIT_TIMEOUT_S = 60.0
VERIFY_DEADLINE_S = 20.0  # to reach a quorum-backed leader; then the push is refused (fail closed)
COMMITS_MAX = 10_000  # one push judged at most this many commits (a bigger one is refused, said why)
REQUEST_COMMITS_MAX = 64  # commit entries per request
REQUEST_PATH_CHARS_MAX = 150_000  # keeps one request well under the protocol's 256 KiB frame
HOOK_MARKER = "# Installed by `tetherlab git install-hook`"


class GitError(RuntimeError):
    """Returned when git cannot answer (not a repository, an unknown revision)."""


@dataclass
class Commit:
    sha: str
    subject: str
    paths: list[str]
    agent: str | None = None
    intent: str | None = None
    fence: int | None = None
    local_reasons: list[dict[str, Any]] = field(default_factory=list)  # found before asking the master


@dataclass
class Verdict:
    commit: Commit
    ok: bool
    uncoordinated: bool
    concepts: list[str]
    reasons: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"commit": self.commit.sha, "subject": self.commit.subject, "ok": self.ok,
                "uncoordinated": self.uncoordinated, "concepts": self.concepts, "reasons": self.reasons}


def git(repo: Path, *args: str, stdin: str | None = None) -> str:
    r = subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True, text=True,
                       timeout=GIT_TIMEOUT_S)
    if r.returncode != 0:
        raise GitError(f"git {' '.join(args)}: {r.stderr.strip() or f'exit {r.returncode}'}")
    return r.stdout


# --- which commits -----------------------------------------------------------------------------


def commits_of_pre_receive(repo: Path, lines: Iterable[str]) -> list[str]:
    """The new commits of a push, from pre-receive (or pre-push) input lines ``old new ref``
    (pre-push: ``local_ref local_sha remote_ref remote_sha``, normalised by the caller)."""
    out: dict[str, None] = {}
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        old, new = parts[0], parts[1]
        if ZERO.match(new):
            continue  # a deletion brings no commit
        spec = [new, "--not", "--all"] if ZERO.match(old) else [f"{old}..{new}"]
        for sha in git(repo, "rev-list", "--reverse", *spec).split():
            out.setdefault(sha, None)
    return list(out)


def commits_of_range(repo: Path, rev_range: str) -> list[str]:
    return git(repo, "rev-list", "--reverse", *shlex.split(rev_range)).split()


# --- what each commit touches and claims ----------------------------------------------------------


def describe(repo: Path, sha: str) -> Commit:
    meta = git(repo, "show", "-s", "--format=%P%x00%s%x00%(trailers:only,unfold)", sha)
    parents, subject, trailers = ([*meta.split("\x00"), "", ""])[:3]
    if len(parents.split()) > 1:
        # A merge: only what the merge itself changed (files differing from every parent); the
        # merged commits are judged on their own.
        paths = [ln for ln in git(repo, "diff-tree", "--no-commit-id", "-r", "--name-only", "-c", sha).splitlines()
                 if ln]
    else:
        paths = []
        out = git(repo, "diff-tree", "--no-commit-id", "-r", "--name-status", "-M", "--root", "-z", sha)
        fields = out.split("\x00")
        i = 0
        while i < len(fields) - 1:
            status = fields[i]
            if status.startswith(("R", "C")):
                paths += [fields[i + 1], fields[i + 2]]  # a rename touches both places
                i += 3
            else:
                paths.append(fields[i + 1])
                i += 2
    c = Commit(sha, subject.strip(), sorted(set(paths)))
    _read_trailers(c, trailers)
    return c


def _read_trailers(c: Commit, text: str) -> None:
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in (TRAILER_AGENT, TRAILER_INTENT, TRAILER_FENCE):
            found[key.strip()] = value.strip()  # the last one wins, as git reads trailers
    if not found:
        return
    agent, intent, fence = found.get(TRAILER_AGENT), found.get(TRAILER_INTENT), found.get(TRAILER_FENCE)
    problems = []
    try:
        if agent is not None:
            p.split_agent_id(agent)
    except p.ProtocolError:
        problems.append(f"{TRAILER_AGENT}: {agent!r} is not an agent id like alice/<uuid>")
    if intent is not None and not re.fullmatch(r"i-[0-9]{1,19}", intent):
        problems.append(f"{TRAILER_INTENT}: {intent!r} is not an intent id like i-42")
    if fence is not None and not re.fullmatch(r"[1-9][0-9]{0,15}", fence):
        problems.append(f"{TRAILER_FENCE}: {fence!r} is not a fencing token")
    if None in (agent, intent, fence):
        problems.append(f"the commit carries some Tetherlab trailers but not all of {TRAILER_AGENT}, "
                        f"{TRAILER_INTENT} and {TRAILER_FENCE}")
    if problems:
        c.local_reasons.append({"code": "bad_trailers", "message": "; ".join(problems)})
        return
    c.agent, c.intent, c.fence = agent, intent, int(fence or 0)


# --- asking the master ---------------------------------------------------------------------------


def requests_for(commits: Sequence[Commit]) -> list[list[p.CommitClaim]]:
    """Commit claims in requests that fit the protocol's bounds; a commit touching more paths
    than one entry takes is sent as several entries under its id (judged together)."""
    batches: list[list[p.CommitClaim]] = []
    cur: list[p.CommitClaim] = []
    chars = 0
    for c in commits:
        if c.local_reasons:
            continue
        chunks = _path_chunks(c.paths)
        for chunk in chunks:
            size = sum(len(x) + 4 for x in chunk) + 200
            if cur and (len(cur) >= REQUEST_COMMITS_MAX or chars + size > REQUEST_PATH_CHARS_MAX):
                batches.append(cur)
                cur, chars = [], 0
            cur.append(p.CommitClaim(commit=c.sha, paths=tuple(chunk), agent=c.agent, intent=c.intent,
                                     fence=c.fence))
            chars += size
    if cur:
        batches.append(cur)
    return batches


def _path_chunks(paths: list[str]) -> list[list[str]]:
    if not paths:
        return [[]]
    out: list[list[str]] = []
    cur: list[str] = []
    chars = 0
    for path in paths:
        if cur and (len(cur) >= p.MAX_COMMIT_PATHS or chars + len(path) > REQUEST_PATH_CHARS_MAX // 2):
            out.append(cur)
            cur, chars = [], 0
        cur.append(path)
        chars += len(path) + 4
    out.append(cur)
    return out


async def judge(commits: Sequence[Commit], cluster_file: Path, key: Path, developer: str,
                deadline_s: float = VERIFY_DEADLINE_S) -> list[Verdict]:
    """The master's verdict on every commit (raises the client's errors when it cannot answer)."""
    merged: dict[str, dict[str, Any]] = {}
    client = MasterClient(masters_from_cluster_file(cluster_file), key, developer, client_name="tetherlab-git")
    try:
        for batch in requests_for(commits):
            out = await client.call(p.VerifyCommits, deadline_s, commits=tuple(batch))
            for r in out["results"]:
                m = merged.setdefault(r["commit"], {"ok": True, "uncoordinated": r["uncoordinated"],
                                                    "concepts": set(), "reasons": []})
                m["ok"] = m["ok"] and r["ok"]
                m["concepts"].update(r["concepts"])
                m["reasons"] += [x for x in r["reasons"] if x not in m["reasons"]]
    finally:
        await client.close()
    verdicts = []
    for c in commits:
        if c.local_reasons:
            verdicts.append(Verdict(c, False, c.agent is None, [], c.local_reasons))
            continue
        m = merged[c.sha]
        verdicts.append(Verdict(c, m["ok"], m["uncoordinated"], sorted(m["concepts"]), m["reasons"]))
    return verdicts


# --- what people read ------------------------------------------------------------------------------


def render(verdicts: Sequence[Verdict]) -> str:
    lines = []
    refused = [v for v in verdicts if not v.ok]
    for v in refused:
        lines.append(f"tetherlab: refusing {v.commit.sha[:12]} \"{v.commit.subject[:72]}\"")
        for r in v.reasons:
            lines.append(f"tetherlab:   {r['code']}: {r['message']}")
    unco = [v for v in verdicts if v.ok and v.uncoordinated and v.concepts]
    for v in unco:
        lines.append(f"tetherlab: note: {v.commit.sha[:12]} was made without a claim; it touches "
                     f"{', '.join(v.concepts)} (nobody holds them now)")
    if refused:
        lines.append(f"tetherlab: {len(refused)} of {len(verdicts)} commit(s) refused: their concepts are held by "
                     "another agent, or the claim they were made under was lost (docs/git-fencing.md)")
    elif verdicts:
        lines.append(f"tetherlab: {len(verdicts)} commit(s) verified")
    return "\n".join(lines)


def unavailable_message(reason: str) -> str:
    return (f"tetherlab: refusing the push: the Tetherlab master's quorum cannot be reached ({reason}). "
            "Fencing fails closed: push again once the cluster is back (tetherlab status).")


# --- the server-side hook ---------------------------------------------------------------------------


def install_hook(repo: Path, argv_tail: list[str], python: str = sys.executable) -> dict[str, Any]:
    """Write ``hooks/pre-receive`` of a bare repository (or of a repository's git dir); a hook
    already there that is not ours keeps running first, as ``pre-receive.chained``."""
    hooks = Path(git(repo, "rev-parse", "--git-path", "hooks").strip())  # honours core.hooksPath
    if not hooks.is_absolute():
        hooks = (repo / hooks).resolve()
    hooks.mkdir(parents=True, exist_ok=True)
    hook = hooks / "pre-receive"
    chained = hooks / "pre-receive.chained"
    moved = False
    if hook.exists() and HOOK_MARKER not in hook.read_text(errors="replace"):
        if chained.exists():
            raise GitError(f"{hook} exists and {chained} too: move one of them away first")
        hook.rename(chained)
        moved = True
    command = " ".join(shlex.quote(a) for a in [python, "-m", "tetherlab.cluster.cli", "git", "pre-receive",
                                                *argv_tail])
    hook.write_text(f"""#!/bin/sh
{HOOK_MARKER}: push-time fencing (docs/git-fencing.md).
# Refuses commits made on a claim their agent no longer holds; fails closed without the master.
input=$(mktemp) || exit 1
trap 'rm -f "$input"' EXIT
cat > "$input"
if [ -x "$(dirname "$0")/pre-receive.chained" ]; then
    "$(dirname "$0")/pre-receive.chained" "$@" < "$input" || exit $?
fi
{command} < "$input"
""")
    hook.chmod(0o755)
    return {"hook": str(hook), "chained": str(chained) if chained.exists() else None, "moved_existing": moved,
            "command": command}


def dumps(verdicts: Sequence[Verdict]) -> str:
    return json.dumps({"ok": all(v.ok for v in verdicts), "commits": [v.to_json() for v in verdicts]})
