"""Admin commands over SSH: ``tetherlab keys|concepts|intents ...``, and the offline
``concepts index|lint|match`` that need no cluster.

The cluster commands find the nodes and the admin key in the cluster file (``--dir DIR`` or
``--cluster FILE``), follow the leader like the shim, and print text or ``--json``.
Exit codes: 0 done; 1 refused by the cluster (the message says why), or lint findings; 2 bad
usage, configuration or input file; 3 the cluster has no quorum-backed leader reachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from tetherlab.cluster import protocol as p
from tetherlab.cluster.core.config import ConfigError
from tetherlab.cluster.core.engine.codeindex import CodeIndex, CodeIndexError, pack
from tetherlab.cluster.core.engine.lint import lint
from tetherlab.cluster.core.engine.lint import summary as lint_summary
from tetherlab.cluster.core.engine.matching import match_intent
from tetherlab.cluster.core.engine.model import IntentBody
from tetherlab.cluster.core.engine.registry import Registry, parse_toml
from tetherlab.cluster.core.errors import CommandError, RegistryError
from tetherlab.cluster.core.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from tetherlab.cluster.ops.codeindex import IndexBuildError, build_index
from tetherlab.cluster.ops.config import load_cluster_file
from tetherlab.cluster.ops.layout import forget_local_node, prepare_local_node
from tetherlab.cluster.tools.admin import admin_request, push_index
from tetherlab.shim.client import ClientError, ClusterUnavailable, HostKeyMismatch, RequestError
from tetherlab.shim.sentinel import plan_from_markdown


def add_parsers(sub: Any, cluster_args: Any) -> None:
    keys = sub.add_parser("keys", help="manage developers' SSH keys (admin)")
    ks = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = ks.add_parser("add", help="register a public key for a developer")
    s.add_argument("developer")
    s.add_argument("pubkey", help="a .pub file, an authorized_keys line, or - for standard input")
    s.add_argument("--role", choices=["developer", "admin", "verifier"], default="developer",
                   help="developer (agents), admin (administration), verifier (a git server: verifies commits only)")
    cluster_args(s)
    s = ks.add_parser("list", help="list registered keys")
    cluster_args(s)
    s = ks.add_parser("revoke", help="revoke a key (its open sessions end)")
    s.add_argument("id", help="key fingerprint (SHA256:...) or a unique prefix")
    cluster_args(s)

    con = sub.add_parser("concepts", help="the concept registry")
    cs = con.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = cs.add_parser("push", help="replace the registry with a concepts.toml (atomic, bumps the version)")
    s.add_argument("file", help="path to .tetherlab/concepts.toml, or - for standard input")
    s.add_argument("--index", metavar="FILE", help="a code index (tetherlab concepts index) to install with it")
    cluster_args(s)
    s = cs.add_parser("index", help="build the code index of a checkout: its files and the symbols they define "
                                    "(offline)")
    s.add_argument("--repo", required=True, help="the repository root (the root the registry's paths start at)")
    s.add_argument("--out", required=True, help="the index file to write (JSON)")
    s.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out paths matching this shell pattern (repeatable)")
    s.add_argument("--json", action="store_true", help="print the build report as JSON")
    s.set_defaults(func=run_offline)
    s = cs.add_parser("lint", help="check a concepts.toml for aliases that never match, common words, duplicates "
                                   "and, with --index, paths and symbols the code does not have (offline)")
    s.add_argument("file", help="path to .tetherlab/concepts.toml, or - for standard input")
    s.add_argument("--index", metavar="FILE", help="a code index to check paths and symbols against")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_offline)
    s = cs.add_parser("match", help="dry run: the claims a plan would get, with reasons (offline, no cluster)")
    s.add_argument("--registry", required=True, metavar="FILE", help="path to .tetherlab/concepts.toml")
    s.add_argument("--index", metavar="FILE", help="a code index (tetherlab concepts index)")
    s.add_argument("--plan", required=True, metavar="FILE",
                   help='the plan: JSON {"summary", "steps", "files"?, "concepts"?}, or Markdown; - for stdin')
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_offline)
    s = cs.add_parser("list", help="list concepts")
    cluster_args(s)
    s = cs.add_parser("show", help="show one concept and who holds it")
    s.add_argument("id")
    cluster_args(s)

    it = sub.add_parser("intents", help="agents' intents")
    its = it.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = its.add_parser("list", help="list active intents (--all: finished ones too)")
    s.add_argument("--all", action="store_true")
    s.add_argument("--limit", type=int, default=100)
    cluster_args(s)
    s = its.add_parser("revoke", help="revoke an intent: its agent is stopped (--revert: and its changes stashed)")
    s.add_argument("id")
    s.add_argument("--revert", action="store_true")
    cluster_args(s)
    cl = sub.add_parser("cluster", help="membership: add, remove or replace a node, online (admin)")
    cls = cl.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, what in (("add", "add a node"), ("replace", "add a new node, then remove an old one")):
        s = cls.add_parser(name, help=what)
        if name == "replace":
            s.add_argument("old", help="id of the node to remove")
        s.add_argument("id", help="id of the new node (e.g. n4)")
        s.add_argument("--raft", required=True, help="the new node's Raft HOST:PORT")
        s.add_argument("--ssh", required=True, help="its SSH HOST:PORT")
        s.add_argument("--http", required=True, help="its HTTP HOST:PORT")
        cluster_args(s)
    s = cls.add_parser("remove", help="remove a node (stop it afterwards)")
    s.add_argument("id")
    cluster_args(s)
    co = sub.add_parser("conflicts", help="soft conflicts and drifts: where agents' in-flight code overlaps")
    cos = co.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = cos.add_parser("list", help="soft conflicts now, then recent drifts and soft conflicts (--json: one JSON "
                                    "array, each entry with state current or recent)")
    s.add_argument("--limit", type=int, default=100, help="at most this many of each (1..1000)")
    cluster_args(s)
    for parser in (keys, con, it, cl, co):
        parser.set_defaults(func=run)
    for name in ("index", "lint", "match"):
        cs.choices[name].set_defaults(func=run_offline)


def _read_input(arg: str) -> str:
    return sys.stdin.read() if arg == "-" else Path(arg).read_text()


def _request(args: argparse.Namespace) -> tuple[type[p.Request], dict[str, Any]]:
    group, action = args.command, args.action
    if group == "keys":
        if action == "add":
            return p.KeysAdd, {"developer": args.developer, "public_key": _read_input(args.pubkey).strip(),
                               "role": args.role}
        if action == "list":
            return p.KeysList, {}
        return p.KeysRevoke, {"key_id": args.id}
    if group == "concepts":
        if action == "push":
            return p.ConceptsPush, {"toml": _read_input(args.file)}
        if action == "list":
            return p.ConceptsList, {}
        return p.ConceptsShow, {"concept_id": args.id}
    if group == "cluster":
        if action == "remove":
            return p.ClusterRemove, {"node_id": args.id}
        return p.ClusterAdd, {"node_id": args.id, "raft": args.raft, "ssh": args.ssh, "http": args.http}
    if group == "conflicts":
        return p.ConflictsList, {"limit": args.limit}
    if action == "list":
        return p.IntentsList, {"all": args.all, "limit": args.limit}
    return p.IntentsRevoke, {"intent_id": args.id, "revert": args.revert}


def run(args: argparse.Namespace) -> int:
    path = Path(args.cluster) if getattr(args, "cluster", None) else Path(args.dir) / "cluster.toml"
    try:
        cf = load_cluster_file(path)
        if cf.admin_key is None:
            raise ConfigError(f"{path}: no admin_key: say which private key to use (admin_key = \"PATH\")")
        key = Path(args.key) if getattr(args, "key", None) else cf.admin_key
        cls, fields = _request(args)
    except (ConfigError, OSError) as e:
        print(f"tetherlab {args.command} {args.action}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except p.ProtocolError as e:
        print(f"tetherlab {args.command} {args.action}: {e.message}", file=sys.stderr)
        return EXIT_USAGE

    local = args.command == "cluster" and not getattr(args, "cluster", None)
    if local and cls is p.ClusterAdd:
        try:
            cfg_path = prepare_local_node(path.parent, args.id, args.raft, args.ssh, args.http)
        except (ConfigError, OSError) as e:
            print(f"tetherlab cluster {args.action}: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"wrote {cfg_path}; start the node with: tetherlab master --config {cfg_path}", file=sys.stderr)

    replace_old = args.old if args.command == "cluster" and args.action == "replace" else None
    packed: tuple[str, list[str]] | None = None
    if args.command == "concepts" and args.action == "push" and args.index:
        try:
            packed = pack(_load_index(args.index))
        except (OSError, CodeIndexError) as e:
            print(f"tetherlab concepts push: {e}", file=sys.stderr)
            return EXIT_USAGE
        fields["index_digest"] = packed[0]
    try:
        if packed is not None:
            asyncio.run(push_index(path, key, cf.developer or "admin", packed[0], packed[1], activate=False))
        payload = asyncio.run(admin_request(path, key, cf.developer or "admin", cls, fields, replace_old))
    except p.LocalProtocolError as e:
        print(f"tetherlab {args.command} {args.action}: {e.message}", file=sys.stderr)
        return EXIT_USAGE
    except RequestError as e:
        if args.json:
            print(json.dumps({"error": {"code": e.code, "message": e.message}}))
        print(f"tetherlab {args.command} {args.action}: refused ({e.code}): {e.message}", file=sys.stderr)
        return EXIT_FAILED
    except (ClusterUnavailable, HostKeyMismatch) as e:
        print(f"tetherlab {args.command} {args.action}: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ClientError as e:
        print(f"tetherlab {args.command} {args.action}: {e}", file=sys.stderr)
        return EXIT_FAILED
    if local and args.action in ("remove", "replace"):
        forget_local_node(path.parent, args.id if args.action == "remove" else args.old)
    if args.json:
        if args.command == "conflicts":  # the command's contract: one JSON array
            print(json.dumps([{"state": "current", **c} for c in payload["current"]] +
                             [{"state": "recent", **e} for e in payload["recent"]]))
        else:
            print(json.dumps(payload))
    else:
        print(render(args.command, args.action, payload))
    return EXIT_OK


# --- offline: index, lint, match -----------------------------------------------------------------


def _load_index(path: str) -> CodeIndex:
    try:
        return CodeIndex.from_bytes(Path(path).read_bytes())
    except CodeIndexError as e:
        raise CodeIndexError(f"{path}: {e}") from None


def _load_registry(path: str) -> Registry:
    return Registry(parse_toml(_read_input(path)), version=0)


def _load_plan(path: str) -> IntentBody:
    raw = _read_input(path)
    stripped = raw.lstrip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise CommandError("bad_json", f"{path}: not JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("summary"), str):
            raise CommandError("bad_field", f"{path}: a plan is an object with a string 'summary'")
        concepts = obj.get("concepts") or {}
        if not isinstance(concepts, dict):
            raise CommandError("bad_field", f"{path}: 'concepts' must be an object with 'modify' and/or 'depend'")
        return IntentBody(summary=obj["summary"], steps=tuple(obj.get("steps") or ()),
                          files=tuple(obj.get("files") or ()), modify=tuple(concepts.get("modify") or ()),
                          depend=tuple(concepts.get("depend") or ()))
    plan = plan_from_markdown(raw)
    concepts = plan.get("concepts") or {}
    return IntentBody(summary=plan["summary"], steps=tuple(plan["steps"]), modify=tuple(concepts.get("modify", ())),
                      depend=tuple(concepts.get("depend", ())))


def run_offline(args: argparse.Namespace) -> int:
    """``concepts index|lint|match``: files in, figures out; no cluster."""
    name = f"tetherlab concepts {args.action}"
    try:
        if args.action == "index":
            idx, report = build_index(Path(args.repo), tuple(args.exclude))
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(idx.canonical())
            res = {"out": str(out), "digest": idx.digest, "bytes": len(idx.canonical()), **report.to_json()}
            if args.json:
                print(json.dumps(res))
            else:
                print(f"wrote {out}: {res['files']} files, {res['parsed']} parsed, {res['symbols']} symbols "
                      f"({res['bytes']} bytes, digest {idx.digest[:12]})"
                      + ("; truncated at the size bounds" if report.truncated else ""))
            return EXIT_OK
        if args.action == "lint":
            reg = _load_registry(args.file)
            index = _load_index(args.index) if args.index else None
            findings = lint(reg, index)
            res = lint_summary(findings)
            if args.json:
                print(json.dumps(res))
            else:
                for f in findings:
                    print(f"{f.concept}: {f.field}: {f.message}")
                print(f"{len(findings)} finding(s)" + (": " + ", ".join(f"{k} {v}" for k, v in res["counts"].items())
                                                     if findings else ""))
            return EXIT_FAILED if findings else EXIT_OK
        reg = _load_registry(args.registry)
        index = _load_index(args.index) if args.index else None
        claims = match_intent(reg, _load_plan(args.plan), index)
        claims.pop("registry_version", None)
        if args.json:
            print(json.dumps(claims))
        else:
            print(render_claims(claims))
        return EXIT_OK
    except RegistryError as e:
        if args.json and args.action == "lint":
            print(json.dumps({"findings": [{"concept": pr.concept, "field": pr.field, "value": "",
                                            "check": "invalid", "message": pr.message} for pr in e.problems],
                              "counts": {"invalid": len(e.problems)}}))
        print(f"{name}: {e}", file=sys.stderr)
        return EXIT_FAILED if args.action == "lint" else EXIT_USAGE
    except (OSError, CodeIndexError, IndexBuildError, CommandError) as e:
        msg = e.message if isinstance(e, CommandError) else str(e)
        print(f"{name}: {msg}", file=sys.stderr)
        return EXIT_USAGE


def render_claims(claims: dict[str, Any]) -> str:
    lines: list[str] = []
    for kind in ("modify", "depend"):
        for c in claims[kind]:
            why = "; ".join(f"{r['kind']} {r['detail']!r} ({r['source']})" for r in c["reasons"][:4])
            lines.append(f"{kind:<7} {c['concept']:<36} {why}")
    if not lines:
        lines.append("no claims: the plan names nothing in the registry")
    for chk in claims.get("checks", []):
        lines.append(f"check   {chk['concept']:<36} {chk['note']}")
    if claims.get("files"):
        lines.append("files   " + ", ".join(claims["files"][:20]))
    if claims.get("symbols"):
        lines.append("symbols " + ", ".join(claims["symbols"][:20]))
    return "\n".join(lines)


def render(group: str, action: str, payload: dict[str, Any]) -> str:
    if group == "keys" and action == "list":
        rows = [f"{k['id']}  {k['developer']:<16} {k['role']:<9} {k.get('comment', '')}" for k in payload["keys"]]
        return "\n".join(rows) if rows else "(no keys)"
    if group == "keys":
        k = payload.get("key") or payload.get("revoked") or {}
        verb = "added" if "key" in payload else "revoked"
        return f"{verb} {k.get('id')} ({k.get('developer')}, {k.get('role')})"
    if group == "concepts" and action == "list":
        rows = [f"{c['id']:<40} {c.get('title', '')}" for c in payload.get("concepts", [])]
        head = f"registry version {payload.get('version', 0)}"
        return "\n".join([head, *rows])
    if group == "intents" and action == "list":
        rows = [
            f"{i['intent_id']:<12} {i['status']:<10} {i['agent_id']:<50} {i.get('summary', '')[:60]}"
            for i in payload.get("intents", [])
        ]
        return "\n".join(rows) if rows else "(no intents)"
    if group == "conflicts":
        lines = ["soft conflicts now:"]
        lines += [f"  {c['agent_id']} ({c['intent_id']}): {c['message']}" for c in payload["current"]] or ["  none"]
        lines.append("recent drifts and soft conflicts (newest first):")
        for e in payload["recent"]:
            what = e.get("concept") or e.get("what") or ""
            other = f" <-> {e['other_agent_id']}" if e.get("other_agent_id") else ""
            where = f"{what} {e.get('path', '')}".strip()
            lines.append(f"  {e['index']:>8} {e['kind']:<14} {e['agent_id']}{other} {where}".rstrip())
        if not payload["recent"]:
            lines.append("  none")
        return "\n".join(lines)
    return json.dumps(payload, indent=2)
