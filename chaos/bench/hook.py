"""Hook latency: the hook Claude Code runs on every tool call, against bare Python.

    tetherlab bench hook [--runs N] [--json]

Times, on the same machine: ``python -c pass`` (this interpreter, with site-packages: the
baseline), ``python -I -S -c pass``, ``tether hook claude-code`` (the console script), and the
command ``tether install claude-code`` writes (``python -I -S .../shim/hooks.py claude-code``),
each hook with a typical PreToolUse payload against a stand-in `tether run` socket that answers
"allow" at once, so what is measured is the hook process: interpreter start, imports, one socket
round trip, exit. The commands run in turn, round after round (no shell), so that load on a
shared machine falls on all of them alike. Prints medians, p90 and each median's ratio to
``python -c pass``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tetherlab.shim import install

PAYLOAD = {
    "session_id": "5f0c8a8e-2b1c-4d0e-9a53-0d6c1f4e2a11",
    "transcript_path": "/home/dev/.claude/projects/-repo/5f0c8a8e.jsonl",
    "cwd": "/repo",
    "prompt_id": "c1d2e3f4",
    "permission_mode": "default",
    "effort": "high",
    "hook_event_name": "PreToolUse",
    "tool_name": "Write",
    "tool_input": {"file_path": "/repo/src/billing/pdf.py", "content": "def render(invoice):\n    ...\n" * 40},
    "tool_use_id": "toolu_01ABCDEF",
}
REPLY = b'{"decision": "allow", "reason": "", "context": ""}\n'
ACCEPT_TIMEOUT_S = 0.5
RUN_TIMEOUT_S = 30
WARMUP_ROUNDS = 5
BASELINE = "python -c pass"
INSTALLED = "installed hook command (python -I -S hooks.py)"


def serve(path: str, stop: threading.Event) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    sock.settimeout(ACCEPT_TIMEOUT_S)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        with conn:
            conn.makefile("rb").readline()
            conn.sendall(REPLY)
    sock.close()


def time_round_robin(commands: dict[str, list[str]], runs: int, payload: Path,
                     env: dict[str, str]) -> dict[str, list[float]]:
    """Each command once per round, in turn, so that load on a shared machine falls on all of
    them alike; no shell (the argv is run directly, the payload on stdin)."""
    out: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(runs + WARMUP_ROUNDS):
        for name, argv in commands.items():
            with open(payload, "rb") as stdin:
                t0 = time.perf_counter()
                subprocess.run(argv, stdin=stdin, stdout=subprocess.DEVNULL, env=env, check=False,
                               timeout=RUN_TIMEOUT_S)
                took = time.perf_counter() - t0
            if i >= WARMUP_ROUNDS:
                out[name].append(took)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tetherlab bench hook", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    python = sys.executable
    tether = str(Path(python).with_name("tether"))
    launcher = install.fast_launcher()
    tmp = Path(tempfile.mkdtemp(prefix="hookbench-", dir="/tmp"))
    payload = tmp / "payload.json"
    payload.write_text(json.dumps(PAYLOAD))
    sock_path = str(tmp / "hook.sock")
    stop = threading.Event()
    server = threading.Thread(target=serve, args=(sock_path, stop), daemon=True)
    server.start()
    env = {**os.environ, "TETHER_SOCK": sock_path}
    commands = {
        BASELINE: [python, "-c", "pass"],
        "python -I -S -c pass": [python, "-I", "-S", "-c", "pass"],
        "tether hook claude-code": [tether, "hook", "claude-code"],
    }
    if launcher is not None:
        commands[INSTALLED] = [*shlex.split(launcher), "claude-code"]
    try:
        times = time_round_robin(commands, args.runs, payload, env)
    finally:
        stop.set()
        server.join(5)
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    p90 = {name: sorted(ts)[int(len(ts) * 0.9) - 1] for name, ts in times.items()}
    base = medians[BASELINE]
    result = {"runs": args.runs, "median_ms": {k: round(v * 1000, 2) for k, v in medians.items()},
              "p90_ms": {k: round(v * 1000, 2) for k, v in p90.items()},
              "ratio_to_python_c_pass": {k: round(v / base, 2) for k, v in medians.items()}}
    if args.json:
        print(json.dumps(result))
    else:
        for name, m in medians.items():
            print(f"{name:50s} median {m * 1000:6.1f} ms  p90 {p90[name] * 1000:6.1f} ms  "
                  f"ratio to {BASELINE}: {m / base:5.2f}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
