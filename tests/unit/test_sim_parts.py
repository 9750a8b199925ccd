"""Simulator pieces: device profiles, the fleet plan, simulated telemetry, the checker's verdicts."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from sim.checker import check
from sim.orchestra import parse_mix, plan
from sim.profiles import ProfileFileError, load_all, parse
from sim.telemetry import SimTelemetry


def fleetflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "fleetflow"), *args], capture_output=True, text=True,
                          timeout=60)


def test_five_device_classes_validate() -> None:
    profiles = load_all()
    assert {"rpi4", "ipc", "gateway", "jetson", "container"} <= set(profiles)
    out = fleetflow("profiles", "validate")
    assert out.returncode == 0 and out.stdout.count(": ok") >= 5
    assert '"step_speed"' in fleetflow("profiles", "show", "gateway").stdout


def test_bad_profiles_are_refused_with_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "toaster.toml"
    bad.write_text('name = "toaster"\n[resources]\ncores = 0\nmemory_mb = 1\ndisk_gb = 1\n'
                   '[intervals]\nheartbeat_s = 5\ntelemetry_s = 5\n')
    with pytest.raises(ProfileFileError, match="resources.cores"):
        parse(bad)
    out = fleetflow("profiles", "validate", str(bad))
    assert out.returncode == 1 and "resources.cores" in out.stderr
    assert fleetflow("profiles", "show", "toaster").returncode == 2


def test_plan_follows_the_mix() -> None:
    devices = plan(100, parse_mix("rpi4=60,ipc=40"))
    assert len(devices) == 100 and sum(d["profile"] == "rpi4" for d in devices) == 60
    assert len({d["node_id"] for d in devices}) == 100
    assert len(plan(7, {"a": 1, "b": 1, "c": 1})) == 7
    with pytest.raises(ValueError, match="name=weight"):
        parse_mix("rpi4")


def test_thermal_model_heats_with_load_and_obeys_overrides() -> None:
    profile = load_all()["rpi4"]
    idle = SimTelemetry(profile, random.Random(1))
    busy = SimTelemetry(profile, random.Random(1))
    busy.busy = profile.max_concurrent
    for _ in range(60):
        a, b = idle.sample(), busy.sample()
    assert b["temp"] > a["temp"] + 10 and b["cpu"] > a["cpu"]
    busy.overrides["temp"] = 95.0
    assert busy.sample()["temp"] == 95.0


def test_checker_fails_what_it_should() -> None:
    runs = {"/runs?limit=100000": [{"id": "r1", "state": "running"}, {"id": "r2", "state": "succeeded"}],
            "/runs/r1": {"id": "r1", "state": "running", "steps": []},
            "/runs/r2": {"id": "r2", "state": "succeeded", "steps": [
                {"id": "s", "attempts": [{"id": "a1", "state": "succeeded"}, {"id": "a2", "state": "succeeded"}]}]},
            "/nodes": [{"id": "n1", "liveness": "online", "changed_at": 0}]}
    verdict = check(runs.__getitem__, {"n1": 0}, outbox_depth=2)
    assert not verdict.passed
    failed = {name for name, ok, _ in verdict.checks if not ok}
    assert failed == {"every run terminal", "no step accepted twice", "no result lost", "every killed device detected"}
