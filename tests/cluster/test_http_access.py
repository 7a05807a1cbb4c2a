"""One access rule for everything HTTP: /ui/, /v1/ and /metrics open on loopback, a read token
from any other address; /livez and /readyz open. Checked from a real non-loopback address in a
private network namespace the test makes (a veth interface), with a real Prometheus scraping
with the token, and without the namespace on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tetherlab.chaos.netns import netns_unavailable_reason
from tetherlab.cluster.ops.localcluster import LocalCluster

pytestmark = pytest.mark.slow


@pytest.mark.skipif(netns_unavailable_reason() is not None, reason=str(netns_unavailable_reason()))
def test_off_loopback_every_view_needs_a_read_token(tmp_path: Path) -> None:
    script = Path(__file__).with_name("netns_access.py")
    r = subprocess.run(["unshare", "--net", "--", sys.executable, str(script), str(tmp_path)], capture_output=True,
                       text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for path in ("/ui/", "/v1/status", "/v1/intents", "/metrics", "/ui/api/snapshot"):
        assert out[f"anonymous {path}"] == 401, (path, out)
        assert out[f"bundle token {path}"] == 200, (path, out)
    for path in ("/livez", "/readyz"):
        assert out[f"anonymous {path}"] == 200, (path, out)
    assert out["wrong token /metrics"] == 401
    assert out["ui with ?token"]["code"] == 302 and out["ui with ?token"]["cookie"]
    assert "token=" not in (out["ui with ?token"]["location"] or "")
    assert out["ui with cookie"] == 200
    assert out["issued token /metrics"] == 200 and out["tokens listed"] == ["prometheus"]
    assert out["revoked token /metrics"] == 401
    if out["prometheus"] != "skip" and shutil.which("prometheus"):
        assert out["prometheus"].get("with_token") == "1", out["prometheus"]
        assert out["prometheus"].get("without_token") == "0", out["prometheus"]


def test_on_loopback_the_views_stay_open(cluster3: LocalCluster) -> None:
    cluster3.wait_leader()
    base = f"http://{cluster3.cluster.nodes[0].http}"
    for path in ("/ui/", "/v1/status", "/metrics", "/ui/api/snapshot", "/livez"):
        with urllib.request.urlopen(base + path, timeout=5) as r:
            assert r.status == 200, path
    with urllib.request.urlopen(base + "/livez", timeout=5) as r:
        live = json.loads(r.read())
    assert live["role"] in ("leader", "follower") and "version" in live and "term" in live
