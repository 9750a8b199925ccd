"""A cron deployment survives a hub kill -9: its next fire time is journaled before the kill, and the restarted hub
fires it at that time (issue 14). A hub process on a real Mosquitto with two simulated devices; judged from the
journal file. Cron fires by the minute, so this test waits up to about a minute for the fire time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.system.deployfleet import DeployFleet, update_step, workflow

pytestmark = pytest.mark.slow
MIN_LEAD_MS = 6_000  # the kill must land before the fire time, with room for the restart


def test_cron_schedule_set_before_a_hub_kill_fires_after_the_restart(tmp_path: Path) -> None:
    with DeployFleet(tmp_path) as fleet:
        fleet.add_devices({"c-1": "dtest", "c-2": "dtest"})
        dep = fleet.deploy(workflow("fw-cron", "1.0.0", update_step(0.1)), "--target", "node=c-1,c-2", "--cron",
                           "* * * * *", "--verify", "1s")
        assert fleet.view(dep)["state"] == "scheduled"

        def journaled_fire() -> int | None:
            """The next fire time as journaled, when it is far enough ahead to kill the hub before it."""
            events = fleet.deployment_events(dep)
            upcoming = events[-1]["next_fire"] if events else None
            return upcoming if upcoming is not None and upcoming - time.time() * 1000 > MIN_LEAD_MS else None

        # a fire time too close (the minute is nearly over) is let pass: the one after it is journaled in turn
        fire = fleet.hub.wait(journaled_fire, 90, "a journaled fire time at least 6 s ahead")
        first_round = not any(e.get("fired") for e in fleet.deployment_events(dep))
        fleet.hub.kill()
        assert time.time() * 1000 < fire
        restarted = int(time.time() * 1000)
        fleet.hub.start()

        def fired() -> dict[str, Any] | None:
            return next((e for e in fleet.deployment_events(dep) if e.get("fired") == fire), None)

        event = fleet.hub.wait(fired, 90, f"the fire at {fire} after the restart")
        assert event["state"] == "running" and restarted <= event["at"] < fire + 30_000, event
        if first_round:  # the round that fired after the restart updates both devices
            fleet.hub.wait(lambda: {e["node"] for e in fleet.execution_events(dep) if e["state"] == "succeeded"
                                    and e["at"] >= fire} == {"c-1", "c-2"}, 90, "both devices updated by the round")
        assert fleet.view(dep)["state"] in ("running", "scheduled")  # and it keeps firing
