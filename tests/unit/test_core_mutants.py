"""The hub core's rules that mutation testing found unpinned (bench/RESULTS.md, "Mutation testing"): each test here
fails under a mutant the scenario tests of test_hub_core.py let live, and says which behaviour it holds."""

from __future__ import annotations

from typing import Any

from hub.events import NodeFailed, ResultReported, StepReported
from hub.state import TIMEOUT_GRACE_MS, SendCancel
from protocols import AttemptRef
from tests.unit.test_hub_core import Driver, spec

SLEEP_10S = spec({"id": "a", "uses": "sleep", "timeout": 10, "retry": {"max_attempts": 2, "initial": 1, "jitter": 0}})
GIVES_UP_MS = 10_000 + TIMEOUT_GRACE_MS


def placed(d: Driver) -> AttemptRef:
    d.node("n1")
    d.submit("r1", SLEEP_10S)
    (cmd,) = d.tick()
    return AttemptRef(cmd.run, cmd.step, cmd.attempt, cmd.fence)


# -- hub-side step timeouts --------------------------------------------------------------------------------------------

def test_an_attempt_accepted_but_never_started_times_out_from_its_assignment() -> None:
    d = Driver()
    ref = placed(d)
    d.feed(StepReported(d.now, "n1", ref.attempt, ref.fence, "accepted"))
    assert d.tick(GIVES_UP_MS - 100) == [] and d.core.attempts[ref.attempt].state == "accepted"
    assert d.tick(200) == [SendCancel("n1", (ref,), "timed out after 10 s (no result)")]
    assert d.core.runs["r1"].steps["a"].failures == 1


def test_a_step_timeout_counts_again_from_a_hub_restart_so_results_in_outboxes_still_land() -> None:
    d = Driver()
    ref = placed(d)
    d.feed(StepReported(d.now, "n1", ref.attempt, ref.fence, "started"))
    d.now += 10 * GIVES_UP_MS  # the hub was down; the node finished meanwhile and holds the result in its outbox
    d.core.after_load(d.now)
    assert d.tick(GIVES_UP_MS - 100) == [] and d.core.attempts[ref.attempt].state == "running"
    d.feed(ResultReported(d.now, "n1", ref.attempt, ref.fence, True, {"v": 1}, None))
    assert d.core.runs["r1"].state == "succeeded" and d.core.runs["r1"].steps["a"].failures == 0


def test_no_step_times_out_while_the_hub_is_behind() -> None:
    d = Driver()
    ref = placed(d)
    d.feed(StepReported(d.now, "n1", ref.attempt, ref.fence, "started"))
    assert d.core.decide(d.now + 2 * GIVES_UP_MS, liveness=False) == []
    assert d.core.attempts[ref.attempt].state == "running"


# -- refusals, stale reports, results --------------------------------------------------------------------------------

def test_a_refusal_backs_off_avoids_the_node_and_fails_the_step_at_the_limit(monkeypatch: Any) -> None:
    import hub.runs

    monkeypatch.setattr(hub.runs, "MAX_REFUSALS", 2)
    d = Driver()
    d.node("n1", labels={"k": "1"})
    d.submit("r1", spec({"id": "a", "uses": "echo", "placement": {"selector": {"labels": {"k": "1"}}}}))
    (first,) = d.tick()
    refused_at = d.now
    d.feed(StepReported(d.now, "n1", first.attempt, first.fence, "refused", "busy"))
    step, attempt = d.core.runs["r1"].steps["a"], d.core.attempts[first.attempt]
    assert (attempt.state, attempt.reason, attempt.ended_at) == ("refused", "busy", refused_at)
    assert (d.core.counters.refusals, step.refusals, step.state, step.failures) == (1, 1, "queued", 0)
    assert step.avoid == {"n1": refused_at + hub.runs.AVOID_AFTER_REFUSAL_MS}
    assert step.ready_at == refused_at + hub.runs.REFUSAL_BACKOFF_MS
    d.node("n2", labels={"k": "1"})
    assert d.tick(hub.runs.REFUSAL_BACKOFF_MS - 100) == []  # backing off
    (second,) = d.tick(100)
    assert second.node == "n2"  # the refusing node is avoided while another fits
    d.feed(StepReported(d.now, "n2", second.attempt, second.fence, "refused", "unknown-executor"))
    assert step.avoid["n2"] == d.now + 10 * hub.runs.AVOID_AFTER_REFUSAL_MS  # a node that cannot run it: far longer
    assert (step.state, d.core.counters.refusals) == ("failed", 2)
    assert (d.core.runs["r1"].error, d.core.runs["r1"].finished_at) == ("refused 2 times (last: unknown-executor)",
                                                                        d.now)


