"""Sockets the node listens on: Unix socket paths of any length, and why an address cannot be bound.

A ``sockaddr_un`` holds at most 107 bytes of path, and a data directory can be deeper than that
(a deployment's volume, a test's temporary directory): binding ``DATA_DIR/control.sock`` then
failed with ``AF_UNIX path too long`` and the node did not start. :func:`usable_path` gives a
path that fits: the path itself when it does, otherwise the same file reached through
``/proc/self/fd/N`` of its directory (Linux resolves it for ``bind`` and ``connect`` alike), the
directory held open while the caller uses it.

:func:`bind_error` says why a TCP address cannot be listened on, by trying: pysyncobj gives up
binding its Raft port without saying why, and local clusters probe for free ports with it.
"""

from __future__ import annotations

import contextlib
import os
import socket
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


def bind_error(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now (the OS's words), or None when it can."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        return e.strerror or str(e)
    return None
