"""bench/run_all.py: how its table goes into bench/RESULTS.md (only between its markers), and how it reads a bench's
figures from its output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import run_all  # noqa: E402
from run_all import (BEGIN, BENCHES, END, Bench, Figure, last_json, run_one, table, unlisted,  # noqa: E402
                     write_between_markers)

MUTATION = "## Mutation testing\n\nkept | as | it is\n"


def test_the_table_replaces_only_what_is_between_the_markers() -> None:
    text = f"# Results\n\n{BEGIN}\nold table\n{END}\n\n{MUTATION}"
    out = write_between_markers(text, "new table")
    assert out == f"# Results\n\n{BEGIN}\nnew table\n{END}\n\n{MUTATION}"
    assert write_between_markers(out, "new table") == out  # a second run changes nothing more


def test_without_markers_the_table_goes_under_the_title_and_the_rest_stays() -> None:
    out = write_between_markers(f"# Results\n\n{MUTATION}", "table")
    assert out.startswith(f"# Results\n\n{BEGIN}\ntable\n{END}\n")
    assert out.endswith(MUTATION)


@pytest.mark.parametrize("text", [f"# R\n{BEGIN}\nonly the start\n", f"# R\n{END}\n{BEGIN}\n"])
def test_a_lone_or_misordered_marker_is_refused_rather_than_guessed(text: str) -> None:
    with pytest.raises(ValueError, match="both"):
        write_between_markers(text, "table")


def test_the_figures_are_the_last_json_line_of_the_output() -> None:
    assert last_json('table\n{"a": 1}\nmore\n{"b": 2}\n') == {"b": 2}
    assert last_json("no figures\n") is None
    assert last_json("{broken\n") is None


def test_every_benchmark_in_bench_is_listed() -> None:
    assert unlisted() == []
    assert len({b.name for b in BENCHES}) == len(BENCHES)


@pytest.mark.parametrize("status", [0, 1])
def test_a_bench_that_fails_after_its_figures_keeps_them_in_the_table_then_a_failed_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int) -> None:
    # A checker's FAIL found by a bench is a failure of the run (exit 1), yet what it measured is shown.
    (tmp_path / "fake.py").write_text(f'import sys\nprint("table")\nprint(\'{{"v": 3}}\')\n'
                                      f'print("the history checker failed", file=sys.stderr)\nsys.exit({status})\n')
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    outcome = run_one(Bench("fake", (), lambda f: [Figure("v", str(f["v"]))]), smoke=True, lock=None)
    assert [f.value for f in outcome.figures] == ["3"]
    rows = [line for line in table([outcome], smoke=True).splitlines() if line.startswith("| `fake`")]
    if status:
        assert outcome.failure is not None and outcome.failure.startswith("exit 1")
        assert len(rows) == 2 and "| v | 3 |" in rows[0]
        assert "FAILED: exit 1: the history checker failed" in rows[1] and rows[1].endswith("| FAILED |")
    else:
        assert outcome.failure is None and len(rows) == 1
