"""`fleetflow validate`: everything that can be known about a workflow (or an adaptation policy) before it runs.

- schema, references and cycles, every problem of the file at once with its line, from `workflow.load_workflow_tree`;
- executors: a step must use a builtin, `shell`, `python`, or one an inventory node offers;
- control flow: a bounded exploration of every reachable marking of the workflow's net (each step pending, done,
  skipped or failed; `when` branches both ways unless constant) proves termination and finds steps that can never
  run and markings that are stuck before the end;
- placement: some firmware profile (or, with --fleet, some inventory node) must match each step's selector,
  offer its executor and hold its resources;
- time: the run's timeout against the longest path of step timeouts (with and without retries).

`--policy FILE` checks a hub adaptation policy with the hub's own model (`health.Policy`), as `hub run --policy`
will read it.

An inventory (`--fleet`) is a YAML or JSON list of nodes shaped as `fleetflow nodes list --json` prints them, so the
live fleet's listing is an inventory as it is: `id`, and optionally `profile`, `labels`, `caps` and `resources`; other
keys are ignored. A node offers what its agent announces in its birth: the builtin executors always, its profile's
capabilities (and labels, resources) when that profile is known here, and what `caps` lists. `shell` and `python`
run only on agents whose config enables them, and an agent that enables one announces it: so a node enables them by
listing them in `caps`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, RootModel

from .limits import DEFAULT_LIMITS, Limits
from .workflow import (Step, Workflow, WorkflowError, line_of, load_model_tree, load_workflow_tree, model_from_data,
                       parse_yaml, read_bounded, topological_order)

if TYPE_CHECKING:
    from .health import Policy

BUILTIN_EXECUTORS = frozenset({"noop", "sleep", "echo", "fail"})
# Executors an agent runs only when its config enables them, each with the config table that does.
GATED_TABLES = {"shell": "shell", "python": "python", "artifact.install": "artifacts", "artifact.rollback": "artifacts",
                "service.restart": "service", "health.check": "health"}
GATED_EXECUTORS = frozenset(GATED_TABLES)
MAX_MARKINGS = 10_000
# An inventory may be the whole fleet's `nodes list --json` (with each node's history): larger than a workflow.
INVENTORY_LIMITS = Limits(workflow_bytes=32 << 20, nodes=5_000_000)

Loc = tuple[Any, ...]


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    source: str = ""                                        # the file checked
    tree: yaml.Node | None = field(default=None, repr=False)  # its YAML, for lines
    where: dict[str, str] = field(default_factory=dict)     # a message's FILE:LINE, where it has one

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, message: str, loc: Loc = ()) -> None:
        self.errors.append(message)
        self._place(message, loc, None)

    def warn(self, message: str, loc: Loc = (), where: str | None = None) -> None:
        """A warning about `loc` in the file checked, or about `where` (FILE:LINE) in another one."""
        self.warnings.append(message)
        self._place(message, loc, where)

    def _place(self, message: str, loc: Loc, where: str | None) -> None:
        line = line_of(self.tree, loc) if loc and where is None else None
        where = where or (f"{self.source}:{line}" if line else None)
        if where:
            self.where.setdefault(message, where)

    def located(self, message: str, severity: str = "") -> str:
        """`FILE:LINE: [severity: ]message`, as `fleetflow validate` prints every problem."""
        return f"{self.where.get(message, self.source)}: " + (f"{severity}: " if severity else "") + message


@dataclass(frozen=True)
class Target:
    """A place a step could run: a firmware profile or an inventory node."""

    name: str
    labels: dict[str, str]
    profile: str
    caps: frozenset[str]
    resources: dict[str, float]


def profile_targets() -> list[Target]:
    from agent.runtime.profiles import available, parse_profile

    out = []
    for name, path in sorted(available().items()):
        p = parse_profile(path)
        out.append(Target(f"profile {name}", dict(p.labels), p.name,
                          frozenset(p.capabilities) | BUILTIN_EXECUTORS | GATED_EXECUTORS, p.resources()))
    return out


class InventoryNode(BaseModel):
    """One node of an inventory. Extra keys are ignored, so `fleetflow nodes list --json` is an inventory."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="the node id")
    profile: str = Field("", description="firmware profile; adds its capabilities, labels and resources")
    labels: dict[str, str] = Field(default_factory=dict, description="labels (over the profile's)")
    caps: list[str] = Field(default_factory=list, description="capabilities and executors beyond the builtins "
                                                              "and the profile's; shell and python when enabled")
    resources: dict[str, float] = Field(default_factory=dict, description="cores, memory_mb, disk_gb (over the "
                                                                          "profile's)")


