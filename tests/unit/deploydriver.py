"""The hub's pure core driven through deployments, as the shell drives it (journal, apply, decide) with a clock the
test moves: tests/unit/test_deployments_*.py share it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cbor2

from hub.deployments.core import Deployment, Execution
from hub.deployments.model import parse_request
from hub.events import DeploymentControlled, DeploymentCreated, Event, ExecutionChanged, StepReported
from hub.fleet import SendAssign
from hub.state import Core
from tests.unit.test_hub_core import Driver

DEP = "d-0123456789"

# A workflow with a compensation (it can be rolled back); `fail` as the install step makes its run fail.
WORKFLOW = """name: app
version: {version}
{extra}steps:
- id: install
  uses: {install}
  retry: {{max_attempts: 1}}
  compensate: {{uses: echo, with: {{undo: install}}}}
- id: check
  uses: echo
  needs: [install]
  retry: {{max_attempts: 1}}
"""


def workflow(version: str = "1.0.0", install: str = "echo", extra: str = "") -> str:
    return WORKFLOW.format(version=version, install=install, extra=extra)


Outcome = Callable[[SendAssign], "bool | str | None"]


class DeployDriver(Driver):
    """Runs steps as their nodes would: `outcome(assign)` says True (succeed), False (fail), "running" (started,
    no result yet) or None (no answer at all)."""

    def __init__(self) -> None:
        super().__init__()
        self.silent = set()
        self.outcome: Outcome = lambda cmd: True

    def deploy(self, dep_id: str = DEP, **body: Any) -> str:
        body.setdefault("workflow", workflow())
        body.setdefault("target", ["all"])
        spec = parse_request(body, None, self.now)
        self.feed(DeploymentCreated(self.now, dep_id, spec.record(), "tester"))
        return dep_id

    def control(self, action: str, force: bool = False, dep_id: str = DEP) -> None:
        self.feed(DeploymentControlled(self.now, dep_id, action, force, f"{action} by a test"))

    def run_for(self, ms: int, step: int = 100) -> None:
        """Move the clock `ms` in steps, deciding and answering assignments at each."""
        for _ in range(ms // step):
            self.answer(self.tick(step))

    def decide_once(self, ms: int = 10) -> list[Event]:
        """Move the clock `ms`, then one decision pass, applied and answered: for a test that acts between passes
        (`run_for` decides again and again at each step)."""
        self.now += ms
        for node in self.core.nodes.values():
            if node.id not in self.silent:
                self.core.touch(node.id, self.now)
        decisions = self.core.decide(self.now)
        for decision in decisions:
            self.answer(self.feed(decision))
        return decisions

    def answer(self, commands: list[Any]) -> None:
        for cmd in commands:
            if isinstance(cmd, SendAssign):
                verdict = self.outcome(cmd)
                if verdict == "running":
                    self.feed(StepReported(self.now, cmd.node, cmd.attempt, cmd.fence, "started"))
                elif isinstance(verdict, bool):
                    self.finish(cmd, ok=verdict)

    def dep(self, dep_id: str = DEP) -> Deployment:
        return self.core.deploys.deployments[dep_id]

    def ex(self, node: str, dep_id: str = DEP) -> Execution:
        return self.dep(dep_id).executions[node]

    def states(self, dep_id: str = DEP) -> dict[str, str]:
        return {n: str(e.state) for n, e in sorted(self.dep(dep_id).executions.items())}

    def changes(self, state: str | None = None, dep_id: str = DEP) -> list[ExecutionChanged]:
        return [e for e in self.journal if isinstance(e, ExecutionChanged) and e.deployment == dep_id
                and (state is None or e.state == state)]

    def starts(self, dep_id: str = DEP) -> list[ExecutionChanged]:
        """The first start of each execution (retries and rollbacks are not starts)."""
        return [e for e in self.changes("in_progress", dep_id) if e.reason.startswith("started")]


def fleet(n: int, **labels: str) -> DeployDriver:
    """A driver with nodes n00, n01, ... carrying `labels`."""
    d = DeployDriver()
    for i in range(n):
        d.node(f"n{i:02}", labels=dict(labels))
    return d


def failing(*nodes: str, step: str = "install") -> Outcome:
    """An outcome: the named nodes fail `step`; everything else succeeds."""
    return lambda cmd: not (cmd.node in nodes and cmd.step == step)


def restarted(d: DeployDriver, at: int, from_snapshot: bool) -> DeployDriver:
    """The hub back at `at` from a snapshot of `d`'s core, or from its journal alone, as hub/service.py starts."""
    again = DeployDriver()
    again.core = (Core.from_snapshot(cbor2.loads(cbor2.dumps(d.core.to_snapshot()))) if from_snapshot
                  else Core().fold(d.journal))
    again.journal = list(d.journal)
    again.now = at
    again.core.after_load(at)
    return again


def comparable(core: Core) -> dict[str, Any]:
    """A core's snapshot without what is not journaled (when nodes were last heard from, when the hub last loaded):
    a replay must equal it."""
    data = cbor2.loads(cbor2.dumps(core.to_snapshot()))
    for node in data["nodes"]:
        node.pop("last_seen")
    data.pop("loaded_at")
    return dict(data)


def assert_replays(d: Driver) -> None:
    """The journal replayed gives the same state, and the snapshot loads to the same state too."""
    assert comparable(Core().fold(d.journal)) == comparable(d.core)
    restored = Core.from_snapshot(cbor2.loads(cbor2.dumps(d.core.to_snapshot())))
    assert comparable(restored) == comparable(d.core)
