"""Why a queued step waits (hub/explain.py): pure, deterministic, and in agreement with the scheduler."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from hub.events import AttemptAssigned, NodeBorn, NodeFailed, ResultReported, RunSubmitted, StepReported
from hub.explain import MAX_EXPLAINED, waiting_reasons, why_waiting
from hub.scheduler import place
from hub.state import Core, Run, StepRun
from hub.workflow import workflow_from_data

CAPS = ("noop", "echo", "sleep", "fail")
NOW = 1_000_000


def spec(*steps: dict[str, Any]) -> dict[str, Any]:
    return workflow_from_data({"name": "t", "version": "1.0.0", "steps": list(steps)}).model_dump(
        by_alias=True, mode="json")


def born(core: Core, node: str, caps: tuple[str, ...] = CAPS, slots: int = 2, labels: dict[str, str] | None = None,
         resources: dict[str, float] | None = None) -> None:
    core.apply(NodeBorn(NOW, node, 1, "container", labels or {}, caps, slots,
                        {"cores": 4, "memory_mb": 4096} if resources is None else resources, (), 1.0))
    core.touch(node, NOW)


def submitted(core: Core, *steps: dict[str, Any], run: str = "r1") -> Run:
    core.apply(RunSubmitted(NOW, run, spec(*steps), {}, None, 10**12))
    return core.runs[run]


def reason(core: Core, run: Run, step: str, now: int = NOW) -> str:
    out = why_waiting(core, run, run.steps[step], now)
    assert out is not None
    return out


GPU = {"id": "train", "uses": "echo", "placement": {"selector": {"capabilities": ["gpu"]}}}


def test_no_online_node_matches_the_selector_and_the_selector_is_named() -> None:
    core = Core()
    born(core, "n1")
    run = submitted(core, GPU)
    text = reason(core, run, "train")
    assert text.startswith("no online node matches selector {capabilities: [gpu]}")
    # no node of the fleet could ever take it: the unrunnable rule fails it after the grace, and says when
    assert "it fails in 30.0 s unless a node that can take it joins" in text


def test_a_matching_node_that_is_down_is_named_and_the_step_does_not_fail() -> None:
    core = Core()
    born(core, "n1")
    born(core, "g1", caps=(*CAPS, "gpu"))
    core.apply(NodeFailed(NOW, "g1", "no heartbeat"))
    run = submitted(core, GPU)
    text = reason(core, run, "train")
    assert text == "no online node matches selector {capabilities: [gpu]} (g1 matches but is failed)"


def test_executor_resources_and_an_empty_fleet() -> None:
    core = Core()
    run = submitted(core, {"id": "a", "uses": "echo"})
    assert reason(core, run, "a").startswith("no node has joined the fleet")
    born(core, "n1")
    core.apply(NodeFailed(NOW, "n1", "gone"))
    assert reason(core, run, "a") == "no node is online (n1 failed)"

    core = Core()
    born(core, "n1")
    run = submitted(core, {"id": "q", "uses": "quantum"}, {"id": "big", "uses": "echo", "resources": {"cores": 8}})
    assert reason(core, run, "q").startswith("no online node offers executor 'quantum'; it fails in")
    assert reason(core, run, "big").startswith(
        "no online node offering 'echo' has cores 8 (n1 cores 4, memory_mb 4096)")


def test_busy_draining_unhealthy_breaker_are_named_per_node() -> None:
    core = Core()
    for node in ("n1", "n2", "n3", "n4"):
        born(core, node, slots=1)
    run = submitted(core, {"id": "a", "uses": "echo"})
    assert reason(core, run, "a") == "about to be placed: a node can take it"
    core.nodes["n1"].draining = True
    core.nodes["n2"].health = "unhealthy"
    core.nodes["n3"].breaker = "open"
    core.nodes["n4"].slots = 0
    assert reason(core, run, "a") == ("no node that could take it can now: n1 draining; n2 unhealthy; "
                                      "n3 circuit breaker open; n4 busy (0 of 0 slots in use)")


def test_a_step_in_backoff_says_until_when_and_after_what() -> None:
    core = Core()
    born(core, "n1")
    run = submitted(core, {"id": "a", "uses": "echo", "retry": {"max_attempts": 3, "initial": 5, "jitter": 0}})
    assigned = [e for e in place(core, NOW) if isinstance(e, AttemptAssigned)]
    for event in assigned:
        core.apply(event)
    attempt = assigned[0]
    core.apply(StepReported(NOW, "n1", attempt.attempt, attempt.fence, "started"))
    core.apply(ResultReported(NOW + 100, "n1", attempt.attempt, attempt.fence, False, {}, "exit 3"))
    assert run.steps["a"].state == "queued"
    assert reason(core, run, "a", NOW + 1100) == (f"backing off: ready in 4.0 s (attempt {attempt.attempt} on n1 "
                                                  f"failed: exit 3)")


def test_affinity_and_anti_affinity() -> None:
    core = Core()
    born(core, "n1")
    born(core, "n2", labels={"zone": "b"})
    run = submitted(core, {"id": "a", "uses": "echo"},
                    {"id": "b", "uses": "echo", "placement": {"anti_affinity": ["a"], "selector": {"labels": {}}}})
    run.steps["a"].node = "n2"  # as if `a` ran on n2
    core.nodes["n1"].draining = True
    assert reason(core, run, "b") == "no node that could take it can now: n1 draining"
    core.nodes["n1"].draining = False
    core.nodes["n1"].caps = frozenset({"noop"})
    assert reason(core, run, "b") == "anti_affinity: every node that could take it ran step a (n2)"


def test_pure_deterministic_and_only_for_queued_steps() -> None:
    core = Core()
    born(core, "n1")
    run = submitted(core, GPU, {"id": "after", "uses": "echo", "needs": ["train"]})
    before = copy.deepcopy((core.queue, core.nodes, core.runs["r1"].steps["train"].__dict__))
    first = waiting_reasons(core, run, NOW)
    assert first == waiting_reasons(core, run, NOW)
    assert copy.deepcopy((core.queue, core.nodes, core.runs["r1"].steps["train"].__dict__)) == before
    assert set(first) == {"train"}  # `after` is pending, not waiting for a node
    assert why_waiting(core, run, run.steps["after"], NOW) is None
    # the clock is an argument: a later `now` moves the unrunnable deadline and nothing else
    assert "fails in 20.0 s" in waiting_reasons(core, run, NOW + 10_000)["train"]


def test_explanations_are_bounded_per_run() -> None:
    core = Core()
    run = submitted(core, *({"id": f"s{i}", "uses": "echo"} for i in range(MAX_EXPLAINED + 3)))
    reasons = waiting_reasons(core, run, NOW)
    assert len(reasons) == MAX_EXPLAINED + 3
    assert sum(1 for text in reasons.values() if text.startswith("queued (only the first")) == 3


@settings(max_examples=300, deadline=None)
def mostly(usual: Any, *others: Any) -> st.SearchStrategy[Any]:
    """Each filter passes most of the time, so that some fleets can take the step and some cannot."""
    return st.sampled_from([usual] * 4 + list(others))


@given(st.lists(st.fixed_dictionaries({
    "state": mostly("online", "suspected", "failed"), "draining": mostly(False, True),
    "throttled": mostly(False, True), "health": mostly("healthy", "degraded", "unhealthy"),
    "breaker": mostly("closed", "open", "half_open"), "slots": mostly(2, 0, 1), "gpu": mostly(True, False),
    "cores": mostly(4.0, 1.0), "avoid": mostly(False, True)}), min_size=0, max_size=4))
def test_about_to_be_placed_exactly_when_the_scheduler_places_it(nodes: list[dict[str, Any]]) -> None:
    core = Core()
    for i, n in enumerate(nodes):
        born(core, f"n{i}", caps=(*CAPS, "gpu") if n["gpu"] else CAPS, slots=n["slots"],
             resources={"cores": n["cores"]})
        node = core.nodes[f"n{i}"]
        node.state, node.draining, node.throttled = n["state"], n["draining"], n["throttled"]
        node.health, node.breaker = n["health"], n["breaker"]
    run = submitted(core, {"id": "s", "uses": "echo", "resources": {"cores": 2},
                           "placement": {"selector": {"capabilities": ["gpu"]}}})
    step: StepRun = run.steps["s"]
    for i, n in enumerate(nodes):
        if n["avoid"]:
            step.avoid[f"n{i}"] = NOW + 5_000
    text = reason(core, run, "s")
    placed = any(isinstance(e, AttemptAssigned) for e in place(core, NOW))
    assert text.startswith("about to be placed") == placed, text
    assert not text.startswith("no node that could take it can now") or "can take it at the next" not in text


def test_the_api_explains_with_the_hubs_clock_not_the_wall_clock(tmp_path: Any) -> None:
    """A hub on a virtual clock (sim/dst.py) answers `GET /runs/{id}` in its own time: an executor no node offers
    fails after the 30 s grace, counted from the hub's now."""
    import asyncio

    import httpx

    from agent.runtime.memory import MemoryBroker, MemoryTransport
    from hub.api import create_app
    from hub.service import Hub, HubConfig

    async def scenario() -> dict[str, Any]:
        transport = MemoryTransport(MemoryBroker(), "hub")
        hub = Hub(HubConfig(broker="mqtt://memory.invalid", fleet="t", data=tmp_path / "hub"), transport=transport,
                  clock=lambda: NOW)
        transport.incoming = lambda maxsize=0: hub.intake
        running = asyncio.create_task(hub.run(api=False, first_connection_required=False))
        try:
            workflow = workflow_from_data({"name": "t", "steps": [{"id": "a", "uses": "teleport"}]})
            run_id, _ = await asyncio.wait_for(hub.submit(workflow, {}, None), 30)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(hub)), base_url="http://hub",
                                         headers={"Authorization": f"Bearer {hub.token}"}) as client:
                response = await asyncio.wait_for(client.get(f"/runs/{run_id}"), 30)
            return response.json()  # type: ignore[no-any-return]
        finally:
            hub.stop()
            await asyncio.gather(running, return_exceptions=True)

    (step,) = asyncio.run(scenario())["steps"]
    assert step["waiting"].endswith("; it fails in 30.0 s unless a node that can take it joins"), step["waiting"]
