"""Admin operations on a running cluster, over SSH with the shim's client: one request, or
the orchestrated ones (replacing a member). The ``tetherlab keys|concepts|intents|cluster``
commands parse arguments and print; this is what they run."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tetherlab.cluster import protocol as p
from tetherlab.shim.client import MasterClient, RequestError, masters_from_cluster_file

ADMIN_DEADLINE_S = 20.0
REMOVE_WAIT_MAX_S = 60.0  # a replaced node is removed once its successor counts toward the quorum
REMOVE_RETRY_S = 0.5


async def admin_request(cluster_file: Path, key: Path, developer: str, cls: type[p.Request],
                        fields: dict[str, Any], replace_old: str | None = None) -> dict[str, Any]:
    """Send one admin request through the leader (``replace_old``: replace that member with
    the node ``fields`` describe); its payload, or the client's errors."""
    client = MasterClient(masters_from_cluster_file(cluster_file), key, developer, client_name="tetherlab-admin")
    try:
        if replace_old is not None:
            return await _replace(client, replace_old, fields)
        return dict(await client.call(cls, ADMIN_DEADLINE_S, idempotent=cls not in (p.KeysAdd, p.ConceptsPush),
                                      **fields))
    finally:
        await client.close()


async def push_index(cluster_file: Path, key: Path, developer: str, digest: str, chunks: list[str],
                     activate: bool = True) -> dict[str, Any]:
    """Send a packed code index chunk by chunk (each an idempotent Raft entry: a resend of a
    chunk replaces it); the last answer says whether it is complete and active."""
    client = MasterClient(masters_from_cluster_file(cluster_file), key, developer, client_name="tetherlab-admin")
    try:
        res: dict[str, Any] = {}
        for seq, data in enumerate(chunks):
            res = dict(await client.call(p.ConceptsIndex, ADMIN_DEADLINE_S, idempotent=True, digest=digest,
                                         seq=seq, total=len(chunks), data=data, activate=activate))
            if res.get("unchanged"):
                break  # the cluster already runs this index
        return res
    finally:
        await client.close()


async def _replace(client: Any, old: str, add: dict[str, Any]) -> dict[str, Any]:
    """Add the new node, then remove the old one. When the old node is dead, adding first
    would leave too few healthy members for the larger cluster: remove it first instead."""
    try:
        added = await client.call(p.ClusterAdd, ADMIN_DEADLINE_S, **add)
    except RequestError as e:
        if e.code != "would_lose_quorum":
            raise
        removed = await client.call(p.ClusterRemove, ADMIN_DEADLINE_S, node_id=old)
        return {"removed": removed, "added": await client.call(p.ClusterAdd, ADMIN_DEADLINE_S, **add)}
    return {"added": added, "removed": await _remove_when_ready(client, old)}


async def _remove_when_ready(client: Any, node_id: str) -> dict[str, Any]:
    """Remove the old node once the new one counts toward the quorum (bounded)."""
    waited = 0.0
    while True:
        try:
            return dict(await client.call(p.ClusterRemove, ADMIN_DEADLINE_S, node_id=node_id))
        except RequestError as e:
            if e.code not in ("would_lose_quorum", "leader_moving") or waited >= REMOVE_WAIT_MAX_S:
                raise
        await asyncio.sleep(REMOVE_RETRY_S)
        waited += REMOVE_RETRY_S
