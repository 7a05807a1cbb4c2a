"""Tetherlab's master and everything that shares its code, in layers that import downwards only.

Layers, from the bottom (each imports only the ones above it in this list; the contract is
checked by tests/unit/test_import_contract.py):

- ``protocol``: the sans-I/O shim protocol (``tetherlab.cluster.protocol``);
- ``core``: pure logic: the state machine, the coordination engine, ``apply``, config model;
- ``replica``: storage and consensus adapters: LMDB and in-memory stores, the LMDB journal,
  pysyncobj and every change made to it;
- ``node``: one master node: the ``Replica`` interface, the service, SSH/HTTP/control;
- ``ops``: clusters on disk and as processes: layout, config files, backup, the supervisor;
- ``shim``: ``tether`` (``tetherlab.shim``): the client, the session, the runner, hooks;
- ``tools``: admin requests and the demo, over the shim's client;
- ``cli``: argument parsing and printing (``tetherlab.cluster.cli``, ``tetherlab.shim.cli``).

Test and measurement infrastructure (``tetherlab.chaos``, ``tetherlab.chaos.bench``) sits
outside: no product module imports it.
"""

__version__ = "0.1.0"
