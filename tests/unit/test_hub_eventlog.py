"""The hub's log lines at the moments that matter (hub/eventlog.py), from the events the live hub applies."""

from __future__ import annotations

import logging

import pytest

from hub.eventlog import apply_logged
from hub.events import (AttemptAssigned, BreakerChanged, NodeBorn, NodeDied, NodeFailed, NodeSeen, NodeSuspected,
                        ResultReported, RunSubmitted, StepReported)
from hub.scheduler import place
from hub.state import Core
from hub.workflow import workflow_from_data

CAPS = ("noop", "echo", "sleep")


def born(core: Core, node: str, at: int, boot: int = 1) -> None:
    apply_logged(core, NodeBorn(at, node, boot, "container", {}, CAPS, 1, {"cores": 4}, (), 0.5))


def placed(core: Core, at: int) -> AttemptAssigned:
    (event,) = [e for e in place(core, at) if isinstance(e, AttemptAssigned)]
    apply_logged(core, event)
    return event


def test_a_node_failure_migration_recovery_and_run_end_are_one_line_each(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fleetflow.hub")
    core = Core()
    born(core, "n1", 1_000)
    born(core, "n2", 1_000)
    spec = workflow_from_data({"name": "moves", "version": "1.2.3", "steps": [
        {"id": "long", "uses": "sleep", "migratable": True}]}).model_dump(by_alias=True, mode="json")
    apply_logged(core, RunSubmitted(2_000, "r1", spec, {}, None, 10**12))
    first = placed(core, 2_000)
    apply_logged(core, StepReported(2_100, first.node, first.attempt, first.fence, "started"))
    core.touch(first.node, 2_500)
    apply_logged(core, NodeSuspected(3_600, first.node))
    apply_logged(core, NodeFailed(4_100, first.node, "no heartbeat for 1.6 s"))
    second = placed(core, 4_100)
    apply_logged(core, StepReported(4_200, second.node, second.attempt, second.fence, "started"))
    apply_logged(core, ResultReported(6_600, second.node, second.attempt, second.fence, True, {}, None))
    born(core, first.node, 7_000, boot=2)  # it comes back
    apply_logged(core, BreakerChanged(7_100, "n2", "half_open", "open for 60 s: one probe"))
    apply_logged(core, NodeDied(8_000, "n2", 1, "shutdown"))

    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "node n1 joined: profile container, 1 slot(s), boot 1",
        "node n2 joined: profile container, 1 slot(s), boot 1",
        "node n1 suspected: nothing heard for 1.1 s (heartbeat every 0.5 s)",
        "node n1 failed: no heartbeat for 1.6 s; 1 attempt(s) lost",
        f"step long of run r1 migrated from n1 to n2 (attempt {second.attempt}): node n1 failed: no heartbeat for "
        "1.6 s",
        "run r1 (moves 1.2.3) succeeded in 4.6 s",
        "node n1 recovered: online again (it was failed; birth, boot 2)",
        "node n2: circuit breaker half-open: open for 60 s: one probe",
        "node n2 offline: it shut down",
    ]
    levels = {r.getMessage().split(":")[0]: r.levelname for r in caplog.records}
    assert levels["node n1 failed"] == "WARNING" and levels["node n1 suspected"] == "WARNING"


def test_a_suspected_node_heard_again_recovers_and_nothing_else_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fleetflow.hub")
    core = Core()
    born(core, "n1", 1_000)
    apply_logged(core, NodeSuspected(3_000, "n1"))
    apply_logged(core, NodeSeen(3_100, "n1"))
    apply_logged(core, NodeSeen(3_200, "n1"))  # already online: no news
    born(core, "n1", 3_300)  # a birth while online: no news either
    assert [r.getMessage() for r in caplog.records][-1] == "node n1 recovered: heard from again, online (it was " \
                                                           "suspected)"
    assert len(caplog.records) == 3