def test_every_report_for_a_stale_attempt_is_counted_and_answered_with_a_cancel() -> None:
    d = Driver()
    ref = placed(d)
    d.feed(NodeFailed(d.now, "n1", "test"))  # lost before it started: placed again, the old attempt is stale
    d.node("n1", boot=2)
    for event in ("accepted", "started"):
        commands = d.feed(StepReported(d.now, "n1", ref.attempt, ref.fence, event))
        assert commands == [SendCancel("n1", (ref,), "stale attempt: the hub moved this step")]
    d.feed(StepReported(d.now, "n1", ref.attempt, ref.fence, "progress"))
    assert d.core.counters.stale_reports == 3


def test_attempts_record_when_and_why_they_ended() -> None:
    d = Driver()
    ref = placed(d)
    d.tick(5_000)
    d.feed(StepReported(d.now, "n1", ref.attempt, ref.fence, "started"))
    d.feed(ResultReported(d.now, "n1", ref.attempt, ref.fence, False, {}, None))  # a failure without an error text
    attempt, step = d.core.attempts[ref.attempt], d.core.runs["r1"].steps["a"]
    assert (attempt.state, attempt.started_at, attempt.ended_at) == ("failed", d.now, d.now)
    assert (step.failures, step.error) == (1, "failed")
    (again,) = d.tick(1_000)
    assert again.timeout == 10 and d.core.runs["r1"].steps["a"].node == "n1"
    d.feed(ResultReported(d.now, "n1", again.attempt, again.fence, True, {}, None))
    assert d.core.attempts[again.attempt].ended_at == d.now and d.core.runs["r1"].finished_at == d.now


# -- joins, conditions, fan-out, compensation ------------------------------------------------------------------------

def test_join_any_starts_after_one_need_succeeded_and_join_all_needs_every_one() -> None:
    d = Driver()
    d.node("n1", slots=4)
    d.submit("r1", spec({"id": "b", "uses": "echo"},
                        {"id": "a", "uses": "echo", "needs": ["b"], "when": "steps.b.output.go == 1"},
                        {"id": "any", "uses": "echo", "needs": ["a", "b"], "join": "any"},
                        {"id": "all", "uses": "echo", "needs": ["a", "b"]},
                        {"id": "none", "uses": "echo", "needs": ["a"], "join": "any"}))
    (b,) = d.tick()
    d.finish(b, output={"go": 0})
    steps = d.core.runs["r1"].steps
    assert [steps[s].state for s in ("a", "all", "none")] == ["skipped", "skipped", "skipped"]
    (after,) = d.tick()
    assert after.step == "any"


def test_a_condition_that_fails_to_evaluate_fails_its_step_and_the_run() -> None:
    d = Driver()
    d.node("n1")
    d.submit("r1", spec({"id": "a", "uses": "echo"},
                        {"id": "b", "uses": "echo", "needs": ["a"], "when": "steps.a.output.t > 30"}))
    (a,) = d.tick()
    d.finish(a, output={"t": "hot"})  # a string compared with a number
    run = d.core.runs["r1"]
    assert (run.steps["b"].state, run.state, run.finished_at) == ("failed", "failed", d.now)
    assert (run.steps["b"].error or "").startswith("condition: ") and (run.error or "").startswith("step b: condition:")


def test_for_each_with_no_node_succeeds_empty_and_keys_outputs_by_whole_node_id() -> None:
    d = Driver()
    d.node("gw.1", labels={"class": "gw"})
    d.submit("r1", spec({"id": "none", "uses": "echo", "for_each": {"labels": {"class": "nowhere"}}},
                        {"id": "up", "uses": "echo", "for_each": {"labels": {"class": "gw"}}}))
    run = d.core.runs["r1"]
    assert (run.steps["none"].state, run.steps["none"].output) == ("succeeded", {"instances": 0})
    (cmd,) = d.tick()
    assert d.core.runs["r1"].steps[cmd.step].spec.migratable is False  # an instance is pinned to its node
    d.finish(cmd, output={"v": 1})
    assert run.steps["up"].output == {"instances": 1, "outputs": {"gw.1": {"v": 1}}}
    assert run.steps["none"].done_seq == 1 and run.steps["up"].done_seq == 3  # instance 2, then its parent 3