class Inventory(RootModel[list[InventoryNode]]):
    pass


def inventory_targets(path: Path, report: Report | None = None) -> list[Target]:
    """The nodes of an inventory file as targets (see the module's docstring for the format)."""
    from agent.runtime.profiles import ProfileError, available, parse_profile

    source = str(path)
    data, tree = parse_yaml(read_bounded(path, INVENTORY_LIMITS), source, INVENTORY_LIMITS)
    if not isinstance(data, list):
        raise WorkflowError([(source, "an inventory is a list of nodes, each with at least an id (as `fleetflow "
                                      "nodes list --json` prints)")])
    nodes = model_from_data(Inventory, data, source, tree).root
    seen: set[str] = set()
    problems = []
    for i, node in enumerate(nodes):
        if node.id in seen:
            problems.append((f"{source}:{line_of(tree, (i, 'id'))}", f"node id {node.id!r} is listed twice"))
        seen.add(node.id)
    if problems:
        raise WorkflowError(problems)
    profiles = available()
    out = []
    for i, node in enumerate(nodes):
        caps, labels, resources = set(node.caps) | BUILTIN_EXECUTORS, dict(node.labels), dict(node.resources)
        if node.profile in profiles:
            try:
                known = parse_profile(profiles[node.profile])
            except ProfileError as exc:
                raise WorkflowError([(f"{source}:{line_of(tree, (i, 'profile'))}", str(exc))]) from None
            caps |= set(known.capabilities)
            labels = {**known.labels, **labels}
            resources = {**known.resources(), **resources}
        elif node.profile and report is not None:
            report.warn(f"node {node.id!r}: profile {node.profile!r} is not known here; only its own caps, labels "
                        f"and resources count", where=f"{source}:{line_of(tree, (i, 'profile'))}")
        out.append(Target(f"node {node.id}", labels, node.profile, frozenset(caps), resources))
    return out


def _index(workflow: Workflow) -> dict[str, int]:
    return {s.id: i for i, s in enumerate(workflow.steps)}


def check_placement(workflow: Workflow, targets: list[Target], report: Report, inventory: bool = False) -> None:
    for i, step in enumerate(workflow.steps):
        selector = step.for_each or step.placement.selector
        res = step.resources
        fitting = [t for t in targets
                   if selector.matches(t.name.split(" ", 1)[1], t.labels, t.profile, t.caps) and step.uses in t.caps
                   and all(not need or t.resources.get(name, float("inf")) >= need
                           for name, need in (("cores", res.cores), ("memory_mb", res.memory_mb),
                                              ("disk_gb", res.disk_gb)))]
        if fitting:
            report.facts.setdefault("placement", {})[step.id] = [t.name for t in fitting]
        elif inventory and step.uses in GATED_EXECUTORS and not any(step.uses in t.caps for t in targets):
            report.error(f"step {step.id!r}: no node in the inventory enables {step.uses!r} (enable it in the "
                         f"agent's config, [{GATED_TABLES[step.uses]}] enabled = true, and list {step.uses!r} in the "
                         f"node's caps)",
                         ("steps", i, "uses"))
        else:
            report.error(f"step {step.id!r}: no known profile or node can run it (selector, executor "
                         f"{step.uses!r}, resources)", ("steps", i))


def check_executors(workflow: Workflow, targets: list[Target], report: Report, inventory: bool = False) -> None:
    offered = set().union(*(t.caps for t in targets)) if targets else set()
    for i, step in enumerate(workflow.steps):
        uses_at: list[tuple[str, str, Loc]] = [(step.uses, step.id, ("steps", i, "uses"))]
        if step.compensate:
            uses_at.append((step.compensate.uses, f"{step.id}.compensate", ("steps", i, "compensate", "uses")))
        for uses, where, loc in uses_at:
            if uses not in BUILTIN_EXECUTORS | GATED_EXECUTORS | offered:
                report.error(f"step {where!r}: unknown executor {uses!r}", loc)
            elif uses in GATED_EXECUTORS and not inventory:
                report.warn(f"step {where!r} uses {uses!r}: agents run it only where their config enables it",
                            loc)


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
                    report.warn(f"control flow has over {MAX_MARKINGS} markings; the check stopped there")
                    frontier = []
                    break
                seen.add(nxt)
                frontier.append(nxt)
    report.facts["markings"] = len(seen)
    report.facts["terminal_markings"] = final
    where = _index(workflow)
    for marking in stuck[:3]:
        waiting = [sid for sid in order if marking[index[sid]] == "P"]
        report.error(f"deadlock: the run can stop with {', '.join(waiting)} never started",
                     ("steps", where[waiting[0]]))
    for sid in order:
        if sid not in ran:
            report.error(f"step {sid!r} can never run (its condition or its needs always skip it)",
                         ("steps", where[sid], "when" if steps[sid].when else "needs"))
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
            report.error(f"timeout {workflow.timeout:g} s is shorter than the longest path of step timeouts "
                         f"({path:g} s)", ("timeout",))
        elif workflow.timeout < path_retry:
            report.warn(f"timeout {workflow.timeout:g} s is shorter than the longest path with every retry "
                        f"({path_retry:g} s)", ("timeout",))


