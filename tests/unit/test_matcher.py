"""The match worker (cluster/node/matcher.py): the same claims as matching on the loop, and
the loop takes over whenever the worker is missing, dead or hung."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import tomllib
from collections import Counter
from typing import Any

import pytest

from tetherlab.chaos.bench import matching as bench
from tetherlab.cluster.core.config import ConfigError, parse_node_config, render_node_config
from tetherlab.cluster.core.engine import IntentBody, MatchBasis, SubmitIntent, prematched
from tetherlab.cluster.core.engine.codeindex import CodeIndex, Symbol
from tetherlab.cluster.core.engine.registry import Registry
from tetherlab.cluster.node import matcher as mw
from tetherlab.cluster.node.matcher import InlineMatcher, ProcessMatcher

AGENT = "ann/4b2e0c1a-1111-4222-8333-0123456789ab"
RICH = bench.load_codebase(bench.DATA_DIR / "rich")
CODE = CodeIndex({
    "rich/console.py": [Symbol("Console", "class", 1, 100), Symbol("Console.print", "method", 10, 20),
                        Symbol("ConsoleOptions", "class", 101, 150)],
    "rich/markup.py": [Symbol("escape", "function", 1, 1), Symbol("render", "function", 2, 2)],
    "rich/live.py": [Symbol("Live", "class", 1, 50), Symbol("Live.render", "method", 3, 9)],
    "rich/progress.py": [Symbol("Progress", "class", 1, 80), Symbol("Progress.update", "method", 5, 9)],
})
BASIS = MatchBasis(RICH.registry, CODE, 3)


def bodies() -> list[IntentBody]:
    """The matching benchmark's plans, as plain text and with explicit claims."""
    out = []
    for plan in RICH.plans:
        out.append(IntentBody(plan["summary"], tuple(plan["steps"])))
        ex = plan["explicit"]
        out.append(IntentBody(plan["summary"], tuple(plan["steps"]), modify=tuple(ex["modify"]),
                              depend=tuple(ex["depend"])))
    out.append(IntentBody("Change the concept nobody registered", (), modify=("no.such.concept",)))  # refused
    return out


def cmd_for(body: IntentBody) -> SubmitIntent:
    return SubmitIntent(agent_id=AGENT, tool="t", intent=body, trigger="initial")


def wire_differences(basis: MatchBasis) -> list[str]:
    """Plans whose claims differ when the basis and the plan travel the worker's wire."""
    bases: dict[tuple[int, int], MatchBasis] = {}
    assert mw.answer(bases, mw.encode_basis(basis)) == ("basis_ready", mw.basis_key(basis))
    out = []
    for i, body in enumerate(bodies()):
        want = prematched(cmd_for(body), basis).matched
        _, status, claims = mw.answer(bases, ("match", i, mw.basis_key(basis), body))
        got = claims if status == "ok" else None
        if got != want:
            out.append(body.summary[:60])
    return out


def test_the_wire_carries_registry_and_code_index_faithfully() -> None:
    assert len(bodies()) > 100
    assert wire_differences(BASIS) == []


def test_a_basis_lost_in_transfer_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    real = mw.decode_basis
    monkeypatch.setattr(mw, "decode_basis", lambda msg: MatchBasis(real(msg).registry, None, msg[4]))
    assert len(wire_differences(BASIS)) > 5  # the plans that name code


def test_an_unknown_basis_and_a_matcher_failure_are_answered() -> None:
    bases: dict[tuple[int, int], MatchBasis] = {}
    assert mw.answer(bases, ("match", 1, (9, 9), bodies()[0]))[1] == "no_basis"  # type: ignore[index]
    mw.answer(bases, mw.encode_basis(BASIS))
    status = mw.answer(bases, ("match", 2, mw.basis_key(BASIS), "not a plan"))
    assert status is not None and status[1] == "error" and "AttributeError" in status[2]


def test_frames_are_cut_from_a_stream_in_any_pieces() -> None:
    msgs = [("match", i, (1, 0), "x" * i) for i in range(40)]
    stream = b"".join(mw._frame(m) for m in msgs)
    for piece in (1, 7, 64, len(stream)):
        buf, got = bytearray(), []
        for at in range(0, len(stream), piece):
            buf += stream[at:at + piece]
            got.extend(mw._frames(buf))
        assert got == msgs and buf == b""
    with pytest.raises(ValueError, match="over"):
        mw._frames(bytearray(mw._LEN.pack(mw.FRAME_MAX_BYTES + 1)))


