"""The ``tetherlab`` command: cluster set-up, node process, local cluster, status, benchmarks.

Exit codes: 0 success; 1 the operation failed (for example no leader); 2 bad usage or bad
configuration; 3 the cluster could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tetherlab.cluster import __version__
from tetherlab.cluster.config import (
    Address,
    ClusterFile,
    ClusterSettings,
    ConfigError,
    NodeAddresses,
    NodeConfig,
    load_cluster_file,
    load_node_config,
    new_secret,
    render_cluster_file,
    render_node_config,
    write_private,
    write_text_atomic,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_DIR = ".tetherlab"
DEFAULT_BASE_PORT = 7100
UP_LEADER_WAIT_S = 30.0
STOP_GRACE_S = 10.0


# --- init -----------------------------------------------------------------------------------


def admin_key_line(directory: Path, admin_key: Path | None, admin_name: str) -> tuple[str, Path | None]:
    """The first admin's public key line, and the private key the admin CLI should use: a new
    key in ``directory`` when none is given; else the given private key, or the private key
    beside a given ``.pub`` file (None when only a public key is known)."""
    from tetherlab.cluster.keys import KeyError_, generate_key_pair, make_registered, public_line_of

    if admin_key is None:
        private = directory / "admin_ed25519"
        directory.mkdir(parents=True, exist_ok=True)
        return generate_key_pair(private, f"{admin_name}@tetherlab"), private
    try:
        text = admin_key.read_text()
        try:
            line = make_registered(admin_name, "admin", text).public_key
            beside = admin_key.with_suffix("") if admin_key.suffix == ".pub" else None
            return line, beside.resolve() if beside is not None and beside.exists() else None
        except KeyError_:
            return make_registered(admin_name, "admin", public_line_of(admin_key)).public_key, admin_key.resolve()
    except (OSError, KeyError_, ValueError) as e:
        raise ConfigError(f"--admin-key {admin_key}: not a public or private SSH key ({e})") from None


def write_client_files(directory: Path, addrs: list[NodeAddresses], host_keys: dict[str, str],
                       admin_key: Path | None, admin_name: str) -> Path:
    """``cluster.toml`` (admin CLI: nodes, pinned host keys, admin key) and ``shim.toml``
    (developers: nodes and pinned host keys)."""
    cluster_path = directory / "cluster.toml"
    if admin_key is not None and admin_key.resolve().is_relative_to(directory.resolve()):
        admin_key = admin_key.resolve().relative_to(directory.resolve())  # the directory can move
    write_text_atomic(cluster_path, render_cluster_file(addrs, admin_key, host_keys, developer=admin_name))
    write_text_atomic(directory / "shim.toml", render_cluster_file(
        addrs, None, host_keys,
        header="# Tetherlab shim configuration: copy to developers' machines (~/.config/tetherlab/shim.toml).\n"
               "# Each node's SSH host key is pinned; add `developer = \"NAME\"` and `key = \"PATH\"`.\n"))
    return cluster_path


def init_cluster(directory: Path, nodes: int, host: str = "127.0.0.1", base_port: int = DEFAULT_BASE_PORT,
                 force: bool = False, admin_key: Path | None = None, admin_name: str = "admin",
                 remote: str = "") -> ClusterFile:
    """A local cluster in one directory: one config and SSH host key per node, the cluster
    secret (0600), an admin key (unless one is given), ``cluster.toml`` and ``shim.toml``."""
    from tetherlab.cluster.keys import generate_key_pair

    if nodes < 1 or nodes > 99:
        raise ConfigError(f"--nodes must be between 1 and 99, got {nodes}")
    directory = directory.resolve()
    if (directory / "cluster.toml").exists() and not force:
        raise ConfigError(f"{directory / 'cluster.toml'} exists: this directory is initialised already "
                          "(use --force to overwrite)")
    directory.mkdir(parents=True, exist_ok=True)
    admin_line, admin_private = admin_key_line(directory, admin_key, admin_name)
    secret_path = directory / "cluster.secret"
    write_private(secret_path, new_secret())
    addrs = [
        NodeAddresses(
            id=f"n{i + 1}",
            raft=Address(host, base_port + 1 + i),
            ssh=Address(host, base_port + 101 + i),
            http=Address(host, base_port + 201 + i),
        )
        for i in range(nodes)
    ]
    host_keys: dict[str, str] = {}
    for a in addrs:
        node_dir = directory / a.id
        node_dir.mkdir(exist_ok=True)
        host_key = node_dir / "ssh_host_ed25519_key"
        host_keys[a.id] = " ".join(generate_key_pair(host_key, f"tetherlab-{a.id}").split()[:2])
        cfg = NodeConfig(
            node=a,
            peers=tuple(p for p in addrs if p.id != a.id),
            data_dir=node_dir / "data",
            secret_file=secret_path,
            ssh_host_key=host_key,
            cluster=ClusterSettings(remote, (admin_line,), admin_name),
        )
        write_text_atomic(node_dir / "node.toml", render_node_config(cfg))
    return load_cluster_file(write_client_files(directory, addrs, host_keys, admin_private, admin_name))


def _cmd_init(args: argparse.Namespace) -> int:
    if args.hosts:
        from tetherlab.cluster.operate import init_hosts

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
    from tetherlab.cluster import logs

    try:
        cfg = load_node_config(args.config)
        logs.setup(args.log_level, args.log_format, cfg.id)
        cfg.read_secret()
    except ConfigError as e:
        print(f"tetherlab master: {e}", file=sys.stderr)
        return EXIT_USAGE
    from tetherlab.cluster.node import run_node

    return run_node(cfg, Path(args.ready_file) if args.ready_file else None)


# --- backup / restore / recover -----------------------------------------------------------


def _cmd_backup(args: argparse.Namespace) -> int:
    from tetherlab.cluster.client import ControlClient

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
    return EXIT_UNREACHABLE


def _report(args: argparse.Namespace, what: str, res: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{what} cluster in {res['dir']} at raft index {res['restored_index']} "
              f"(registry version {res.get('registry_version')}); start it with: tetherlab up --dir {res['dir']}")
    return EXIT_OK


def _cmd_restore(args: argparse.Namespace) -> int:
    from tetherlab.cluster.operate import restore
    from tetherlab.cluster.store import SnapshotError

    if bool(args.config) == bool(args.dir):
        print("tetherlab restore: give exactly one of --dir (a new local cluster) or --config (seed a deployed "
              "node)", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.config:
            from tetherlab.cluster.operate import restore_node

            return _report(args, "seeded node data", restore_node(Path(args.file), Path(args.config)))
        return _report(args, "restored", restore(Path(args.file), Path(args.dir), args.nodes, host=args.host,
                                                 base_port=args.base_port,
                                                 admin_key=Path(args.admin_key) if args.admin_key else None))
    except (ConfigError, SnapshotError, OSError) as e:
        print(f"tetherlab restore: {e}", file=sys.stderr)
        return EXIT_USAGE


def _cmd_recover(args: argparse.Namespace) -> int:
    from tetherlab.cluster.operate import recover
    from tetherlab.cluster.store import SnapshotError

    try:
        return _report(args, "recovered a single-node", recover(
            Path(args.config), Path(args.dir), host=args.host, base_port=args.base_port,
            admin_key=Path(args.admin_key) if args.admin_key else None))
    except (ConfigError, SnapshotError, OSError) as e:
        print(f"tetherlab recover: {e}", file=sys.stderr)
        return EXIT_USAGE


# --- status ---------------------------------------------------------------------------------


def _find_cluster(args: argparse.Namespace) -> ClusterFile:
    if getattr(args, "cluster", None):
        return load_cluster_file(args.cluster)
    return load_cluster_file(Path(args.dir) / "cluster.toml")


def _cmd_status(args: argparse.Namespace) -> int:
    from tetherlab.cluster.client import cluster_status

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
        return EXIT_UNREACHABLE
    return EXIT_OK if st["leader"] else EXIT_FAILED


def _s(v: Any) -> str:
    return "-" if v is None else str(v)


# --- up -------------------------------------------------------------------------------------


def start_node_process(
    config: Path, log_file: Path | None = None, extra: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``tetherlab master --config`` as a child process (its own process group)."""
    cmd = [sys.executable, "-m", "tetherlab.cluster.cli", "master", "--config", str(config), *(extra or [])]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_leader(cluster: ClusterFile, timeout_s: float, progress: bool = False) -> dict[str, Any] | None:
    from tetherlab.cluster.client import cluster_status

    deadline = time.monotonic() + timeout_s
    last_line = ""
    while time.monotonic() < deadline:
        st = cluster_status(cluster, timeout_s=1.0)
        if st["leader"] is not None:
            return st
        if progress:
            line = ", ".join(f"{n['id']}={n['role']}" for n in st["nodes"])
            if line != last_line:
                print(f"  waiting for a leader: {line}", file=sys.stderr)
                last_line = line
        time.sleep(0.2)
    return None


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
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def _stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        for n in cluster.nodes:
            procs[n.id] = start_node_process(directory / n.id / "node.toml", directory / n.id / "node.log")
            print(f"started {n.id} (pid {procs[n.id].pid}): raft {n.raft}  ssh {n.ssh}  http {n.http}  "
                  f"log {directory / n.id / 'node.log'}")
        st = wait_for_leader(cluster, UP_LEADER_WAIT_S, progress=True)
        if st is None:
            print(f"no leader elected within {UP_LEADER_WAIT_S:.0f} s; see the node logs", file=sys.stderr)
            return EXIT_FAILED
        print(f"leader: {st['leader']}")
        print(f"cluster file: {cluster_path}   (tetherlab status --dir {args.dir})")
        print("press Ctrl-C to stop all nodes")
        sys.stdout.flush()
        while not stopping:
            for nid, p in procs.items():
                if p.poll() is not None:
                    print(f"node {nid} exited with status {p.returncode}; see {directory / nid / 'node.log'}",
                          file=sys.stderr)
                    return EXIT_FAILED
            time.sleep(0.2)
        return EXIT_OK
    finally:
        _stop_all(procs)


