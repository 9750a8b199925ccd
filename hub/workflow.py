"""Workflow definitions: YAML validated with pydantic, errors reported with file and line.

A workflow is a DAG of steps. Each step names an executor (`uses`), its inputs (`with`), the steps it needs, an
optional `when` condition, placement rules, resources, a timeout, a retry policy, whether it may be migrated to
another node while running, an optional saga compensation, and optionally `for_each` (one instance per node
matching a selector).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from yaml.constructor import SafeConstructor

from protocols import is_valid_id

from .conditions import Condition, ConditionError, parse_condition
from .limits import (DEFAULT_LIMITS, Limits, Problem, data_problem, event_problem, over, text_problem, tree_problem,
                     yaml_loader)

SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
_M = TypeVar("_M", bound=BaseModel)
STEP_ID = r"^[A-Za-z0-9_-]{1,48}$"  # no dots: for_each instances are named <step>.<node>


class WorkflowError(ValueError):
    """A workflow file that cannot be used; `problems` lists (location, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{where}: {what}" for where, what in problems))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Selector(_Model):
    """Which nodes qualify: all given labels equal, the profile (if given), every capability present."""

    labels: dict[str, str] = Field(default_factory=dict)
    profile: str | None = None
    capabilities: list[str] = Field(default_factory=list)
    nodes: list[str] = Field(default_factory=list, description="explicit node ids (any of them)")

    def matches(self, node_id: str, labels: dict[str, str], profile: str, caps: set[str] | frozenset[str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.labels.items())
                and (self.profile is None or self.profile == profile)
                and all(c in caps for c in self.capabilities)
                and (not self.nodes or node_id in self.nodes))


class Placement(_Model):
    selector: Selector = Field(default_factory=Selector)
    strategy: Literal["spread", "bin-pack"] = "spread"
    affinity: str | None = Field(None, description="run on the node that ran this step")
    anti_affinity: list[str] = Field(default_factory=list, description="avoid the nodes that ran these steps")
    priority: int = 0


class Resources(_Model):
    cores: float = Field(0.0, ge=0)
    memory_mb: float = Field(0.0, ge=0)
    disk_gb: float = Field(0.0, ge=0)


class Retry(_Model):
    max_attempts: int = Field(3, ge=1, le=100)
    initial: float = Field(5.0, gt=0, description="seconds before the first retry")
    multiplier: float = Field(2.0, ge=1)
    max: float = Field(300.0, gt=0, description="cap on the delay, seconds")
    jitter: float = Field(0.2, ge=0, le=1)

    def delay(self, failures: int, unit: float) -> float:
        """Delay after `failures` failures; `unit` in [0, 1) is the deterministic jitter draw."""
        base = min(self.max, self.initial * self.multiplier ** max(0, failures - 1))
        return max(0.0, base * (1 + self.jitter * (2 * unit - 1)))


class Compensation(_Model):
    uses: str
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    timeout: float = Field(300.0, gt=0)


class Step(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: str = Field(pattern=STEP_ID)
    uses: str
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    needs: list[str] = Field(default_factory=list)
    join: Literal["all", "any"] = Field("all", description="all: every need succeeded; any: at least one did")
    when: str | None = None
    placement: Placement = Field(default_factory=Placement)
    resources: Resources = Field(default_factory=Resources)
    timeout: float = Field(300.0, gt=0, description="seconds per attempt")
    retry: Retry = Field(default_factory=Retry)
    migratable: bool = False
    compensate: Compensation | None = None
    for_each: Selector | None = None

    @field_validator("when")
    @classmethod
    def _condition(cls, value: str | None) -> str | None:
        if value is not None:
            parse_condition(value)
        return value

    def condition(self) -> Condition | None:
        return parse_condition(self.when) if self.when else None


class Input(_Model):
    type: Literal["string", "number", "integer", "boolean", "object", "array"] = "string"
    default: Any = None
    required: bool = False


class Workflow(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    version: str = "0.1.0"
    description: str = ""
    inputs: dict[str, Input] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1)
    timeout: float | None = Field(None, gt=0, description="deadline for the whole run, seconds")
    priority: int = 0

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not SEMVER.match(value):
            raise ValueError(f"version {value!r} is not semantic (MAJOR.MINOR.PATCH)")
        return value

    @model_validator(mode="after")
    def _graph(self) -> Workflow:
        problems = graph_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def step(self, step_id: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def resolve_inputs(self, given: dict[str, Any]) -> dict[str, Any]:
        unknown = set(given) - set(self.inputs)
        if unknown:
            raise WorkflowError([("inputs", f"unknown input(s): {', '.join(sorted(unknown))}")])
        out = {}
        types = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "object": dict,
                 "array": list}
        for name, spec in self.inputs.items():
            if name in given:
                value = given[name]
            elif spec.required:
                raise WorkflowError([(f"inputs.{name}", "is required")])
            else:
                value = spec.default
            if value is not None and (not isinstance(value, types[spec.type]) or
                                      (spec.type in ("number", "integer") and isinstance(value, bool))):
                raise WorkflowError([(f"inputs.{name}", f"expected {spec.type}, got {type(value).__name__}")])
            out[name] = value
        return out


def graph_problems(workflow: Workflow) -> list[str]:
    """Unknown references, duplicate ids and cycles (with the loop spelled out)."""
    problems = []
    ids = [s.id for s in workflow.steps]
    known = set(ids)
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"step id {dup!r} is used twice")
    for step in workflow.steps:
        for need in step.needs:
            if need not in known:
                problems.append(f"step {step.id!r} needs unknown step {need!r}")
        if step.placement.affinity and step.placement.affinity not in known:
            problems.append(f"step {step.id!r}: affinity to unknown step {step.placement.affinity!r}")
        for other in step.placement.anti_affinity:
            if other not in known:
                problems.append(f"step {step.id!r}: anti_affinity to unknown step {other!r}")
        if step.when:
            condition = parse_condition(step.when)
            ancestors = _ancestors(workflow, step.id)
            for ref in sorted(condition.step_refs - ancestors):
                problems.append(f"step {step.id!r}: condition reads steps.{ref}, which is not among its needs "
                                f"(direct or indirect)")
            for ref in sorted(condition.input_refs - set(workflow.inputs)):
                problems.append(f"step {step.id!r}: condition reads inputs.{ref}, which is not declared")
    cycle = find_cycle(workflow)
    if cycle:
        problems.append("steps form a cycle: " + " -> ".join(cycle))
    return problems


def _ancestors(workflow: Workflow, step_id: str) -> set[str]:
    needs = {s.id: s.needs for s in workflow.steps}
    seen: set[str] = set()
    stack = list(needs.get(step_id, []))
    while stack:
        current = stack.pop()
        if current not in seen and current in needs:
            seen.add(current)
            stack.extend(needs[current])
    return seen


def find_cycle(workflow: Workflow) -> list[str] | None:
    """The first cycle of needs, spelled out; iterative, as a chain of a thousand steps is a legal workflow."""
    needs = {s.id: list(s.needs) for s in workflow.steps}
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in needs:
        if start in state:
            continue
        state[start] = 1
        path, pending = [start], [iter(needs[start])]
        while pending:
            nxt = next(pending[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                pending.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt in needs and nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                pending.append(iter(needs[nxt]))
    return None


def topological_order(workflow: Workflow) -> list[str]:
    """Every step after the steps it needs (depth-first post-order, iterative)."""
    order: list[str] = []
    done: set[str] = set()
    needs = {s.id: s.needs for s in workflow.steps}
    for step in workflow.steps:
        if step.id in done:
            continue
        done.add(step.id)
        stack = [(step.id, iter(needs[step.id]))]
        while stack:
            node, pending = stack[-1]
            nxt = next(pending, None)
            if nxt is None:
                order.append(node)
                stack.pop()
            elif nxt not in done:
                done.add(nxt)
                stack.append((nxt, iter(needs[nxt])))
    return order


# ---------------------------------------------------------------------------------------------------------------
# Loading YAML with line numbers.


def _locate(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Follow a pydantic error location through the composed YAML tree; returns a 1-based line."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                key = next((k for k, v in node.value if getattr(k, "value", None) == part), None)
                return key.start_mark.line + 1 if key is not None else line
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def load_workflow_text(text: str, source: str = "<workflow>", limits: Limits = DEFAULT_LIMITS) -> Workflow:
    return load_model_text(Workflow, text, source, "a workflow file must be a YAML mapping (name, version, steps, ...)",
                           limits)


def _refuse(problem: Problem | None) -> None:
    if problem is not None:
        raise WorkflowError([problem])


def load_model_text(model: type[_M], text: str, source: str, not_a_mapping: str,
                    limits: Limits = DEFAULT_LIMITS) -> _M:
    """Parse and validate YAML within `limits` (see limits.py: each stage is bounded before it runs).

    CPU-bound for up to a second on a large document: callers on the hub's event loop run it in a thread.
    """
    workflow = issubclass(model, Workflow)
    _refuse(text_problem(text, source, limits))
    try:
        _refuse(event_problem(text, source, limits, workflow))
        tree = yaml.compose(text, Loader=yaml_loader())
        _refuse(tree_problem(tree, source, limits, workflow))
        # Construct from the tree already composed and measured, rather than parse the text again.
        data = SafeConstructor().construct_document(tree) if tree is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise WorkflowError([(where, f"not valid YAML: {getattr(exc, 'problem', None) or exc}")]) from None
    if not isinstance(data, dict):
        raise WorkflowError([(source, not_a_mapping)])
    return model_from_data(model, data, source, tree)


def workflow_from_data(data: Any, source: str = "<workflow>", tree: yaml.Node | None = None) -> Workflow:
    """Validate an object as a workflow, without limits: for what was bounded before (the journal's own records)."""
    return model_from_data(Workflow, data, source, tree)


def workflow_from_object(data: Any, source: str = "<workflow>", limits: Limits = DEFAULT_LIMITS) -> Workflow:
    """A workflow sent as a JSON object: the same steps, depth and size limits as YAML, then validation."""
    _refuse(data_problem(data, source, limits, workflow=True))
    return model_from_data(Workflow, data, source)


def model_from_data(model: type[_M], data: Any, source: str, tree: yaml.Node | None = None) -> _M:
    """Validate `data` as `model`; errors become one WorkflowError with file:line per problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            line = _locate(tree, loc)
            path = ".".join(str(p) for p in loc) or "workflow"
            message = error["msg"].removeprefix("Value error, ")
            problems.append((f"{source}:{line}" if line else source, f"{path}: {message}"))
        raise WorkflowError(problems) from None
    except ConditionError as exc:
        raise WorkflowError([(source, str(exc))]) from None


def read_bounded(path: Path, limits: Limits = DEFAULT_LIMITS) -> str:
    """A workflow file's text, reading no more than the size limit allows."""
    try:
        with open(path, "rb") as file:
            raw = file.read(limits.workflow_bytes + 1)
            size = os.fstat(file.fileno()).st_size
    except OSError as exc:
        raise WorkflowError([(str(path), f"cannot read: {exc.strerror}")]) from None
    if len(raw) > limits.workflow_bytes:
        raise WorkflowError([(str(path), f"{max(size, len(raw))} bytes of YAML, {over(limits, 'workflow_bytes')}")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WorkflowError([(str(path), f"not UTF-8 text (byte {exc.start})")]) from None


def load_workflow(path: Path, limits: Limits = DEFAULT_LIMITS) -> Workflow:
    return load_workflow_text(read_bounded(path, limits), str(path), limits)


def instance_id(step_id: str, node_id: str) -> str:
    """The step id of one for_each instance."""
    return f"{step_id}.{node_id}"


assert is_valid_id(instance_id("a" * 48, "n" * 15))
