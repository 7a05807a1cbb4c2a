"""Layer ``ops``: what operators and tools do with clusters on disk and as processes.

- ``config``: reading and writing configuration files, the cluster secret;
- ``layout``: ``tetherlab init`` (local clusters and per-host bundles), nodes added online;
- ``keys``: new SSH key pairs; ``backup``: backup, restore, disaster recovery;
- ``procs``: starting node processes and stopping what we started (by PID);
- ``localcluster``: a local cluster of node processes, and the ``tetherlab up`` supervisor;
- ``client``: the control socket and HTTP status clients.

Imports ``node``, ``replica``, ``core`` and ``protocol``.
"""