def _stop_all(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for nid, p in procs.items():
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"node {nid} did not stop in {STOP_GRACE_S:.0f} s; killing it", file=sys.stderr)
            p.kill()
            p.wait()
    if procs:
        print("all nodes stopped", file=sys.stderr)


# --- demo -----------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from tetherlab.cluster.demo import main as demo_main

    return demo_main(args.dir, args.json)


# --- bench ----------------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "raft":
        from tetherlab.cluster.bench import bench_raft

        result = bench_raft(duration_s=args.duration, clients=args.clients, in_flight=args.in_flight,
                            progress=not args.json)
    elif args.what == "engine":
        from tetherlab.cluster.engine.bench import run_bench

        result = run_bench()
    elif args.what == "cluster":
        from tetherlab.cluster.benchcluster import bench_cluster

        result = bench_cluster(args)
    else:
        print(f"tetherlab bench: unknown benchmark {args.what!r}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            if k != "details":
                print(f"{k:>28}: {v}")
    return EXIT_OK


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
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_restore)

    s = sub.add_parser("recover", help="disaster recovery: a new single-node cluster from a stopped node's data")
    s.add_argument("--config", required=True, help="node.toml of the surviving node (stop it first)")
    s.add_argument("--admin-key", help="private key of an admin registered in the cluster, for cluster.toml")
    s.add_argument("--host", default="127.0.0.1", help="address the recovered node listens on")
    s.add_argument("--dir", required=True, help="new cluster directory (must not exist yet)")
    s.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
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

    from tetherlab.cluster import admin

    admin.add_parsers(sub, cluster_args)

    s = sub.add_parser("demo", help="the seed walkthrough: three scripted agents through real tether processes")
    s.add_argument("--dir", default=DEFAULT_DIR,
                   help=f"cluster directory; a cluster is started there if none runs (default {DEFAULT_DIR})")
    s.add_argument("--json", action="store_true", help='print {"alice": VERDICT, "bob": VERDICT, "carol": VERDICT}')
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("bench", help="benchmarks that print figures")
    s.add_argument("what", choices=["raft", "engine", "cluster"],
                   help="raft: durable cluster vs bare pysyncobj; engine: the pure engine; cluster: the full path "
                        "(SSH, protocol, Raft, LMDB) vs bare pysyncobj and etcd")
    s.add_argument("--json", action="store_true")
    s.add_argument("--duration", type=float, default=8.0, help="seconds of load per phase (raft)")
    s.add_argument("--clients", type=int, default=4, help="client processes (raft)")
    s.add_argument("--in-flight", type=int, default=256, help="requests in flight per client (raft)")
    from tetherlab.cluster.benchcluster import add_bench_cluster_args

    add_bench_cluster_args(s)
    s.set_defaults(func=_cmd_bench)

    from tetherlab.chaos import drill

    drill.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
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
    except BrokenPipeError:
        os._exit(EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
