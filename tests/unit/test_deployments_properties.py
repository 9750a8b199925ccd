"""Deployments under random histories (hypothesis): nodes that answer, fail, hang, reboot, go quiet, change labels,
join and leave, operators who pause, resume and cancel, hubs that restart from a snapshot. Whatever happens, no
execution is ever past the deadline of its state (a queued one has none only while it may not start: paused, or
its wave not started), a forced cancel ends the executions it found at once, everything ends in a terminal state,
the inventory agrees with the executions, and the journal replays to the same state."""

from __future__ import annotations

from typing import Any

import cbor2
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from hub.deployments.core import Execution
from hub.deployments.machine import EXECUTION_LIVE, EXECUTION_TERMINAL
from hub.events import HealthChanged, NodeBorn, NodeDied, NodeRemoved
from hub.fleet import SUSPECT_AFTER_HEARTBEATS, SendAssign
from hub.state import Core
from tests.unit.deploydriver import DeployDriver, assert_replays, comparable
from tests.unit.test_hub_core import CAPS

NODES = ("n0", "n1", "n2", "n3")
ANSWERS = st.sampled_from([True, False, None, "running"])
SETTLE_MS = 120_000  # past every deadline the settings below allow: 20 s queued per wave, 3 runs of 5 s, 5 s verify,
#                     rollback

SETTINGS = st.fixed_dictionaries({
    "rate": st.sampled_from([None, "60/min", "600/min"]),
    "max_concurrent": st.sampled_from([None, 1, 2]),
    "waves": st.sampled_from([None, "1,100%", "1,50%,100%"]),
    "wave_success": st.sampled_from([None, 50, 100]),
    "pause_between": st.booleans(),
    "abort_threshold": st.sampled_from([None, 30, 100]),
    "abort_type": st.sampled_from(["ALL", "FAILED", "TIMED_OUT"]),
    "retries": st.integers(0, 2),
    "rollback": st.sampled_from(["never", "on-failure", "on-abort"]),
    "verify": st.sampled_from(["0s", "2s", "5s"]),
    "target": st.sampled_from([["all"], ["role=gw"]]),
    "in_progress_timeout": st.just("5s"),
    "timeout": st.just("20s"),
})


