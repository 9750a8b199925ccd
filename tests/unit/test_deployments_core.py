"""Deployments in the hub's pure core, scenario by scenario, with the clock passed in: rates, waves, abort criteria,
the verify window, rollback and inventory, targets that change, version rules, cancel and pause. Every scenario ends
with the journal replayed and the snapshot loaded giving the same state."""

from __future__ import annotations

from hub.events import HealthChanged, NodeBorn, NodeDied, NodeRemoved, RunSubmitted, StepReported
from hub.fleet import SendAssign, SendCancel
from hub.workflow import workflow_from_data
from tests.unit.deploydriver import DEP, DeployDriver, assert_replays, failing, fleet, workflow
from tests.unit.test_hub_core import CAPS


def test_a_constant_rate_spaces_starts_at_least_60_over_n_seconds_apart() -> None:
    d = fleet(10)
    d.deploy(rate="120/min", verify="0s")
    d.run_for(10_000)
    starts = [e.at for e in d.starts()]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(starts) == 10 and min(gaps) >= 500 and max(gaps) <= 600  # 500 ms, at the 100 ms the test ticks
    assert d.dep().state == "succeeded" and set(d.states().values()) == {"succeeded"}
    assert_replays(d)


def test_an_exponential_rate_grows_by_its_factor_after_each_k_notified() -> None:
    d = fleet(8)
    d.deploy(base_rate="60/min", increment_factor=2, grow_after_notified=2, verify="0s")
    d.run_for(6_000, step=10)
    starts = [e.at for e in d.starts()]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    expected = [1000, 500, 500, 250, 250, 125, 125]  # 60/min, x2 after every 2 nodes notified
    assert len(gaps) == 7 and all(e <= g <= e + 10 for g, e in zip(gaps, expected)), gaps
    assert_replays(d)


def test_growth_after_succeeded_waits_for_successes() -> None:
    d = fleet(4)
    d.outcome = lambda cmd: None  # nothing finishes: nothing succeeds, the rate stays at its base
    d.deploy(base_rate="60/min", increment_factor=2, grow_after_succeeded=1)
    d.run_for(4_000, step=10)
    starts = [e.at for e in d.starts()]
    assert [b - a for a, b in zip(starts, starts[1:])] == [1000, 1000, 1000]


def test_max_concurrent_bounds_the_executions_under_way() -> None:
    d = fleet(5)
    d.deploy(max_concurrent=2, verify="1s")
    most = 0
    for _ in range(100):
        d.run_for(100)
        most = max(most, d.dep().active)
    assert most == 2 and d.dep().state == "succeeded"
    assert_replays(d)


def test_a_canary_wave_failure_stops_the_rollout_before_the_next_wave() -> None:
    d = fleet(4)
    d.outcome = failing("n00")
    d.deploy(waves="1,50%,100%")
    d.run_for(5_000)
    assert d.dep().state == "aborted"
    assert d.dep().abort_reason == "aborted: wave 1: 0 of 1 succeeded, needs 100%"
    assert d.states() == {"n00": "failed", "n01": "canceled", "n02": "canceled", "n03": "canceled"}
    assert [e.node for e in d.starts()] == ["n00"]
    assert [e.wave for e in d.changes("queued")] == [1, 2, 3, 3]
    assert_replays(d)


def test_waves_proceed_at_their_success_threshold_and_pause_between() -> None:
    d = fleet(5)
    d.outcome = failing("n01")
    d.deploy(waves="2,100%", wave_success=50, pause_between=True, verify="0s", rollback="never", abort_threshold=60,
             abort_min_executed=2)  # what tolerates n01's failure: without it the rollout would end aborted
    d.run_for(3_000)
    assert d.dep().state == "paused" and d.dep().wave == 2 and "wave 1 done (1 of 2 succeeded)" in d.dep().reason
    assert d.states() == {"n00": "succeeded", "n01": "failed", "n02": "queued", "n03": "queued", "n04": "queued"}
    d.run_for(3_000)
    assert d.states()["n02"] == "queued"  # paused until resumed
    d.control("resume")
    d.run_for(3_000)
    assert d.dep().state == "succeeded" and d.dep().reason == "done: 4 of 5 succeeded"
    assert_replays(d)


def test_abort_at_the_threshold_rolls_back_the_completed_nodes_when_asked() -> None:
    d = fleet(10)
    d.outcome = failing("n00", "n01", "n02")
    d.deploy(abort_threshold=30, abort_min_executed=10, rollback="on-abort", verify="0s")
    d.run_for(5_000)
    dep = d.dep()
    assert dep.state == "aborted" and dep.abort_reason == "aborted: 3 of 10 executed (30%) failed, threshold 30%"
    states = d.states()
    assert [states[f"n{i:02}"] for i in range(3)] == ["failed"] * 3
    assert [states[f"n{i:02}"] for i in range(3, 10)] == ["rolled_back"] * 7
    for node in d.core.nodes.values():  # the inventory: every node back where it was
        assert node.versions == {}
    for i in range(3, 10):
        ex = d.ex(f"n{i:02}")
        assert (ex.version_before, ex.version, len(ex.runs)) == (None, None, 2)
    assert_replays(d)