def test_a_compensation_runs_with_its_own_timeout_and_the_originals_retry_after_the_one_before() -> None:
    d = Driver()
    d.node("n1", slots=4)
    d.submit("r1", spec({"id": "a", "uses": "echo", "retry": {"max_attempts": 3},
                         "compensate": {"uses": "echo", "timeout": 7}},
                        {"id": "b", "uses": "echo", "needs": ["a"], "compensate": {"uses": "echo"}},
                        {"id": "c", "uses": "fail", "needs": ["b"], "retry": {"max_attempts": 1}},
                        {"id": "plain", "uses": "echo"}))
    for _ in range(2):
        for cmd in d.tick():
            if cmd.step != "c":
                d.finish(cmd)
    (c,) = [cmd for cmd in d.tick() if cmd.step == "c"]
    d.finish(c, ok=False)
    run = d.core.runs["r1"]
    undo_b, undo_a = run.steps["undo-b"].spec, run.steps["undo-a"].spec
    assert (undo_b.needs, undo_a.needs, undo_a.timeout, undo_a.retry.max_attempts) == ([], ["undo-b"], 7, 3)
    assert undo_a.migratable and undo_a.join == "all" and undo_a.when is None
    assert run.compensations == ["undo-b", "undo-a"]  # "plain" had nothing to undo


def test_a_failed_instance_fails_its_parent_with_its_error() -> None:
    d = Driver()
    d.node("g1", labels={"class": "gw"})
    d.node("g2", labels={"class": "gw"})
    d.submit("r1", spec({"id": "up", "uses": "echo", "for_each": {"labels": {"class": "gw"}},
                         "retry": {"max_attempts": 1}}))
    first, second = d.tick()
    d.finish(first, ok=False)
    run = d.core.runs["r1"]
    assert (run.steps["up"].state, run.steps["up"].error) == ("failed", run.steps[first.step].error)
    assert run.steps[second.step].state == "cancelled" and run.state == "failed"


# -- deadlines and cancellation -------------------------------------------------------------------------------------

def test_cancelling_records_the_reason_and_the_time_on_run_and_attempts() -> None:
    from hub.events import RunCancelRequested, RunTimedOut

    d = Driver()
    ref = placed(d)
    d.tick(500)
    assert d.feed(RunTimedOut(d.now, "nope")) == []
    d.feed(RunCancelRequested(d.now, "r1", "not needed"))
    run, attempt = d.core.runs["r1"], d.core.attempts[ref.attempt]
    assert (run.state, run.error, run.finished_at) == ("cancelled", "not needed", d.now)
    assert (attempt.state, attempt.reason, attempt.ended_at) == ("cancelled", "not needed", d.now)
    assert d.feed(RunTimedOut(d.now, "r1")) == [] and run.state == "cancelled"


def test_a_run_past_its_deadline_cancels_its_attempts_at_that_time() -> None:
    from hub.events import RunTimedOut

    d = Driver()
    ref = placed(d)
    d.tick(500)
    commands = d.feed(RunTimedOut(d.now, "r1"))
    assert commands == [SendCancel("n1", (ref,), "run deadline passed")]
    run = d.core.runs["r1"]
    assert (run.state, run.error, run.finished_at, d.core.attempts[ref.attempt].ended_at) == (
        "timed_out", "deadline passed", d.now, d.now)


# -- retries ----------------------------------------------------------------------------------------------------------

def test_retry_jitter_is_drawn_per_run_so_runs_do_not_retry_in_step() -> None:
    from hub.runs import unit

    draws = [unit("r", i) for i in range(200)]
    assert all(0 <= x < 1 for x in draws) and min(draws) < 0.1 and max(draws) > 0.9
    d = Driver()
    d.node("n1", slots=10)
    flaky = spec({"id": "a", "uses": "fail", "retry": {"max_attempts": 2, "initial": 10, "jitter": 0.5}})
    for i in range(10):
        d.submit(f"r{i}", flaky)
    for cmd in d.tick():
        d.finish(cmd, ok=False)
    ready = {d.core.runs[f"r{i}"].steps["a"].ready_at for i in range(10)}
    assert len(ready) == 10


