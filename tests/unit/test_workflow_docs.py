"""The workflow authoring guide and what `fleetflow validate` promises with it: every problem of a file at once with
its line, a description on every schema field, `--policy`, inventories that enable shell and python, and every
complete example in docs/workflows.md valid."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from hub.validate import inventory_targets, validate
from tests.cli import fleetflow

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "workflows.md"


def blocks(kind: str) -> list[tuple[int, str]]:
    """The ```yaml KIND blocks of the guide, with the line each starts on."""
    text = GUIDE.read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(rf"^```yaml {kind}\n(.*?)^```$", text, re.M | re.S)]


THREE_MISTAKES = """name: three
version: 1.0.x
steps:
  - id: fetch
    uses: echo
    colour: red
  - id: store
    uses: echo
    needs: [fetch, transform]
"""


def test_validate_lists_every_error_of_a_file_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "three.yaml"
    path.write_text(THREE_MISTAKES)
    out = fleetflow("validate", str(path))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [
        f"{path}:2: version: version '1.0.x' is not semantic (MAJOR.MINOR.PATCH)",
        f"{path}:6: steps.0.colour: Extra inputs are not permitted",
        f"{path}:9: steps.1.needs.1: step 'store' needs unknown step 'transform'",
    ]
    as_json = json.loads(fleetflow("validate", str(path), "--json").stdout)
    assert not as_json["ok"] and len(as_json["errors"]) == 3


def test_checks_after_loading_name_their_lines_too(tmp_path: Path) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text("name: x\ntimeout: 10\nsteps:\n  - id: a\n    uses: echo\n    when: \"1 > 2\"\n"
                    "  - id: b\n    uses: teleport\n")
    out = fleetflow("validate", str(path))
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert f"{path}:8: error: step 'b': unknown executor 'teleport'" in lines
    assert f"{path}:6: error: step 'a' can never run (its condition or its needs always skip it)" in lines
    assert f"{path}:2: error: timeout 10 s is shorter than the longest path of step timeouts (300 s)" in lines


def _undescribed(schema: dict[str, Any]) -> list[str]:
    models = {"<root>": schema, **schema.get("$defs", {})}
    return [f"{model}.{name}" for model, sub in models.items() for name, prop in sub.get("properties", {}).items()
            if not prop.get("description")]


def test_every_field_of_the_workflow_and_policy_schemas_is_described() -> None:
    for kind in ("workflow", "policy"):
        out = fleetflow("schema", kind)
        assert out.returncode == 0, out.stderr
        schema = json.loads(out.stdout)
        assert len(schema["$defs"]) >= 5 and _undescribed(schema) == [], (kind, _undescribed(schema))


def test_validate_policy(tmp_path: Path) -> None:
    example = fleetflow("validate", "--policy", str(ROOT / "docs" / "examples" / "policy.yaml"))
    assert example.returncode == 0 and example.stderr == "", example.stderr
    assert "ok (adaptation policy, 3 triggers, 1 profile overrides)" in example.stdout
    bad = tmp_path / "policy.yaml"
    bad.write_text("duration: -1\nthresholds:\n  cpu: {high: 90, critical: 70}\ntriggers:\n"
                   "  - {metric: cpu, threshold: 3, action: explode}\ncolour: red\n")
    out = fleetflow("validate", "--policy", str(bad))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [f"{bad}:{n}" for n in (1, 3, 5, 6)], lines
    assert "critical (70.0) must not be below high (90.0)" in lines[1] and "triggers.0.action" in lines[2]
    typo = tmp_path / "typo.yaml"
    typo.write_text("profiles:\n  rpi44:\n    temp: {high: 60, critical: 70}\n")
    warned = fleetflow("validate", "--policy", str(typo))
    assert warned.returncode == 0 and f"{typo}:2: warning: profiles.rpi44: no firmware profile" in warned.stderr
    usage = fleetflow("validate", "--policy", str(typo), str(bad))
    assert usage.returncode == 2 and usage.stderr.startswith("error: --policy checks a policy file alone")
    assert fleetflow("validate").returncode == 2


def test_shell_and_python_steps_place_on_inventory_nodes_that_enable_them(tmp_path: Path) -> None:
    workflow = tmp_path / "wf.yaml"
    workflow.write_text("name: x\nsteps:\n  - id: restart\n    uses: shell\n    with: {argv: [/bin/true]}\n"
                        "  - id: calibrate\n    uses: python\n    with: {function: m:f}\n"
                        "    placement: {selector: {capabilities: [gpio]}}\n")
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("- {id: a, profile: rpi4, caps: [shell]}\n- {id: b, profile: rpi4, caps: [python]}\n"
                     "- {id: c, caps: [python]}\n")
    _, report = validate(workflow, fleet)
    assert report.ok, report.errors
    assert report.facts["placement"] == {"restart": ["node a"], "calibrate": ["node b"]}  # c has no gpio
    # `fleetflow nodes list --json` is an inventory as it is (extra keys ignored, builtins always offered).
    fleet.write_text(json.dumps([{"id": "a", "liveness": "online", "profile": "rpi4", "labels": {"class": "sbc"},
                                  "caps": ["echo", "gpio", "noop", "python", "shell"], "resources": {"cores": 4}}]))
    _, report = validate(workflow, fleet)
    assert report.ok, report.errors
    fleet.write_text("- {id: a, profile: rpi4}\n")
    _, report = validate(workflow, fleet)
    assert any("no node in the inventory enables 'shell'" in e for e in report.errors), report.errors
    assert report.where[next(e for e in report.errors if "'shell'" in e)] == f"{workflow}:4"


def test_the_guide_documents_every_field_and_executor() -> None:
    from agent.executors import BUILTINS
    from hub.workflow import Workflow

    text = GUIDE.read_text()
    schema = Workflow.model_json_schema(by_alias=True)
    fields = {name for sub in [schema, *schema["$defs"].values()] for name in sub.get("properties", {})}
    assert [f for f in sorted(fields) if f"`{f}`" not in text] == []
    assert [e for e in [*BUILTINS, "shell", "python"] if f"| `{e}` |" not in text] == []
    for argument in ("argv", "env", "cwd", "function", "args", "seconds", "message"):
        assert f"`{argument}`" in text, argument


@pytest.mark.parametrize("line, yaml_text", blocks("workflow"), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_every_complete_workflow_in_the_guide_validates(tmp_path: Path, line: int, yaml_text: str) -> None:
    path = tmp_path / f"workflows.md-{line}.yaml"
    path.write_text(yaml_text)
    _, report = validate(path)
    assert report.ok, (f"docs/workflows.md:{line}", report.errors)


def test_the_guide_has_complete_workflows_and_a_valid_inventory(tmp_path: Path) -> None:
    assert len(blocks("workflow")) >= 8
    for line, text in blocks("inventory"):
        path = tmp_path / "fleet.yaml"
        path.write_text(text)
        assert inventory_targets(path), line
