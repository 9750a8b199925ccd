"""More of the hub core's rules that mutation testing found unpinned (bench/RESULTS.md, "Mutation testing", the
second round): where for_each instances and compensations run, what `when` conditions read, hard refusals, and
the time and reason every loss, removal, migration and failure records. test_core_mutants.py holds the first round."""

from __future__ import annotations

from typing import Any

from hub.events import (ActionTaken, NodeBorn, NodeConflict, NodeFailed, NodeRemoved, NodeSuspected, ResultReported,
                        RunSubmitted, StepReported)
from hub.health import Limits, Policy
from hub.runs import AVOID_AFTER_REFUSAL_MS, REFUSAL_BACKOFF_MS, instance_spec
from hub.state import SendAssign, SendCancel
from hub.workflow import Selector, workflow_from_data
from tests.unit.test_hub_core import CAPS, Driver, spec


def started(d: Driver, commands: list[Any]) -> list[SendAssign]:
    """The assignments among `commands`, each reported started by its node."""
    assigns = [c for c in commands if isinstance(c, SendAssign)]
    for cmd in assigns:
        d.feed(StepReported(d.now, cmd.node, cmd.attempt, cmd.fence, "started"))
    return assigns


# -- for_each -------------------------------------------------------------------------------------------------------

def test_each_for_each_instance_runs_only_on_the_node_it_is_named_for() -> None:
    d = Driver()
    d.node("g1", labels={"class": "gw"}, slots=1)
    d.node("g2", labels={"class": "gw"}, slots=4)
    d.node("x", slots=4)  # idle, fits the step, but is not a gateway
    d.submit("busy", spec({"id": "hold", "uses": "sleep", "placement": {"selector": {"nodes": ["g1"]}}}))
    (hold,) = started(d, d.tick())
    d.submit("r1", spec({"id": "up", "uses": "echo", "for_each": {"labels": {"class": "gw"}}}))
    assert [(c.step, c.node) for c in d.tick()] == [("up.g2", "g2")]  # up.g1 waits for g1's one slot
    d.finish(hold)
    assert [(c.step, c.node) for c in d.tick()] == [("up.g1", "g1")]


def test_an_instance_is_a_plain_step_pinned_to_its_node() -> None:
    base = workflow_from_data({"name": "t", "steps": [
        {"id": "up", "uses": "echo", "migratable": True, "for_each": {"labels": {"class": "gw"}},
         "placement": {"selector": {"labels": {"class": "gw"}}, "strategy": "bin-pack"}}]}).steps[0]
    instance = instance_spec(base, "g1")
    assert (instance.id, instance.placement.selector, instance.placement.strategy) == (
        "up.g1", Selector(nodes=["g1"]), "bin-pack")
    assert instance.for_each is None and instance.migratable is False  # it fans out no further and stays put


def test_a_migrate_action_leaves_for_each_instances_on_their_node() -> None:
    d = Driver()
    d.node("g1", labels={"class": "gw"})
    d.node("spare", slots=4)
    d.submit("r1", spec({"id": "up", "uses": "sleep", "migratable": True, "for_each": {"labels": {"class": "gw"}}}))
    (cmd,) = started(d, d.tick())
    assert d.feed(ActionTaken(d.now, "g1", "migrate", "hot")) == []
    assert d.core.attempts[cmd.attempt].state == "running" and d.core.runs["r1"].migrations == 0


def born(d: Driver, node_id: str, profile: str, caps: tuple[str, ...]) -> None:
    d.feed(NodeBorn(d.now, node_id, 1, profile, {}, caps, 2, {"cores": 4, "memory_mb": 4096}, (), 1.0))


def test_for_each_selects_nodes_by_id_profile_and_capability() -> None:
    d = Driver()
    born(d, "a", "container", CAPS)
    born(d, "b", "rpi", CAPS)
    born(d, "c", "container", (*CAPS, "camera"))
    d.submit("r1", spec({"id": "by-id", "uses": "echo", "for_each": {"nodes": ["b", "c"]}},
                        {"id": "by-profile", "uses": "echo", "for_each": {"profile": "rpi"}},
                        {"id": "by-cap", "uses": "echo", "for_each": {"capabilities": ["camera"]}}))
    steps = d.core.runs["r1"].steps
    assert {s: steps[s].instances for s in ("by-id", "by-profile", "by-cap")} == {
        "by-id": ["by-id.b", "by-id.c"], "by-profile": ["by-profile.b"], "by-cap": ["by-cap.c"]}