def test_an_abort_cancels_queued_executions_and_the_runs_in_progress() -> None:
    d = fleet(7)
    d.outcome = lambda cmd: False if cmd.node in ("n03", "n04") else None  # the others never answer
    d.deploy(rate="600/min", abort_threshold=50, abort_min_executed=2)
    d.run_for(1_000)
    assert d.dep().state == "aborted" and d.dep().abort_reason.startswith("aborted: 2 of 2 executed (100%) failed")
    assert d.states() == {"n00": "canceled", "n01": "canceled", "n02": "canceled", "n03": "failed",
                          "n04": "failed", "n05": "canceled", "n06": "canceled"}
    assert {e.node for e in d.starts()} >= {"n00", "n01", "n02"}
    assert {c.node for c in d.sent if isinstance(c, SendCancel)} == {"n00", "n01", "n02"}  # told to stop
    assert all(d.core.runs[d.ex(n).run].state == "cancelled" for n in ("n00", "n01", "n02"))  # type: ignore[index]
    assert_replays(d)


def test_abort_waits_for_its_minimum_and_counts_only_its_failure_type() -> None:
    d = fleet(4)
    d.outcome = failing("n00")
    d.deploy(rate="600/min", abort_threshold=10, abort_min_executed=3, rollback="never", verify="0s")
    d.run_for(400)
    assert d.states()["n00"] == "failed" and d.dep().state == "running"  # 1 executed: below the minimum
    d.run_for(2_000)
    assert d.dep().state == "aborted"
    d = fleet(4)
    d.outcome = failing("n00")
    d.deploy(abort_threshold=10, abort_type="REJECTED", rollback="never", verify="0s")
    d.run_for(2_000)
    assert d.dep().state == "succeeded"  # a failure is not a rejection


def test_success_needs_the_node_healthy_through_the_window_across_a_reboot() -> None:
    d = fleet(1)
    d.deploy(verify="5s")
    d.run_for(500)
    assert d.states() == {"n00": "verifying"}
    d.feed(NodeDied(d.now, "n00", 1, "lost"))
    d.run_for(2_000)
    d.node("n00", boot=2)  # back within the window
    d.run_for(3_000)
    ex = d.ex("n00")
    assert ex.state == "succeeded" and "rebooted: boot 1 -> 2" in ex.reason
    assert d.core.nodes["n00"].versions == {"app": "1.0.0"}
    assert_replays(d)


def test_a_node_that_does_not_come_back_in_the_window_is_rolled_back() -> None:
    d = fleet(1)
    d.deploy(verify="5s")
    d.run_for(500)
    d.silent = {"n00"}  # it goes quiet: suspected, then failed by missed heartbeats
    d.run_for(6_000)
    ex = d.ex("n00")
    assert ex.state == "rolling_back"
    assert ex.reason.startswith("verify failed: the node is failed at the end of the window (it did not come back)")
    d.silent = set()
    d.node("n00", boot=2)  # back later: the rollback run it was waiting for runs now
    d.run_for(1_000)
    assert d.ex("n00").state == "rolled_back" and d.core.nodes["n00"].versions == {}
    assert_replays(d)


def test_a_node_unhealthy_in_the_window_fails_its_verify_even_if_it_recovers() -> None:
    d = fleet(1)
    d.deploy(verify="5s", rollback="never")
    d.run_for(1_000)
    d.feed(HealthChanged(d.now, "n00", "unhealthy", "cpu", 99, 90, 10, "cpu over critical"))
    d.run_for(1_000)
    d.feed(HealthChanged(d.now, "n00", "healthy", "cpu", 10, 90, 10, "cpu back"))
    d.run_for(4_000)
    ex = d.ex("n00")
    assert ex.state == "failed" and ex.reason == "verify failed: the node was unhealthy during the window"


