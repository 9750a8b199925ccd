"""Work that can never run (hub/runnable.py): refused at submit, or failed by the pure core with a clear reason,
never sent and retried forever or queued until the run deadline. Deterministic: the clock is the Driver's."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest

from hub.events import AttemptLost, NodeBorn, NodeDied, StepReported, StepUnrunnable, from_record, to_record
from hub.health import Policy
from hub.errors import OperatorError
from hub.service import Hub, HubConfig
from hub.state import Core, SendAssign
from hub.workflow import workflow_from_data
from tests.unit.test_hub_core import Driver, spec, summary


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"b": value}
    return value


BIG_WITH = {"blob": "x" * 4000, **{f"part{i}": "y" * 4000 for i in range(20)}}  # ~84 KB of text
DEEP_WITH = {"a": nested(21)}
WIDE_WITH = {f"k{i}": i for i in range(5000)}


def full_summary(core: Core) -> Any:
    """The shared summary plus what these rules add: the unanswered counts and every step's error."""
    return (summary(core), {r: {s: (x.unanswered, x.error, x.ready_at) for s, x in run.steps.items()}
                            for r, run in core.runs.items()})


def assert_replays(d: Driver) -> None:
    rebuilt = Core().fold(copy.deepcopy(d.journal))
    assert full_summary(rebuilt) == full_summary(d.core)
    # and through the journal's record form, as a restart reads it
    reread = Core().fold([from_record(*to_record(event)) for event in d.journal])
    assert full_summary(reread) == full_summary(d.core)


def driver(grace: float = 30.0, max_unanswered: int = 5) -> Driver:
    d = Driver()
    d.silent = set()
    d.core = Core(Policy.model_validate({"unrunnable": {"grace": grace, "max_unanswered": max_unanswered}}))
    return d


# -- 1. refused at submit ------------------------------------------------------------------------------------------

@pytest.fixture
def hub(tmp_path: Path) -> Any:
    hub = Hub(HubConfig(broker="mqtt://127.0.0.1:1", fleet="t", data=tmp_path / "hub"))
    try:
        yield hub
    finally:
        hub.journal.close()
        hub.registry.close()
        hub.meta.close()


def submit(hub: Hub, *steps: dict[str, Any]) -> str:
    """Hub.submit with the hub's core loop running, as the API calls it (bounded)."""
    workflow = workflow_from_data({"name": "w", "version": "1.0.0", "steps": list(steps)})

    async def go() -> str:
        core_loop = asyncio.create_task(hub._core_loop())
        try:
            run_id, created = await asyncio.wait_for(hub.submit(workflow, {}, None), 30)
            assert created
            return run_id
        finally:
            core_loop.cancel()
            await asyncio.gather(core_loop, return_exceptions=True)

    return asyncio.run(go())


def submit_error(hub: Hub, *steps: dict[str, Any]) -> OperatorError:
    with pytest.raises(OperatorError) as caught:
        submit(hub, *steps)
    return caught.value


def test_submit_refuses_a_with_that_can_never_be_sent(hub: Hub) -> None:
    big = submit_error(hub, {"id": "ok", "uses": "echo", "with": {"v": 1}}, {"id": "big", "uses": "echo",
                                                                              "with": BIG_WITH})
    assert big.status == 422
    assert str(big).startswith("step 'big': `with` cannot be sent: the assignment would be ")
    assert "bytes, over the 65,536-byte message limit" in str(big) and "'ok'" not in str(big)

    deep = submit_error(hub, {"id": "deep", "uses": "echo", "with": DEEP_WITH})
    assert deep.status == 422
    assert str(deep).startswith("step 'deep': `with` cannot be sent: field 'with.a.b.b.b.b.b.b': nested too deeply")

    wide = submit_error(hub, {"id": "wide", "uses": "echo", "with": WIDE_WITH})
    assert str(wide) == "step 'wide': `with` cannot be sent: field 'with': 5000 entries is over the limit of 4096"

    undo = submit_error(hub, {"id": "a", "uses": "echo", "compensate": {"uses": "echo", "with": BIG_WITH}})
    assert str(undo).startswith("step 'a': compensation `with` cannot be sent: the assignment would be ")


def test_submit_accepts_the_largest_with_that_fits(hub: Hub) -> None:
    """The limits are the codec's: just under them is accepted (with room for the widest ids and counters)."""
    fits = {"blob": "x" * 4000, **{f"part{i}": "y" * 4000 for i in range(15)}, "deep": nested(5)}
    run_id = submit(hub, {"id": "a", "uses": "echo", "with": fits})
    assert hub.core.runs[run_id].state == "running"