# -- compensation ---------------------------------------------------------------------------------------------------

def test_a_compensation_runs_where_its_step_may_run_and_holds_what_it_held() -> None:
    d = Driver()
    d.node("site", labels={"k": "1"}, slots=4)
    d.node("other", slots=4)  # idle, 4 cores, but not where the step belongs
    d.submit("r1", spec({"id": "a", "uses": "echo", "resources": {"cores": 3},
                         "placement": {"selector": {"labels": {"k": "1"}}}, "compensate": {"uses": "echo"}},
                        {"id": "c", "uses": "fail", "needs": ["a"], "retry": {"max_attempts": 1}}))
    (a,) = d.tick()
    d.finish(a)
    d.submit("filler", spec({"id": "f", "uses": "sleep", "resources": {"cores": 2},
                             "placement": {"selector": {"labels": {"k": "1"}}}}))
    placed = {c.step: c for c in started(d, d.tick())}
    d.finish(placed["c"], ok=False)
    assert d.core.runs["r1"].state == "compensating"
    assert d.tick() == []  # "site" has 2 of the 3 cores free, "other" is not allowed
    d.finish(placed["f"])
    (undo,) = d.tick()
    assert (undo.step, undo.node) == ("undo-a", "site")


# -- conditions -----------------------------------------------------------------------------------------------------

def test_a_condition_reads_the_runs_inputs() -> None:
    d = Driver()
    d.node("n1", slots=4)
    flow = spec({"id": "deep", "uses": "echo", "when": "inputs.mode == 'full'"},
                inputs={"mode": {"type": "string", "default": "quick"}})
    for run, mode in (("full", "full"), ("quick", "quick")):
        d.feed(RunSubmitted(d.now, run, flow, {"mode": mode}, None, 10**12))
    assert [c.run for c in d.tick()] == ["full"]
    assert d.core.runs["quick"].steps["deep"].state == "skipped"


def test_a_condition_reads_the_state_of_earlier_steps() -> None:
    d = Driver()
    d.node("n1", slots=4)
    d.submit("r1", spec({"id": "probe", "uses": "echo", "when": "1 == 2"},
                        {"id": "main", "uses": "echo"},
                        {"id": "fallback", "uses": "echo", "needs": ["probe", "main"], "join": "any",
                         "when": "steps.probe.state == 'skipped' and steps.main.state == 'succeeded'"},
                        {"id": "follow", "uses": "echo", "needs": ["probe", "main"], "join": "any",
                         "when": "steps.probe.state == 'succeeded'"}))
    (main,) = d.tick()
    d.finish(main)
    (fallback,) = d.tick()
    assert fallback.step == "fallback" and d.core.runs["r1"].steps["follow"].state == "skipped"


# -- refusals, losses and failures: why and when --------------------------------------------------------------------

def test_a_disabled_executor_keeps_the_node_avoided_ten_times_longer() -> None:
    d = Driver()
    d.node("n1")
    d.submit("r1", spec({"id": "a", "uses": "echo"}))
    (first,) = d.tick()
    d.feed(StepReported(d.now, "n1", first.attempt, first.fence, "refused", "executor-disabled"))
    assert d.tick(REFUSAL_BACKOFF_MS + AVOID_AFTER_REFUSAL_MS) == []  # an ordinary refusal would be over by now
    (again,) = d.tick(9 * AVOID_AFTER_REFUSAL_MS)
    assert (again.step, again.node) == ("a", "n1")


def test_a_lost_attempt_that_counts_gives_its_step_and_run_the_reason() -> None:
    d = Driver()
    d.node("n1")
    d.submit("r1", spec({"id": "a", "uses": "sleep", "retry": {"max_attempts": 1}}))
    started(d, d.tick())
    d.feed(NodeFailed(d.now, "n1", "power cut"))
    run = d.core.runs["r1"]
    assert run.error == run.steps["a"].error == "step a failed after 1 attempt(s): node n1 failed: power cut"


