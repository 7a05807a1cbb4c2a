"""Unix socket paths of any length.

A ``sockaddr_un`` holds at most 107 bytes of path, and a data directory can be deeper than that
(a deployment's volume, a test's temporary directory): binding ``DATA_DIR/control.sock`` then
failed with ``AF_UNIX path too long`` and the node did not start. :func:`usable_path` gives a
path that fits: the path itself when it does, otherwise the same file reached through
``/proc/self/fd/N`` of its directory (Linux resolves it for ``bind`` and ``connect`` alike), the
directory held open while the caller uses it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

SUN_PATH_MAX_BYTES = 107  # sizeof(sockaddr_un.sun_path) is 108 on Linux, with the closing NUL


@contextlib.contextmanager
def usable_path(path: str | Path) -> Iterator[str]:
    """``path``, or a short alias of it valid inside the ``with`` block, for bind or connect."""
    text = str(path)
    if len(os.fsencode(text)) <= SUN_PATH_MAX_BYTES:
        yield text
        return
    parent, name = os.path.split(text)
    try:
        fd = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY)
    except OSError as e:
        raise OSError(e.errno, f"cannot open the directory of the socket {text}: {e.strerror}") from None
    try:
        short = f"/proc/self/fd/{fd}/{name}"
        if len(os.fsencode(short)) > SUN_PATH_MAX_BYTES or not os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(f"the socket path {text} is {len(os.fsencode(text))} bytes, longer than the "
                          f"{SUN_PATH_MAX_BYTES} a Unix socket takes, and /proc cannot shorten it here: "
                          f"use a shorter directory")
        yield short
    finally:
        os.close(fd)
