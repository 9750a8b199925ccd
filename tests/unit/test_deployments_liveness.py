"""Deployments and time, in the pure core with the clock passed in: what a verify window proves (nothing across a
hub restart until the node is heard again; not an outage inside it), which deadline a queued execution has (none
while the operator or an earlier wave holds it), a node lost during its update (waited for, no retry used), and an
ended deployment that lets go. Each scenario replays to the same state."""

from __future__ import annotations

from hub.events import NodeDied, NodeRemoved, NodeSeen
from tests.unit.deploydriver import DeployDriver, assert_replays, fleet, restarted


def test_a_hub_restart_inside_the_verify_window_proves_nothing_until_the_node_is_heard() -> None:
    d = fleet(2)
    d.deploy(verify="60s")
    d.run_for(1_000)
    assert d.states() == {"n00": "verifying", "n01": "verifying"}
    d.silent = {"n00"}          # n00 goes dark right after its run; n01 keeps sending heartbeats
    d.run_for(1_000)            # the hub dies before it suspects n00, and is back after the window ended
    back = restarted(d, d.now + 120_000, from_snapshot=True)
    back.silent = {"n00"}
    back.tick(0)
    assert back.states() == {"n00": "verifying", "n01": "verifying"}  # nobody heard since the restart: no verdict
    back.run_for(100)
    assert back.states()["n01"] == "succeeded"  # heard again: proven
    back.run_for(3_000)                          # n00 stays silent: suspected, which fails its verify
    ex = back.ex("n00")
    assert ex.state == "rolling_back" and ex.reason.startswith("verify failed: the node is suspected at the end")
    assert back.core.nodes["n00"].versions == {}
    assert_replays(back)


def test_an_outage_inside_the_window_fails_the_verify_when_the_node_did_not_reboot() -> None:
    for outage in ("death certificate", "suspected"):
        d = fleet(1)
        d.deploy(verify="60s", rollback="never")
        d.run_for(1_000)
        if outage == "death certificate":
            d.feed(NodeDied(d.now, "n00", 1, "lost"))
            d.run_for(20_000)
            d.node("n00")  # back on the same boot, well inside the window: it did not reboot
        else:
            d.silent = {"n00"}
            d.run_for(2_500)  # missed heartbeats
            assert d.core.nodes["n00"].state == "suspected"
            d.silent = set()
            d.feed(NodeSeen(d.now, "n00"))  # heard again before it was failed
        d.run_for(60_000)  # past the window's end
        ex = d.ex("n00")
        assert ex.state == "failed" and ex.reason.startswith(
            "verify failed: the node was not online throughout the window: it was lost at"), ex.reason
        assert d.core.nodes["n00"].versions == {}
        assert_replays(d)


def test_a_paused_deployment_waits_for_its_operator_and_never_ends_by_itself() -> None:
    d = fleet(4)
    d.deploy(waves="1,100%", pause_between=True, verify="0s", timeout="10s", abort_threshold=50,
             rollback="on-abort")
    d.run_for(2_000)
    waiting = {"n01": "queued", "n02": "queued", "n03": "queued"}
    assert d.dep().state == "paused" and d.states() == {"n00": "succeeded", **waiting}
    assert [d.ex(n).deadline for n in waiting] == [None] * 3  # its --timeout does not run while it may not start
    d.run_for(60_000)                                          # six timeouts later, nobody resumed
    assert d.dep().state == "paused" and d.states() == {"n00": "succeeded", **waiting}
    d.control("resume")
    assert [d.ex(n).deadline for n in waiting] == [d.now + 10_000] * 3  # from now on, it does
    d.run_for(1_000)
    assert d.dep().state == "succeeded" and set(d.states().values()) == {"succeeded"}
    assert_replays(d)


def test_a_queued_node_has_no_deadline_before_its_wave_starts() -> None:
    d = fleet(3)
    d.outcome = lambda cmd: "running" if cmd.node == "n00" else True  # the canary takes its time
    d.deploy(waves="1,100%", verify="0s", timeout="10s", in_progress_timeout="1m")
    d.run_for(30_000)
    assert d.states() == {"n00": "in_progress", "n01": "queued", "n02": "queued"}
    assert d.ex("n01").deadline is None and d.dep().state == "running"
    assert_replays(d)


def test_a_node_that_timed_out_queued_was_not_executed_for_the_abort_criteria() -> None:
    d = fleet(2)
    d.outcome = lambda cmd: "running"  # n00 takes a minute; n01 waits behind it (--max-concurrent 1)
    d.deploy(max_concurrent=1, timeout="10s", in_progress_timeout="1m", abort_threshold=1, rollback="never")
    d.run_for(11_000)
    assert d.states() == {"n00": "in_progress", "n01": "timed_out"}
    assert d.dep().state == "running" and d.dep().executed == 0  # it never got its turn: nothing failed yet
    d.run_for(50_000)
    assert d.dep().abort_reason == "aborted: 1 of 1 executed (100%) failed, threshold 1%"  # n00's own timeout
    assert_replays(d)


def test_a_node_lost_during_its_update_is_waited_for_without_using_a_retry() -> None:
    for comes_back in (False, True):
        d = fleet(1)
        d.outcome = lambda cmd: "running"  # its install starts ...
        d.deploy(in_progress_timeout="10s", verify="0s")
        d.run_for(1_000)
        first = d.ex("n00")
        deadline, first_run = first.deadline, first.run
        d.feed(NodeDied(d.now, "n00", 1, "lost"))  # ... and the node dies under it (the step has one attempt)
        d.run_for(1_000)
        ex = d.ex("n00")
        assert (ex.state, ex.retries, ex.deadline) == ("in_progress", 0, deadline) and ex.run != first_run
        assert "was lost with its node (node n00 failed" in ex.reason and "no retry used" in ex.reason
        if comes_back:
            d.outcome = lambda cmd: True
            d.node("n00", boot=2)
            d.run_for(1_000)
            assert (d.ex("n00").state, len(d.ex("n00").runs)) == ("succeeded", 2)
        else:
            d.run_for(9_000)
            ex = d.ex("n00")
            assert ex.state == "timed_out" and "(--in-progress-timeout)" in ex.reason
            assert d.core.runs[str(ex.run)].state in ("cancelled", "timed_out")  # nothing left waiting for the node
        assert_replays(d)


def test_a_queued_node_that_left_lets_its_ended_deployment_go() -> None:
    d = fleet(3)
    d.deploy(rate="60/min", verify="0s", rollback="never")
    d.run_for(200)
    d.feed(NodeRemoved(d.now, "n02", "decommissioned", True))
    d.run_for(5_000)
    assert d.dep().state == "succeeded" and d.states()["n02"] == "removed"
    assert not d.dep().leaving and d.dep().id not in d.core.deploys.active  # decided on no pass any more
    assert_replays(d)


def test_a_deployment_without_a_node_to_update_succeeds_at_once() -> None:
    d = DeployDriver()
    d.deploy(verify="0s")
    d.run_for(200)
    assert d.dep().state == "succeeded" and d.dep().reason == "done: 0 of 0 succeeded"
