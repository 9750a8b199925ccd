"""Every benchmark still runs: `bench/run_all.py --smoke` runs each one at its tiny size, one after the other, and
must end with status 0 and a row of figures per bench. Its figures mean nothing at that size and are not judged;
it must not write bench/RESULTS.md (a smoke run never does: here it is pointed at a file that must stay absent)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from run_all import BENCHES  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_every_bench_runs_at_its_smoke_size(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--smoke", "--results", str(results)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1100, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| `")]
    for bench in BENCHES:
        assert any(row.startswith(f"| `{bench.name}` (") for row in rows), (bench.name, done.stdout[-3000:])
    assert not any("FAILED" in row for row in rows), done.stdout
    assert not results.exists()