def test_a_failed_run_is_retried_on_its_node_then_rolled_back_to_the_version_before() -> None:
    d = fleet(2)
    d.deploy("d-0000000001", verify="0s")
    d.run_for(1_000)
    d.outcome = failing("n01", step="check")  # install succeeds, the check after it fails
    d.deploy(workflow=workflow(version="1.0.1"), retries=2, verify="0s")
    d.run_for(3_000)
    assert d.ex("n01").state == "rolling_back"
    assert d.core.nodes["n01"].breaker == "open"  # three failed steps: its rollback runs once the breaker half-opens
    d.run_for(61_000)
    n0, n1 = d.ex("n00"), d.ex("n01")
    assert (n0.state, n0.version_before, n0.version) == ("succeeded", "1.0.0", "1.0.1")
    assert (n1.state, n1.version_before, n1.version) == ("rolled_back", "1.0.0", "1.0.0")
    assert n1.runs == [f"{DEP}.n01.{i}" for i in (1, 2, 3, 4)] and n1.retries == 2  # 3 runs, then the rollback
    assert {n: node.versions for n, node in d.core.nodes.items()} == {"n00": {"app": "1.0.1"},
                                                                     "n01": {"app": "1.0.0"}}
    rollback = next(e for e in d.journal if isinstance(e, RunSubmitted) and e.run == n1.runs[-1])
    steps = workflow_from_data(rollback.spec).steps
    assert [(s.id, s.uses, s.with_, s.placement.selector.nodes) for s in steps] == [
        ("undo-install", "echo", {"undo": "install"}, ["n01"])]
    assert all(d.core.runs[r].spec["steps"][0]["placement"]["selector"]["nodes"] == ["n01"] for r in n1.runs)
    assert_replays(d)


def test_without_rollback_a_failure_stays_failed() -> None:
    d = fleet(1)
    d.outcome = failing("n00", step="check")
    d.deploy(rollback="never")
    d.run_for(2_000)
    ex = d.ex("n00")
    assert ex.state == "failed" and len(ex.runs) == 1 and ex.failure == "failed"


def test_an_execution_in_progress_past_its_timeout_is_cancelled_and_rolled_back() -> None:
    d = fleet(2)
    d.outcome = lambda cmd: None if cmd.step == "check" or (cmd.node == "n00" and cmd.step == "install") else True
    d.deploy(in_progress_timeout="3s")
    d.run_for(4_000)
    n0, n1 = d.ex("n00"), d.ex("n01")
    assert n0.state == "timed_out" and "nothing to roll back" in n0.reason       # nothing it did can be undone
    assert n1.state == "rolled_back" and n1.failure == "timed_out"                # its install was undone
    assert "in progress for 3 s" in d.changes("rolling_back")[0].reason
    assert {c.node for c in d.sent if isinstance(c, SendCancel)} >= {"n00", "n01"}  # told to stop
    assert_replays(d)


def test_nodes_that_join_the_target_are_deployed_and_queued_nodes_that_leave_are_removed() -> None:
    d = fleet(3, role="gw")
    d.node("other", labels={"role": "db"})
    d.deploy(target=["role=gw"], rate="60/min", verify="0s", waves="1,100%")
    d.run_for(500)
    d.node("late", labels={"role": "gw"})             # a new device matching the target
    d.node("other", boot=2, labels={"role": "gw"})    # a known one whose labels now match
    d.node("n02", boot=2, labels={"role": "db"})      # still queued, no longer matching
    d.feed(NodeRemoved(d.now, "n01", "revoked"))      # still queued, revoked
    d.run_for(10_000)
    assert d.states() == {"late": "succeeded", "n00": "succeeded", "n01": "removed", "n02": "removed",
                          "other": "succeeded"}
    assert d.ex("late").wave == 2 and d.dep().state == "succeeded"
    d.node("later", labels={"role": "gw"})            # after it succeeded: still the component's current one
    d.run_for(2_000)
    assert d.states()["later"] == "succeeded" and d.dep().state == "succeeded"
    assert_replays(d)


def test_a_minor_or_major_upgrade_needs_a_declared_migration_and_the_executors() -> None:
    d = fleet(1)
    d.deploy("d-0000000001", verify="0s")
    d.run_for(1_000)
    d.deploy("d-0000000002", workflow=workflow(version="1.1.0"), verify="0s")
    d.run_for(1_000)
    ex = d.ex("n00", "d-0000000002")
    assert ex.state == "rejected" and ex.failure == "rejected" and ex.runs == []
    assert ex.reason == "no migration declared from 1.0.0 to 1.1.0 (a minor or major change; migrates_from: none)"
    d.deploy("d-0000000003", workflow=workflow(version="1.1.0", extra='migrates_from: [">=1.0,<1.1"]\n'),
             verify="0s")
    d.deploy("d-0000000004", workflow=workflow(version="1.1.7"), verify="0s")  # then a patch: nothing needed
    d.run_for(2_000)
    assert d.states("d-0000000003") == {"n00": "succeeded"} and d.states("d-0000000004") == {"n00": "succeeded"}
    assert d.core.nodes["n00"].versions == {"app": "1.1.7"}
    d.deploy("d-0000000005", workflow=workflow(version="1.1.8", install="shell"))
    d.run_for(500)
    assert d.ex("n00", "d-0000000005").reason == "the node lacks executor(s) shell"
    assert_replays(d)