def test_a_lost_attempt_is_counted_once_per_loss() -> None:
    d = Driver()
    ref = placed(d)
    d.feed(StepReported(d.now, "n1", ref.attempt, ref.fence, "started"))
    d.feed(NodeFailed(d.now, "n1", "test"))
    d.node("n1", boot=2)
    (again,) = d.tick(1_000)
    d.feed(NodeFailed(d.now, "n1", "test"))
    assert d.core.counters.lost_attempts == 2 and d.core.attempts[again.attempt].ended_at == d.now


# -- the fleet: liveness, adaptation, breakers, migration -----------------------------------------------------------

def test_a_death_certificate_says_whether_the_node_shut_down_or_was_lost() -> None:
    from hub.events import NodeDied

    d = Driver()
    d.node("n1")
    d.node("n2")
    d.feed(NodeDied(d.now, "n1", 1, "shutdown"))
    d.feed(NodeDied(d.now, "n2", 1, "lost"))
    assert (d.core.nodes["n1"].state, d.core.nodes["n2"].state) == ("offline", "failed")
    assert d.core.nodes["n2"].history[-1] == {"at": d.now, "kind": "liveness", "state": "failed",
                                              "reason": "death certificate (lost)"}
    d.feed(NodeDied(d.now + 5, "n1", 1, "lost"))  # already down: nothing changes
    assert (d.core.nodes["n1"].state, d.core.nodes["n1"].changed_at) == ("offline", d.now)


def test_liveness_and_adaptation_events_change_only_the_node_they_name() -> None:
    from hub.events import ActionTaken, HealthChanged, NodeDrainSet, NodeSeen, NodeSuspected
    from hub.state import SendConfig, SendDrain

    d = Driver()
    d.node("n1")
    d.node("n2")
    for event in (NodeSeen(d.now, "ghost"), NodeSuspected(d.now, "ghost"), NodeDrainSet(d.now, "ghost", True),
                  HealthChanged(d.now, "ghost", "unhealthy"), ActionTaken(d.now, "ghost", "drain", "x")):
        assert d.feed(event) == []
    d.feed(NodeSeen(d.now, "n1"))  # heard while online: nothing to undo
    assert d.core.nodes["n1"].state == "online"
    d.feed(NodeSuspected(d.now + 1, "n1"))
    d.feed(NodeSeen(d.now + 2, "n1"))
    assert (d.core.nodes["n1"].state, d.core.nodes["n1"].changed_at) == ("online", d.now + 2)
    d.feed(NodeFailed(d.now + 3, "n2", "test"))
    d.feed(NodeSuspected(d.now + 4, "n2"))  # a failed node is not merely suspected
    assert (d.core.nodes["n2"].state, d.core.nodes["n2"].changed_at) == ("failed", d.now + 3)
    d.feed(NodeDrainSet(d.now, "n1", True))
    assert d.core.nodes["n1"].draining and not d.core.nodes["n2"].draining
    d.feed(NodeDrainSet(d.now, "n1", False))
    assert not d.core.nodes["n1"].draining
    d.feed(HealthChanged(d.now, "n1", "degraded", "temp", 80.0, 75.0, 60.0, "temp 80 over 75 for 60 s"))
    assert d.core.nodes["n1"].health == "degraded" and d.core.nodes["n1"].history[-1]["reason"] == (
        "temp 80 over 75 for 60 s")
    assert d.feed(ActionTaken(d.now, "n1", "throttle", "hot")) == [] and d.core.nodes["n1"].throttled
    assert d.core.nodes["n1"].history[-1] == {"at": d.now, "kind": "action", "action": "throttle", "reason": "hot"}
    d.feed(ActionTaken(d.now, "n1", "unthrottle", "cool"))
    assert not d.core.nodes["n1"].throttled
    assert d.feed(ActionTaken(d.now, "n1", "drain", "hot")) == [SendDrain("n1", True)] and d.core.nodes["n1"].draining
    assert d.feed(ActionTaken(d.now, "n1", "telemetry_rate", "busy")) == [SendConfig("n1", 40.0)]


