"""`fleetflow validate`: everything that can be known about a workflow before it runs.

- schema, references and cycles (with file and line), from `workflow.load_workflow`;
- executors: a step must use a builtin, `shell`, `python`, or one an inventory node offers;
- control flow: a bounded exploration of every reachable marking of the workflow's net (each step pending, done,
  skipped or failed; `when` branches both ways unless constant) proves termination and finds steps that can never
  run and markings that are stuck before the end;
- placement: some firmware profile (or, with --fleet, some inventory node) must match each step's selector,
  offer its executor and hold its resources;
- time: the run's timeout against the longest path of step timeouts (with and without retries).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from .workflow import Step, Workflow, WorkflowError, load_workflow, topological_order

BUILTIN_EXECUTORS = frozenset({"noop", "sleep", "echo", "fail"})
GATED_EXECUTORS = frozenset({"shell", "python"})
MAX_MARKINGS = 10_000


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(frozen=True)
class Target:
    """A place a step could run: a firmware profile or an inventory node."""

    name: str
    labels: dict[str, str]
    profile: str
    caps: frozenset[str]
    resources: dict[str, float]


def profile_targets() -> list[Target]:
    from agent.profiles import available, parse_profile

    out = []
    for name, path in sorted(available().items()):
        p = parse_profile(path)
        out.append(Target(f"profile {name}", dict(p.labels), p.name,
                          frozenset(p.capabilities) | BUILTIN_EXECUTORS | GATED_EXECUTORS, p.resources()))
    return out


def inventory_targets(path: Path) -> list[Target]:
    """An inventory: a YAML/JSON list of {id, profile, labels, caps, resources}."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise WorkflowError([(str(path), f"cannot read inventory: {exc}")]) from None
    if not isinstance(raw, list) or not all(isinstance(n, dict) and "id" in n for n in raw):
        raise WorkflowError([(str(path), "an inventory is a list of nodes, each with at least an id")])
    return [Target(f"node {n['id']}", {str(k): str(v) for k, v in (n.get("labels") or {}).items()},
                   str(n.get("profile", "")), frozenset(n.get("caps") or BUILTIN_EXECUTORS),
                   {k: float(v) for k, v in (n.get("resources") or {}).items()}) for n in raw]


def check_placement(workflow: Workflow, targets: list[Target], report: Report) -> None:
    for step in workflow.steps:
        selector = step.for_each or step.placement.selector
        res = step.resources
        fitting = [t for t in targets
                   if selector.matches(t.name.split(" ", 1)[1], t.labels, t.profile, t.caps) and step.uses in t.caps
                   and all(not need or t.resources.get(name, float("inf")) >= need
                           for name, need in (("cores", res.cores), ("memory_mb", res.memory_mb),
                                              ("disk_gb", res.disk_gb)))]
        if not fitting:
            report.errors.append(f"step {step.id!r}: no known profile or node can run it (selector, executor "
                                 f"{step.uses!r}, resources)")
        else:
            report.facts.setdefault("placement", {})[step.id] = [t.name for t in fitting]


def check_executors(workflow: Workflow, targets: list[Target], report: Report) -> None:
    offered = set().union(*(t.caps for t in targets)) if targets else set()
    for step in workflow.steps:
        for uses, where in [(step.uses, step.id)] + ([(step.compensate.uses, f"{step.id}.compensate")]
                                                      if step.compensate else []):
            if uses not in BUILTIN_EXECUTORS | GATED_EXECUTORS | offered:
                report.errors.append(f"step {where!r}: unknown executor {uses!r}")
            elif uses in GATED_EXECUTORS:
                report.warnings.append(f"step {where!r} uses {uses!r}: agents run it only where their config "
                                       f"enables it")


def _branches(step: Step) -> tuple[bool, bool]:
    """(can run, can be skipped by its condition)."""
    condition = step.condition()
    if condition is None:
        return True, False
    if not condition.step_refs and not condition.input_refs:
        value = condition.evaluate({"inputs": {}, "steps": {}})
        return value, not value
    return True, True


