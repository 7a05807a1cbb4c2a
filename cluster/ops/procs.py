"""Child processes of Tetherlab's own tools: starting a node, and stopping what we started.

Only processes started here are ever signalled, and only by the PID we hold.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this


def start_node_process(
    config: Path, log_file: Path | None = None, extra: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``tetherlab master --config`` as a child process (its own process group)."""
    cmd = [sys.executable, "-m", "tetherlab.cluster.cli", "master", "--config", str(config), *(extra or [])]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log_file:
            out.close()  # type: ignore[union-attr]  # the child holds its own descriptor


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], grace_s: float = STOP_GRACE_S,
                   on_kill: Callable[[subprocess.Popen[bytes]], None] | None = None) -> None:
    """SIGTERM every process still running, then SIGKILL whatever has not exited ``grace_s``
    after the first signal (one deadline for all of them, so N stuck processes cost ``grace_s``,
    not N times it)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if on_kill is not None:
                on_kill(p)
            p.kill()
            p.wait()
