"""bench/fuzz.py at CI size: every decoder takes a share of 2,000 generated and mutated inputs with no crash and no
hang; and the harness itself is shown to count what it must, with test-only targets that raise, spin, sleep, hang
where no signal is seen, and kill their process."""

from __future__ import annotations

import importlib.util
import io
import os
import random
import select
import signal
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_fuzz() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz", BENCH / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz"] = module
    spec.loader.exec_module(module)
    return module


fuzz = load_fuzz()
import fuzz_targets

DECODERS = [name for name in fuzz.TARGETS if not name.startswith("probe")]


def findings(reports: list[Any]) -> list[str]:
    return [f"{r.target}: {f.kind} {f.error} at {f.where}, input {f.index}\n{f.detail}" for r in reports
            for f in r.findings]


def test_every_decoder_survives_a_ci_sized_run(tmp_path: Path) -> None:
    out = io.StringIO()
    reports = fuzz.run(DECODERS, 2000, seed=1, budget=2.0, crash_dir=tmp_path, out=out)
    assert not findings(reports), "\n\n".join(findings(reports))
    assert {r.target for r in reports} == set(DECODERS)
    assert sum(r.inputs for r in reports) >= 2000
    for r in reports:  # every input ended in an outcome, and some got past the checks
        assert r.inputs == sum(r.outcomes.values()) + sum(r.refusals.values()), r.target
        assert r.outcomes, f"{r.target}: nothing accepted\n{out.getvalue()}"
    assert out.getvalue().rstrip().endswith(f"{sum(r.inputs for r in reports)} inputs, 0 crashes, 0 hangs")


# -- the harness can fail: test-only targets ------------------------------------------------------------------------


def number(rng: random.Random) -> int:
    return rng.randrange(20)


def raises_key_error(value: int) -> str:
    table: dict[str, str] = {}
    if value == 3:
        return table["missing"]
    if value == 5:
        raise ValueError("a documented refusal")
    return "ok"


def spins(value: int) -> str:
    if value == 7:
        while True:  # the CPU budget stops it
            value += 1
    return "ok"


def blocks(seconds: float = 60) -> None:
    """Hang as a stuck decoder does, using no CPU: wait for data on a pipe nobody writes, bounded by `seconds` so a
    harness that failed to stop it still cannot stall the suite."""
    read_end, write_end = os.pipe()
    try:
        select.select([read_end], [], [], seconds)
    finally:
        os.close(read_end)
        os.close(write_end)


def sleeps(value: int) -> str:
    if value == 7:
        blocks()  # no CPU: the clock limit stops it
    return "ok"


def hangs_unseen(value: int) -> str:
    if value == 7:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # as C code holding on would: the timer waits
        blocks()
    return "ok"


def dies(value: int) -> str:
    if value == 9:
        os.kill(os.getpid(), signal.SIGKILL)
    return "ok"


@pytest.fixture
def probes() -> Any:
    made = {
        "probe-keyerror": fuzz.Target("probe-keyerror", "raises KeyError on 3", number, raises_key_error, (ValueError,),
                                      fuzz_targets.JSON),
        "probe-spin": fuzz.Target("probe-spin", "spins on 7", number, spins, (), fuzz_targets.JSON),
        "probe-sleep": fuzz.Target("probe-sleep", "sleeps on 7", number, sleeps, (), fuzz_targets.JSON),
        "probe-stuck": fuzz.Target("probe-stuck", "sleeps on 7 with the alarm blocked", number, hangs_unseen, (),
                                   fuzz_targets.JSON),
        "probe-dies": fuzz.Target("probe-dies", "killed on 9", number, dies, (), fuzz_targets.JSON),
    }
    fuzz.TARGETS.update(made)  # the forked workers inherit the registry
    yield made
    for name in made:
        del fuzz.TARGETS[name]


def inputs_equal(target: Any, seed: int, count: int, value: int) -> list[int]:
    return [i for i in range(count) if fuzz.make_input(target, seed, i) == value]


def test_a_decoder_that_raises_is_counted_as_a_crash_and_its_input_saved(probes: Any, tmp_path: Path) -> None:
    target = probes["probe-keyerror"]
    expected = inputs_equal(target, 4, 200, 3)
    refusals = inputs_equal(target, 4, 200, 5)
    out = io.StringIO()
    [report] = fuzz.run(["probe-keyerror"], 200, seed=4, budget=2.0, crash_dir=tmp_path, out=out)
    assert expected and [f.index for f in report.findings] == expected
    assert {f.error for f in report.findings} == {"KeyError"} and report.hangs == 0
    assert sum(report.refusals.values()) == len(refusals)
    assert out.getvalue().rstrip().endswith(f"200 inputs, {len(expected)} crashes, 0 hangs")
    saved = tmp_path / f"probe-keyerror.4.{expected[0]}.json"
    assert saved.read_bytes() == b"3"
    about = (tmp_path / f"probe-keyerror.4.{expected[0]}.txt").read_text()
    assert f"--only probe-keyerror --seed 4 --index {expected[0]}" in about and "KeyError: 'missing'" in about


@pytest.mark.parametrize("name, error, where", [
    ("probe-spin", "over 0.2 s of CPU", "in spins"),
    ("probe-sleep", "over 1 s on the clock", "in sleeps"),
    ("probe-stuck", "killed", None),
])
def test_an_input_over_the_budget_is_a_hang_and_the_run_goes_on(probes: Any, tmp_path: Path, name: str, error: str,
                                                                 where: str | None) -> None:
    target = probes[name]
    expected = inputs_equal(target, 2, 40, 7)[:2]  # each costs its limit: 0.2 s CPU, 1 s clock, or 2 s to the kill
    count = expected[-1] + 3
    started = time.monotonic()
    [report] = fuzz.run([name], count, seed=2, budget=0.2, crash_dir=tmp_path, out=io.StringIO())
    assert [f.index for f in report.findings] == expected and report.hangs == len(expected)
    assert {f.error for f in report.findings} == {error}
    assert report.crashes == 0 and report.inputs == count
    assert sum(report.outcomes.values()) == count - len(expected)  # every other input, after each hang, still ran
    if where is not None:
        assert where in report.findings[0].detail  # the timer's traceback says where it hung
    assert time.monotonic() - started < 30


def test_a_worker_killed_by_an_input_is_a_crash_and_the_rest_still_run(probes: Any, tmp_path: Path) -> None:
    target = probes["probe-dies"]
    expected = inputs_equal(target, 3, 60, 9)
    [report] = fuzz.run(["probe-dies"], 60, seed=3, budget=2.0, crash_dir=tmp_path, out=io.StringIO())
    assert expected and [f.index for f in report.findings] == expected
    assert {f.error for f in report.findings} == {"worker died"} and "signal 9" in report.findings[0].detail
    assert report.inputs == 60


def test_main_exits_1_on_a_crash_and_0_on_a_clean_run(probes: Any, tmp_path: Path) -> None:
    assert fuzz.main(["--only", "probe-keyerror", "--count", "100", "--seed", "4", "--crash-dir", str(tmp_path)]) == 1
    assert fuzz.main(["--only", "cbor", "--count", "50", "--crash-dir", str(tmp_path)]) == 0