def test_a_burst_of_plans_reaches_the_worker_in_one_write() -> None:
    """Plans asked for within one step of the loop (one burst of SSH packets) cost one system
    call, not one each (a tenth of a busy leader's time went to those writes)."""
    writes: list[int] = []

    async def run() -> None:
        m = ProcessMatcher("on")
        try:
            await _wait_holding(m, BASIS)
            w = m._worker
            assert w is not None
            real = w.writer.write
            w.writer.write = lambda data: (writes.append(len(data)), real(data))[1]  # type: ignore[method-assign]
            burst = bodies()[:30]
            got = await asyncio.gather(*(m.prematch(cmd_for(b), BASIS) for b in burst))
            assert [g.matched for g in got] == [prematched(cmd_for(b), BASIS).matched for b in burst]
        finally:
            await m.close()

    asyncio.run(run())
    assert len(writes) == 1


async def _all_through(m: Any, basis: MatchBasis) -> list[str]:
    diffs = []
    for body in bodies():
        got = await m.prematch(cmd_for(body), basis)
        if got.matched != prematched(cmd_for(body), basis).matched:
            diffs.append(body.summary[:60])
    return diffs


async def _wait_ready(m: ProcessMatcher, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while m.worker_pid is None:
        assert time.monotonic() < deadline, "the match worker did not start"
        await asyncio.sleep(0.05)
    return m.worker_pid


async def _wait_holding(m: ProcessMatcher, basis: MatchBasis, timeout_s: float = 30.0) -> None:
    """Until the worker has built ``basis`` (the first plan sends it; plans go on the loop meanwhile)."""
    m.start()
    await _wait_ready(m, timeout_s)
    deadline = time.monotonic() + timeout_s
    while not m.holds(basis):
        got = await m.prematch(cmd_for(bodies()[0]), basis)
        assert got.matched == prematched(cmd_for(bodies()[0]), basis).matched
        assert time.monotonic() < deadline, "the match worker never built the basis"
        await asyncio.sleep(0.05)


def test_the_worker_process_gives_the_loops_claims_and_follows_a_new_registry() -> None:
    where: Counter[str] = Counter()

    async def run() -> None:
        m = ProcessMatcher("on", on_match=lambda w: where.update([w]))
        try:
            await _wait_holding(m, BASIS)
            where.clear()
            assert await _all_through(m, BASIS) == []
            assert where["worker"] == len(bodies()) and where["loop"] == 0
            # A push: new registry version, other concepts; the worker matches against it.
            concepts = list(RICH.registry.concepts.values())[:5]
            newer = MatchBasis(Registry(concepts, RICH.registry.version + 1), None, 0)
            assert await _all_through(m, newer) == []  # the loop's until the worker has it, then its
            await _wait_holding(m, newer)
            where.clear()
            assert await _all_through(m, newer) == []
            assert where["worker"] == len(bodies())
            got = await m.prematch(cmd_for(IntentBody("x", (), modify=(concepts[0].id,))), newer)
            assert got.matched is not None and got.matched["registry_version"] == newer.registry_version
        finally:
            await m.close()

    asyncio.run(run())
    assert where["worker"] > 0


def test_a_killed_worker_falls_back_to_the_loop_and_is_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mw, "RESTART_BACKOFF_S", 0.0)

    async def run() -> None:
        m = ProcessMatcher("on")
        try:
            await _wait_holding(m, BASIS)
            pid = await _wait_ready(m)
            os.kill(pid, signal.SIGKILL)  # our own child
            for body in bodies()[:20]:  # answered all along, by the loop while there is no worker
                got = await m.prematch(cmd_for(body), BASIS)
                assert got.matched == prematched(cmd_for(body), BASIS).matched
            assert await _wait_ready(m) != pid and m.starts == 2
        finally:
            await m.close()

    asyncio.run(run())


