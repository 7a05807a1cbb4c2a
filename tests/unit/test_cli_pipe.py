"""`tetherlab ... | head`: a reader that stops early ends the command quietly, exit code 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# argparse's own --help swallows the write error and exits 0 as usual in later 3.11 releases (3.11.7
# here); Debian 12's 3.11.2 lets it reach the command's handler, which ends quietly with exit 1.
ARGPARSE_HELP = (0, 1)


@pytest.mark.parametrize(("argv", "codes"), [
    (["bench", "--help"], (1,)), (["status", "--help"], ARGPARSE_HELP), (["--help"], ARGPARSE_HELP),
    (["bench", "apply", "--concepts", "20", "--entries", "60", "--passes", "1"], (1,)),
], ids=["bench-help", "argparse-help", "top-help", "bench-run"])
def test_a_closed_stdout_ends_the_command_without_a_traceback(argv: list[str], codes: tuple[int, ...]) -> None:
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first line: every write fails with EPIPE
    try:
        p = subprocess.run([sys.executable, "-m", "tetherlab.cluster.cli", *argv], stdout=w,
                           stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(w)
    err = p.stderr.decode()
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert p.returncode in codes, err
