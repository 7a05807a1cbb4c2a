"""Git hooks for one ``tether run``: commits carry the agent's claim, pushes are verified first.

While the agent holds ``continue``, every commit it makes carries three trailers naming its
agent, intent and fencing token (``Tetherlab-Agent``, ``Tetherlab-Intent``, ``Tetherlab-Fence``),
and a push is checked by ``tetherlab git verify --pre-push`` before anything is sent, so the
agent learns at once when its claim was lost (docs/git-fencing.md).

How, without touching the repository: the hooks live in a directory of the run's own, and
the agent's processes see it through git's environment configuration (``GIT_CONFIG_COUNT``,
``core.hooksPath``); the developer's other git commands are unaffected, nothing is written to
the repository's config or hooks, and a killed ``tether`` leaves nothing behind but a
temporary directory. The repository's own hooks (``git rev-parse --git-path hooks``, which
honours its ``core.hooksPath``) keep running: each is chained from ours.
``prepare-commit-msg`` adds the trailers because, unlike ``commit-msg``, ``--no-verify`` does
not skip it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
from pathlib import Path

HOOK_NAMES = (  # every client-side hook git runs: ours chain the repository's own
    "applypatch-msg", "pre-applypatch", "post-applypatch", "pre-commit", "pre-merge-commit", "prepare-commit-msg",
    "commit-msg", "post-commit", "pre-rebase", "post-checkout", "post-merge", "pre-push", "post-rewrite",
    "reference-transaction", "push-to-checkout", "pre-auto-gc", "post-index-change", "fsmonitor-watchman",
)
CLAIM_FILE = "claim"  # three lines: agent, intent, fencing token; absent while nothing is held
GIT_TIMEOUT_S = 30.0


class RunHooks:
    """The hooks of one run, in ``directory`` (created and removed by this object)."""

    def __init__(self, repo: Path, directory: Path, verify_command: list[str] | None) -> None:
        self.repo = repo
        self.dir = directory
        self.verify_command = verify_command  # tetherlab git verify --pre-push ... (None: no push check)
        self.original: Path | None = None

    # --- life cycle -------------------------------------------------------------------------------

    def install(self) -> dict[str, str]:
        """Write the hooks; returns the environment the agent must run with."""
        self.original = self._original_hooks_dir()
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in HOOK_NAMES:
            script = self._script(name)
            if script is not None:
                path = self.dir / name
                path.write_text(script)
                path.chmod(0o755)
        return self.environment(os.environ)

    def environment(self, base: os._Environ[str] | dict[str, str]) -> dict[str, str]:
        """``core.hooksPath`` for the agent's git, added after any environment config it has."""
        try:
            n = int(base.get("GIT_CONFIG_COUNT", "0"))
        except ValueError:
            n = 0
        return {"GIT_CONFIG_COUNT": str(n + 1), f"GIT_CONFIG_KEY_{n}": "core.hooksPath",
                f"GIT_CONFIG_VALUE_{n}": str(self.dir)}

    def set_claim(self, agent_id: str, intent_id: str, fencing_token: int) -> None:
        tmp = self.dir / (CLAIM_FILE + ".tmp")
        tmp.write_text(f"{agent_id}\n{intent_id}\n{fencing_token}\n")
        os.replace(tmp, self.dir / CLAIM_FILE)  # a commit never reads half a claim

    def clear_claim(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / CLAIM_FILE).unlink()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- scripts ----------------------------------------------------------------------------------

    def _original_hooks_dir(self) -> Path:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_CONFIG_")}
        out = subprocess.run(["git", "-C", str(self.repo), "rev-parse", "--git-path", "hooks"], capture_output=True,
                             text=True, timeout=GIT_TIMEOUT_S, env=env, check=True).stdout.strip()
        path = Path(out)
        return path if path.is_absolute() else (self.repo / path).resolve()

    def _script(self, name: str) -> str | None:
        assert self.original is not None
        orig = shlex.quote(str(self.original / name))
        chain = f'if [ -x {orig} ]; then {orig} "$@" || exit $?; fi\n'
        if name == "prepare-commit-msg":
            claim = shlex.quote(str(self.dir / CLAIM_FILE))
            return ("#!/bin/sh\n# tether: the repository's own hook first, then the claim's trailers.\n" + chain +
                    f"if [ -f {claim} ]; then\n"
                    f"    {{ read -r agent; read -r intent; read -r fence; }} < {claim}\n"
                    '    git interpret-trailers --in-place --if-exists replace --trailer "Tetherlab-Agent: $agent" '
                    '--trailer "Tetherlab-Intent: $intent" --trailer "Tetherlab-Fence: $fence" "$1"\n'
                    "fi\n")
        if name == "pre-push" and self.verify_command is not None:
            verify = " ".join(shlex.quote(a) for a in self.verify_command)
            return ("#!/bin/sh\n# tether: the repository's own hook first, then Tetherlab's push verification.\n"
                    "input=$(mktemp) || exit 1\ntrap 'rm -f \"$input\"' EXIT\ncat > \"$input\"\n"
                    f'if [ -x {orig} ]; then {orig} "$@" < "$input" || exit $?; fi\n'
                    f'{verify} --repo "$(pwd)" < "$input"\n')
        if (self.original / name).exists():
            return f"#!/bin/sh\n# tether: runs the repository's own hook.\nexec {orig} \"$@\"\n"
        return None
