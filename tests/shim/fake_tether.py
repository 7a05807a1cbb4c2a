"""A fake `tether run` hook socket for the adapter tests: answers each request line with
``answer(request)``; ``HANG`` never answers, ``b""`` hangs up."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable

HANG = b"<hang>"


class FakeTether:
    def __init__(self, answer: Callable[[dict[str, object]], bytes]) -> None:
        # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer.
        self.dir = tempfile.mkdtemp(prefix="tether-test-", dir="/tmp")
        self.path = os.path.join(self.dir, "tether.sock")
        self.answer = answer
        self.requests: list[dict[str, object]] = []
        self.closed = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(64)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            request = json.loads(conn.makefile("rb").readline())
            self.requests.append(request)
            out = self.answer(request)
            if out == HANG:
                self.closed.wait(30)  # bounded: the hook under test gives up long before
            elif out:
                conn.sendall(out)

    def close(self) -> None:
        self.closed.set()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)
