"""Hook latency: `tether hook claude-code` on a typical PreToolUse payload against bare Python.

    .venv/bin/python tests/agents/bench_hook.py [--runs N]

Runs hyperfine (apt-get install hyperfine) when it is on PATH, else times the commands itself.
The hook talks to a stand-in `tether run` socket that answers "allow" at once, so what is
measured is the hook process: interpreter start, imports, one socket round trip, exit.
Prints medians and the ratio to `python -c pass` (the venv's interpreter, which also pays for
site-packages, and the system interpreter with -I, which does not).
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


def time_command(cmd: str, runs: int, env: dict[str, str]) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, shell=True, env=env, stdout=subprocess.DEVNULL, check=False, timeout=30)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args()
    venv_python = sys.executable
    tether = str(Path(venv_python).with_name("tether"))
    system_python = shutil.which("python3", path="/usr/bin:/bin") or "python3"
    tmp = Path(tempfile.mkdtemp(prefix="hookbench-", dir="/tmp"))
    payload = tmp / "payload.json"
    payload.write_text(json.dumps(PAYLOAD))
    sock_path = str(tmp / "hook.sock")
    stop = threading.Event()
    server = threading.Thread(target=serve, args=(sock_path, stop), daemon=True)
    server.start()
    env = {**os.environ, "TETHER_SOCK": sock_path}
    commands = {
        "system python3 -I -c pass": f"{shlex.quote(system_python)} -I -c pass",
        "venv python -c pass": f"{shlex.quote(venv_python)} -c pass",
        "tether hook claude-code (allow via socket)": f"{shlex.quote(tether)} hook claude-code < {payload}",
    }
    medians: dict[str, float] = {}
    try:
        if shutil.which("hyperfine"):
            export = tmp / "hyperfine.json"
            # hyperfine runs each command through sh and subtracts the shell's own start-up.
            cmd = ["hyperfine", "--warmup", "5", "--runs", str(args.runs), "--export-json", str(export)]
            for name, c in commands.items():
                cmd += ["--command-name", name, c]
            subprocess.run(cmd, env=env, check=True, timeout=600)
            for r in json.loads(export.read_text())["results"]:
                medians[r["command"]] = r["median"]
        else:
            for name, c in commands.items():
                time_command(c, 5, env)
                medians[name] = statistics.median(time_command(c, args.runs, env))
    finally:
        stop.set()
        server.join(5)
        shutil.rmtree(tmp, ignore_errors=True)
    hook = medians["tether hook claude-code (allow via socket)"]
    for name, m in medians.items():
        print(f"{name:45s} median {m * 1000:7.1f} ms")
    for base in ("venv python -c pass", "system python3 -I -c pass"):
        print(f"ratio hook / {base}: {hook / medians[base]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
