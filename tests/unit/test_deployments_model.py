"""Deployments, the pure parts: the request refused with the field named, semver and migrations, fire times and
maintenance windows, rates and waves, the runs an execution starts."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hub.deployments.model import DeploymentError, Rate, Waves, parse_request, spec_from_record
from hub.deployments.runspec import pinned_spec, rollback_spec, run_id
from hub.deployments.schedule import Window, next_fire
from hub.deployments.versions import UNKNOWN, migration_problem, parse_specifiers, parse_version
from hub.workflow import WorkflowError, load_workflow_text, workflow_from_data
from protocols import is_valid_id
from tests.unit.deploydriver import workflow

NOW = int(datetime(2030, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)
KNOWN = frozenset({"role", "site"})


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp() * 1000)


def parse(**body: Any) -> Any:
    body.setdefault("workflow", workflow())
    body.setdefault("target", ["role=gateway"])
    return parse_request(body, KNOWN, NOW)


@pytest.mark.parametrize("body, message", [
    ({"target": ["rloe=gateway"]}, "--target: unknown selector key 'rloe'"),
    ({"target": []}, "--target: give at least one selector"),
    ({"target": ["node=a,b c"]}, "--target: node=a,b c: 'b c' is not a node id"),
    ({"rate": 0}, "--rate: must be 1-1000 per minute"),
    ({"rate": "0/min"}, "--rate: must be 1-1000 per minute"),
    ({"rate": "2000/min"}, "--rate: must be 1-1000 per minute"),
    ({"rate": "fast"}, "--rate: 'fast' is not a rate"),
    ({"rate": "10/min", "base_rate": "10/min", "increment_factor": 2, "grow_after_notified": 1},
     "--rate: give --rate (constant) or --base-rate (exponential), not both"),
    ({"base_rate": "10/min"}, "--increment-factor: --base-rate needs --increment-factor"),
    ({"base_rate": "10/min", "increment_factor": 6, "grow_after_notified": 1}, "--increment-factor: must be 1.1-5"),
    ({"base_rate": "10/min", "increment_factor": 2}, "--grow-after-notified: --base-rate needs one of"),
    ({"abort_threshold": 101}, "--abort-threshold: must be 0-100"),
    ({"abort_threshold": -1}, "--abort-threshold: must be 0-100"),
    ({"wave_success": 100.5}, "--wave-success: must be 0-100"),
    ({"abort_min_executed": 0}, "--abort-min-executed: must be 1-"),
    ({"abort_type": "SLOW"}, "--abort-type: 'SLOW': one of FAILED, REJECTED, TIMED_OUT, ALL"),
    ({"retries": 11}, "--retries: must be 0-10"),
    ({"max_concurrent": 0}, "--max-concurrent: must be 1-"),
    ({"waves": "10%,5%"}, "--waves: sizes are cumulative and must not decrease"),
    ({"waves": "0,100%"}, "--waves: '0': a wave is a count"),
    ({"verify": "forever"}, "--verify: 'forever' is not a duration"),
    ({"in_progress_timeout": "0s"}, "--in-progress-timeout: must be 1 s to 7 d"),
    ({"cron": "0 0 30 2 *"}, "--cron: '0 0 30 2 *' never fires"),
    ({"cron": "61 * * * *"}, "--cron: '61 * * * *':"),
    ({"at": "2001-01-01T00:00:00Z"}, "--at: 2001-01-01T00:00:00Z is in the past"),
    ({"at": "tomorrow"}, "--at: 'tomorrow' is not a time"),
    ({"at": "+1h", "cron": "0 * * * *"}, "--at: give --at (once) or --cron (repeatedly), not both"),
    ({"window": ["site=berlin 0 2 * * *"]},
     "--window: 'site=berlin 0 2 * * *': expected \"LABEL=VALUE CRON DURATION\""),
    ({"window": ["site=berlin 0 0 30 2 * 2h"]}, "--window: '0 0 30 2 *' never fires"),
    ({"rollback": "sometimes"}, "--rollback: 'sometimes': one of never, on-failure, on-abort"),
    ({"workflow": "name: app\nsteps: [{id: a, uses: echo}]\n"}, "workflow: workflow 'app' declares no version"),
    ({"workflow": "name: app\nversion: 1.0.0\nsteps: [{id: a, uses: echo}]\n"},
     "--rollback: workflow 'app' has no compensation (no step declares `compensate`), so it cannot be rolled back: "
     "use --rollback never"),
    ({"workflow": "name: app\nversion: 1.0.0\nsteps: [{id: a, uses: echo, for_each: {labels: {a: b}}, "
                  "compensate: {uses: echo}}]\n"}, "workflow: step 'a' uses for_each"),
    ({"colour": "red"}, "--colour: not a deployment setting"),
    # numbers no arithmetic should meet (each once gave a 500: OverflowError, TypeError)
    ({"verify": 1e308}, "--verify: '1e+308' is too long (at most 3650 d)"),
    ({"verify": "9" * 400}, "--verify: '9999999999"),
    ({"timeout": "9" * 400 + "s"}, "--timeout: '9999999999"),
    ({"in_progress_timeout": 1e300}, "--in-progress-timeout: '1e+300' is too long"),
    ({"window": ["site=berlin 0 2 * * * " + "9" * 400 + "s"]}, "--window: '9999999999"),
    ({"at": "+" + "9" * 400 + "s"}, "--at: '9999999999"),
    ({"waves": 5}, "--waves: give cumulative sizes as text"),
    ({"waves": True}, "--waves: give cumulative sizes as text"),
    # values that were read as something else
    ({"pause_between": "false"}, "--pause-between: expected true or false, got 'false'"),
    ({"max_concurrent": 2.5}, "--max-concurrent: 2.5 is not a whole number"),
    ({"retries": 1.9}, "--retries: 1.9 is not a whole number"),
    ({"waves": "1,10%"}, "--waves: the last wave must be 100% (it takes every node left), got '10%'"),
    # waits that --timeout would cut short before they could end
    ({"window": ["site=berlin 0 2 * * * 1h"], "timeout": "10h"},
     "--window: 'site=berlin 0 2 * * * 1h': a node under it may wait 23 h for it to open, longer than --timeout 10 h"),
    ({"rate": "1/min", "timeout": "30s"}, "--rate: one start every 60 s is longer than --timeout 30 s"),
    ({"base_rate": "2/min", "increment_factor": 2, "grow_after_notified": 1, "timeout": "20s"},
     "--rate: one start every 30 s is longer than --timeout 20 s"),
])
def test_bad_input_is_refused_naming_the_field(body: dict[str, Any], message: str) -> None:
    with pytest.raises(DeploymentError) as refused:
        parse(**body)
    assert str(refused.value).startswith(message), str(refused.value)


def test_what_parses_is_what_the_journal_reads_back() -> None:
    spec = parse(rate="120/min", abort_threshold=30, abort_min_executed=2, waves="1,10%,100%", pause_between=True,
                 retries=2, verify="60s", in_progress_timeout="5m", at="+1h", window=["site=berlin 0 2 * * * 2h"],
                 inputs={}, target=["role=gateway", "label.site=berlin", "cap=gpio", "profile=rpi4", "node=a,b"])
    assert spec.rate.per_minute == 120 and spec.abort.threshold == 30 and spec.abort.min_executed == 2
    assert spec.verify_ms == 60_000 and spec.in_progress_timeout_ms == 300_000 and spec.at == NOW + 3_600_000
    assert spec.target.labels == (("role", "gateway"), ("site", "berlin")) and spec.target.nodes == ("a", "b")
    assert spec.windows[0] == Window("site", "berlin", "0 2 * * *", 7_200_000)
    assert spec_from_record(spec.record()) == spec
    exponential = parse(base_rate="10/min", increment_factor=1.5, grow_after_succeeded=4)
    assert spec_from_record(exponential.record()) == exponential
    # The fleet's label keys are the hub's to check; the CLI checks everything else before it asks.
    assert parse_request({"workflow": workflow(), "target": ["anything=x"]}, None, NOW).target.labels == (
        ("anything", "x"),)


def test_absent_and_whole_values_mean_what_they_say() -> None:
    assert parse(wave_success=None).waves.success == 100  # null is "not given", as for every field: the default
    assert parse(max_concurrent=2.0, retries=3.0).max_concurrent == 2 and parse(retries=3.0).retries == 3
    assert parse(pause_between=False).waves.pause_between is False
    assert parse(waves="1,10%,100%", timeout="23h", window=["site=berlin 0 2 * * * 1h"]).timeout_ms == 23 * 3_600_000


def test_a_wave_of_a_percent_is_counted_exactly() -> None:
    assert Waves(("16.1%", "100%")).plan(1000) == [161, 1000]  # in floats 1000 * 16.1 / 100 is 161.00000000000003
    assert Waves(("64.9%", "100%")).plan(1000) == [649, 1000] and Waves(("12.5%", "100%")).plan(8) == [1, 8]


def test_a_bad_workflow_is_the_workflow_parsers_error_with_its_line() -> None:
    with pytest.raises(WorkflowError, match="workflow:4: steps.0.uses: Field required"):
        parse(workflow="name: app\nversion: 1.0.0\nsteps:\n- id: a\n")
    with pytest.raises(WorkflowError, match="inputs.x: is required"):
        parse(workflow=workflow(extra="inputs: {x: {required: true}}\n"))


def test_semver_precedence_and_specifier_sets() -> None:
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11",
               "1.0.0-rc.1", "1.0.0", "1.0.1", "1.2.0", "2.0.0"]
    versions = [parse_version(v) for v in ordered]
    assert sorted(reversed(versions)) == versions
    assert parse_version("1.0.0+build.5") == parse_version("1.0.0")
    assert parse_specifiers(">=1.2,<2").contains(parse_version("1.9.9"))
    assert not parse_specifiers(">=1.2,<2").contains(parse_version("2.0.0"))
    assert not parse_specifiers(">=1.2,<2").contains(parse_version("1.1.9"))
    assert parse_specifiers("!=1.5").contains(parse_version("1.5.1"))
    with pytest.raises(ValueError, match="not a semantic version"):
        parse_version("1.2")


def test_a_patch_needs_no_migration_a_minor_or_major_change_does() -> None:
    assert migration_problem(None, "2.0.0", []) is None             # the node has no version yet
    assert migration_problem(UNKNOWN, "2.0.0", []) is None          # nor one the hub can name (an update stopped)
    assert migration_problem("1.2.3", "1.2.9", []) is None          # patch up
    assert migration_problem("1.2.9", "1.2.3", []) is None          # patch down
    problem = migration_problem("1.1.0", "1.2.0", [])
    assert problem == "no migration declared from 1.1.0 to 1.2.0 (a minor or major change; migrates_from: none)"
    assert migration_problem("1.9.0", "2.0.0", [">=1.2,<2"]) is None
    assert migration_problem("1.1.0", "2.0.0", [">=1.2,<2"]) is not None
    assert migration_problem("1.1.0", "2.0.0", [">=1.2,<2", "==1.1.0"]) is None


def test_a_workflow_declares_migrations_as_specifier_sets() -> None:
    text = workflow(version="2.0.0", extra='migrates_from: [">=1.2,<2"]\n')
    assert load_workflow_text(text).migrates_from == [">=1.2,<2"]
    with pytest.raises(WorkflowError, match=r"<workflow>:3: migrates_from: 'x' is not a version"):
        load_workflow_text(workflow(extra='migrates_from: [">=x"]\n'))


def test_fire_times_come_from_the_cron_and_the_clock_passed_in() -> None:
    assert next_fire("*/5 * * * *", ms("2030-01-01T00:02:30")) == ms("2030-01-01T00:05:00")
    assert next_fire("*/5 * * * *", ms("2030-01-01T00:05:00")) == ms("2030-01-01T00:10:00")  # strictly after
    assert next_fire("0 0 29 2 *", ms("2030-01-01T00:00:00")) == ms("2032-02-29T00:00:00")
    assert next_fire("0 0 30 2 *", ms("2030-01-01T00:00:00")) is None


def test_a_maintenance_window_is_open_from_each_fire_for_its_duration() -> None:
    window = Window("site", "berlin", "0 2 * * *", 2 * 3_600_000)
    start = ms("2030-01-01T02:00:00")
    assert [window.open_at(start + d) for d in (-1, 0, 7_199_999, 7_200_000)] == [False, True, True, False]
    assert window.applies({"site": "berlin"}) and not window.applies({"site": "paris"})


def test_rates_and_wave_plans() -> None:
    assert Rate(per_minute=120).spacing_ms(50, 0) == 500
    assert Rate().spacing_ms(50, 0) == 0                           # no rate: no spacing
    grow = Rate(base=60, factor=2, grow_after=3, grow_on="notified")
    assert [grow.spacing_ms(n, 0) for n in (0, 2, 3, 6, 9, 100)] == [1000, 1000, 500, 250, 125, 60]  # capped 1000/min
    on_success = Rate(base=60, factor=2, grow_after=3, grow_on="succeeded")
    assert on_success.spacing_ms(100, 2) == 1000 and on_success.spacing_ms(0, 3) == 500
    assert Waves(("1", "10%", "50%", "100%")).plan(50) == [1, 5, 25, 50]
    assert Waves(("1", "10%", "50%", "100%")).plan(3) == [1, 1, 2, 3]
    assert Waves(("5", "2")).plan(10) == [5, 10]                    # never decreasing; the last takes the rest
    assert Waves(("100%",)).plan(0) == [0]


@given(st.integers(min_value=0, max_value=5000), st.lists(st.integers(min_value=1, max_value=100), min_size=1))
def test_a_wave_plan_is_cumulative_and_covers_the_target(total: int, percents: list[int]) -> None:
    plan = Waves(tuple(f"{p}%" for p in sorted(percents))).plan(total)
    assert plan == sorted(plan) and plan[-1] == total and all(size >= min(1, total) for size in plan)


def test_a_run_is_pinned_to_its_node_and_a_rollback_undoes_completed_steps_newest_first() -> None:
    text = """name: app
