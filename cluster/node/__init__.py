"""Layer ``node``: one master node: a replica and the front doors that serve it.

- ``replica``: the :class:`~tetherlab.cluster.node.replica.Replica` interface the front doors
  use; ``raftreplica`` (pysyncobj over LMDB) and ``fake`` (in memory, for fast tests);
- ``service``: what each protocol request does (authorisation, routing, commands); takes a
  ``Replica`` and a ``Clock`` and nothing else of the node;
- ``duties``: what only a quorum-backed leader does (bootstrap, LeaderElected, Expire);
- ``ssh`` and ``http``: the SSH endpoint (the shim protocol) and the HTTP endpoint (health,
  metrics, read API); ``control``: the local control socket (``sockets``: socket paths of
  any length, bind errors);
- ``matcher``: where the leader matches plans before proposing them (a worker process, or the
  event loop);
- ``deadlines``: timeouts of many futures on one loop timer (proposals, plans at the worker);
- ``gcpolicy``: when the node's long-lived state is frozen out of CPython's full collections;
  ``heap``: how glibc's allocator keeps the node's heap;
- ``clock``, ``errors``, ``keys``, ``metrics``, ``logs``; ``process``: the wiring (``run_node``).

Imports ``replica``, ``core`` and ``protocol``.
"""
