"""Layer ``replica``: storage and consensus adapters around ``core``.

- ``store``: the :class:`~tetherlab.cluster.replica.store.Store` interface and the snapshot
  file format; ``lmdbstore`` (LMDB, production) and ``memstore`` (in memory, with crash
  semantics) pass one conformance test;
- ``journal``: pysyncobj's Raft log, term, vote and commit index in LMDB, with group commit;
  ``memjournal`` its in-memory twin (crash semantics), passing one conformance test;
- ``files``: the files outside LMDB (snapshots), on the real file system or in memory with
  explicit durability (``MemoryFiles``);
- ``pysyncobj_patches``: every change to pysyncobj's behaviour, applied by ``install()``;
- ``raft``: ``RaftNode``, pysyncobj with the durable transport, LMDB snapshots and safe settings.

Imports ``core`` (and ``protocol``), never ``node`` or above.
"""