version: 1.0.0
steps:
- {id: fetch, uses: echo, compensate: {uses: noop}, placement: {selector: {capabilities: [gpio]}}}
- {id: install, uses: echo, needs: [fetch], compensate: {uses: echo, with: {undo: install}}}
- {id: check, uses: echo, needs: [install]}
"""
    spec = load_workflow_text(text).model_dump(by_alias=True, mode="json")
    pinned = workflow_from_data(pinned_spec(spec, "n1"))
    assert [s.placement.selector.nodes for s in pinned.steps] == [["n1"]] * 3
    assert pinned.steps[0].placement.selector.capabilities == ["gpio"]   # its other constraints kept
    assert all(s.compensate is None for s in pinned.steps)              # undoing is the deployment's rollback
    undo = workflow_from_data(rollback_spec(spec, "n1", {"fetch", "install", "check"}))
    assert [(s.id, s.uses, s.needs, s.placement.selector.nodes) for s in undo.steps] == [
        ("undo-install", "echo", [], ["n1"]), ("undo-fetch", "noop", ["undo-install"], ["n1"])]
    assert [s.id for s in workflow_from_data(rollback_spec(spec, "n1", {"fetch"})).steps] == ["undo-fetch"]
    assert run_id("d-0123456789", "n1", 3) == "d-0123456789.n1.3"
    long = run_id("d-0123456789", "n" * 64, 3)
    assert is_valid_id(long) and long != run_id("d-0123456789", "m" * 64, 3)
