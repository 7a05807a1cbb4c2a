"""Tetherlab master: the replicated core (Raft over LMDB), the node process and the CLI.

Layout:
- ``config``: node and cluster configuration files (TOML).
- ``journal``: the pysyncobj journal kept in LMDB, with group-commit fsync.
- ``statemachine``: the pure replicated state machine (typed records in, typed records out).
- ``store``: LMDB as the state machine's store, snapshots as LMDB copies.
- ``raft``: the pysyncobj adapter: durable transport, snapshots, proposals, read barrier.
- ``node``: one node process (``tetherlab master``).
- ``cli``: the ``tetherlab`` command.
"""

__version__ = "0.1.0"
