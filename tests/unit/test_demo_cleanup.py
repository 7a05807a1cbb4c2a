"""`tetherlab demo` and the shim trials stop the nodes they started even when those never elect a
leader (they were left running, orphaned, when the wait for a leader failed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tetherlab.cluster.tools import demo


class NoLeaderCluster:
    instances: list[NoLeaderCluster] = []

    def __init__(self, directory: Path, nodes: int) -> None:
        self.ids = [f"n{i + 1}" for i in range(nodes)]
        self.started = self.closed = False
        NoLeaderCluster.instances.append(self)

    def start(self) -> None:
        self.started = True

    def wait_serving(self, nid: str) -> None:
        pass

    def wait_leader(self) -> str:
        raise TimeoutError("no leader within 20.0s")

    def close(self) -> None:
        self.closed = True


def test_nodes_started_by_the_demo_are_stopped_when_no_leader_appears(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    NoLeaderCluster.instances.clear()
    monkeypatch.setattr(demo, "LocalCluster", NoLeaderCluster)
    with pytest.raises(TimeoutError):
        demo.run_demo(tmp_path / "c", as_json=True)
    [cluster] = NoLeaderCluster.instances
    assert cluster.started and cluster.closed


def test_the_shim_trials_rig_stops_its_nodes_when_no_leader_appears(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from tetherlab.chaos import shim_trials

    NoLeaderCluster.instances.clear()
    monkeypatch.setattr(shim_trials, "LocalCluster", NoLeaderCluster)
    with pytest.raises(TimeoutError):
        shim_trials.Rig(tmp_path)
    [cluster] = NoLeaderCluster.instances
    assert cluster.started and cluster.closed
