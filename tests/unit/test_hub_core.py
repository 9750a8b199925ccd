"""The hub's pure core: deterministic scenarios and a hypothesis state machine with restarts."""

from __future__ import annotations

import copy
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from hub.events import (Event, NodeBorn, NodeDied, NodeFailed, ResultReported, RunCancelRequested, RunSubmitted,
                        StepReported)
from hub.state import ATTEMPT_LIVE, RUN_TERMINAL, STEP_TERMINAL, Core, SendAssign, SendCancel
from hub.workflow import workflow_from_data
from protocols import AttemptRef

CAPS = ("noop", "echo", "sleep", "fail", "gpio")


def spec(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return workflow_from_data({"name": "t", "version": "1.0.0", "steps": list(steps), **extra}).model_dump(
        by_alias=True, mode="json")


class Driver:
    """Runs the core like the shell does: journal every event, apply, decide, apply decisions."""

    def __init__(self) -> None:
        self.core = Core()
        self.journal: list[Event] = []
        self.now = 1_000
        self.sent: list[Any] = []

    def feed(self, event: Event) -> list[Any]:
        self.journal.append(event)
        commands = self.core.apply(event)
        self.sent += commands
        return commands

    def tick(self, ms: int = 100) -> list[Any]:
        self.now += ms
        for node in self.core.nodes.values():
            if node.state in ("online", "suspected") and node.id not in self.silent:
                self.core.touch(node.id, self.now)
        out = []
        for _ in range(5):
            decisions = self.core.decide(self.now)
            if not decisions:
                break
            for decision in decisions:
                out += self.feed(decision)
        return out

    silent: set[str] = set()

    def node(self, node_id: str, boot: int = 1, labels: dict[str, str] | None = None, slots: int = 2,
             running: tuple[AttemptRef, ...] = ()) -> list[Any]:
        return self.feed(NodeBorn(self.now, node_id, boot, "container", labels or {}, CAPS, slots,
                                  {"cores": 4, "memory_mb": 4096}, running, 1.0))

    def submit(self, run: str, workflow: dict[str, Any], deadline: int = 10**12, key: str | None = None) -> None:
        self.feed(RunSubmitted(self.now, run, workflow, {}, key, deadline))

    def assigned(self) -> list[SendAssign]:
        return [c for c in self.sent if isinstance(c, SendAssign)]

    def finish(self, cmd: SendAssign, ok: bool = True, output: dict[str, Any] | None = None) -> None:
        self.feed(StepReported(self.now, cmd.node, cmd.attempt, cmd.fence, "started"))
        self.feed(ResultReported(self.now, cmd.node, cmd.attempt, cmd.fence, ok, output or {}, None if ok else "x"))


@pytest.fixture
def d() -> Driver:
    driver = Driver()
    driver.silent = set()
    return driver


def test_dag_runs_in_order_and_spreads(d: Driver) -> None:
    d.node("n1")
    d.node("n2")
    d.submit("r1", spec({"id": "a", "uses": "echo"}, {"id": "b", "uses": "echo"},
                        {"id": "c", "uses": "echo", "needs": ["a", "b"]}))
    first = d.tick()
    assert sorted((c.step, c.node) for c in first) == [("a", "n1"), ("b", "n2")]  # spread
    for cmd in first:
        d.finish(cmd)
    (third,) = d.tick()
    assert third.step == "c"
    d.finish(third)
    assert d.core.runs["r1"].state == "succeeded"


def test_when_false_skips_and_skips_propagate(d: Driver) -> None:
    d.node("n1")
    d.submit("r1", spec({"id": "read", "uses": "echo"},
                        {"id": "alert", "uses": "echo", "needs": ["read"], "when": "steps.read.output.t > 30"},
                        {"id": "ticket", "uses": "echo", "needs": ["alert"]}))
    (read,) = d.tick()
    d.finish(read, output={"t": 20})
    d.tick()
    run = d.core.runs["r1"]
    assert [run.steps[s].state for s in ("read", "alert", "ticket")] == ["succeeded", "skipped", "skipped"]
    assert run.state == "succeeded"


def test_retry_with_backoff_then_fail_and_compensate_newest_first(d: Driver) -> None:
    d.node("n1", slots=4)
    d.submit("r1", spec({"id": "a", "uses": "echo", "compensate": {"uses": "echo", "with": {"undo": "a"}}},
                        {"id": "b", "uses": "echo", "needs": ["a"], "compensate": {"uses": "echo"}},
                        {"id": "c", "uses": "fail", "needs": ["b"],
                         "retry": {"max_attempts": 2, "initial": 1, "jitter": 0}}))
    for step in ("a", "b"):
        (cmd,) = d.tick()
        assert cmd.step == step
        d.finish(cmd)
    (c1,) = d.tick()
    d.finish(c1, ok=False)
    assert d.tick(500) == []  # backoff: 1 s
    (c2,) = d.tick(600)
    assert c2.step == "c" and c2.fence > c1.fence
    d.finish(c2, ok=False)
    run = d.core.runs["r1"]
    assert run.state == "compensating" and run.compensations == ["undo-b", "undo-a"]
    (u1,) = d.tick()
    assert u1.step == "undo-b"
    d.finish(u1)
    (u2,) = d.tick()
    assert u2.step == "undo-a" and u2.inputs == {"undo": "a"}
    d.finish(u2)
    assert run.state == "failed" and "failed after 2 attempt(s)" in (run.error or "")


def test_node_failure_moves_migratable_step_and_rejects_its_late_result(d: Driver) -> None:
    d.node("n1")
    d.node("n2")
    d.submit("r1", spec({"id": "a", "uses": "sleep", "migratable": True, "placement": {"strategy": "bin-pack"}}))
    (first,) = d.tick()
    d.feed(StepReported(d.now, first.node, first.attempt, first.fence, "started"))
    d.feed(NodeDied(d.now, first.node, 1, "lost"))
    (second,) = d.tick()
    assert second.node != first.node and second.fence > first.fence
    d.feed(ResultReported(d.now, first.node, first.attempt, first.fence, True, {}, None))  # late, stale
    assert d.core.counters.stale_reports == 1 and d.core.runs["r1"].state == "running"
    # the returning node lists the stale attempt in its birth: it is told to cancel it
    commands = d.node(first.node, boot=2, running=(AttemptRef(first.run, first.step, first.attempt, first.fence),))
    assert commands == [SendCancel(first.node, (AttemptRef(first.run, first.step, first.attempt, first.fence),),
                                   "stale attempt: the hub moved this step")]
    d.finish(second)
    assert d.core.runs["r1"].state == "succeeded"


def test_non_migratable_step_counts_a_failure_on_node_loss(d: Driver) -> None:
    d.node("n1")
    d.node("n2")
    d.submit("r1", spec({"id": "a", "uses": "sleep", "retry": {"max_attempts": 1}}))
    (first,) = d.tick()
    d.feed(StepReported(d.now, first.node, first.attempt, first.fence, "started"))
    d.feed(NodeFailed(d.now, first.node, "test"))
    assert d.core.runs["r1"].state == "failed"


def test_missed_heartbeats_suspect_then_fail(d: Driver) -> None:
    d.node("n1")
    d.silent = {"n1"}
    d.tick(1_500)
    assert d.core.nodes["n1"].state == "online"
    d.tick(600)  # 2.1 heartbeats of 1 s
    assert d.core.nodes["n1"].state == "suspected"
    d.tick(1_000)
    assert d.core.nodes["n1"].state == "failed"


def test_stale_death_certificate_is_ignored(d: Driver) -> None:
    d.node("n1", boot=3)
    d.feed(NodeDied(d.now, "n1", 2, "lost"))
    assert d.core.nodes["n1"].state == "online"


def test_unanswered_assignment_is_placed_again_after_a_backoff_without_using_a_retry(d: Driver) -> None:
    d.node("n1")
    d.submit("r1", spec({"id": "a", "uses": "echo", "retry": {"max_attempts": 1, "initial": 2, "jitter": 0}}))
    (first,) = d.tick()
    lost = d.tick(10_100)
    assert SendCancel("n1", (AttemptRef(first.run, first.step, first.attempt, first.fence),),
                      "the node did not answer the assignment") in lost
    assert not [c for c in lost if isinstance(c, SendAssign)]  # backs off by the retry delay (2 s) first
    step = d.core.runs["r1"].steps["a"]
    assert (step.state, step.failures, step.unanswered) == ("queued", 0, 1)
    assert d.tick(1_900) == []
    (again,) = d.tick(2_200)  # then prefers another node for 2 s; there is none, so n1 again
    assert isinstance(again, SendAssign) and again.step == "a" and again.fence > first.fence


def test_cancel_force_fail_and_deadline(d: Driver) -> None:
    d.node("n1", slots=3)
    d.submit("r1", spec({"id": "a", "uses": "sleep"}))
    d.submit("r2", spec({"id": "a", "uses": "sleep"}))
    d.submit("r3", spec({"id": "a", "uses": "sleep"}), deadline=d.now + 1_000)
    d.tick()
    cancel = d.feed(RunCancelRequested(d.now, "r1", "operator"))
    assert isinstance(cancel[0], SendCancel) and d.core.runs["r1"].state == "cancelled"
    d.feed(RunCancelRequested(d.now, "r2", "broken", force_fail=True))
    assert d.core.runs["r2"].state == "failed"
    d.tick(1_000)
    assert d.core.runs["r3"].state == "timed_out"


def test_a_result_from_a_node_that_is_not_the_assignee_is_refused(d: Driver) -> None:
    from hub.health import Breaker, Policy

    d.core.policy = Policy(breaker=Breaker(failures=1, window=60, cooldown=5, successes=1))
    d.node("n1")
    d.node("n2")
    d.submit("r1", spec({"id": "a", "uses": "echo", "retry": {"max_attempts": 1}}))
    (cmd,) = d.tick()
    other = "n2" if cmd.node == "n1" else "n1"
    # the right attempt id and fence, from the wrong node: a success would finish the step, a failure the run
    d.feed(StepReported(d.now, other, cmd.attempt, cmd.fence, "started"))
    d.feed(ResultReported(d.now, other, cmd.attempt, cmd.fence, True, {"forged": True}, None))
    d.feed(ResultReported(d.now, other, cmd.attempt, cmd.fence, False, {}, "forged failure"))
    step = d.core.runs["r1"].steps["a"]
    assert (d.core.attempts[cmd.attempt].state, step.state, step.output) == ("assigned", "placed", None)
    assert d.core.counters.stale_reports == 3
    assert d.core.nodes[other].failures == [] and d.core.nodes[cmd.node].failures == []  # no breaker counts it
    d.tick()
    assert d.core.nodes[other].breaker == "closed"
    d.finish(cmd, output={"v": 1})
    assert d.core.runs["r1"].state == "succeeded" and step.output == {"v": 1}


def test_a_silent_step_is_timed_out_by_the_hub_and_retried_long_before_the_run_deadline(d: Driver) -> None:
    from hub.service import DEFAULT_RUN_DEADLINE_S
    from hub.state import TIMEOUT_GRACE_MS

    d.node("n1")
    # the defaults: the step's timeout (300 s) and the deadline a run without a timeout gets (24 h)
    d.submit("r1", spec({"id": "a", "uses": "sleep", "retry": {"max_attempts": 2, "initial": 1, "jitter": 0}}),
             deadline=d.now + DEFAULT_RUN_DEADLINE_S * 1000)
    step = d.core.runs["r1"].steps["a"]
    gives_up_ms = int(step.spec.timeout * 1000) + TIMEOUT_GRACE_MS
    assert gives_up_ms < DEFAULT_RUN_DEADLINE_S * 1000 // 100
    (first,) = d.tick()
    d.feed(StepReported(d.now, "n1", first.attempt, first.fence, "started"))
    # the node stays online (its heartbeats go on) but never reports a result for the step
    assert d.tick(gives_up_ms) == [] and d.core.attempts[first.attempt].state == "running"
    lost = d.tick(100)
    ref = AttemptRef(first.run, first.step, first.attempt, first.fence)
    assert lost == [SendCancel("n1", (ref,), "timed out after 300 s (no result)")]
    assert (d.core.attempts[first.attempt].state, step.state, step.failures) == ("lost", "queued", 1)
    (again,) = d.tick(1_000)  # the retry, after the policy's 1 s delay
    assert again.step == "a" and again.fence > first.fence
    d.finish(again)
    assert d.core.runs["r1"].state == "succeeded"


def test_a_nodes_own_cancelled_requeues_the_step_without_counting_a_failure(d: Driver) -> None:
    d.node("n1")
    d.submit("r1", spec({"id": "a", "uses": "sleep", "retry": {"max_attempts": 1}}))
    (first,) = d.tick()
    d.feed(StepReported(d.now, "n1", first.attempt, first.fence, "started"))
    d.feed(StepReported(d.now, "n1", first.attempt, first.fence, "cancelled", "agent shutting down"))
    step = d.core.runs["r1"].steps["a"]
    assert (d.core.attempts[first.attempt].state, step.state, step.failures) == ("cancelled", "queued", 0)
    assert d.core.runs["r1"].state == "running"  # with max_attempts 1, a counted failure would have failed it
    (again,) = d.tick()
    assert again.step == "a" and again.fence > first.fence
    d.finish(again)
    assert d.core.runs["r1"].state == "succeeded"


def test_for_each_fans_out_per_matching_node(d: Driver) -> None:
    d.node("g1", labels={"class": "gw"})
    d.node("g2", labels={"class": "gw"})
    d.node("x1", labels={"class": "other"})
    d.submit("r1", spec({"id": "up", "uses": "echo", "for_each": {"labels": {"class": "gw"}}}))
    cmds = d.tick()
    assert sorted((c.step, c.node) for c in cmds) == [("up.g1", "g1"), ("up.g2", "g2")]
    for cmd in cmds:
        d.finish(cmd, output={"v": cmd.node})
    run = d.core.runs["r1"]
    assert run.state == "succeeded" and run.steps["up"].output["instances"] == 2  # type: ignore[index]


def test_selector_resources_and_idempotency(d: Driver) -> None:
    d.node("small", labels={"site": "n"})
    d.submit("r1", spec({"id": "a", "uses": "echo", "resources": {"cores": 8}}))
    d.submit("r2", spec({"id": "a", "uses": "echo", "placement": {"selector": {"labels": {"site": "s"}}}}))
    assert d.tick() == []  # nothing fits
    d.submit("r3", spec({"id": "a", "uses": "echo"}), key="k1")
    d.submit("r4", spec({"id": "a", "uses": "echo"}), key="k1")
    assert "r4" not in d.core.runs and d.core.keys["k1"] == "r3"


# -- the state machine ---------------------------------------------------------------------------------------------

WORKFLOWS = [
    spec({"id": "a", "uses": "echo", "migratable": True}, {"id": "b", "uses": "echo", "needs": ["a"]},
         {"id": "c", "uses": "echo", "needs": ["a"], "retry": {"max_attempts": 2, "initial": 0.1}}),
    spec({"id": "x", "uses": "sleep", "compensate": {"uses": "echo"}},
         {"id": "y", "uses": "fail", "needs": ["x"], "retry": {"max_attempts": 2, "initial": 0.1}}),
]


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.d = Driver()
        self.d.silent = set()
        self.runs = 0
        self.fences_seen: dict[str, int] = {}
        self.terminal: dict[str, str] = {}

    @rule(node=st.sampled_from(["n1", "n2", "n3"]))
    def birth(self, node: str) -> None:
        boot = self.d.core.nodes[node].boot + 1 if node in self.d.core.nodes else 1
        self.d.node(node, boot=boot)

    @rule(which=st.integers(0, len(WORKFLOWS) - 1))
    def submit(self, which: int) -> None:
        self.runs += 1
        self.d.submit(f"r{self.runs}", WORKFLOWS[which], deadline=self.d.now + 60_000)

    @rule(ms=st.sampled_from([50, 500, 3_000, 11_000]))
    def tick(self, ms: int) -> None:
        self.d.tick(ms)

    @rule(data=st.data(), ok=st.booleans(), started=st.booleans())
    def report(self, data: st.DataObject, ok: bool, started: bool) -> None:
        sent = self.d.assigned()
        if not sent:
            return
        cmd = data.draw(st.sampled_from(sent))  # any attempt ever sent, current or stale
        if started:
            self.d.feed(StepReported(self.d.now, cmd.node, cmd.attempt, cmd.fence, "started"))
        self.d.feed(ResultReported(self.d.now, cmd.node, cmd.attempt, cmd.fence, ok, {}, None if ok else "x"))

    @rule(outcomes=st.lists(st.sampled_from([True, True, True, False]), min_size=1, max_size=6))
    def work(self, outcomes: list[bool]) -> None:
        """The nodes finish their live attempts: the path most runs take. Step y (executor `fail`) always fails,
        so workflow 1 ends in compensation; other steps fail when drawn False."""
        for attempt, ok in zip(self.d.core.live_attempts(), outcomes):
            ok = ok and attempt.step != "y"
            self.d.feed(StepReported(self.d.now, attempt.node, attempt.id, attempt.fence, "started"))
            self.d.feed(ResultReported(self.d.now, attempt.node, attempt.id, attempt.fence, ok, {},
                                       None if ok else "failed"))
        self.d.tick(50)

    @rule(node=st.sampled_from(["n1", "n2", "n3"]), how=st.sampled_from(["death", "failed", "silent"]))
    def lose_node(self, node: str, how: str) -> None:
        if node not in self.d.core.nodes:
            return
        if how == "death":
            self.d.feed(NodeDied(self.d.now, node, self.d.core.nodes[node].boot, "lost"))
        elif how == "failed":
            self.d.feed(NodeFailed(self.d.now, node, "test"))
        else:
            self.d.silent.add(node)

    @rule(run=st.integers(1, 5), force=st.booleans())
    def cancel(self, run: int, force: bool) -> None:
        self.d.feed(RunCancelRequested(self.d.now, f"r{run}", "test", force))

    @rule(snapshot=st.booleans())
    def restart(self, snapshot: bool) -> None:
        """The hub restarts: state is rebuilt from the journal alone, or from a snapshot of it, and must be the same."""
        rebuilt = Core().fold(copy.deepcopy(self.d.journal))
        assert summary(rebuilt) == summary(self.d.core)
        if snapshot:
            stored = cbor2.dumps(self.d.core.to_snapshot())  # as the journal stores it
            rebuilt = Core.from_snapshot(cbor2.loads(stored))
            assert summary(rebuilt) == summary(self.d.core)
            assert rebuilt.to_snapshot() == self.d.core.to_snapshot()
        rebuilt.after_load(self.d.now)
        self.d.core = rebuilt
        self.d.silent = set()

    @invariant()
    def at_most_one_live_attempt_per_step(self) -> None:
        for run in self.d.core.runs.values():
            for step in run.steps.values():
                live = [a for a in step.attempts if self.d.core.attempts[a].state in ATTEMPT_LIVE]
                assert len(live) <= 1
                if live:
                    assert live[0] == step.attempts[-1]
                fences = [self.d.core.attempts[a].fence for a in step.attempts]
                assert fences == sorted(fences) and len(set(fences)) == len(fences)

    @invariant()
    def fences_only_grow_and_terminal_stays_terminal(self) -> None:
        assert self.d.core.fence >= self.fences_seen.get("max", 0)
        self.fences_seen["max"] = self.d.core.fence
        for run_id, state in self.terminal.items():
            assert self.d.core.runs[run_id].state == state
        for run in self.d.core.runs.values():
            if run.state in RUN_TERMINAL:
                self.terminal[run.id] = run.state
                assert all(s.state in STEP_TERMINAL for s in run.steps.values()), run.id
                assert not [a for s in run.steps.values() for a in s.attempts
                            if self.d.core.attempts[a].state in ATTEMPT_LIVE]


def summary(core: Core) -> Any:
    return ({r: (run.state, {s: (x.state, tuple(x.attempts), x.failures) for s, x in run.steps.items()})
             for r, run in core.runs.items()},
            {n: (node.state, node.boot, sorted(node.attempts)) for n, node in core.nodes.items()},
            {a: (x.state, x.node, x.fence) for a, x in core.attempts.items()}, core.fence)


TestCoreMachine = CoreMachine.TestCase
TestCoreMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


def test_old_finished_runs_shrink_to_summaries(d: Driver, monkeypatch: pytest.MonkeyPatch) -> None:
    import hub.runs

    monkeypatch.setattr(hub.runs, "RETAIN_FINISHED", 2)
    d.node("n1", slots=8)
    for i in range(4):
        d.submit(f"r{i}", spec({"id": "a", "uses": "echo"}))
    for cmd in d.tick():
        d.finish(cmd)
    assert sorted(d.core.runs) == ["r2", "r3"] and sorted(d.core.archived) == ["r0", "r1"]
    assert d.core.archived["r0"][2] == "succeeded"
    assert all(a.run in ("r2", "r3") for a in d.core.attempts.values())
    d.submit("r0", spec({"id": "a", "uses": "echo"}))  # a run id is never reused
    assert "r0" not in d.core.runs
    assert summary(Core().fold(d.journal)) == summary(d.core)


def test_migrate_moves_only_migratable_attempts_within_limits(d: Driver) -> None:
    from hub.events import ActionTaken
    from hub.health import Limits, Policy

    d.core.policy = Policy(limits=Limits(max_migrations_per_run=1))
    d.node("hot", slots=4)
    d.submit("r1", spec({"id": "m", "uses": "sleep", "migratable": True}, {"id": "p", "uses": "sleep"}))
    first = {c.step: c for c in d.tick()}
    assert {c.node for c in first.values()} == {"hot"}
    d.node("cool", slots=4)
    d.feed(ActionTaken(d.now, "hot", "throttle", "test"))
    commands = d.feed(ActionTaken(d.now, "hot", "migrate", "temp 95 over 85 for 1 s"))
    assert commands == [SendCancel("hot", (AttemptRef("r1", "m", first["m"].attempt, first["m"].fence),),
                                   "migrated off hot: temp 95 over 85 for 1 s")]
    (moved,) = [c for c in d.tick() if isinstance(c, SendAssign)]
    assert moved.step == "m" and moved.node == "cool" and moved.fence > first["m"].fence
    assert d.core.runs["r1"].steps["p"].attempts == [first["p"].attempt]  # non-migratable: stays
    assert d.core.runs["r1"].steps["m"].failures == 0  # a migration is not a failure
    d.feed(StepReported(d.now, "cool", moved.attempt, moved.fence, "started"))
    d.feed(ActionTaken(d.now, "cool", "migrate", "again"))  # the run's limit (1) is used up
    assert d.core.attempts[moved.attempt].state == "running"
    assert d.core.nodes["cool"].history[-1]["action"] == "migrate-skipped"


def test_breaker_opens_half_opens_and_closes(d: Driver) -> None:
    from hub.health import Breaker, Policy

    d.core.policy = Policy(breaker=Breaker(failures=2, window=60, cooldown=5, successes=1))
    d.node("n1", slots=4)
    for i in range(2):
        d.submit(f"f{i}", spec({"id": "a", "uses": "fail", "retry": {"max_attempts": 1}}))
    for cmd in d.tick():
        d.finish(cmd, ok=False)
    d.tick()
    assert d.core.nodes["n1"].breaker == "open"
    d.submit("ok", spec({"id": "a", "uses": "echo"}))
    assert [c for c in d.tick(1_000) if isinstance(c, SendAssign)] == []  # open: no work
    probes = [c for c in d.tick(4_500) if isinstance(c, SendAssign)]
    assert d.core.nodes["n1"].breaker == "half_open" and len(probes) == 1
    d.finish(probes[0])
    d.tick()
    assert d.core.nodes["n1"].breaker == "closed"
    assert [h["state"] for h in d.core.nodes["n1"].history if h["kind"] == "breaker"] == ["open", "half_open",
                                                                                            "closed"]


def test_a_breaker_opened_by_the_adaptation_loop_half_opens_after_its_cooldown(d: Driver) -> None:
    from hub.events import ActionTaken
    from hub.health import Breaker, Policy

    d.core.policy = Policy(breaker=Breaker(failures=2, window=60, cooldown=5, successes=1))
    d.node("n1", slots=4)
    d.feed(ActionTaken(d.now, "n1", "circuit_break", "temp 95 over 85"))
    assert d.core.nodes["n1"].breaker == "open"
    d.submit("ok", spec({"id": "a", "uses": "echo"}))
    probes = [c for c in d.tick(5_500) if isinstance(c, SendAssign)]
    assert d.core.nodes["n1"].breaker == "half_open" and len(probes) == 1  # not open for ever


def test_overload_slows_the_fleets_telemetry_and_recovery_restores_it(d: Driver) -> None:
    from hub.events import HubLoadChanged
    from hub.state import SendConfig

    d.node("n1")
    d.node("n2")
    slow = d.feed(HubLoadChanged(d.now, True, "event-loop lag"))
    assert slow == [SendConfig("n1", 40.0), SendConfig("n2", 40.0)] and d.core.overloaded
    assert d.feed(HubLoadChanged(d.now, False, "ok")) == [SendConfig("n1", 10.0), SendConfig("n2", 10.0)]


# -- transitions, attempt references, plain-string states ------------------------------------------------------------

def test_an_operator_may_remove_a_node_that_shut_down(d: Driver) -> None:
    from hub.events import NodeRemoved

    d.node("n1")
    d.feed(NodeDied(d.now, "n1", 1, "shutdown"))
    assert d.core.nodes["n1"].state == "offline"
    d.feed(NodeRemoved(d.now, "n1", "revoked by an operator"))  # once raised IllegalTransition: offline -> failed
    assert (d.core.nodes["n1"].state, d.core.nodes["n1"].removed) == ("failed", True)
    d.feed(NodeRemoved(d.now, "n1", "deleted by an operator", forget=True))
    assert "n1" not in d.core.nodes
    assert summary(Core().fold(d.journal)) == summary(d.core)  # and the journal replays


def test_a_refusal_out_of_order_changes_nothing(d: Driver) -> None:
    d.node("n1")
    d.submit("r1", spec({"id": "a", "uses": "sleep"}))
    (cmd,) = d.tick()
    d.feed(StepReported(d.now, "n1", cmd.attempt, cmd.fence, "started"))
    d.feed(StepReported(d.now, "n1", cmd.attempt, cmd.fence, "refused", "busy"))  # once raised: running -> refused
    assert d.core.attempts[cmd.attempt].state == "running" and d.core.counters.refusals == 0
    d.finish(cmd)
    assert d.core.runs["r1"].state == "succeeded"


def test_tables_never_leave_a_terminal_state_and_refuse_what_they_do_not_hold() -> None:
    from hub.runs import Attempt
    from hub.transitions import ATTEMPT, RUN, STEP, AttemptTrigger, IllegalTransition, RunTrigger

    assert not [key for key in RUN.table if key[0] in RUN_TERMINAL]
    assert not [key for key in STEP.table if key[0] in STEP_TERMINAL]
    assert {state for state, _ in ATTEMPT.table} == ATTEMPT_LIVE
    attempt = Attempt("a1", "r1", "s1", 1, "n1")
    ATTEMPT.move(attempt, AttemptTrigger.STARTED)
    with pytest.raises(IllegalTransition, match="attempt a1: refused is not allowed in state running"):
        ATTEMPT.move(attempt, AttemptTrigger.REFUSED)
    assert attempt.state == "running"
    d = Driver()
    d.node("n1")
    d.submit("r1", spec({"id": "a", "uses": "echo"}))
    run = d.core.runs["r1"]
    d.feed(RunCancelRequested(d.now, "r1", "operator"))
    with pytest.raises(IllegalTransition):
        RUN.move(run, RunTrigger.STEPS_SETTLED)


def test_births_name_attempts_as_attempt_refs_in_new_and_old_journals() -> None:
    from hub.events import from_record, to_record

    ref = AttemptRef("r1", "a", "a7", 7)
    born = NodeBorn(5, "n1", 2, "rpi4", {}, ("echo",), 1, {}, (ref,), 1.0)
    kind, data = to_record(born)
    assert data["running"] == [{"run": "r1", "step": "a", "attempt": "a7", "fence": 7}]
    assert from_record(kind, cbor2.loads(cbor2.dumps(data))) == born
    old = {**data, "running": [["r1", "a", "a7", 7]], "caps": ["echo"]}  # as journals before AttemptRef hold it
    assert from_record(kind, cbor2.loads(cbor2.dumps(old))) == born


def test_states_leave_the_hub_as_plain_strings(d: Driver) -> None:
    import json

    from fastapi.encoders import jsonable_encoder

    from hub.api import run_detail

    d.node("n1")
    d.submit("r1", spec({"id": "a", "uses": "echo"}))
    for cmd in d.tick():
        d.finish(cmd)
    detail = jsonable_encoder(run_detail(d.core, d.core.runs["r1"], d.now))
    assert type(detail["state"]) is str and type(detail["steps"][0]["attempts"][0]["state"]) is str
    text = json.dumps(run_detail(d.core, d.core.runs["r1"], d.now))
    assert '"state": "succeeded"' in text and "RunState" not in text
    assert cbor2.loads(cbor2.dumps({"liveness": d.core.nodes["n1"].state})) == {"liveness": "online"}


def test_cancelling_a_run_stops_every_open_step_through_the_table(d: Driver) -> None:
    d.node("g1", labels={"class": "gw"})
    d.submit("r1", spec({"id": "up", "uses": "sleep", "for_each": {"labels": {"class": "gw"}}},
                        {"id": "after", "uses": "echo", "needs": ["up"]},
                        {"id": "nowhere", "uses": "echo", "placement": {"selector": {"labels": {"site": "none"}}}}))
    (instance,) = d.tick()
    steps = d.core.runs["r1"].steps
    assert [steps[s].state for s in ("up", "up.g1", "after", "nowhere")] == ["running", "placed", "pending", "queued"]
    commands = d.feed(RunCancelRequested(d.now, "r1", "operator"))
    assert commands == [SendCancel("g1", (AttemptRef("r1", "up.g1", instance.attempt, instance.fence),), "operator")]
    assert {s.state for s in steps.values()} == {"cancelled"} and not d.core.queue


def test_the_compiled_workflow_cache_is_bounded() -> None:
    from hub import runs

    for i in range(runs.WORKFLOW_CACHE + 50):
        runs.compile_workflow(spec({"id": f"s{i}", "uses": "echo"}))
    assert len(runs._WORKFLOWS) == runs.WORKFLOW_CACHE