def test_a_node_refusing_the_executor_rejects_the_execution() -> None:
    d = fleet(1)
    d.outcome = lambda cmd: None
    d.deploy()
    (assign,) = [c for c in d.tick() if isinstance(c, SendAssign)]
    d.feed(StepReported(d.now, "n00", assign.attempt, assign.fence, "refused", "executor-disabled"))
    d.run_for(200)
    ex = d.ex("n00")
    assert ex.state == "rejected" and ex.reason == "the node refused step install: executor-disabled"
    assert d.core.runs[assign.run].state == "cancelled"


def test_force_cancel_ends_every_non_terminal_state_at_once_and_tells_the_nodes() -> None:
    d = DeployDriver()
    for node in ("a", "b", "c", "d"):
        d.node(node)
    # a: its check fails and its rollback never answers; b: verifying; c: never answers; d: queued behind them
    d.outcome = lambda cmd: {"a": {"install": True, "check": False}.get(cmd.step), "b": True}.get(cmd.node)
    d.deploy(max_concurrent=3, verify="60s")
    d.run_for(1_000)
    assert d.states() == {"a": "rolling_back", "b": "verifying", "c": "in_progress", "d": "queued"}
    runs = {n: d.ex(n).run for n in "ac"}
    d.sent.clear()
    d.control("cancel", force=True)
    d.run_for(100)
    assert d.dep().state == "canceled" and set(d.states().values()) == {"canceled"}
    assert {c.node for c in d.sent if isinstance(c, SendCancel)} == {"a", "c"}
    assert all(d.core.runs[r].state == "cancelled" for r in runs.values())  # type: ignore[index]
    assert_replays(d)


def test_cancel_without_force_lets_executions_under_way_finish() -> None:
    d = fleet(3)
    d.outcome = lambda cmd: "running"
    d.deploy(max_concurrent=1, verify="2s")
    d.run_for(500)
    (install,) = [c for c in d.sent if isinstance(c, SendAssign)]
    d.control("cancel")
    d.run_for(500)
    assert d.dep().state == "canceled" and d.states() == {"n00": "in_progress", "n01": "canceled", "n02": "canceled"}
    d.outcome = lambda cmd: True
    d.finish(install)
    d.run_for(3_000)
    assert d.states() == {"n00": "succeeded", "n01": "canceled", "n02": "canceled"}


def test_pause_stops_new_starts_until_resumed() -> None:
    d = fleet(3)
    d.deploy(rate="60/min", verify="0s")
    d.run_for(300)
    d.control("pause")
    d.run_for(3_000)
    assert len(d.starts()) == 1 and d.dep().state == "paused"
    d.control("resume")
    d.run_for(3_000)
    assert d.dep().state == "succeeded" and len(d.starts()) == 3


def test_a_node_outside_its_maintenance_window_waits_for_it_to_open() -> None:
    d = DeployDriver()  # the clock is at 00:00:01 UTC: the 02:00 window is closed
    d.node("berlin", labels={"site": "berlin"})
    d.node("paris", labels={"site": "paris"})
    d.deploy(window=["site=berlin 0 2 * * * 1h"], verify="0s")
    d.run_for(2 * 3_600_000 - 60_000, step=60_000)
    assert d.states() == {"berlin": "queued", "paris": "succeeded"}
    d.run_for(120_000, step=1_000)  # 02:00: it opens
    assert d.states() == {"berlin": "succeeded", "paris": "succeeded"} and d.dep().state == "succeeded"
    assert d.starts()[-1].at == 2 * 3_600_000
    assert_replays(d)


def test_one_deployment_of_a_component_updates_a_node_at_a_time() -> None:
    d = fleet(1)
    d.deploy("d-0000000001", verify="3s")
    d.deploy("d-0000000002", workflow=workflow(version="1.0.1"), verify="0s")
    d.run_for(2_000)
    assert d.ex("n00", "d-0000000001").state == "verifying" and d.ex("n00", "d-0000000002").state == "queued"
    d.run_for(3_000)
    assert d.ex("n00", "d-0000000002").state == "succeeded" and d.core.nodes["n00"].versions == {"app": "1.0.1"}


def test_a_node_born_with_the_executors_of_its_profile() -> None:
    """The driver's nodes offer CAPS: the deployment's workflow uses echo, which they have."""
    assert "echo" in CAPS
    d = fleet(1)
    d.feed(NodeBorn(d.now, "bare", 1, "container", {}, ("noop",), 1, {}, (), 1.0))
    d.deploy()
    d.run_for(300)
    assert d.states()["bare"] == "rejected" and d.ex("bare").reason == "the node lacks executor(s) echo"
