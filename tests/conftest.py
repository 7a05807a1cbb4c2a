"""Shared fixtures: real node processes on loopback, each test in its own directory."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tetherlab.cluster.ops.localcluster import LocalCluster


@contextlib.contextmanager
def running_cluster(tmp_path: Path, nodes: int = 3, extra_toml: str = "") -> Iterator[LocalCluster]:
    """A local cluster, every node serving; stopped (by PID) however the block ends."""
    c = LocalCluster(tmp_path / "cluster", nodes=nodes, extra_toml=extra_toml)
    c.start()
    try:
        for nid in c.ids:
            c.wait_serving(nid)
        yield c
    finally:
        c.close()


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path) as c:
        yield c


def make_cluster(tmp_path: Path, nodes: int = 3, extra_toml: str = "") -> LocalCluster:
    c = LocalCluster(tmp_path / "cluster", nodes=nodes, extra_toml=extra_toml)
    c.start()
    for nid in c.ids:
        c.wait_serving(nid)
    return c


def until_available(call: Callable[[], dict[str, Any]], timeout_s: float = 20.0) -> dict[str, Any]:
    """``call``'s reply, asked again while the node answers ``unavailable``: on a busy machine a
    follower can miss the leader's heartbeats for a moment (or a new election runs), and a client
    is told to retry then. Only used for idempotent requests (a put of the same value, a get)."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = call()
        if r["ok"] or r.get("error", {}).get("code") != "unavailable" or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


class BackgroundWriter:
    """Writes keys ``<ns>/<prefix><i>`` in a loop through whichever nodes are up (skipping
    ``avoid``), recording what was acknowledged and the longest pause between acknowledgements.
    An indeterminate outcome is not counted as acknowledged. Use as a context manager."""

    def __init__(self, c: LocalCluster, ns: str = "w", prefix: str = "k", avoid: str | None = None,
                 pause_s: float = 0.0) -> None:
        import threading

        self.c, self.ns, self.prefix, self.avoid, self.pause_s = c, ns, prefix, avoid, pause_s
        self.acked: list[str] = []
        self.gaps_s: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        last_ok = time.monotonic()
        while not self._stop.is_set():
            for nid in list(self.c.ids):
                if self._stop.is_set() or nid == self.avoid or not self.c.alive(nid):
                    continue
                try:
                    with self.c.client(nid, timeout_s=6) as cl:
                        r = cl.put(self.ns, f"{self.prefix}{i}", "v")
                except OSError:
                    continue
                if r["ok"]:
                    self.acked.append(f"{self.prefix}{i}")
                    now = time.monotonic()
                    self.gaps_s.append(now - last_ok)
                    last_ok = now
                i += 1
                if self.pause_s:
                    time.sleep(self.pause_s)

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
