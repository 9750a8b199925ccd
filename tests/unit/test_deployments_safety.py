"""Deployments that stop, in the pure core with the clock passed in: aborts and what they roll back (never another
deployment's version, never a node another deployment is updating, only steps that ran), forced cancels (which end
what was live then and start nothing, and leave no version claimed that the node may not have), the abort criteria
judged before any start, and when a finished rollout counts as succeeded. Each scenario replays to the same state."""

from __future__ import annotations

from typing import Any

import pytest

from hub.events import DeploymentControlled, HealthChanged, NodeRemoved, ResultReported, RunSubmitted
from hub.fleet import SendAssign
from hub.workflow import workflow_from_data
from tests.unit.deploydriver import DEP, DeployDriver, assert_replays, failing, fleet, workflow

OLD, NEW = "d-000000000a", "d-000000000b"  # two deployments of the component, the second a patch
WHEN_SKIPPED = """name: app
version: 1.0.0
inputs:
  extra: {type: boolean, default: false}
steps:
- {id: install, uses: echo, retry: {max_attempts: 1}, compensate: {uses: echo, with: {undo: install}}}
- {id: extra, uses: echo, needs: [install], when: inputs.extra, compensate: {uses: echo, with: {undo: extra}}}
"""


def updating(d: DeployDriver) -> dict[str, list[str]]:
    """Per node, the deployments whose execution there is in progress, verifying or rolling back."""
    out: dict[str, list[str]] = {}
    for dep in d.core.deploys.deployments.values():
        for ex in dep.executions.values():
            if ex.state in ("in_progress", "verifying", "rolling_back"):
                out.setdefault(ex.node, []).append(dep.id)
    return out


def abort_under_a_patch(new_verify: str) -> DeployDriver:
    """OLD: n00 succeeds, n01 never answers until its in-progress timeout (5 s), which aborts OLD under on-abort;
    meanwhile NEW (1.0.1) updates n00 and verifies for `new_verify`."""
    d = fleet(2)
    d.outcome = lambda cmd: None if cmd.node == "n01" and cmd.run.startswith(OLD) else True
    d.deploy(OLD, verify="0s", rollback="on-abort", abort_threshold=50, abort_min_executed=2,
             in_progress_timeout="5s")
    d.run_for(1_000)
    d.deploy(NEW, workflow=workflow("1.0.1"), target=["node=n00"], verify=new_verify, rollback="never")
    for _ in range(80):
        d.run_for(100)
        assert all(len(deps) == 1 for deps in updating(d).values()), updating(d)  # one deployment a node at a time
    assert d.dep(OLD).state == "aborted"
    return d


def test_an_abort_does_not_roll_back_a_node_another_deployment_has_updated_since() -> None:
    d = abort_under_a_patch("0s")
    ex = d.ex("n00", OLD)
    assert ex.state == "succeeded" and ex.reason == "not rolled back after the abort: the node runs app 1.0.1 now, not 1.0.0"
    assert d.ex("n00", NEW).state == "succeeded" and d.core.nodes["n00"].versions == {"app": "1.0.1"}
    assert not d.dep(OLD).undo and OLD not in d.core.deploys.active
    assert_replays(d)


def test_an_abort_does_not_roll_back_a_node_another_deployment_is_updating() -> None:
    d = abort_under_a_patch("10s")
    assert d.ex("n00", NEW).state == "verifying" and d.core.deploys.busy == {("n00", "app"): NEW}
    assert d.ex("n00", OLD).reason == f"not rolled back after the abort: deployment {NEW} is updating app on it"
    d.run_for(3_000)
    assert d.ex("n00", NEW).state == "succeeded" and d.core.nodes["n00"].versions == {"app": "1.0.1"}
    assert_replays(d)


@pytest.mark.parametrize("rollback, state, version", [("on-abort", "rolled_back", None),
                                                      ("never", "canceled", "unknown")])