def test_a_hung_worker_costs_one_timeout_then_the_loop_matches() -> None:
    async def run() -> None:
        m = ProcessMatcher("on", timeout_s=0.3)
        try:
            await _wait_holding(m, BASIS)
            pid = await _wait_ready(m)
            proc = m._worker.proc  # type: ignore[union-attr]
            os.kill(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            body = bodies()[2]
            got = await m.prematch(cmd_for(body), BASIS)
            assert got.matched == prematched(cmd_for(body), BASIS).matched
            assert time.monotonic() - t0 < 5.0
            assert m.worker_pid is None  # no longer used
            deadline = time.monotonic() + 10
            while proc.poll() is None:  # stopped children do not exit on EOF: it was killed
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            await m.close()

    asyncio.run(run())


@pytest.mark.parametrize(("mode", "busy_s", "cpus", "starts"),
                         [("auto", 0.0, 2, 1), ("auto", 1e9, 4, 0), ("auto", 0.0, 1, 0), ("off", 0.0, 8, 0)])
def test_auto_starts_the_worker_only_once_matching_is_busy_on_a_machine_with_cores_to_spare(
        mode: str, busy_s: float, cpus: int, starts: int) -> None:
    async def run() -> None:
        m = ProcessMatcher(mode, auto_start_busy_s=busy_s, cpus=cpus)
        try:
            for body in bodies()[:5]:
                got = await m.prematch(cmd_for(body), BASIS)
                assert got.matched == prematched(cmd_for(body), BASIS).matched
            assert m.starts == starts
            if starts:
                await _wait_ready(m)
        finally:
            await m.close()

    asyncio.run(run())


def test_commands_without_a_plan_to_match_are_passed_through() -> None:
    async def run() -> None:
        m = ProcessMatcher("on")
        end = SubmitIntent(agent_id=AGENT, tool="t", intent=None, trigger="complete", intent_id="i-12")
        assert await m.prematch(end, BASIS) is end
        assert m.starts == 0
        assert await InlineMatcher().prematch(end, BASIS) is end
        await m.close()

    asyncio.run(run())


def test_the_node_file_sets_the_mode_and_names_a_bad_one(tmp_path: Any) -> None:
    base: dict[str, Any] = {"node": {"id": "n1", "raft": "127.0.0.1:1", "ssh": "127.0.0.1:2",
                                     "http": "127.0.0.1:3", "data_dir": "d", "secret_file": "s"}}
    path = tmp_path / "n.toml"
    cfg = parse_node_config(base, path)
    assert cfg.match_worker == "auto" and "[matching]" not in render_node_config(cfg)
    cfg = parse_node_config({**base, "matching": {"worker": "on"}}, path)
    assert cfg.match_worker == "on"
    assert parse_node_config(tomllib.loads(render_node_config(cfg)), path).match_worker == "on"
    for bad, why in [({"worker": "sometimes"}, r"\[matching\].worker must be one of auto, on, off"),
                     ({"workers": "on"}, r"\[matching\] has unknown key\(s\) \['workers'\]")]:
        with pytest.raises(ConfigError, match=why):
            parse_node_config({**base, "matching": bad}, path)


def test_the_worker_is_used_only_while_requests_queue_at_the_node() -> None:
    """With "auto", a node that keeps up matches on its loop (no round trip); one with proposals
    queueing hands plans to the worker (its loop time goes to SSH and applying instead). "on"
    always uses the worker (test_the_worker_process_gives_the_loops_claims...)."""
    where: Counter[str] = Counter()
    queued = [0]

    async def run() -> None:
        m = ProcessMatcher("auto", auto_start_busy_s=0.0, cpus=2, queued=lambda: queued[0],
                           offload_min_queued=32, on_match=lambda w: where.update([w]))
        try:
            await m.prematch(cmd_for(bodies()[0]), BASIS)  # matched on the loop: starts the worker
            await _wait_holding(m, BASIS)  # plans send it the basis even while the loop matches them
            where.clear()
            assert await _all_through(m, BASIS) == []
            assert where == {"loop": len(bodies())}
            queued[0] = 32
            where.clear()
            assert await _all_through(m, BASIS) == []
            assert where == {"worker": len(bodies())}
        finally:
            await m.close()

    asyncio.run(run())
