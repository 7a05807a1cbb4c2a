"""Fixtures for tests/agents: one real 3-node cluster per module (developer keys registered, one
concept per test) and a scripted model per test.

tests/agents is a package (it has an __init__.py) so that this conftest is imported as
`agents.conftest` and does not shadow tests/conftest.py, which other tests import by name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tetherlab.chaos.agents.model_server import ModelServer
from tetherlab.cluster.ops.localcluster import LocalCluster

from .harness import REGISTRY, SKIP_REASON, Env, keygen, tl

MODEL_MAX_REQUESTS = 60
MODEL_MAX_BODY_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if SKIP_REASON is not None:
        pytest.skip(SKIP_REASON)
    tmp = tmp_path_factory.mktemp("agents")
    c = LocalCluster(tmp / "cluster", nodes=3)
    c.start()
    try:
        for nid in c.ids:
            c.wait_serving(nid)
        c.wait_leader()
        keys = {}
        for dev in ("alice", "bob", "carol"):
            keys[dev] = keygen(tmp / dev, dev)
            r = tl(c, "keys", "add", dev, str(keys[dev]) + ".pub")
            for _ in range(50):  # the bootstrap admin key lands a moment after the first election
                if r.returncode == 0:
                    break
                time.sleep(0.2)
                r = tl(c, "keys", "add", dev, str(keys[dev]) + ".pub")
            assert r.returncode == 0, r.stderr
        (tmp / "concepts.toml").write_text(REGISTRY)
        assert tl(c, "concepts", "push", str(tmp / "concepts.toml")).returncode == 0
        yield Env(c, keys, tmp)
    finally:
        c.close()


@pytest.fixture
def model() -> Iterator[ModelServer]:
    server = ModelServer(max_requests=MODEL_MAX_REQUESTS, max_body_bytes=MODEL_MAX_BODY_BYTES).start()
    try:
        yield server
    finally:
        server.stop()