def test_breaker_failures_count_within_the_window_and_probes_add_up() -> None:
    from hub.health import Breaker, Policy

    d = Driver()
    d.core.policy = Policy(breaker=Breaker(failures=2, window=10, cooldown=1, successes=2))
    d.node("n1", slots=4)
    fail = spec({"id": "a", "uses": "fail", "retry": {"max_attempts": 1}})
    d.submit("f1", fail)
    (first,) = d.tick()
    d.finish(first, ok=False)
    d.tick(9_900)
    d.submit("f2", fail)
    (second,) = d.tick(100)  # exactly the window after the first failure: that one no longer counts
    d.finish(second, ok=False)
    assert d.core.nodes["n1"].failures == [d.now] and not d.core.nodes["n1"].probe_failed
    d.tick()
    assert d.core.nodes["n1"].breaker == "closed"
    d.submit("f3", fail)
    (third,) = d.tick()
    d.finish(third, ok=False)
    d.tick()
    assert d.core.nodes["n1"].breaker == "open"
    for i in range(2):
        d.submit(f"ok{i}", spec({"id": "a", "uses": "echo"}))
    (probe,) = [c for c in d.tick(1_100) if c.run.startswith("ok")]
    d.finish(probe)
    (probe2,) = [c for c in d.tick() if c.run.startswith("ok")]
    assert d.core.nodes["n1"].breaker == "half_open"  # one success of the two it needs
    d.finish(probe2)
    d.tick()
    assert (d.core.nodes["n1"].breaker, d.core.nodes["n1"].failures) == ("closed", [])


def test_migrations_are_limited_per_node_within_a_window_and_the_node_is_avoided_for_the_cooldown() -> None:
    from hub.events import ActionTaken
    from hub.health import Limits, Policy

    d = Driver()
    d.core.policy = Policy(cooldown=30, limits=Limits(max_migrations_per_node=1, window=60))
    d.node("hot", slots=4)
    for i in range(3):
        d.submit(f"r{i}", spec({"id": "m", "uses": "sleep", "migratable": True}))
    for cmd in d.tick():
        d.feed(StepReported(d.now, cmd.node, cmd.attempt, cmd.fence, "started"))
    d.node("cool", labels={}, slots=4)
    d.feed(ActionTaken(d.now, "hot", "throttle", "test"))
    moved = d.feed(ActionTaken(d.now, "hot", "migrate", "first"))
    assert len(moved) == 1 and d.core.nodes["hot"].migrations == [d.now]
    run = d.core.runs[moved[0].refs[0].run]  # type: ignore[union-attr]
    assert (run.migrations, run.steps["m"].avoid) == (1, {"hot": d.now + 30_000})
    skipped = [h for h in d.core.nodes["hot"].history if h.get("action") == "migrate-skipped"]
    assert len(skipped) == 2  # each attempt over the limit is named, not just the first
    d.tick(59_900)
    assert d.feed(ActionTaken(d.now, "hot", "migrate", "too soon")) == []
    d.tick(100)  # the first migration is now exactly `window` old: it no longer counts
    assert len(d.feed(ActionTaken(d.now, "hot", "migrate", "again"))) == 1


def test_a_node_lost_with_attempts_of_two_runs_fails_both_and_cancels_their_other_attempts() -> None:
    d = Driver()
    d.node("n1", labels={"k": "1"}, slots=4)
    d.node("n2", labels={"k": "2"}, slots=4)
    for run in ("r1", "r2"):
        d.submit(run, spec({"id": "a", "uses": "sleep", "retry": {"max_attempts": 1},
                            "placement": {"selector": {"labels": {"k": "1"}}}},
                           {"id": "b", "uses": "sleep", "placement": {"selector": {"labels": {"k": "2"}}}}))
    sent = {(c.run, c.step): c for c in d.tick()}
    for cmd in sent.values():
        d.feed(StepReported(d.now, cmd.node, cmd.attempt, cmd.fence, "started"))
    commands = d.feed(NodeFailed(d.now, "n1", "test"))
    cancels = [c for c in commands if isinstance(c, SendCancel) and c.node == "n2"]
    assert sorted(c.refs[0].run for c in cancels) == ["r1", "r2"]
    assert all(c.reason.startswith("run failed: step a failed after 1 attempt(s)") for c in cancels)
    assert d.core.nodes["n1"].history[-1]["reason"] == "test"


