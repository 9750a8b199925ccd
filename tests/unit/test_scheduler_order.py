"""Placement at fleet scale chooses exactly what the rule says: every candidate listed, then the least loaded
(spread) or the most loaded that fits (bin-pack), ties by node id. The scheduler finds the spread choice by scanning
nodes in load order instead of listing every candidate (hub/scheduler.py `_SpreadOrder`); this checks the two agree
on random fleets, loads and steps."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from hub.events import AttemptAssigned, Event, NodeBorn, RunSubmitted
from hub.scheduler import _used, candidates_for, eligible, place
from hub.state import Core
from hub.transitions import Breaker
from hub.workflow import workflow_from_data

CAPS = ("echo", "sleep", "gpio")
NOW = 1_000

nodes_st = st.lists(st.tuples(st.integers(1, 3), st.sampled_from(["a", "b"]),
                              st.sets(st.sampled_from(CAPS), min_size=1), st.sampled_from([1.0, 2.0, 4.0])),
                    min_size=1, max_size=10)
steps_st = st.lists(st.tuples(st.sampled_from(CAPS), st.sampled_from(["spread", "spread", "bin-pack"]),
                              st.sampled_from([None, "a", "b"]), st.sampled_from([0.0, 0.0, 1.0, 2.5]),
                              st.integers(-1, 1)), min_size=1, max_size=24)


def workflow(uses: str, strategy: str, site: str | None, cores: float, priority: int) -> dict[str, Any]:
    step: dict[str, Any] = {"id": "s", "uses": uses, "resources": {"cores": cores},
                            "placement": {"strategy": strategy, "priority": priority,
                                          "selector": {"labels": {"site": site}} if site else {}}}
    return workflow_from_data({"name": "t", "version": "1.0.0", "steps": [step]}).model_dump(by_alias=True,
                                                                                              mode="json")


def by_the_rule(core: Core, now: int) -> list[Event]:
    """Placement as the rule reads, for a queue of ready steps: list every candidate, take the best."""
    ready = sorted(((-step.spec.placement.priority - run.workflow.priority, run.deadline, run.seq, step.id, run, step)
                    for run, step in ((core.runs[r], core.runs[r].steps[s]) for r, s in core.queue)
                    if step.ready_at <= now), key=lambda item: item[:4])
    nodes = sorted((n for n in core.nodes.values() if eligible(core, n)), key=lambda n: n.id)
    free = {n.id: (1 if n.breaker == Breaker.HALF_OPEN else n.slots) - len(n.attempts) for n in nodes}
    used = {n.id: _used(core, n) for n in nodes}
    load = {n.id: len(n.attempts) for n in nodes}
    out: list[Event] = []
    fence = core.fence
    for *_, run, step in ready:
        if not any(v > 0 for v in free.values()):
            break
        options = candidates_for(core, run, step, nodes, free, used, now)
        if not options:
            continue
        sign = -1 if step.spec.placement.strategy == "bin-pack" else 1
        best = min(options, key=lambda n: (sign * load[n.id] / max(1, n.slots), n.id))
        fence += 1
        out.append(AttemptAssigned(now, run.id, step.id, f"a{fence}", fence, best.id))
        free[best.id] -= 1
        load[best.id] += 1
        used[best.id]["cores"] += step.spec.resources.cores
    return out


@settings(max_examples=300, deadline=None)
@given(nodes_st, steps_st)
def test_placement_chooses_what_listing_every_candidate_chooses(nodes: list[Any], steps: list[Any]) -> None:
    core = Core()
    for i, (slots, site, caps, cores) in enumerate(nodes):
        core.apply(NodeBorn(NOW, f"n{i:02d}", 1, "container", {"site": site}, tuple(sorted(caps)), slots,
                            {"cores": cores}, (), 1.0))
    # Two rounds: the second places onto nodes the first loaded, in different proportions to their slots.
    for round_ in (0, 1):
        for i, step in enumerate(steps[round_::2]):
            core.apply(RunSubmitted(NOW, f"r{round_}-{i}", workflow(*step), {}, None, 10**12))
        expected = by_the_rule(core, NOW)
        got = place(core, NOW)
        assert got == expected
        for event in got:
            core.apply(event)


def test_a_selector_for_the_empty_profile_is_a_selector() -> None:
    # `profile: ""` names the profile a node with none has: not "any profile" (only a missing profile is that).
    core = Core()
    core.apply(NodeBorn(NOW, "n1", 1, "container", {}, ("echo",), 2, {}, (), 1.0))
    step = {"id": "s", "uses": "echo", "placement": {"selector": {"profile": ""}}}
    core.apply(RunSubmitted(NOW, "r1", workflow_from_data({"name": "t", "version": "1.0.0", "steps": [step]})
                            .model_dump(by_alias=True, mode="json"), {}, None, 10**12))
    assert place(core, NOW) == []
    core.apply(NodeBorn(NOW, "n2", 1, "", {}, ("echo",), 2, {}, (), 1.0))
    assert [e.node for e in place(core, NOW) if isinstance(e, AttemptAssigned)] == ["n2"]
