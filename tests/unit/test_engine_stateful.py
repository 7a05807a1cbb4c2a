"""Random command sequences against the engine, checking its invariants after every step."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tetherlab.cluster.core.engine import Engine, Limits
from tetherlab.cluster.core.engine.testing import Driver

AGENTS = ["ann/1", "ben/2", "cat/3", "dan/4"]
CONCEPTS = ["k.a", "k.b", "k.c", "k.d"]
WORD = {"k.a": "alpha", "k.b": "bravo", "k.c": "charlie", "k.d": "delta"}


RELAXED = [frozenset({"k.c"}), frozenset({"k.a", "k.b"}), frozenset()]


def registry(variant: int) -> list[dict[str, Any]]:
    # Variants differ in dependencies and in which concepts relax their dependents.
    deps = [{"k.b": ["k.a"], "k.d": ["k.c"]}, {"k.a": ["k.d"]}, {}][variant]
    relaxed = RELAXED[variant]
    ids = CONCEPTS if variant != 2 else CONCEPTS[:3]
    return [
        {"id": c, "aliases": [f"{WORD[c]} module"], "depends_on": deps.get(c, []),
         "dependents": "continue" if c in relaxed else "stop", "paths": [f"src/{WORD[c]}/"],
         "symbols": [f"{WORD[c].title()}Api"], "drift": "warn" if c == "k.d" and variant == 1 else "stop"}
        for c in ids
    ]


class EngineMachine(RuleBasedStateMachine):
    @initialize(variant=st.integers(0, 2))
    def start(self, variant: int) -> None:
        self.d = Driver(Limits(finished_intents_max=6, history_per_concept=2, session_retain_ms=50_000), mirror=True)
        assert self.d.init(ttl_ms=10_000)["ok"]
        assert self.d.push(concepts=registry(variant))["ok"]
        self.max_token = 0
        self.relaxed_now = RELAXED[variant]
        # The relaxed concepts in force when each intent was last granted.
        self.relaxed_at_grant: dict[str, frozenset[str]] = {}
        for a in AGENTS:
            assert self.d.open(a)["ok"]

    def _check_result(self, cmd_trigger: str | None, result: dict[str, Any]) -> None:
        if "error" in result:
            assert self.d.last_writes == [], "a refused command must change nothing"
        granted = cmd_trigger in ("initial", "replan", "report") and result.get("action") == "continue"
        if granted and result["fencing_token"] == self.d.index:  # a new grant, not a replayed notice
            assert result["fencing_token"] > self.max_token
            self.max_token = result["fencing_token"]
            self.relaxed_at_grant[result["intent_id"]] = self.relaxed_now

    @rule(agent=st.sampled_from(AGENTS))
    def open_session(self, agent: str) -> None:
        self._check_result(None, self.d.open(agent))

    @rule(agent=st.sampled_from(AGENTS))
    def close_session(self, agent: str) -> None:
        self._check_result(None, self.d.send({"type": "close_session", "agent_id": agent}))

    @rule(agents=st.lists(st.sampled_from(AGENTS), max_size=4))
    def heartbeat(self, agents: list[str]) -> None:
        self._check_result(None, self.d.heartbeat(*agents))

    # Planning is what the invariants are about: it gets most of the steps.
    plan_args = {
        "agent": st.sampled_from(AGENTS),
        "replan": st.booleans(),
        "modify": st.lists(st.sampled_from(CONCEPTS), max_size=2, unique=True),
        "depend": st.lists(st.sampled_from(CONCEPTS), max_size=2, unique=True),
        "said": st.lists(st.sampled_from(CONCEPTS), max_size=2),
        "verb": st.sampled_from(["Rewrite", "Build on top of", "Use"]),
    }

    def _plan(self, agent: str, replan: bool, modify: list[str], depend: list[str], said: list[str],
              verb: str) -> None:
        depend = [c for c in depend if c not in modify]
        text = (f"{verb} " + " and ".join(f"the {WORD[c]} module" for c in said)) if said else "tidy up"
        trigger = "replan" if replan else "initial"
        self._check_result(trigger, self.d.intent(agent, text, trigger=trigger, modify=modify, depend=depend))

    @rule(**plan_args)
    def plan(self, **kw: Any) -> None:
        self._plan(**kw)

    @rule(**plan_args)
    def plan_again(self, **kw: Any) -> None:
        self._plan(**kw)

    @rule(**plan_args)
    def plan_once_more(self, **kw: Any) -> None:
        self._plan(**kw)

    @rule(agent=st.sampled_from(AGENTS), touched=st.lists(st.sampled_from(CONCEPTS), max_size=3, unique=True),
          shared=st.booleans(), symbol=st.booleans())
    def report_changes(self, agent: str, touched: list[str], shared: bool, symbol: bool) -> None:
        """In-flight changes: files of concepts (drift), a file every agent touches (soft)."""
        s = self.d.engine.get_session(agent)
        if s is None or not s.get("intent_id"):
            return
        files: list[dict[str, Any]] = [{"path": f"src/{WORD[c]}/x.py", "symbols": [
            {"name": f"{WORD[c].title()}Api.run"}] if symbol else []} for c in touched]
        if shared:
            files.append({"path": "README.md", "symbols": []})
        result = self.d.send({"type": "report_changes", "agent_id": agent, "intent_id": s["intent_id"],
                              "files": files})
        self._check_result("report", result)

    @rule(agent=st.sampled_from(AGENTS))
    def report_shared_file(self, agent: str) -> None:
        """Every agent's changes touch one shared file: soft conflicts among the active ones."""
        self.report_changes(agent, [], True, False)

    @invariant()
    def soft_conflicts_are_between_active_intents_and_symmetric(self) -> None:
        if not hasattr(self, "d"):
            return
        active = {i["intent_id"]: i for i in self._active()}
        for iid, it in active.items():
            for c in it.get("soft", []):
                assert c["other_intent_id"] in active, (iid, c)
                other = active[c["other_intent_id"]]
                assert any(x["other_intent_id"] == iid and x["kind"] == c["kind"] for x in other.get("soft", [])), \
                    (iid, c, other.get("soft"))

    @rule(agent=st.sampled_from(AGENTS), trigger=st.sampled_from(["complete", "abandon"]))
    def end(self, agent: str, trigger: str) -> None:
        self._check_result(trigger, self.d.end(agent, trigger))

    @rule(ms=st.integers(0, 12_000))
    def expire(self, ms: int) -> None:
        self.d.advance(ms)
        self._check_result(None, self.d.expire())

    @rule()
    def leader_elected(self) -> None:
        self._check_result(None, self.d.leader_elected())

    @rule(n=st.integers(1, 40), revert=st.booleans())
    def revoke(self, n: int, revert: bool) -> None:
        self._check_result(None, self.d.revoke(f"i-{n}", revert=revert))

    @rule(variant=st.integers(0, 2))
    def push(self, variant: int) -> None:
        if "ok" in self.d.push(concepts=registry(variant)):
            self.relaxed_now = RELAXED[variant]

    def _active(self) -> list[dict[str, Any]]:
        e = self.d.engine
        return [e.get_intent(i["intent_id"]) for i in e.list_intents(status="active", limit=1000)["intents"]]

    @invariant()
    def never_two_active_intents_modify_one_concept(self) -> None:
        seen: dict[str, str] = {}
        for it in self._active():
            for c in it["claims"]["modify"]:
                assert c["concept"] not in seen, (c["concept"], seen[c["concept"]], it["intent_id"])
                seen[c["concept"]] = it["intent_id"]

    @invariant()
    def depending_on_a_modified_concept_only_where_allowed(self) -> None:
        active = self._active()
        for a in active:
            for dep in a["claims"]["depend"]:
                c = dep["concept"]
                for b in active:
                    if b is a or c not in [m["concept"] for m in b["claims"]["modify"]]:
                        continue
                    # The later grant of the two saw the other: the registry had to relax c then,
                    # and the verdict had to say so.
                    later, other = (a, b) if a["fencing_token"] > b["fencing_token"] else (b, a)
                    assert c in self.relaxed_at_grant[later["intent_id"]], (a["intent_id"], b["intent_id"], c)
                    assert any(
                        x["concept"] == c and x["holder_agent_id"] == other["agent_id"] for x in later["conflicts"]
                    ), (a["intent_id"], b["intent_id"], c)

    @invariant()
    def records_round_trip(self) -> None:
        if not hasattr(self, "d"):
            return
        dump = self.d.engine.dump_records()
        assert dump == self.d.records()
        rebuilt = Engine.from_records(dump, self.d.limits)
        assert rebuilt.dump_records() == dump
        assert rebuilt._index_view() == self.d.engine._index_view()


EngineMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestEngineMachine = EngineMachine.TestCase
