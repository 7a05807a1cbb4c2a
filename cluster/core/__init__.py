"""Layer ``core``: the pure logic of the replicated state. No I/O, no clocks, no randomness.

Every replica applies the same log entries in the same order and must reach the same state, so
nothing here touches sockets, disks, asyncio, lmdb, pysyncobj, aiohttp or asyncssh, or reads a
clock or a random source: time and everything else come in as arguments.

- ``apply``: one log entry applied to a state view (KV or engine, idempotent by Raft index);
- ``statemachine``: the key-value state machine (put, delete, CAS, txn, barrier; revisions);
- ``engine``: the coordination engine (registry, matching, intents, sessions, verdicts);
- ``errors``: ``CommandError`` (the one error of the replicated state) and ``RegistryError``;
- ``config``: the typed, validated node and cluster configuration (parsing, rendering);
- ``exitcodes``: every command's exit codes.

Imports only ``protocol`` of Tetherlab's own layers (and nothing at all today).
"""
