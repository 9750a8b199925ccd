"""Adaptation end to end: a real hub, real agents whose telemetry the test drives, Mosquitto."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import Broker
from tests.hubprocess import HubProcess

POLICY = """
duration: 1
recovery: 3
cooldown: 1
breaker: {failures: 2, window: 60, cooldown: 2, successes: 1}
"""


@pytest.fixture
def hub(mosquitto: Broker, tmp_path: Path) -> Iterator[HubProcess]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with HubProcess(mosquitto, "adapt", tmp_path / "hub", args=("--auto-accept", "--policy", str(policy))) as process:
        yield process


def reading(temp: float) -> str:
    """A telemetry overlay that pins every judged metric, not only the one under test: the agents' real psutil
    figures are of the test machine, whose CPU a busy CI run keeps at 100% (that made every node unhealthy)."""
    return json.dumps({"cpu": 10, "mem": 30, "disk": 20, "temp": temp})


def start_nodes(hub: HubProcess, names: list[str]) -> dict[str, Path]:
    files = {}
    for name in names:
        files[name] = hub.data.parent / f"{name}-telemetry.json"
        files[name].write_text(reading(45))
        hub.agent(name, "--telemetry", "0.2", "--telemetry-file", str(files[name]))
    hub.wait_nodes(len(names))
    return files


def running_on(hub: HubProcess, run_id: str, step: str) -> dict:
    def find() -> dict | None:
        for s in hub.get(f"/runs/{run_id}")["steps"]:
            if s["id"] == step and s["attempts"] and s["attempts"][-1]["state"] == "running":
                return s["attempts"][-1]  # type: ignore[no-any-return]
        return None

    return hub.wait(find, 15, f"{step} running")  # type: ignore[no-any-return]


def test_critical_temperature_moves_the_migratable_step(hub: HubProcess) -> None:
    files = start_nodes(hub, ["n1", "n2", "n3"])
    run_id = hub.submit("name: hot\nsteps:\n  - id: long\n    uses: sleep\n    with: {seconds: 5}\n"
                        "    migratable: true\n")
    first = running_on(hub, run_id, "long")
    stale_before = hub.metric("fleetflow_stale_reports")
    files[first["node"]].write_text(reading(95))  # over critical (85) from now on
    run = hub.wait_run(run_id, 30)
    assert run["state"] == "succeeded", run
    attempts = run["steps"][0]["attempts"]
    assert attempts[0]["node"] == first["node"] and attempts[0]["state"] == "lost"
    assert "migrated off" in attempts[0]["reason"] and "temp" in attempts[0]["reason"]
    assert attempts[-1]["state"] == "succeeded" and attempts[-1]["node"] != first["node"]
    node = hub.get(f"/nodes/{first['node']}")
    assert node["health"] == "unhealthy" and node["throttled"]
    kinds = [(h["kind"], h.get("health") or h.get("action")) for h in node["history"]]
    assert ("health", "unhealthy") in kinds and ("action", "migrate") in kinds and ("action", "throttle") in kinds
    health = next(h for h in node["history"] if h["kind"] == "health")
    assert health["metric"] == "temp" and health["value"] == 95 and health["threshold"] == 85
    # the old attempt was cancelled on the hot node, and its report of that is refused as stale
    hub.wait(lambda: hub.metric("fleetflow_stale_reports") > stale_before, 10, "the stale report")
    assert hub.metric('fleetflow_adaptation_actions_total{action="migrate"}') >= 1
    # cooling down past the recovery time makes it healthy and placeable again
    files[first["node"]].write_text(reading(40))
    hub.wait(lambda: hub.get(f"/nodes/{first['node']}")["health"] == "healthy", 15, "recovery")
    assert not hub.get(f"/nodes/{first['node']}")["throttled"]


def test_non_migratable_step_stays_and_the_node_is_throttled(hub: HubProcess) -> None:
    files = start_nodes(hub, ["n1", "n2"])
    run_id = hub.submit("name: pinned\nsteps:\n  - id: stay\n    uses: sleep\n    with: {seconds: 3}\n")
    first = running_on(hub, run_id, "stay")
    hot = first["node"]
    files[hot].write_text(reading(95))
    hub.wait(lambda: hub.get(f"/nodes/{hot}")["throttled"], 10, "throttle")
    others = [hub.submit("name: quick\nsteps:\n  - id: q\n    uses: echo\n") for _ in range(3)]
    run = hub.wait_run(run_id, 20)
    assert run["state"] == "succeeded"
    assert [a["node"] for a in run["steps"][0]["attempts"]] == [hot]  # it stayed where it was
    for other in others:
        placed = hub.wait_run(other, 20)
        assert placed["state"] == "succeeded" and placed["steps"][0]["attempts"][-1]["node"] != hot


def test_repeated_failures_open_the_breaker_then_half_open(hub: HubProcess) -> None:
    start_nodes(hub, ["n1"])
    for _ in range(2):
        run = hub.wait_run(hub.submit("name: bad\nsteps:\n  - id: f\n    uses: fail\n    retry: {max_attempts: 1}\n"))
        assert run["state"] == "failed"
    hub.wait(lambda: hub.get("/nodes/n1")["breaker"] == "open", 10, "breaker open")
    hub.wait(lambda: hub.get("/nodes/n1")["breaker"] == "half_open", 10, "half-open after the cooldown")
    probe = hub.wait_run(hub.submit("name: ok\nsteps:\n  - id: e\n    uses: echo\n"), 20)
    assert probe["state"] == "succeeded"
    hub.wait(lambda: hub.get("/nodes/n1")["breaker"] == "closed", 10, "closed after a successful probe")
    states = [h["state"] for h in hub.get("/nodes/n1")["history"] if h["kind"] == "breaker"]
    assert states == ["open", "half_open", "closed"]