def test_an_abort_stops_updates_in_progress_and_undoes_what_they_completed(rollback: str, state: str,
                                                                          version: str | None) -> None:
    d = fleet(2)
    # n00 fails at once; n01 installs, then hangs in its check
    d.outcome = lambda cmd: False if cmd.node == "n00" else (True if cmd.step in ("install", "undo-install") else None)
    d.deploy(verify="0s", rollback=rollback, abort_threshold=50)
    d.run_for(3_000)
    assert d.dep().state == "aborted"
    ex = d.ex("n01")
    assert (ex.state, ex.version, d.core.nodes["n01"].versions.get("app")) == (state, version, version)
    assert d.core.runs[f"{DEP}.n01.1"].state == "cancelled"  # its run stopped: the node was told to
    stopped = [c for c in d.changes() if c.node == "n01" and c.state in ("rolling_back", "canceled")][0]
    assert stopped.reason.startswith(f"deployment aborted: {d.dep().abort_reason}: its run {DEP}.n01.1 was cancelled")
    assert ("rolling back install" if rollback == "on-abort" else "stopped part-way (done: install)") in stopped.reason
    assert_replays(d)


def test_a_forced_cancel_claims_no_version_the_node_may_not_have() -> None:
    d = fleet(3)
    # n00 installs and hangs in its check; n01 verifies for a minute; n02 never answers
    d.outcome = lambda cmd: {"n00": {"install": True}.get(cmd.step), "n01": True}.get(cmd.node)
    d.deploy(verify="60s")
    d.run_for(1_000)
    assert d.states() == {"n00": "in_progress", "n01": "verifying", "n02": "in_progress"}
    d.control("cancel", force=True)
    d.run_for(100)
    assert {n: (ex.state, ex.version) for n, ex in d.dep().executions.items()} == {
        "n00": ("canceled", "unknown"), "n01": ("canceled", "unknown"), "n02": ("canceled", None)}
    assert {n: node.versions for n, node in d.core.nodes.items()} == {
        "n00": {"app": "unknown"}, "n01": {"app": "unknown"}, "n02": {}}
    assert "its verify was cut short" in d.ex("n01").reason
    d.outcome = lambda cmd: True  # a version installed over an unknown one needs no migration: it mends the node
    d.deploy("d-0000000002", workflow=workflow("2.0.0"), verify="0s")
    d.run_for(1_000)
    assert {n: node.versions for n, node in d.core.nodes.items()} == dict.fromkeys(("n00", "n01", "n02"),
                                                                                   {"app": "2.0.0"})
    assert_replays(d)


def test_a_forced_cancel_right_after_an_abort_starts_no_run() -> None:
    d = fleet(4)
    d.outcome = failing("n03")
    d.deploy(verify="0s", rollback="on-abort", abort_threshold=1, abort_min_executed=4)
    for _ in range(300):  # pass by pass, so the operator acts before the pass after the abort
        d.decide_once()
        if d.dep().state == "aborted":
            break
    assert d.dep().state == "aborted" and d.dep().undo == {"n00", "n01", "n02"}  # rollbacks are due next ...
    mark = len(d.journal)
    d.feed(DeploymentControlled(d.now, DEP, "cancel", True, "stop everything"))
    d.run_for(2_000)
    assert [e.run for e in d.journal[mark:] if isinstance(e, RunSubmitted)] == []  # ... and none started
    assert d.states() == {"n00": "succeeded", "n01": "succeeded", "n02": "succeeded", "n03": "failed"}
    assert_replays(d)


def test_a_forced_cancel_of_a_succeeded_deployment_ends_only_what_was_live_then() -> None:
    d = fleet(1)
    d.deploy(verify="0s")
    d.run_for(1_000)
    d.outcome = lambda cmd: None if cmd.node == "late" else True
    d.node("late")                    # joins the succeeded deployment, and hangs
    d.run_for(500)
    assert d.ex("late").state == "in_progress"
    d.control("cancel", force=True)  # allowed: it has an execution under way
    d.run_for(500)
    assert d.ex("late").state == "canceled" and d.dep().state == "succeeded"
    d.node("later")                   # a device that joins afterwards still receives the component's current one
    d.run_for(2_000)
    assert d.ex("later").state == "succeeded" and d.core.nodes["later"].versions == {"app": "1.0.0"}
    assert_replays(d)