def validate(path: Path, inventory: Path | None = None) -> tuple[Workflow, Report]:
    """Load (every schema and reference problem at once, raised as WorkflowError), then run every check."""
    workflow, tree = load_workflow_tree(path)
    report = Report(source=str(path), tree=tree)
    targets = inventory_targets(inventory, report) if inventory else profile_targets()
    check_executors(workflow, targets, report, inventory is not None)
    explore(workflow, report)
    check_placement(workflow, targets, report, inventory is not None)
    check_time(workflow, report)
    return workflow, report


def validate_policy(path: Path) -> tuple[Policy, Report]:
    """A hub adaptation policy, read as `hub run --policy` reads it (`health.Policy`), with every problem at once."""
    from agent.runtime.profiles import available

    from .health import Policy

    policy, tree = load_model_tree(Policy, read_bounded(path, DEFAULT_LIMITS), str(path),
                                   "a hub policy file must be a YAML mapping (duration, thresholds, triggers, ...)")
    report = Report(source=str(path), tree=tree)
    known = available()
    for profile in policy.profiles:
        if profile not in known:  # most likely a typo: the overrides would never apply
            report.warn(f"profiles.{profile}: no firmware profile {profile!r} is known here (known: "
                        f"{', '.join(sorted(known)) or 'none'})", ("profiles", profile))
    report.facts.update(triggers=len(policy.triggers), profiles=len(policy.profiles))
    return policy, report


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


def validate_command(workflow: Optional[Path] = typer.Argument(None, help="Workflow YAML file"),
                     fleet: Optional[Path] = typer.Option(None, "--fleet", help="Inventory file: a YAML/JSON list of "
                                                                                "nodes, as `nodes list --json` prints"),
                     policy: Optional[Path] = typer.Option(None, "--policy", help="Check an adaptation policy file "
                                                                                  "(hub run --policy) instead"),
                     as_json: bool = typer.Option(False, "--json", help="Print JSON"),
                     dot: bool = typer.Option(False, "--dot", help="Print the graph for Graphviz")) -> None:
    """Check a workflow (schema, references, cycles, deadlocks, placement, deadline), or a policy with --policy.
    Every problem is printed at once as FILE:LINE: message; exit 1 if any is an error."""
    from agent.runtime.console import fail

    if policy is not None and (workflow is not None or fleet is not None or dot):
        fail("--policy checks a policy file alone: give it without a workflow, --fleet or --dot", 2)
    if policy is None and workflow is None:
        fail("give a workflow file (fleetflow validate WF.yaml) or --policy FILE", 2)
    checked: Workflow | Policy
    try:
        if policy is not None:
            source, (checked, report) = policy, validate_policy(policy)
        else:
            assert workflow is not None
            source, (checked, report) = workflow, validate(workflow, fleet)
    except WorkflowError as exc:
        if as_json:
            typer.echo(json.dumps({"ok": False, "errors": [f"{w}: {m}" for w, m in exc.problems], "warnings": []}))
        else:
            for where, what in exc.problems:
                typer.echo(f"{where}: {what}", err=True)
        raise typer.Exit(1)
    errors = [report.located(e, "" if as_json else "error") for e in report.errors]
    warnings = [report.located(w, "" if as_json else "warning") for w in report.warnings]
    if dot and isinstance(checked, Workflow):
        typer.echo(to_dot(checked))
    elif as_json:
        typer.echo(json.dumps({"ok": report.ok, "errors": errors, "warnings": warnings, **report.facts}))
    else:
        for line in errors + warnings:
            typer.echo(line, err=True)
        if report.ok and isinstance(checked, Workflow):
            typer.echo(f"{source}: ok ({checked.name} {checked.version}, {len(checked.steps)} steps, "
                       f"{report.facts.get('markings')} markings explored, longest path "
                       f"{report.facts.get('longest_path_s'):g} s)")
        elif report.ok:
            typer.echo(f"{source}: ok (adaptation policy, {report.facts['triggers']} triggers, "
                       f"{report.facts['profiles']} profile overrides)")
    if not report.ok:
        raise typer.Exit(1)