def test_timer_decisions_carry_their_time_and_reason() -> None:
    from hub.events import RunTimedOut

    d = Driver()
    d.node("n1")
    d.submit("r1", spec({"id": "a", "uses": "echo"}), deadline=d.now + 5_000)
    d.silent = {"n1"}
    d.tick(10_001)  # silent past 3 heartbeats (suspected, then failed) and past the run's deadline
    node = d.core.nodes["n1"]
    assert (node.state, node.changed_at, node.history[-1]["reason"]) == ("failed", d.now, "no heartbeat for 10.0 s")
    run = d.core.runs["r1"]
    assert (run.state, run.finished_at) == ("timed_out", d.now)
    assert [type(e) for e in d.journal].count(RunTimedOut) == 1
    assert d.core.seq == len(d.journal)  # every event applied counts once


def test_a_step_timeout_is_checked_past_an_attempt_still_waiting_for_its_answer() -> None:
    d = Driver()
    d.node("n1", slots=4)
    for i in range(8):  # attempt ids are "a<fence>": b1's will be a9, a1's a10, which sorts first
        d.submit(f"quick{i}", spec({"id": "a", "uses": "echo"}))
        (cmd,) = d.tick()
        d.finish(cmd)
    d.submit("b1", SLEEP_10S)
    (late,) = d.tick()
    assert late.attempt == "a9"
    d.feed(StepReported(d.now, "n1", late.attempt, late.fence, "started"))
    d.tick(GIVES_UP_MS - 1_000)
    d.submit("a1", SLEEP_10S)  # its attempt sorts first and is assigned, not yet answered, when b1's time is up
    d.tick()
    lost = d.tick(1_000)
    assert [c.refs[0].run for c in lost if isinstance(c, SendCancel)] == ["b1"]


def test_a_birth_that_lists_only_current_attempts_cancels_nothing() -> None:
    d = Driver()
    ref = placed(d)
    d.feed(StepReported(d.now, "n1", ref.attempt, ref.fence, "started"))
    assert d.node("n1", boot=2, running=(ref,)) == []
    assert d.node("n1", boot=3) == []


def test_a_conflict_mark_clears_only_after_a_quiet_spell() -> None:
    from hub.events import NodeConflict
    from hub.state import CONFLICT_QUIET_MS

    d = Driver()
    d.node("n1")
    d.feed(NodeConflict(d.now, "n1", 1, 2, "two devices"))
    assert d.core.nodes["n1"].history[-1]["conflict"] is True
    d.now += CONFLICT_QUIET_MS - 1
    d.node("n1", boot=3)
    assert d.core.nodes["n1"].conflict is not None
    d.now += 1
    d.node("n1", boot=4)
    assert d.core.nodes["n1"].conflict is None


def test_a_removed_node_that_is_born_again_takes_work_again() -> None:
    from hub.events import NodeRemoved

    d = Driver()
    d.node("n1")
    d.feed(NodeRemoved(d.now, "n1", ""))
    assert d.core.nodes["n1"].history[-1]["reason"] == "removed" and d.core.nodes["n1"].removed
    d.tick(1_000)
    d.node("n1", boot=2)
    assert (d.core.nodes["n1"].removed, d.core.nodes["n1"].changed_at) == (False, d.now)


def test_unknown_runs_and_steps_are_ignored_by_unrunnable_and_reports() -> None:
    from hub.events import StepUnrunnable

    d = Driver()
    ref = placed(d)
    assert d.feed(StepUnrunnable(d.now, "nope", "a", "x")) == []
    assert d.feed(StepUnrunnable(d.now, "r1", "nope", "x")) == []
    assert d.feed(StepReported(d.now, "n1", "never-assigned", 1, "started")) == []
    assert d.core.counters.stale_reports == 1 and d.core.attempts[ref.attempt].state == "assigned"


