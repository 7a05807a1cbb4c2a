"""Product code bounds its waits with ``asyncio.timeout``, never ``asyncio.wait_for``.

On Python 3.11 ``wait_for`` returns the result when a cancellation arrives together with it, and
the cancelled task carries on: a shim told to stop, or a node shutting down, would keep going past
the point where it was cancelled. ``asyncio.timeout`` keeps the cancellation. The first test shows
the difference on the running interpreter; the second finds any ``asyncio.wait_for`` in
``cluster/`` and ``shim/``, and the third proves that check can fail.
"""

from __future__ import annotations

import ast
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = (ROOT / "cluster", ROOT / "shim")


def wait_for_calls(roots: tuple[Path, ...]) -> list[str]:
    found = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute) and node.attr == "wait_for" \
                        and isinstance(node.value, ast.Name) and node.value.id == "asyncio":
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


async def _cancel_as_the_result_arrives(use_timeout: bool) -> str:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()

    async def waiter() -> int:
        if use_timeout:
            async with asyncio.timeout(5):
                return await fut
        return await asyncio.wait_for(fut, 5)

    task = loop.create_task(waiter())
    await asyncio.sleep(0)  # the task waits for fut
    fut.set_result(1)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled"
    return "carried on"


def test_timeout_keeps_a_cancellation_that_arrives_with_the_result() -> None:
    assert asyncio.run(_cancel_as_the_result_arrives(use_timeout=True)) == "cancelled"
    lost = asyncio.run(_cancel_as_the_result_arrives(use_timeout=False))
    assert lost == ("carried on" if sys.version_info < (3, 12) else "cancelled")


def test_product_code_has_no_asyncio_wait_for() -> None:
    assert wait_for_calls(PRODUCT) == [], "use `async with asyncio.timeout(s):` (see this module's docstring)"


def test_the_check_finds_a_planted_wait_for(tmp_path: Path) -> None:
    pkg = tmp_path / "cluster"
    pkg.mkdir()
    (pkg / "m.py").write_text("import asyncio\n\nasync def f(x):\n    return await asyncio.wait_for(x, 1)\n")
    assert wait_for_calls((pkg,)) == ["cluster/m.py:4"]

