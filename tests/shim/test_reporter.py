"""In-flight change reports (shim/reporter.py): when they are due (pure schedule), and the
reporter against a real git repository with the real tree-sitter grammars: it sends a state
once, again only when it changes, retries what was not delivered, and starts over on a new
intent."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

from tetherlab.shim.reporter import ChangeReporter, ReportSchedule


def test_schedule_first_report_is_due_at_once_then_periodic() -> None:
    s = ReportSchedule(interval_s=5.0, debounce_s=0.3, min_gap_s=1.0)
    assert s.due_s(10.0) == 10.0
    s.collected(10.0)
    assert s.due_s(10.5) == 15.0


def test_schedule_edits_are_debounced_and_spaced() -> None:
    s = ReportSchedule(interval_s=5.0, debounce_s=0.3, min_gap_s=1.0)
    s.collected(10.0)
    s.poke(10.1)
    s.poke(10.2)  # the same burst: the first edit sets the time
    assert s.due_s(10.2) == 11.0  # debounce would say 10.4; never closer than min_gap to the last
    s.collected(11.0)
    assert s.poked_s is None
    s.poke(13.0)
    assert s.due_s(13.0) == 13.3
    # An edit during a collection is not covered by it.
    s.collected(13.3)
    s.poke(13.4)
    s.collected(13.2)  # (a collection that started before the edit)
    assert s.poked_s == 13.4


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          timeout=30).stdout


def make_repo(tmp: Path) -> tuple[Path, str]:
    repo = tmp / "r"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "a@b")
    git(repo, "config", "user.name", "a")
    (repo / "app.py").write_text("def load():\n    return 1\n\n\nclass Store:\n    def get(self):\n        return 2\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    return repo, git(repo, "rev-parse", "HEAD").strip()


class Master:
    def __init__(self) -> None:
        self.reports: list[tuple[str, dict[str, Any]]] = []
        self.down = False

    async def send(self, intent_id: str, report: dict[str, Any]) -> dict[str, Any] | None:
        if self.down:
            return None
        self.reports.append((intent_id, report))
        return {"ok": True, "drift": {"claimed": [], "warned": []}}


def test_reports_what_changed_once_and_only_changes(tmp_path: Path) -> None:
    repo, base = make_repo(tmp_path)
    master = Master()
    replies: list[dict[str, Any]] = []
    r = ChangeReporter(repo, master.send, replies.append, exclude=[".tetherlab-world.md"])

    async def go() -> None:
        r.begin("i-7", base)
        assert await r.report_once() is not None  # a clean tree is a state too: nothing changed
        assert master.reports[-1] == ("i-7", {"files": [], "truncated": False})
        (repo / "app.py").write_text("def load():\n    return 1\n\n\nclass Store:\n    def get(self):\n"
                                     "        return 3\n")
        (repo / ".tetherlab-world.md").write_text("the world slice tether writes")
        await r.report_once()
        _, rep = master.reports[-1]
        assert [f["path"] for f in rep["files"]] == ["app.py"]
        names = {s["name"]: s["change"] for s in rep["files"][0]["symbols"]}
        assert names == {"Store.get": "modified"} or names.get("Store.get") == "modified", names
        assert "contents" not in str(rep) and "return 3" not in str(rep)
        n = len(master.reports)
        assert await r.report_once() is None  # unchanged: nothing sent
        assert len(master.reports) == n
        master.down = True
        (repo / "new.py").write_text("def fresh():\n    pass\n")
        assert await r.report_once() is None
        master.down = False
        await r.report_once()  # not delivered before: sent now
        assert [f["path"] for f in master.reports[-1][1]["files"]] == ["app.py", "new.py"]
        r.begin("i-9", base)  # a new intent: its first state goes out even if unchanged
        await r.report_once()
        assert master.reports[-1][0] == "i-9"
        r.end()
        assert await r.report_once() is None

    asyncio.run(go())
    assert len(replies) == r.sent == 4


def test_a_hooked_edit_wakes_the_loop(tmp_path: Path) -> None:
    repo, base = make_repo(tmp_path)
    master = Master()
    r = ChangeReporter(repo, master.send, lambda _reply: None,
                       schedule=ReportSchedule(interval_s=3600.0, debounce_s=0.05, min_gap_s=0.05))

    async def go() -> None:
        task = asyncio.create_task(r.run())
        try:
            r.begin("i-1", base)
            for _ in range(200):  # the first report: due at once
                if master.reports:
                    break
                await asyncio.sleep(0.02)
            assert len(master.reports) == 1
            (repo / "app.py").write_text("def load():\n    return 5\n")
            r.poke()  # without it the next report would be an hour away
            for _ in range(500):
                if len(master.reports) == 2:
                    break
                await asyncio.sleep(0.02)
            assert len(master.reports) == 2
        finally:
            task.cancel()

    asyncio.run(go())