# -- 2. an assignment that cannot be encoded never goes out -------------------------------------------------------

def test_unsendable_with_fails_the_step_at_placement_and_is_never_sent() -> None:
    """A run journaled before the submit check (or from any other path) fails at once with the reason."""
    d = driver()
    d.node("n1")
    d.submit("r1", spec({"id": "ok", "uses": "echo", "compensate": {"uses": "echo"}},
                        {"id": "big", "uses": "echo", "with": BIG_WITH, "needs": ["ok"]},
                        {"id": "after", "uses": "echo", "needs": ["big"]}))
    (ok,) = d.tick()
    d.finish(ok)
    d.tick()
    run = d.core.runs["r1"]
    big = run.steps["big"]
    assert big.state == "failed" and not big.attempts
    assert big.error is not None and big.error.startswith("step big can never run: `with` cannot be sent: the "
                                                          "assignment would be ")
    assert run.error == big.error and run.state == "compensating"  # the saga still undoes what succeeded
    assert [c.step for c in d.assigned()] == ["ok", "undo-ok"]
    assert [e for e in d.journal if isinstance(e, StepUnrunnable)][0].step == "big"
    assert_replays(d)


def test_unsendable_for_each_instances_and_deep_with_fail_without_retries() -> None:
    d = driver()
    d.node("g1", labels={"class": "gw"})
    d.node("g2", labels={"class": "gw"})
    d.submit("r1", spec({"id": "up", "uses": "echo", "with": DEEP_WITH, "retry": {"max_attempts": 5},
                         "for_each": {"labels": {"class": "gw"}}}))
    d.tick()
    run = d.core.runs["r1"]
    assert run.state == "failed" and not d.assigned()
    assert "field 'with.a.b.b.b.b.b.b': nested too deeply" in (run.error or "")
    assert all(run.steps[s].failures == 0 for s in run.steps)  # failed for good, not retried
    assert_replays(d)


# -- 3. nobody in the fleet offers the executor -------------------------------------------------------------------

def test_step_whose_executor_no_node_offers_fails_after_the_grace() -> None:
    d = driver(grace=30)
    d.node("n1")  # offers noop, echo, sleep, fail, gpio
    d.submit("r1", spec({"id": "x", "uses": "nosuch"}))
    d.submit("r2", spec({"id": "a", "uses": "echo"}))
    (other,) = d.tick()
    assert other.run == "r2"  # a normal run is placed meanwhile
    d.finish(other)
    d.tick(29_800)
    assert d.core.runs["r1"].steps["x"].state == "queued"  # inside the grace: devices may still connect
    d.tick(200)
    run = d.core.runs["r1"]
    assert run.state == "failed" and run.steps["x"].state == "failed"
    assert run.error == "step x can never run: no node in the fleet offers executor 'nosuch' (disabled or unknown)"
    assert d.core.runs["r2"].state == "succeeded"
    assert_replays(d)


def test_a_node_that_connects_within_the_grace_takes_the_step() -> None:
    d = driver(grace=30)
    d.submit("r1", spec({"id": "a", "uses": "echo"}))  # submitted before any device connected
    assert d.tick(20_000) == []
    d.node("n1")
    (cmd,) = d.tick(100)
    d.finish(cmd)
    assert d.core.runs["r1"].state == "succeeded"


def test_offline_nodes_still_count_removed_ones_do_not_and_selectors_are_checked() -> None:
    d = driver(grace=5)
    d.node("n1", labels={"site": "north"})
    d.feed(NodeDied(d.now, "n1", 1, "shutdown"))  # offline: it may come back, so its executors still count
    d.submit("r1", spec({"id": "a", "uses": "echo"}))
    d.submit("r2", spec({"id": "a", "uses": "echo", "placement": {"selector": {"labels": {"site": "south"}}}}))
    d.submit("r3", spec({"id": "a", "uses": "echo", "resources": {"cores": 64}}))
    d.tick(6_000)
    assert d.core.runs["r1"].steps["a"].state == "queued"
    assert d.core.runs["r2"].error == ("step a can never run: no node in the fleet that offers executor 'echo' "
                                       "matches its selector and has its resources (labels {'site': 'south'})")
    assert d.core.runs["r3"].error is not None and d.core.runs["r3"].error.endswith("(cores 64)")
    assert_replays(d)


def test_grace_comes_from_the_policy() -> None:
    d = driver(grace=2)
    d.node("n1")
    d.submit("r1", spec({"id": "x", "uses": "shell"}))
    d.tick(1_900)
    assert d.core.runs["r1"].state == "running"
    d.tick(100)
    assert d.core.runs["r1"].state == "failed"
    assert "executor 'shell' (disabled or unknown)" in (d.core.runs["r1"].error or "")


