"""The deterministic simulation of the master cluster (``tetherlab sim``).

The whole cluster in one process, deterministic for a seed: the production Raft (pysyncobj with
every patch, ``RaftNode``, ``RaftReplica``), service, leader duties, engine and state machine,
over simulated time, network and disks. See docs/design.md (Deterministic simulation).

- ``loop``: simulated time, the event queue, an asyncio loop on it;
- ``net``: TCP-like connections between nodes, partitions, resets; pysyncobj's transport;
- ``node``: a node's disks (twins with crash points) and its processes;
- ``clients``: client connections and the shim's request rules;
- ``workload``: agents behind shims, the operator;
- ``world``: the wiring; ``schedule``: one seeded schedule (faults, healing, settling);
- ``checks``: the checks every schedule ends with; ``inject``: known-bad behaviours to catch;
- ``cli``: ``tetherlab sim``.
"""