def test_a_failed_compensation_does_not_stop_the_ones_after_it() -> None:
    d = Driver()
    d.node("n1", slots=4)
    d.submit("r1", spec({"id": "a", "uses": "echo", "compensate": {"uses": "echo"}},
                        {"id": "b", "uses": "echo", "needs": ["a"], "compensate": {"uses": "fail"},
                         "retry": {"max_attempts": 1}},
                        {"id": "c", "uses": "fail", "needs": ["b"], "retry": {"max_attempts": 1}}))
    for _ in range(2):
        (cmd,) = d.tick()
        d.finish(cmd)
    (c,) = d.tick()
    d.finish(c, ok=False)
    (undo_b,) = d.tick()
    d.finish(undo_b, ok=False)
    (undo_a,) = d.tick()
    assert undo_a.step == "undo-a"
    d.finish(undo_a)
    run = d.core.runs["r1"]
    assert (run.state, run.finished_at, run.steps["undo-b"].state) == ("failed", d.now, "failed")


def test_a_run_keeps_what_it_was_submitted_with() -> None:
    from hub.events import RunSubmitted

    d = Driver()
    d.feed(RunSubmitted(d.now, "r1", spec({"id": "a", "uses": "echo"}), {"x": 1}, "k1", d.now + 60_000))
    d.feed(RunSubmitted(d.now, "r2", spec({"id": "a", "uses": "echo"}), {}, None, d.now + 60_000))
    run, second = d.core.runs["r1"], d.core.runs["r2"]
    assert (run.inputs, run.submitted_at, run.key, run.deadline) == ({"x": 1}, d.now, "k1", d.now + 60_000)
    assert run.seq < second.seq  # submission order: FIFO among equals


def test_a_nodes_own_cancel_records_when_and_why() -> None:
    d = Driver()
    ref = placed(d)
    d.tick(500)
    d.feed(StepReported(d.now, "n1", ref.attempt, ref.fence, "cancelled", "agent shutting down"))
    attempt = d.core.attempts[ref.attempt]
    assert (attempt.state, attempt.ended_at, attempt.reason) == ("cancelled", d.now, "agent shutting down")


def test_a_run_times_out_at_its_deadline_exactly() -> None:
    d = Driver()
    d.node("n1")
    d.submit("r1", spec({"id": "a", "uses": "echo"}), deadline=d.now + 1_000)
    d.tick(1_000)
    assert d.core.runs["r1"].state == "timed_out"


def test_a_failed_probe_reopens_the_breaker_and_a_forgotten_node_leaves_the_watch() -> None:
    from hub.events import NodeRemoved
    from hub.health import Breaker, Policy

    d = Driver()
    d.core.policy = Policy(breaker=Breaker(failures=1, window=60, cooldown=1, successes=1))
    d.node("n1", slots=4)
    d.submit("f1", spec({"id": "a", "uses": "fail", "retry": {"max_attempts": 1}}))
    (cmd,) = d.tick()
    d.finish(cmd, ok=False)
    d.tick()
    assert d.core.nodes["n1"].breaker == "open"
    d.submit("f2", spec({"id": "a", "uses": "fail", "retry": {"max_attempts": 1}}))
    (probe,) = d.tick(1_100)
    assert d.core.nodes["n1"].breaker == "half_open"
    d.finish(probe, ok=False)
    d.tick()
    assert d.core.nodes["n1"].breaker == "open"
    d.feed(NodeRemoved(d.now, "n1", "deleted", forget=True))
    d.tick(2_000)  # nothing is left to look up
    assert "n1" not in d.core.nodes and "n1" not in d.core.breaker_watch


def test_a_silent_node_is_suspected_at_the_time_of_the_scan() -> None:
    d = Driver()
    d.node("n1")
    d.silent = {"n1"}
    d.tick(2_500)
    assert (d.core.nodes["n1"].state, d.core.nodes["n1"].changed_at) == ("suspected", d.now)


def test_a_step_timeout_counts_from_the_start_not_the_assignment() -> None:
    d = Driver()
    ref = placed(d)
    d.feed(StepReported(d.now, "n1", ref.attempt, ref.fence, "accepted"))
    d.tick(5_000)
    d.feed(StepReported(d.now, "n1", ref.attempt, ref.fence, "started"))
    assert d.tick(GIVES_UP_MS - 100) == [] and d.core.attempts[ref.attempt].state == "running"
    assert len(d.tick(200)) == 1
