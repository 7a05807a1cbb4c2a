"""Runs inside a private network namespace (``unshare --net``; see test_http_access.py): a node
on a non-loopback address (a veth interface the script adds), checked from that address, and a
real Prometheus scraping it with a bearer token. Prints one JSON object of findings."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tetherlab.cluster import protocol as p
from tetherlab.cluster.node.access import token_hash
from tetherlab.cluster.ops.localcluster import LocalCluster, free_base_port
from tetherlab.cluster.tools.admin import admin_request

ADDR = "10.77.0.1"
BUNDLE_TOKEN = "tlr_bundle-token-for-prometheus-0123456789"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def get(url: str, token: str | None = None, cookie: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if cookie:
        req.add_header("Cookie", cookie)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a: Any, **k: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def main(work: Path) -> dict[str, Any]:
    sh("ip", "link", "set", "lo", "up")
    # A veth pair of this namespace's own: the node listens on a real non-loopback address.
    sh("ip", "link", "add", "tl0", "type", "veth", "peer", "name", "tl1")
    sh("ip", "addr", "add", f"{ADDR}/24", "dev", "tl0")
    sh("ip", "link", "set", "tl0", "up")
    sh("ip", "link", "set", "tl1", "up")
    out: dict[str, Any] = {}
    c = LocalCluster(work / "cluster", nodes=1, host=ADDR, base_port=free_base_port(1, ADDR),
                     extra_toml=f'[http]\nread_token_sha256 = ["{token_hash(BUNDLE_TOKEN)}"]\n')
    c.start()
    try:
        c.wait_serving("n1")
        c.wait_leader()
        base = f"http://{c.cluster.nodes[0].http}"
        for path in ("/ui/", "/v1/status", "/v1/intents", "/metrics", "/ui/api/snapshot", "/livez", "/readyz"):
            out[f"anonymous {path}"] = get(base + path)[0]
            out[f"bundle token {path}"] = get(base + path, token=BUNDLE_TOKEN)[0]
        out["wrong token /metrics"] = get(base + "/metrics", token="tlr_nope")[0]
        code, headers, _ = get(base + f"/ui/?token={BUNDLE_TOKEN}")
        cookie = headers.get("Set-Cookie", "").split(";")[0]
        out["ui with ?token"] = {"code": code, "location": headers.get("Location"), "cookie": bool(cookie)}
        out["ui with cookie"] = get(base + "/ui/", cookie=cookie)[0]
        # A token an admin issues over SSH works on the node that applied it, and stops once revoked.
        cluster_file = c.dir / "cluster.toml"
        admin = c.dir / "admin_ed25519"
        issued = asyncio.run(admin_request(cluster_file, admin, "admin", p.UiTokenIssue, {"name": "prometheus"}))
        token = issued["token"]
        out["issued token /metrics"] = get(base + "/metrics", token=token)[0]
        out["tokens listed"] = [t["name"] for t in asyncio.run(
            admin_request(cluster_file, admin, "admin", p.UiTokensList, {}))["tokens"]]
        out["prometheus"] = prometheus(work, c.cluster.nodes[0].http, token) if shutil.which("prometheus") else "skip"
        asyncio.run(admin_request(cluster_file, admin, "admin", p.UiTokenRevoke, {"name": "prometheus"}))
        time.sleep(0.3)
        out["revoked token /metrics"] = get(base + "/metrics", token=token)[0]
    finally:
        c.close()
    return out


def prometheus(work: Path, target: Any, token: str) -> dict[str, Any]:
    (work / "token").write_text(token)
    cfg = work / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: with_token\n    authorization:\n      credentials_file: {work / 'token'}\n"
        f"    static_configs:\n      - targets: [\"{target}\"]\n"
        f"  - job_name: without_token\n    static_configs:\n      - targets: [\"{target}\"]\n")
    port = 19090
    prom = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={work / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        ups: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query=up", timeout=2) as r:
                    res = json.loads(r.read())["data"]["result"]
                ups = {s["metric"]["job"]: s["value"][1] for s in res}
            except (OSError, ValueError, KeyError):
                ups = {}
            if ups.get("with_token") == "1" and "without_token" in ups:
                break
            time.sleep(0.5)
        return ups
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