def test_no_node_starts_in_the_pass_that_meets_the_abort_criterion() -> None:
    d = fleet(3)
    held: list[SendAssign] = []
    d.outcome = lambda cmd: (held.append(cmd) or "running") if cmd.node == "n00" else True
    d.deploy(rate="60/min", abort_threshold=1, verify="0s")
    d.run_for(500)
    (install,) = held
    d.now = d.starts()[0].at + 1_000  # n01 is due, and n00's failure arrives in the same instant
    d.feed(ResultReported(d.now, "n00", install.attempt, install.fence, False, {}, "boom"))
    d.tick(0)
    d.run_for(1_000)
    assert [e.node for e in d.starts()] == ["n00"] and d.dep().state == "aborted"
    assert d.states() == {"n00": "failed", "n01": "canceled", "n02": "canceled"}


def test_a_cancelled_deployment_lets_a_run_under_way_finish_but_retries_nothing() -> None:
    d = fleet(1)
    d.outcome = lambda cmd: "running"
    d.deploy(retries=3, rollback="never")
    d.run_for(300)
    (install,) = d.assigned()
    d.control("cancel")
    d.feed(ResultReported(d.now, "n00", install.attempt, install.fence, False, {}, "boom"))
    d.run_for(1_000)
    ex = d.ex("n00")
    assert (ex.state, ex.retries, len(ex.runs)) == ("failed", 0, 1)
    assert_replays(d)


def test_rollbacks_undo_only_the_steps_that_ran() -> None:
    def undone(d: DeployDriver, node: str) -> list[str]:
        rollback = next(e for e in d.journal if isinstance(e, RunSubmitted) and e.run == d.ex(node).run)
        return [step.id for step in workflow_from_data(rollback.spec).steps]

    d = fleet(1)  # a failed verify
    d.deploy(workflow=WHEN_SKIPPED, verify="5s")
    d.run_for(1_000)
    d.feed(HealthChanged(d.now, "n00", "unhealthy", "cpu", 99, 90, 10, "cpu over critical"))
    d.run_for(5_000)
    assert d.ex("n00").state == "rolling_back" and undone(d, "n00") == ["undo-install"]  # `extra` was skipped
    d = fleet(2)  # an abort under on-abort
    d.outcome = failing("n01")
    d.deploy(workflow=WHEN_SKIPPED, verify="0s", rollback="on-abort", abort_threshold=50, abort_min_executed=2)
    d.run_for(2_000)
    assert d.ex("n00").state == "rolled_back" and undone(d, "n00") == ["undo-install"]
    assert_replays(d)


def test_the_abort_reason_gives_the_percent_as_precisely_as_the_threshold() -> None:
    d = fleet(8)
    d.outcome = failing("n00")
    d.deploy(abort_threshold=12.5, abort_min_executed=8, verify="0s", rollback="never")
    d.run_for(2_000)
    assert d.dep().abort_reason == "aborted: 1 of 8 executed (12.5%) failed, threshold 12.5%"


@pytest.mark.parametrize("criteria, state, reason", [
    ({}, "aborted", "finished with 1 of 3 executions not succeeded (no abort criteria tolerate failures)"),
    ({"abort_threshold": 50, "abort_min_executed": 10}, "succeeded", "done: 2 of 3 succeeded"),
    ({"abort_threshold": 20, "abort_min_executed": 10}, "aborted",
     "finished with 1 of 3 executions not succeeded (1 of 3 executed (33.3%) failed, over --abort-threshold 20%)"),
    ({"abort_threshold": 10, "abort_type": "REJECTED"}, "succeeded", "done: 2 of 3 succeeded"),
])
def test_a_finished_rollout_succeeds_only_as_far_as_its_criteria_tolerate_failures(criteria: dict[str, Any],
                                                                                   state: str, reason: str) -> None:
    d = fleet(4)
    d.outcome = failing("n01")
    d.deploy(verify="0s", rollback="never", rate="600/min", **criteria)
    d.run_for(100)
    d.feed(NodeRemoved(d.now, "n03", "decommissioned"))  # still queued: removed, which counts neither way
    d.run_for(2_000)
    assert d.states() == {"n00": "succeeded", "n01": "failed", "n02": "succeeded", "n03": "removed"}
    assert (d.dep().state, d.dep().reason) == (state, reason)
    assert d.dep().abort_reason == (reason if state == "aborted" else None)
    assert_replays(d)
