"""`fleetflow demo`, shortened, runs to completion with the checker passing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_runs_and_the_checker_passes() -> None:
    exe = Path(sys.executable).parent / "fleetflow"
    out = subprocess.run([str(exe), "demo", "--devices", "15", "--seed", "3"], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for check in ("every run terminal", "no step accepted twice", "no result lost", "every killed device detected",
                  "thermal runaway ended in migration"):
        assert f"PASS  {check}" in out.stdout
    assert "checker: PASS (5/5 checks)" in out.stdout
    assert "faults applied: " in out.stdout and "power cut: " in out.stdout and "overheats" in out.stdout


def test_demo_refuses_a_bad_broker_url() -> None:
    exe = Path(sys.executable).parent / "fleetflow"
    out = subprocess.run([str(exe), "demo", "--broker", "http://nope"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "mqtt://" in out.stderr and "Traceback" not in out.stderr
