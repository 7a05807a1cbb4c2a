"""The ``tetherlab`` command: cluster set-up, node process, local cluster, status, benchmarks.

Exit codes (``tetherlab.cluster.core.exitcodes``): 0 success; 1 the operation failed (for example
no leader); 2 bad usage or bad configuration; 3 the cluster could not be reached.

This module parses arguments and prints; the work is done by the layers below (``ops`` for
files and processes, ``tools`` for requests to a running cluster, ``node`` for ``master``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tetherlab.cluster import __version__
from tetherlab.cluster.core.config import ClusterFile, ConfigError
from tetherlab.cluster.core.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from tetherlab.cluster.ops.config import load_cluster_file, load_node_config, read_secret
from tetherlab.cluster.ops.layout import DEFAULT_BASE_PORT, DEFAULT_DIR, init_cluster, init_hosts
from tetherlab.cluster.ops.localcluster import Supervisor, wait_for_leader

UP_LEADER_WAIT_S = 30.0


# --- init ---------------------------------------------------------------------------------


def _cmd_init(args: argparse.Namespace) -> int:
    if args.hosts:
        if not args.out:
            print("tetherlab init: --hosts needs --out DIR (one bundle per host is written there)", file=sys.stderr)
            return EXIT_USAGE
        try:
            res = init_hosts(args.hosts.split(","), Path(args.out), data_dir=args.data_dir, raft_port=args.raft_port,
                             ssh_port=args.ssh_port, http_port=args.http_port,
                             admin_key=Path(args.admin_key) if args.admin_key else None, admin_name=args.admin_name,
                             remote=args.remote, force=args.force)
        except ConfigError as e:
            print(f"tetherlab init: {e}", file=sys.stderr)
            return EXIT_USAGE
        if args.json:
            print(json.dumps(res))
        else:
            print(f"wrote {len(res['bundles'])} host bundle(s) in {res['out']}:")
            for host, path in res["bundles"].items():
                print(f"  {host}: {path}  (copy to /etc/tetherlab on {host}; see deploy/systemd/README.md)")
            print(f"  shim configuration for developers: {res['shim']}")
            print(f"  admin CLI configuration: {res['admin']}  (tetherlab status --cluster {res['admin']})")
            print(f"  Prometheus: {Path(res['out']) / 'prometheus.yml'} and its read token {res['prometheus_token']} "
                  "(keep them together; see docs/world-view.md)")
        return EXIT_OK
    try:
        cluster = init_cluster(Path(args.dir), args.nodes, args.host, args.base_port, args.force,
                               Path(args.admin_key) if args.admin_key else None, args.admin_name, args.remote)
    except ConfigError as e:
        print(f"tetherlab init: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps({"dir": str(Path(args.dir).resolve()), "nodes": [n.to_json() for n in cluster.nodes]}))
    else:
        print(f"initialised {len(cluster.nodes)} node(s) in {Path(args.dir).resolve()}")
        for n in cluster.nodes:
            print(f"  {n.id}: raft {n.raft}  ssh {n.ssh}  http {n.http}  config {Path(args.dir) / n.id / 'node.toml'}")
    return EXIT_OK


# --- master ---------------------------------------------------------------------------------


def _cmd_master(args: argparse.Namespace) -> int:
    from tetherlab.cluster.node import logs
    from tetherlab.cluster.node.process import run_node

    try:
        cfg = load_node_config(args.config)
        logs.setup(args.log_level, args.log_format, cfg.id)
        secret = read_secret(cfg.secret_file)  # refuse to start without it, before anything binds
    except ConfigError as e:
        print(f"tetherlab master: {e}", file=sys.stderr)
        return EXIT_USAGE
    return run_node(cfg, secret, Path(args.ready_file) if args.ready_file else None)


# --- backup / restore / recover -----------------------------------------------------------


def _cmd_backup(args: argparse.Namespace) -> int:
    from tetherlab.cluster.ops.client import ControlClient

    out = Path(args.out).resolve()
    try:
        if args.config:
            socks = [load_node_config(args.config).data_dir / "control.sock"]
        else:
            cluster = load_cluster_file(Path(args.dir) / "cluster.toml")
            ids = [args.node] if args.node else [n.id for n in cluster.nodes]
            socks = [Path(args.dir) / i / "data" / "control.sock" for i in ids]
    except ConfigError as e:
        print(f"tetherlab backup: {e}", file=sys.stderr)
        return EXIT_USAGE
    last = "no node's control socket found on this host"
    for sock in socks:
        if not sock.exists():
            continue
        try:
            with ControlClient(sock, timeout_s=120) as c:
                reply = c.call("backup", path=str(out))
        except OSError as e:
            last = f"{sock}: {e}"
            continue
        if reply.get("ok"):
            h = reply["result"]
            if args.json:
                print(json.dumps({"file": str(out), **h}))
            else:
                print(f"backup written to {out}: raft index {h['applied_index']}, registry version "
                      f"{h.get('registry_version')}, from node {h.get('node')}")
            return EXIT_OK
        last = f"{reply['error']['code']}: {reply['error']['message']}"
    print(f"tetherlab backup: {last}", file=sys.stderr)
    return EXIT_UNAVAILABLE


def _report(args: argparse.Namespace, what: str, res: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(res))
    else:
        gap = f"; its log starts at index {res['log_start_index']} (a gap of {res['gap']})" \
            if "log_start_index" in res else ""
        print(f"{what} cluster in {res['dir']} at raft index {res['restored_index']} "
              f"(registry version {res.get('registry_version')}){gap}; start it with: tetherlab up --dir {res['dir']}")
    return EXIT_OK


def _cmd_restore(args: argparse.Namespace) -> int:
    from tetherlab.cluster.ops.backup import restore
    from tetherlab.cluster.replica.store import SnapshotError

    if bool(args.config) == bool(args.dir):
        print("tetherlab restore: give exactly one of --dir (a new local cluster) or --config (seed a deployed "
              "node)", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.config:
            from tetherlab.cluster.ops.backup import restore_node

            return _report(args, "seeded node data", restore_node(Path(args.file), Path(args.config),
                                                                  above_index=args.above_index))
        return _report(args, "restored", restore(Path(args.file), Path(args.dir), args.nodes, host=args.host,
                                                 base_port=args.base_port,
                                                 admin_key=Path(args.admin_key) if args.admin_key else None,
                                                 above_index=args.above_index))
    except (ConfigError, SnapshotError, OSError) as e:
        print(f"tetherlab restore: {e}", file=sys.stderr)
        return EXIT_USAGE


def _cmd_recover(args: argparse.Namespace) -> int:
    from tetherlab.cluster.ops.backup import recover
    from tetherlab.cluster.replica.store import SnapshotError

    try:
        return _report(args, "recovered a single-node", recover(
            Path(args.config), Path(args.dir), host=args.host, base_port=args.base_port,
            admin_key=Path(args.admin_key) if args.admin_key else None, above_index=args.above_index))
    except (ConfigError, SnapshotError, OSError) as e:
        print(f"tetherlab recover: {e}", file=sys.stderr)
        return EXIT_USAGE


# --- status ---------------------------------------------------------------------------------


def _find_cluster(args: argparse.Namespace) -> ClusterFile:
    if getattr(args, "cluster", None):
        return load_cluster_file(args.cluster)
    return load_cluster_file(Path(args.dir) / "cluster.toml")


def _cmd_status(args: argparse.Namespace) -> int:
    from tetherlab.cluster.ops.client import cluster_status

    try:
        cluster = _find_cluster(args)
    except ConfigError as e:
        print(f"tetherlab status: {e}", file=sys.stderr)
        return EXIT_USAGE
    versions: dict[str, str] = {}
    st = cluster_status(cluster, versions=versions)
    if args.json:
        print(json.dumps(st))
    else:
        print(f"leader: {st['leader'] or 'none'}")
        print(f"{'id':<6} {'role':<12} {'term':>6} {'commit':>9} {'applied':>9}  raft / ssh / http")
        for n in st["nodes"]:
            print(
                f"{n['id']:<6} {n['role']:<12} {_s(n['term']):>6} {_s(n['commit_index']):>9} "
                f"{_s(n['applied_index']):>9}  {n['raft']} / {n['ssh']} / {n['http']}  {versions.get(n['id']) or ''}"
            )
        if len(set(versions.values())) > 1:
            print(f"warning: nodes run different versions {versions}: finish the rolling upgrade", file=sys.stderr)
    if all(n["role"] == "unreachable" for n in st["nodes"]):
        return EXIT_UNAVAILABLE
    return EXIT_OK if st["leader"] else EXIT_FAILED


def _s(v: Any) -> str:
    return "-" if v is None else str(v)


# --- up -------------------------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace) -> int:
    directory = Path(args.dir).resolve()
    cluster_path = directory / "cluster.toml"
    try:
        if not cluster_path.exists():
            init_cluster(directory, args.nodes, args.host, args.base_port)
            print(f"initialised {args.nodes} node(s) in {directory}")
        cluster = load_cluster_file(cluster_path)
    except ConfigError as e:
        print(f"tetherlab up: {e}", file=sys.stderr)
        return EXIT_USAGE
    if len(cluster.nodes) != args.nodes and args.nodes_given:
        print(f"tetherlab up: {cluster_path} has {len(cluster.nodes)} node(s), not {args.nodes}; "
              f"use another --dir or remove it", file=sys.stderr)
        return EXIT_USAGE
    stopping = False

    def _stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    def say(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    sup = Supervisor(directory, cluster, say)
    try:
        sup.start_all()
        st = wait_for_leader(cluster, UP_LEADER_WAIT_S, progress=lambda line: print(f"  {line}", file=sys.stderr))
        if st is None:
            print(f"no leader elected within {UP_LEADER_WAIT_S:.0f} s; see the node logs", file=sys.stderr)
            return EXIT_FAILED
        print(f"cluster file: {cluster_path}   (tetherlab status --dir {args.dir})")
        print("a node that exits is restarted after a short delay; press Ctrl-C to stop all nodes", flush=True)
        sup.run(lambda: stopping)
        return EXIT_OK
    finally:
        sup.stop()


# --- demo -----------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.agents == "real":
        # The real agents' walkthrough lives with the scripted model, outside the product (chaos).
        from tetherlab.chaos.agents.demo import main as real_demo_main

        return real_demo_main(args.dir, args.json)
    from tetherlab.cluster.tools.demo import main as demo_main

    return demo_main(args.dir, args.json)


# --- bench ----------------------------------------------------------------------------------


# Test and measurement tools (tetherlab.chaos): each parses its own arguments; imported only when run.
BENCHES = {
    "raft": "the durable cluster vs bare pysyncobj, same run",
    "engine": "the pure coordination engine at 10,000 concepts",
    "apply": "a replica's apply path (LMDB, batched commits), as a follower and as the leader",
    "push": "large registry pushes on a real cluster, and whether each kept its leader",
    "cluster": "the full path (SSH, protocol, Raft, LMDB) vs bare pysyncobj and etcd",
    "worldview": "the live world view at 10,000 concepts and 5,000 active intents, in headless Chromium",
    "matching": "matching on labelled plans: precision, recall, F1, exact match",
    "hook": "tether's Claude Code hook (as installed, and as `tether hook`) vs bare `python -c pass`",
}


PASSTHROUGH = ("bench", "drill", "sim")  # commands whose tool parses its own arguments


def _passthrough(command: str, rest: list[str]) -> int:
    """``tetherlab bench NAME ARGS``, ``tetherlab drill ARGS``, ``tetherlab sim ARGS``: the tool's own parser."""
    import importlib

    if command == "drill":
        from tetherlab.chaos import drill

        return drill.main(rest)
    if command == "sim":
        from tetherlab.chaos.sim import cli as sim_cli

        return sim_cli.main(rest)
    if not rest or rest[0] in ("-h", "--help") or rest[0] not in BENCHES:
        out = sys.stdout if rest and rest[0] in ("-h", "--help") else sys.stderr
        print("usage: tetherlab bench NAME [--help | ARGS...]\n\nbenchmarks that print figures:", file=out)
        for name, what in BENCHES.items():
            print(f"  {name:<8} {what}", file=out)
        return EXIT_OK if out is sys.stdout else EXIT_USAGE
    module = importlib.import_module(f"tetherlab.chaos.bench.{rest[0]}")
    return int(module.main(rest[1:]))