class Deploying(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.d = DeployDriver()
        self.answers: dict[str, Any] = {}
        self.undo_answer: Any = True
        self.boots = {n: 1 for n in NODES}
        for i, node in enumerate(NODES):
            self.d.node(node, labels={"role": "gw" if i < 3 else "db"})
        self.d.outcome = self.answer
        self.joined = 0
        self.awaiting: set[str] = set()  # verifies past their window's end, waiting to hear from the node

    def answer(self, cmd: SendAssign) -> Any:
        return self.undo_answer if cmd.step.startswith("undo-") else self.answers.get(cmd.node, True)

    @initialize(body=SETTINGS)
    def deploy(self, body: dict[str, Any]) -> None:
        self.d.deploy(**body)

    @rule(ms=st.sampled_from([100, 700, 3_000, 9_000]))
    def time_passes(self, ms: int) -> None:
        self.d.run_for(ms)
        assert not self.d.dep().stopping  # a forced cancel ends the executions it found at the next decision
        self.awaiting = {n for n, ex in self.d.dep().executions.items() if self.awaiting_word(ex)}

    @rule(node=st.sampled_from(NODES), answer=ANSWERS)
    def node_answers(self, node: str, answer: Any) -> None:
        self.answers[node] = answer

    @rule(answer=ANSWERS)
    def rollbacks_answer(self, answer: Any) -> None:
        self.undo_answer = answer

    @rule(node=st.sampled_from(NODES), lost=st.booleans())
    def node_reboots(self, node: str, lost: bool) -> None:
        self.d.feed(NodeDied(self.d.now, node, self.boots[node], "lost" if lost else "shutdown"))
        self.boots[node] += 1
        self.d.node(node, boot=self.boots[node], labels=dict(self.d.core.nodes[node].labels))

    @rule(node=st.sampled_from(NODES))
    def node_goes_quiet_or_speaks_again(self, node: str) -> None:
        self.d.silent = self.d.silent ^ {node}

    @rule(node=st.sampled_from(NODES), role=st.sampled_from(["gw", "db"]))
    def node_is_relabelled(self, node: str, role: str) -> None:
        self.boots[node] += 1
        self.d.node(node, boot=self.boots[node], labels={"role": role})

    @rule(role=st.sampled_from(["gw", "db"]))
    def a_node_joins(self, role: str) -> None:
        self.joined += 1
        self.d.feed(NodeBorn(self.d.now, f"new{self.joined}", 1, "container", {"role": role}, CAPS, 2, {}, (), 1.0))

    @rule(node=st.sampled_from(NODES))
    def node_is_revoked(self, node: str) -> None:
        self.d.feed(NodeRemoved(self.d.now, node, "revoked"))

    @rule(node=st.sampled_from(NODES), health=st.sampled_from(["unhealthy", "healthy"]))
    def node_health(self, node: str, health: str) -> None:
        self.d.feed(HealthChanged(self.d.now, node, health, "cpu", 99.0, 90.0, 10.0, "test"))

    @rule(action=st.sampled_from(["pause", "resume", "cancel"]), force=st.booleans())
    def operator(self, action: str, force: bool) -> None:
        self.d.control(action, force)

    @rule()
    def hub_restarts_from_a_snapshot(self) -> None:
        before = comparable(self.d.core)
        self.d.core = Core.from_snapshot(cbor2.loads(cbor2.dumps(self.d.core.to_snapshot())))
        self.d.core.after_load(self.d.now)
        assert comparable(self.d.core) == before

    @invariant()
    def no_execution_is_past_its_deadline(self) -> None:
        dep = self.d.dep()
        for ex in dep.executions.values():
            waiting = ex.state == "queued" and not dep.startable(ex)  # on the operator, or on the waves before
            assert (ex.state in EXECUTION_LIVE and not waiting) == (ex.deadline is not None), ex
            # the decisions at `now` moved it on, but for a verify waiting to hear from its node
            assert ex.deadline is None or ex.deadline > self.d.now or ex.node in self.awaiting, ex

    def awaiting_word(self, ex: Execution) -> bool:
        """A verify whose window ended waits for a node online but not heard from since the window began or the hub
        restarted; no longer than until it would be suspected (which fails the verify)."""
        node = self.d.core.nodes[ex.node]
        since = max(ex.verify_from or 0, self.d.core.loaded_at)
        return (ex.state == "verifying" and ex.deadline is not None and ex.deadline <= self.d.now
                and node.state == "online" and node.last_seen <= since
                and self.d.now - max(since, node.last_seen) <= SUSPECT_AFTER_HEARTBEATS * node.hb * 1000 + 100)

    @invariant()
    def counters_agree_with_the_executions(self) -> None:
        dep = self.d.dep()
        live = {n for n, ex in dep.executions.items() if ex.state in EXECUTION_LIVE}
        assert dep.live == live
        assert dep.active == sum(ex.state in ("in_progress", "verifying", "rolling_back")
                                 for ex in dep.executions.values())

    def teardown(self) -> None:
        if not self.d.dep().executions and self.d.dep().state == "scheduled":
            return  # the machine stopped before its first decision
        self.d.silent = set()
        for _ in range(SETTLE_MS // 10_000):  # a paused deployment waits for its operator: resumed here
            if self.d.dep().state == "paused":
                self.d.control("resume")
            self.d.run_for(10_000, step=1_000)
        dep = self.d.dep()
        assert all(ex.state in EXECUTION_TERMINAL for ex in dep.executions.values()), self.d.states()
        assert dep.state in ("succeeded", "aborted", "canceled"), (dep.state, dep.reason)
        # The inventory: the version a node proved it runs, until a rollback brought it back (to the version before),
        # or unknown where an update was stopped part-way.
        expected: dict[str, str | None] = {}
        for change in self.d.changes():
            if change.state == "succeeded" and change.version is not None:
                expected[change.node] = change.version
            elif change.state == "rolled_back" or (change.state == "canceled" and change.version is not None):
                expected[change.node] = change.version
        for node_id, ex in dep.executions.items():
            assert self.d.core.nodes[node_id].versions.get("app") == expected.get(node_id), (ex, expected)
        assert_replays(self.d)


Deploying.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
TestDeploymentHistories = Deploying.TestCase
