"""``tetherlab git pre-receive|verify|install-hook``: push-time fencing (docs/git-fencing.md).

Exit codes: 0 every commit may land; 1 at least one commit is refused; 2 bad usage or
configuration; 3 the master's quorum could not be reached (the push is refused: fail closed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from tetherlab.cluster.core.config import ConfigError
from tetherlab.cluster.core.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from tetherlab.cluster.ops.config import load_cluster_file
from tetherlab.cluster.tools import gitfence
from tetherlab.shim.client import ClientError, ClusterUnavailable, HostKeyMismatch, RequestError

EPILOG = ("Exit codes: 0 every commit may land; 1 a commit is refused; 2 bad usage or configuration; "
          "3 the master's quorum is unreachable (the push is refused: fencing fails closed).")


def add_parsers(sub: Any) -> None:
    g = sub.add_parser("git", help="push-time fencing: refuse commits made on a claim the agent no longer holds")
    gs = g.add_subparsers(dest="git_command", metavar="ACTION", required=True)

    def identity(s: argparse.ArgumentParser) -> None:
        s.add_argument("--cluster", required=True, help="cluster file naming the nodes and their host keys "
                                                        "(cluster.toml or shim.toml)")
        s.add_argument("--key", help="private key (default: the cluster file's key): a verifier key on a git "
                                     "server, a developer's own key in a pre-push hook")
        s.add_argument("--developer", help="the name the key is registered to (default: the cluster file's)")
        s.add_argument("--json", action="store_true", help="print the verdicts as JSON on stdout")

    s = gs.add_parser("pre-receive", help="the server-side hook: reads git's pre-receive input on stdin",
                      epilog=EPILOG)
    identity(s)
    s.add_argument("--repo", default=".", help="the repository (default: the current directory, as git runs hooks)")
    s.set_defaults(func=_pre_receive)

    s = gs.add_parser("verify", help="verify a range of commits (CI, branch protection, a pre-push hook)",
                      epilog=EPILOG)
    identity(s)
    s.add_argument("range", nargs="?", default="@{upstream}..HEAD",
                   help="commits to verify, as git rev-list takes them (default @{upstream}..HEAD)")
    s.add_argument("--repo", default=".", help="the repository (default: the current directory)")
    s.add_argument("--pre-push", action="store_true",
                   help="read git's pre-push input on stdin instead of a range (what tether's hook does)")
    s.set_defaults(func=_verify)

    s = gs.add_parser("install-hook", help="install the pre-receive hook into a bare repository", epilog=EPILOG)
    s.add_argument("--repo", required=True, help="the bare repository (PATH.git)")
    s.add_argument("--cluster", required=True, help="cluster file the hook uses (an absolute path is kept)")
    s.add_argument("--key", help="the verifier key the hook authenticates with (default: the cluster file's)")
    s.add_argument("--developer", help="the name the key is registered to (default: the cluster file's)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_install_hook)


def _identity(args: argparse.Namespace) -> tuple[Path, Path, str]:
    cluster = Path(args.cluster).resolve()
    cf = load_cluster_file(cluster)
    key = Path(args.key).resolve() if args.key else cf.admin_key
    if key is None:
        raise ConfigError(f"{cluster} names no key: pass --key (a verifier key on a git server)")
    developer = args.developer or cf.developer
    if not developer:
        raise ConfigError(f"{cluster} names no developer: pass --developer (the name the key is registered to)")
    return cluster, key, developer


def _run(args: argparse.Namespace, shas_of: Any, what: str) -> int:
    try:
        cluster, key, developer = _identity(args)
        repo = Path(args.repo).resolve()
        shas = shas_of(repo)
        if len(shas) > gitfence.COMMITS_MAX:
            print(f"tetherlab: refusing the push: {len(shas)} new commits, more than the {gitfence.COMMITS_MAX} "
                  "one push may bring; push in parts", file=sys.stderr)
            return EXIT_FAILED
        commits = [gitfence.describe(repo, s) for s in shas]
    except (ConfigError, gitfence.GitError, OSError) as e:
        print(f"tetherlab git {what}: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not commits:
        if args.json:
            print(gitfence.dumps([]))
        return EXIT_OK
    try:
        verdicts = asyncio.run(gitfence.judge(commits, cluster, key, developer))
    except (ClusterUnavailable, HostKeyMismatch) as e:
        print(gitfence.unavailable_message(str(e)), file=sys.stderr)
        return EXIT_UNAVAILABLE
    except RequestError as e:
        print(f"tetherlab: refusing the push: the master refused the verification ({e.code}): {e.message}",
              file=sys.stderr)
        return EXIT_FAILED
    except ClientError as e:
        print(gitfence.unavailable_message(str(e)), file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.json:
        print(gitfence.dumps(verdicts))
    text = gitfence.render(verdicts)
    if text:
        print(text, file=sys.stderr)
    return EXIT_OK if all(v.ok for v in verdicts) else EXIT_FAILED


def _pre_receive(args: argparse.Namespace) -> int:
    lines = sys.stdin.read().splitlines()
    return _run(args, lambda repo: gitfence.commits_of_pre_receive(repo, lines), "pre-receive")


def _verify(args: argparse.Namespace) -> int:
    if args.pre_push:
        # pre-push lines are "local_ref local_sha remote_ref remote_sha": judge remote..local.
        pushed = []
        for line in sys.stdin.read().splitlines():
            parts = line.split()
            if len(parts) == 4:
                pushed.append(f"{parts[3]} {parts[1]} {parts[2]}")
        return _run(args, lambda repo: gitfence.commits_of_pre_receive(repo, pushed), "verify")
    return _run(args, lambda repo: gitfence.commits_of_range(repo, args.range), "verify")


def _install_hook(args: argparse.Namespace) -> int:
    try:
        cluster, key, developer = _identity(args)
        res = gitfence.install_hook(Path(args.repo).resolve(), ["--cluster", str(cluster), "--key", str(key),
                                                                 "--developer", developer])
    except (ConfigError, gitfence.GitError, OSError) as e:
        print(f"tetherlab git install-hook: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(res))
    else:
        print(f"installed {res['hook']}" + (f" (the hook that was there runs first: {res['chained']})"
                                            if res["chained"] else ""))
    return EXIT_OK