# -- 4. unanswered assignments are counted ------------------------------------------------------------------------

def test_unanswered_assignments_back_off_and_fail_the_step_naming_the_nodes() -> None:
    d = driver(max_unanswered=5)
    d.node("n1", slots=1)
    d.node("n2", slots=1)
    d.submit("r1", spec({"id": "a", "uses": "echo", "retry": {"max_attempts": 1, "initial": 1, "multiplier": 2,
                                                              "max": 60, "jitter": 0}}))
    placed_at = []
    for _ in range(1000):  # 100 s of 100 ms ticks is more than enough: 5 x 10 s + 1 + 2 + 4 + 8 s of backoff
        if any(isinstance(c, SendAssign) for c in d.tick(100)):
            placed_at.append(d.now)
        if d.core.runs["r1"].state != "running":
            break
    run = d.core.runs["r1"]
    step = run.steps["a"]
    assert run.state == "failed" and step.state == "failed"
    assert (step.unanswered, step.failures, len(step.attempts)) == (5, 0, 5)
    assert step.error == "step a failed: 5 assignments were not answered (nodes n1, n2)"
    gaps = [b - a for a, b in zip(placed_at, placed_at[1:])]
    assert gaps == [11_100, 12_100, 14_100, 18_100]  # 10 s unanswered (+ one scan) + 1, 2, 4, 8 s of backoff
    assert_replays(d)


def test_unanswered_while_the_node_dies_or_is_suspected_is_not_counted() -> None:
    d = driver(max_unanswered=1)
    d.node("n1")
    d.submit("r1", spec({"id": "a", "uses": "echo"}))
    (first,) = d.tick()
    d.feed(NodeDied(d.now, "n1", 1, "lost"))  # the node-failure path: placed again, nothing counted
    step = d.core.runs["r1"].steps["a"]
    assert (step.state, step.unanswered) == ("queued", 0)
    d.node("n1", boot=2)
    (second,) = d.tick()
    d.silent.add("n1")
    d.tick(10_100)  # silent since its assignment: not counted here (the liveness path suspects it)
    assert d.core.attempts[second.attempt].state == "lost"
    assert step.unanswered == 0 and d.core.runs["r1"].state == "running"
    assert_replays(d)


def test_an_answered_assignment_is_not_counted_and_a_restart_gives_a_fresh_window() -> None:
    d = driver(max_unanswered=1)
    d.node("n1")
    d.submit("r1", spec({"id": "a", "uses": "sleep"}))
    (cmd,) = d.tick()
    d.feed(StepReported(d.now, "n1", cmd.attempt, cmd.fence, "accepted"))
    d.tick(20_000)
    assert d.core.runs["r1"].steps["a"].unanswered == 0
    d.submit("r2", spec({"id": "b", "uses": "sleep"}))
    (cmd2,) = d.tick()
    # The hub restarts 9 s later and is back 5 s after that: the node's answer may still be in its outbox.
    d.core = Core(d.core.policy).fold(copy.deepcopy(d.journal))
    d.core.after_load(d.now + 14_000)
    d.tick(14_000)
    assert d.core.attempts[cmd2.attempt].state == "assigned"
    d.tick(10_100)
    assert d.core.runs["r2"].state == "failed"


def test_journals_from_before_the_rule_still_load_and_replay_the_same() -> None:
    """An AttemptLost written before `unanswered` existed lacks the field: it loads and is re-queued for free."""
    old = {"at": 5, "attempt": "a1", "reason": "the node did not answer the assignment", "counts": False}
    event = from_record("attempt_lost", old)
    assert isinstance(event, AttemptLost) and event.unanswered is False
    d = driver()
    d.node("n1")
    d.submit("r1", spec({"id": "a", "uses": "echo"}))
    (cmd,) = d.tick()
    d.feed(from_record("attempt_lost", {**old, "at": d.now, "attempt": cmd.attempt}))
    step = d.core.runs["r1"].steps["a"]
    assert (step.state, step.unanswered, step.ready_at) == ("queued", 0, d.now)
    assert_replays(d)


def test_node_caps_from_births_feed_the_rule() -> None:
    d = driver(grace=1)
    d.feed(NodeBorn(d.now, "n1", 1, "container", {}, ("shell",), 1, {}, (), 1.0))
    d.submit("r1", spec({"id": "x", "uses": "shell"}))
    (cmd,) = d.tick(2_000)
    assert isinstance(cmd, SendAssign) and cmd.uses == "shell"
