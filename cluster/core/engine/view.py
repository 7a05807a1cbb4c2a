"""The world view's data: what the live page (``/ui/``) shows, computed from engine state.

Pure, like the rest of the engine. The page loads one snapshot, then follows changes:

- :func:`graph`: every concept with its title, dependencies and a position on a fixed layout,
  computed once per registry version (the browser draws it on a canvas: 10,000 concepts must not
  freeze it, so no layout runs in the browser). Concepts are grouped by their first id segment
  (``auth`` of ``auth.session-store``), each group a band; within a band, columns follow the
  dependency depth (a concept sits right of what it depends on), rows fill each column.
- :func:`intent_view`: one intent as the page shows it (claims, conflicts, times, how it ended).
"""

from __future__ import annotations

from typing import Any

from tetherlab.cluster.core.engine.model import Intent
from tetherlab.cluster.core.engine.registry import Registry
from tetherlab.cluster.core.engine.world import describe_soft

BAND_ROWS_MAX = 40  # a group's column wraps after this many concepts (keeps bands readable)
CELL_W, CELL_H = 220, 28  # layout units the page scales from
BAND_GAP = 1  # empty rows between groups


def group_of(concept_id: str) -> str:
    return concept_id.split(".", 1)[0]


def _depths(reg: Registry) -> dict[str, int]:
    """Longest dependency chain below each concept (0: depends on nothing); cycle-free by
    registry validation, computed iteratively so a deep chain cannot overflow the stack."""
    depth: dict[str, int] = {}
    for root in reg.ids:
        if root in depth:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            cid, i = stack.pop()
            deps = [d for d in reg.concepts[cid].depends_on if d in reg.concepts]
            if i < len(deps):
                stack.append((cid, i + 1))
                if deps[i] not in depth:
                    stack.append((deps[i], 0))
                continue
            depth[cid] = 1 + max((depth[d] for d in deps), default=-1)
    return depth


def graph(reg: Registry | None) -> dict[str, Any]:
    """``{"version", "concepts": [{"id", "title", "group", "x", "y", "depends_on", "dependents"}],
    "groups": [{"name", "y", "height"}], "width", "height"}``."""
    if reg is None:
        return {"version": 0, "concepts": [], "groups": [], "width": 0, "height": 0}
    depth = _depths(reg)
    groups: dict[str, list[str]] = {}
    for cid in reg.ids:
        groups.setdefault(group_of(cid), []).append(cid)
    concepts: list[dict[str, Any]] = []
    bands: list[dict[str, Any]] = []
    row0 = 0
    width = 0
    for name in sorted(groups):
        ids = sorted(groups[name], key=lambda c: (depth[c], c))
        col, row, last_depth = 0, 0, None
        rows_used = 0
        for cid in ids:
            if last_depth is not None and (depth[cid] != last_depth or row >= BAND_ROWS_MAX):
                col, row = col + 1, 0
            last_depth = depth[cid]
            c = reg.concepts[cid]
            concepts.append({"id": cid, "title": c.title, "group": name, "x": col * CELL_W,
                             "y": (row0 + 1 + row) * CELL_H, "depends_on": list(c.depends_on),
                             "dependents": c.dependents})
            row += 1
            rows_used = max(rows_used, row)
            width = max(width, (col + 1) * CELL_W)
        # The band's first row is its label.
        bands.append({"name": name, "y": row0 * CELL_H, "height": (rows_used + 1) * CELL_H})
        row0 += rows_used + 1 + BAND_GAP
    return {"version": reg.version, "concepts": concepts, "groups": bands, "width": width,
            "height": max(0, row0 - BAND_GAP) * CELL_H}


def intent_view(it: Intent) -> dict[str, Any]:
    return {
        **it.summary_json(),
        "trigger": it.trigger,
        "updated_index": it.updated_index,
        "granted_ms": it.granted_ms,
        "finished_ms": it.finished_ms,
        "ended_by": it.ended_by,
        "conflicts": it.conflicts,
        "claims": {k: it.claims.get(k, []) for k in ("modify", "depend")},
        "soft_conflicts": [{**c, "message": describe_soft(c)} for c in it.soft],
        "footprint_concepts": sorted((it.footprint or {}).get("concepts", {})),
    }
