"""`fleetflow` run as its users run it: the installed command in a subprocess, bounded (a command that hangs fails
the test instead of stalling the suite), with the test's own `FLEETFLOW_*` variables kept out of its environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

FLEETFLOW = str(Path(sys.executable).parent / "fleetflow")


def fleetflow(*args: str | Path, env: Mapping[str, str] | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLEETFLOW_")}
    return subprocess.run([FLEETFLOW, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**clean, **(env or {})})


def ok(*args: str | Path, env: Mapping[str, str] | None = None, timeout: float = 60) -> str:
    """The output of a command that must succeed."""
    out = fleetflow(*args, env=env, timeout=timeout)
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out.stdout