def test_a_failing_run_cancels_its_other_attempts_at_that_time() -> None:
    d = Driver()
    d.node("n1", slots=4)
    d.submit("r1", spec({"id": "a", "uses": "fail", "retry": {"max_attempts": 1}}, {"id": "b", "uses": "sleep"}))
    placed = {c.step: c for c in started(d, d.tick())}
    d.tick(2_000)
    d.feed(StepReported(d.now, "n1", placed["a"].attempt, placed["a"].fence, "started"))
    commands = d.feed(ResultReported(d.now, "n1", placed["a"].attempt, placed["a"].fence, False, {}, "boom"))
    (cancel,) = commands
    b = d.core.attempts[placed["b"].attempt]
    assert isinstance(cancel, SendCancel) and cancel.refs[0].attempt == b.id
    assert (b.state, b.ended_at, b.reason) == ("cancelled", d.now, "run failed: step a failed after 1 attempt(s): boom")


def test_a_removed_node_loses_its_attempts_at_the_time_of_removal() -> None:
    d = Driver()
    d.node("n1")
    d.submit("r1", spec({"id": "a", "uses": "sleep", "migratable": True}))
    (cmd,) = started(d, d.tick())
    d.node("n2")
    d.tick(3_000)
    d.feed(NodeRemoved(d.now, "n1", "revoked"))
    node, attempt = d.core.nodes["n1"], d.core.attempts[cmd.attempt]
    assert (node.changed_at, node.history[-1]["at"], node.history[-1]["reason"]) == (d.now, d.now, "revoked")
    assert (attempt.state, attempt.ended_at) == ("lost", d.now)
    (again,) = d.tick()
    assert (again.step, again.node) == ("a", "n2")


# -- migration ------------------------------------------------------------------------------------------------------

def test_a_migration_moves_every_migratable_attempt_on_the_node() -> None:
    d = Driver()
    d.node("hot", slots=4)
    for run in ("r1", "r2"):
        d.submit(run, spec({"id": "m", "uses": "sleep", "migratable": True}))
    moved = started(d, d.tick())
    d.node("cool", slots=4)
    commands = d.feed(ActionTaken(d.now, "hot", "migrate", "hot"))
    assert sorted(c.refs[0].run for c in commands if isinstance(c, SendCancel)) == ["r1", "r2"]
    assert sorted((c.run, c.node) for c in d.tick()) == [("r1", "cool"), ("r2", "cool")]
    assert all(d.core.attempts[c.attempt].state == "lost" for c in moved)


def test_a_run_migrated_twice_counts_both_and_stays_put_at_its_limit() -> None:
    d = Driver()
    d.core.policy = Policy(cooldown=600, limits=Limits(max_migrations_per_run=2, max_migrations_per_node=10))
    for node in ("n1", "n2", "n3"):
        d.node(node)
    d.submit("r1", spec({"id": "m", "uses": "sleep", "migratable": True}))
    (cmd,) = started(d, d.tick())
    for migrated in (1, 2):
        d.feed(ActionTaken(d.now, cmd.node, "migrate", "hot"))
        assert d.core.runs["r1"].migrations == migrated
        (cmd,) = started(d, d.tick())
    assert d.feed(ActionTaken(d.now, cmd.node, "migrate", "hot")) == []
    assert d.core.attempts[cmd.attempt].state == "running"
    assert d.core.nodes[cmd.node].history[-1]["action"] == "migrate-skipped"


# -- the fleet: births, conflicts, sightings ------------------------------------------------------------------------

def test_a_node_born_again_records_its_return() -> None:
    d = Driver()
    d.node("n1")
    d.feed(NodeFailed(d.now, "n1", "test"))
    d.tick(1_000)
    d.node("n1", boot=2)
    assert d.core.nodes["n1"].history[-1] == {"at": d.now, "kind": "liveness", "state": "online",
                                              "reason": "birth, boot 2"}


def test_a_conflict_keeps_the_four_newest_boots_it_saw() -> None:
    d = Driver()
    d.node("n1")
    for boot in range(2, 6):
        d.feed(NodeConflict(d.now, "n1", boot, boot - 1, "two devices"))
    assert d.core.nodes["n1"].conflict["boots"] == [2, 3, 4, 5]  # type: ignore[index]


def test_a_message_asks_for_a_sighting_only_from_a_known_suspected_node() -> None:
    d = Driver()
    d.node("n1")
    assert d.core.touch("n1", d.now) is False  # online already
    assert d.core.touch("ghost", d.now) is False and "ghost" not in d.core.nodes
    d.feed(NodeSuspected(d.now, "n1"))
    assert d.core.touch("n1", d.now + 1) is True and d.core.nodes["n1"].last_seen == d.now + 1
