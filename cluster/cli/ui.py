"""``tetherlab ui``: the URL of a reachable node's live world view, and the read tokens that
open it from other machines (docs/world-view.md).

Exit codes: 0 done; 1 refused by the cluster; 2 bad usage or configuration; 3 no node reachable.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import webbrowser
from pathlib import Path
from typing import Any

from tetherlab.cluster import protocol as p
from tetherlab.cluster.core.config import ConfigError
from tetherlab.cluster.core.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from tetherlab.cluster.ops.client import cluster_status
from tetherlab.cluster.ops.config import load_cluster_file
from tetherlab.cluster.ops.layout import DEFAULT_DIR
from tetherlab.cluster.tools.admin import admin_request
from tetherlab.shim.client import ClientError, ClusterUnavailable, HostKeyMismatch, RequestError


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("ui", help="the live world view: print (or open) a reachable node's page; issue read tokens",
                       description="Without an action: the URL of a reachable node's /ui/ page.")
    _cluster_args(s)
    s.add_argument("--open", action="store_true", help="open the page in a browser")
    s.add_argument("--token", help="a read token to put in the URL (for a node that is not on this machine)")
    s.set_defaults(func=_url, ui_action=None)
    acts = s.add_subparsers(dest="ui_action", metavar="ACTION")
    t = acts.add_parser("token", help="issue, list or revoke read tokens (admin)",
                        description="A read token opens /ui/, /v1/ and /metrics from a non-loopback address "
                                    "(Prometheus sends it as Authorization: Bearer). It is printed once.")
    _cluster_args(t)
    g = t.add_mutually_exclusive_group(required=True)
    g.add_argument("name", nargs="?", help="issue a token with this name (e.g. prometheus, team-screen)")
    g.add_argument("--list", action="store_true", help="list the tokens (names, who issued them, when)")
    g.add_argument("--revoke", metavar="NAME", help="revoke a token: every node refuses it once it applied this")
    t.set_defaults(func=_token)


def _cluster_args(s: argparse.ArgumentParser) -> None:
    g = s.add_mutually_exclusive_group()
    g.add_argument("--dir", default=DEFAULT_DIR, help=f"cluster directory (default {DEFAULT_DIR})")
    g.add_argument("--cluster", help="cluster file (cluster.toml)")
    s.add_argument("--key", help="private key to use instead of the cluster file's admin_key (token actions)")
    s.add_argument("--json", action="store_true", help="print JSON")


def _path(args: argparse.Namespace) -> Path:
    return Path(args.cluster) if args.cluster else Path(args.dir) / "cluster.toml"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _url(args: argparse.Namespace) -> int:
    try:
        cf = load_cluster_file(_path(args))
    except ConfigError as e:
        print(f"tetherlab ui: {e}", file=sys.stderr)
        return EXIT_USAGE
    st = cluster_status(cf, timeout_s=1.0)
    reachable = [n for n in st["nodes"] if n["role"] != "unreachable"]
    if not reachable:
        print("tetherlab ui: no node answers (tetherlab status shows why)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    node = next((n for n in reachable if n["id"] == st["leader"]), reachable[0])
    host = node["http"].rsplit(":", 1)[0]
    url = f"http://{node['http']}/ui/" + (f"?token={args.token}" if args.token else "")
    needs_token = not _is_loopback(host) and not args.token
    if args.json:
        print(json.dumps({"url": url, "node": node["id"], "needs_token": needs_token}))
    else:
        print(url)
        if needs_token:
            print(f"note: {host} is not this machine's loopback: the page needs a read token "
                  f"(tetherlab ui token NAME, then tetherlab ui --token TOKEN)", file=sys.stderr)
    if args.open:
        webbrowser.open(url)
    return EXIT_OK


def _token(args: argparse.Namespace) -> int:
    path = _path(args)
    try:
        cf = load_cluster_file(path)
        key = Path(args.key) if args.key else cf.admin_key
        if key is None:
            raise ConfigError(f"{path}: no admin_key: say which private key to use (--key)")
    except ConfigError as e:
        print(f"tetherlab ui token: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.list:
        cls, fields = p.UiTokensList, {}
    elif args.revoke:
        cls, fields = p.UiTokenRevoke, {"name": args.revoke}
    else:
        cls, fields = p.UiTokenIssue, {"name": args.name}
    try:
        out = asyncio.run(admin_request(path, key, cf.developer or "admin", cls, fields))
    except p.LocalProtocolError as e:
        print(f"tetherlab ui token: {e.message}", file=sys.stderr)
        return EXIT_USAGE
    except RequestError as e:
        print(f"tetherlab ui token: refused ({e.code}): {e.message}", file=sys.stderr)
        return EXIT_FAILED
    except (ClusterUnavailable, HostKeyMismatch, ClientError) as e:
        print(f"tetherlab ui token: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.json:
        print(json.dumps(out))
    elif "token" in out:
        print(out["token"])
        print(f"read token {out['name']!r}: shown once. Prometheus: authorization: {{type: Bearer, credentials: "
              f"TOKEN}} (or credentials_file); a browser: tetherlab ui --token TOKEN", file=sys.stderr)
    elif "tokens" in out:
        for t in out["tokens"]:
            print(f"{t['name']:<24} issued by {t['created_by']}")
        if not out["tokens"]:
            print("(no read tokens)")
    else:
        print(f"revoked {out['revoked']}")
    return EXIT_OK