def explore(workflow: Workflow, report: Report) -> None:
    """Breadth-first over markings: each step pending (P), done (D), skipped (S) or failed (F)."""
    order = topological_order(workflow)
    index = {sid: i for i, sid in enumerate(order)}
    steps = {s.id: s for s in workflow.steps}
    branches = {sid: _branches(steps[sid]) for sid in order}
    start = "P" * len(order)
    seen = {start}
    frontier = [start]
    ran: set[str] = set()
    stuck: list[str] = []
    final = 0
    while frontier:
        marking = frontier.pop()
        if "F" in marking:
            final += 1
            continue
        successors = []
        for sid in order:
            i = index[sid]
            if marking[i] != "P":
                continue
            needs = [marking[index[n]] for n in steps[sid].needs]
            if "P" in needs:
                continue
            if steps[sid].join == "all":
                enabled = all(n == "D" for n in needs)
            else:
                enabled = any(n == "D" for n in needs) or not needs
            can_run, can_skip = branches[sid]
            outcomes = []
            if enabled and can_run:
                outcomes += ["D", "F"]
            if not enabled or can_skip:
                outcomes.append("S")
            for outcome in outcomes:
                if outcome == "D":
                    ran.add(sid)
                successors.append(marking[:i] + outcome + marking[i + 1:])
        if not successors:
            if "P" in marking:
                stuck.append(marking)
            else:
                final += 1
        for nxt in successors:
            if nxt not in seen:
                if len(seen) >= MAX_MARKINGS:
                    report.warnings.append(f"control flow has over {MAX_MARKINGS} markings; the check stopped there")
                    frontier = []
                    break
                seen.add(nxt)
                frontier.append(nxt)
    report.facts["markings"] = len(seen)
    report.facts["terminal_markings"] = final
    for marking in stuck[:3]:
        waiting = [sid for sid in order if marking[index[sid]] == "P"]
        report.errors.append(f"deadlock: the run can stop with {', '.join(waiting)} never started")
    for sid in order:
        if sid not in ran:
            report.errors.append(f"step {sid!r} can never run (its condition or its needs always skip it)")
    report.facts["terminates"] = not stuck


def check_time(workflow: Workflow, report: Report) -> None:
    longest: dict[str, float] = {}
    longest_retry: dict[str, float] = {}
    steps = {s.id: s for s in workflow.steps}
    for sid in topological_order(workflow):
        step = steps[sid]
        before = max((longest[n] for n in step.needs), default=0.0)
        before_r = max((longest_retry[n] for n in step.needs), default=0.0)
        retry = step.retry
        waits = sum(min(retry.max, retry.initial * retry.multiplier ** k) for k in range(retry.max_attempts - 1))
        longest[sid] = before + step.timeout
        longest_retry[sid] = before_r + step.timeout * retry.max_attempts + waits
    path = max(longest.values(), default=0.0)
    path_retry = max(longest_retry.values(), default=0.0)
    report.facts["longest_path_s"] = path
    report.facts["longest_path_with_retries_s"] = path_retry
    if workflow.timeout is not None:
        if workflow.timeout < path:
            report.errors.append(f"timeout {workflow.timeout:g} s is shorter than the longest path of step "
                                 f"timeouts ({path:g} s)")
        elif workflow.timeout < path_retry:
            report.warnings.append(f"timeout {workflow.timeout:g} s is shorter than the longest path with every "
                                   f"retry ({path_retry:g} s)")


def validate(path: Path, inventory: Path | None = None) -> tuple[Workflow, Report]:
    workflow = load_workflow(path)
    report = Report()
    targets = inventory_targets(inventory) if inventory else profile_targets()
    check_executors(workflow, targets, report)
    explore(workflow, report)
    check_placement(workflow, targets, report)
    check_time(workflow, report)
    return workflow, report


def to_dot(workflow: Workflow) -> str:
    lines = [f'digraph "{workflow.name}" {{', "  rankdir=LR;"]
    for step in workflow.steps:
        label = f"{step.id}\\n{step.uses}" + (f"\\nwhen {step.when}" if step.when else "")
        shape = "box3d" if step.for_each else "box"
        lines.append(f'  "{step.id}" [shape={shape}, label="{label.replace(chr(34), chr(39))}"];')
        for need in step.needs:
            lines.append(f'  "{need}" -> "{step.id}"' + (' [style=dashed]' if step.join == "any" else "") + ";")
    lines.append("}")
    return "\n".join(lines)


def validate_command(workflow: Path = typer.Argument(..., help="Workflow YAML file"),
                     fleet: Optional[Path] = typer.Option(None, "--fleet", help="Inventory file (YAML/JSON list)"),
                     as_json: bool = typer.Option(False, "--json", help="Print JSON"),
                     dot: bool = typer.Option(False, "--dot", help="Print the graph for Graphviz")) -> None:
    """Check a workflow: schema, references, cycles, deadlocks, placement, deadline."""
    try:
        parsed, report = validate(workflow, fleet)
    except WorkflowError as exc:
        if as_json:
            typer.echo(json.dumps({"ok": False, "errors": [f"{w}: {m}" for w, m in exc.problems]}))
        else:
            for where, what in exc.problems:
                typer.echo(f"{where}: {what}", err=True)
        raise typer.Exit(1)
    if dot:
        typer.echo(to_dot(parsed))
    elif as_json:
        typer.echo(json.dumps({"ok": report.ok, "errors": report.errors, "warnings": report.warnings,
                               **report.facts}))
    else:
        for error in report.errors:
            typer.echo(f"{workflow}: error: {error}", err=True)
        for warning in report.warnings:
            typer.echo(f"{workflow}: warning: {warning}", err=True)
        if report.ok:
            typer.echo(f"{workflow}: ok ({parsed.name} {parsed.version}, {len(parsed.steps)} steps, "
                       f"{report.facts.get('markings')} markings explored, longest path "
                       f"{report.facts.get('longest_path_s'):g} s)")
    if not report.ok:
        raise typer.Exit(1)
