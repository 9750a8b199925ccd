"""Workflow files and `fleetflow validate`: clear errors with file and line, and the checks that find real bugs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hub.conditions import ConditionError, parse_condition
from hub.validate import validate
from hub.workflow import WorkflowError, load_workflow_text
from tests.cli import fleetflow

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, where, says", [
    ("name: x\nsteps:\n  - id: a\n    uses: echo\n    timeout: -5\n", ":5", "steps.0.timeout"),
    ("name: x\nversion: 1.0\nsteps:\n  - id: a\n    uses: echo\n", ":2", "version"),
    ("name: x\nversion: one\nsteps:\n  - id: a\n    uses: echo\n", ":2", "not semantic"),
    ("name: x\nsteps:\n  - id: a\n    uses: echo\n    colour: red\n", ":5", "Extra inputs are not permitted"),
    ("name: x\nsteps:\n  - id: a\n    uses: echo\n    needs: [zz]\n", ":5", "unknown step 'zz'"),
    ("name: x\nsteps:\n  - id: a\n    uses: echo\n    needs: [b]\n  - id: b\n    uses: echo\n    needs: [a]\n",
     ":5", "cycle: a -> b -> a"),
    ("name: x\nsteps:\n  - id: a\n    uses: echo\n    when: os.system('x')\n", "", "not allowed"),
    ("name: x\nsteps:\n  - id: a\n    uses: echo\n  - id: b\n    uses: echo\n    when: steps.a.output.v > 1\n",
     ":7", "not among its needs"),
    ("name: x\nsteps: [\n", ":3", "not valid YAML"),
    ("- just a list\n", "", "must be a YAML mapping"),
])
def test_bad_workflows_say_what_and_where(text: str, where: str, says: str) -> None:
    with pytest.raises(WorkflowError) as caught:
        load_workflow_text(text, "wf.yaml")
    message = str(caught.value)
    assert says in message and f"wf.yaml{where}" in message


@pytest.mark.parametrize("source", ["__import__('os')", "inputs.__class__", "(" * 40 + "1" + ")" * 40,
                                    "[x for x in inputs]", "lambda: 1", "inputs.a if inputs.b else 1", "f(1)"])
def test_conditions_refuse_everything_but_the_small_language(source: str) -> None:
    with pytest.raises(ConditionError):
        parse_condition(source)


def test_condition_evaluates_against_outputs_and_reports_missing_values() -> None:
    c = parse_condition("steps.read.output.t > inputs.limit and steps.read.state == 'succeeded'")
    ctx = {"inputs": {"limit": 30}, "steps": {"read": {"output": {"t": 31}, "state": "succeeded"}}}
    assert c.evaluate(ctx) is True
    with pytest.raises(ConditionError, match="steps.read.output.t is not defined"):
        c.evaluate({"inputs": {"limit": 30}, "steps": {"read": {"output": {}, "state": "succeeded"}}})


def test_examples_validate() -> None:
    from hub.health import load_policy

    examples = sorted((ROOT / "docs" / "examples").glob("*.yaml"))
    assert len(examples) == 4
    for path in examples:
        if path.name == "policy.yaml":  # the adaptation policy example, not a workflow
            assert load_policy(path).profiles["rpi4"]["temp"].critical == 78
            continue
        _, report = validate(path)
        assert report.ok, (path, report.errors)


def test_validate_finds_steps_that_can_never_run_and_bad_placement(tmp_path: Path) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text("""name: x
timeout: 10
steps:
  - id: a
    uses: echo
    when: "1 > 2"
  - id: b
    uses: echo
    needs: [a]
  - id: c
    uses: teleport
  - id: d
    uses: echo
    resources: {cores: 512}
  - id: e
    uses: sleep
    timeout: 60
""")
    _, report = validate(wf)
    text = "\n".join(report.errors)
    assert "step 'a' can never run" in text and "step 'b' can never run" in text
    assert "unknown executor 'teleport'" in text
    assert "step 'd': no known profile or node can run it" in text
    assert "timeout 10 s is shorter than the longest path" in text


def test_validate_with_an_inventory(tmp_path: Path) -> None:
    inventory = tmp_path / "fleet.yaml"
    inventory.write_text("- {id: gw1, labels: {site: north}, caps: [echo, gpio]}\n")
    wf = tmp_path / "wf.yaml"
    wf.write_text("name: x\nsteps:\n  - id: a\n    uses: echo\n    placement: {selector: {labels: {site: south}}}\n")
    _, report = validate(wf, inventory)
    assert report.errors == ["step 'a': no known profile or node can run it (selector, executor 'echo', resources)"]


def test_validate_cli(tmp_path: Path) -> None:
    good = fleetflow("validate", str(ROOT / "docs/examples/etl.yaml"), "--json")
    assert good.returncode == 0 and json.loads(good.stdout)["ok"] and json.loads(good.stdout)["terminates"]
    dot = fleetflow("validate", str(ROOT / "docs/examples/etl.yaml"), "--dot")
    assert dot.returncode == 0 and '"extract" -> "transform";' in dot.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps:\n  - id: a\n    uses: echo\n    retry: {max_attempts: 0}\n")
    out = fleetflow("validate", str(bad))
    assert out.returncode == 1 and f"{bad}:5" in out.stderr and "Traceback" not in out.stderr
    missing = fleetflow("validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    schema = fleetflow("schema", "workflow")
    assert schema.returncode == 0 and "retry" in json.loads(schema.stdout)["$defs"]["Step"]["properties"]