# --- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tetherlab", description="Tetherlab master cluster: set up, run, inspect.")
    p.add_argument("--version", action="version", version=f"tetherlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("init", help="write node configs and a cluster secret for a new cluster")
    s.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    s.add_argument("--dir", default=DEFAULT_DIR, help=f"directory to write (default {DEFAULT_DIR})")
    s.add_argument("--host", default="127.0.0.1", help="address the nodes listen on (default 127.0.0.1)")
    s.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT,
                   help="raft ports are BASE+1.., ssh BASE+101.., http BASE+201.. (default %(default)s)")
    s.add_argument("--force", action="store_true", help="overwrite an initialised directory")
    s.add_argument("--admin-key", help="register this public key (.pub or authorized_keys line) as the first admin "
                                       "(default: generate DIR/admin_ed25519)")
    s.add_argument("--admin-name", default="admin", help="developer name of the first admin (default admin)")
    s.add_argument("--remote", default="", help="the git remote this cluster coordinates (default: set by the "
                                                 "first session)")
    s.add_argument("--hosts",
                   help="HOST1,HOST2,HOST3: write one bundle per host (with --out) instead of a local cluster")
    s.add_argument("--out", help="with --hosts: the directory to write the bundles to")
    s.add_argument("--data-dir", default="/var/lib/tetherlab",
                   help="with --hosts: data directory on each host (default /var/lib/tetherlab)")
    s.add_argument("--raft-port", type=int, default=7100, help="with --hosts: Raft port on every host (7100)")
    s.add_argument("--ssh-port", type=int, default=7200, help="with --hosts: SSH port on every host (7200)")
    s.add_argument("--http-port", type=int, default=7300, help="with --hosts: HTTP port on every host (7300)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=_cmd_init)

    s = sub.add_parser("backup", help="write a consistent snapshot of a running node's state to a file")
    s.add_argument("--out", required=True, help="the backup file to write")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--config", help="node.toml of a node running on this host")
    g.add_argument("--dir", default=DEFAULT_DIR, help=f"local cluster directory (default {DEFAULT_DIR})")
    s.add_argument("--node", help="with --dir: which node (default: the first that answers)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_backup)

    s = sub.add_parser("restore", help="bootstrap a new cluster from a backup file: a local one (--dir), or seed "
                                      "one deployed node (--config, on every host)")
    s.add_argument("file", help="a file written by tetherlab backup")
    s.add_argument("--config", help="seed this deployed node (node.toml of a new, never-started node) instead")
    s.add_argument("--host", default="127.0.0.1", help="with --dir: address the local nodes listen on")
    s.add_argument("--admin-key", help="private key of an admin registered in the backup, for cluster.toml "
                                       "(the backup's key registry is kept as it was)")
    s.add_argument("--dir", help="new local cluster directory (must not exist yet)")
    s.add_argument("--nodes", type=int, default=3)
    s.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    s.add_argument("--above-index", type=int, default=0,
                   help="the old cluster's last Raft index, if known and above the next epoch: the restored log "
                        "starts past it (fencing tokens never repeat)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_restore)

    s = sub.add_parser("recover", help="disaster recovery: a new single-node cluster from a stopped node's data")
    s.add_argument("--config", required=True, help="node.toml of the surviving node (stop it first)")
    s.add_argument("--admin-key", help="private key of an admin registered in the cluster, for cluster.toml")
    s.add_argument("--host", default="127.0.0.1", help="address the recovered node listens on")
    s.add_argument("--dir", required=True, help="new cluster directory (must not exist yet)")
    s.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    s.add_argument("--above-index", type=int, default=0,
                   help="the old cluster's last Raft index, if known and above the next epoch")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_recover)

    s = sub.add_parser("master", help="run one node (the command systemd units run)")
    s.add_argument("--config", required=True, help="node configuration file (TOML)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-format", default="text", choices=["text", "json"])
    s.add_argument("--ready-file", help=argparse.SUPPRESS)
    s.set_defaults(func=_cmd_master)

    s = sub.add_parser("up", help="run a local cluster in the foreground (Ctrl-C stops it)")
    s.add_argument("--nodes", type=int, default=None, help="number of nodes (default 3; 1 = embedded single node)")
    s.add_argument("--dir", default=DEFAULT_DIR, help=f"cluster directory (default {DEFAULT_DIR})")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    s.set_defaults(func=_cmd_up)

    s = sub.add_parser("status", help="show every node's role, term and indexes")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--dir", default=DEFAULT_DIR, help=f"cluster directory (default {DEFAULT_DIR})")
    g.add_argument("--cluster", help="cluster file (cluster.toml)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_cmd_status)

    def cluster_args(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--dir", default=DEFAULT_DIR, help=f"cluster directory (default {DEFAULT_DIR})")
        g.add_argument("--cluster", help="cluster file (cluster.toml) naming the nodes and the admin key")
        sp.add_argument("--key", help="private key to use instead of the cluster file's admin_key")
        sp.add_argument("--json", action="store_true", help="print JSON")

    from tetherlab.cluster.cli import admin, git, ui

    admin.add_parsers(sub, cluster_args)
    git.add_parsers(sub)
    ui.add_parsers(sub)

    s = sub.add_parser("demo", help="the seed walkthrough: three scripted agents through real tether processes")
    s.add_argument("--dir", default=DEFAULT_DIR,
                   help=f"cluster directory; a cluster is started there if none runs (default {DEFAULT_DIR})")
    s.add_argument("--json", action="store_true", help='print {"alice": VERDICT, "bob": VERDICT, "carol": VERDICT}')
    s.add_argument("--agents", choices=("scripted", "real"), default="scripted",
                   help="scripted agents (default), or the real Claude Code (alice, carol) and OpenCode (bob) "
                        "driven by a scripted model (needs `make agents`)")
    s.set_defaults(func=_cmd_demo)

    # Listed for --help only: main() hands their arguments to the tool itself.
    sub.add_parser("bench", help="benchmarks that print figures (tetherlab bench --help)")
    sub.add_parser("drill", help="fault drills: partitions, kills, pauses, latency, with checked histories "
                                 "(tetherlab drill --help)")
    sub.add_parser("sim", help="deterministic simulation of the cluster: seeded fault schedules, every one "
                               "checked (tetherlab sim --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, not at exit: a reader gone (`| head`) is caught below
    except BrokenPipeError:
        # The reader of our output stopped early: no traceback. What is still buffered goes to
        # /dev/null, so the interpreter's own flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        return _passthrough(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "up":
        args.nodes_given = args.nodes is not None
        args.nodes = args.nodes or 3
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
