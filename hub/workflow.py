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
from pydantic import (BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, ValidationError, field_validator,
                      model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError
from yaml.constructor import ConstructorError, SafeConstructor

from protocols import FleetflowError, is_valid_id

from .conditions import Condition, ConditionError, parse_condition
from .limits import (DEFAULT_LIMITS, Limits, Problem, data_problem, event_problem, over, text_problem, tree_problem,
                     yaml_loader)

SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
_M = TypeVar("_M", bound=BaseModel)
STEP_ID = r"^[A-Za-z0-9_-]{1,48}$"  # no dots: for_each instances are named <step>.<node>


class WorkflowError(FleetflowError, ValueError):
    """A workflow file that cannot be used; `problems` lists (location, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{where}: {what}" for where, what in problems))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Selector(_Model):
    """Which nodes qualify: all given labels equal, the profile (if given), every capability present."""

    labels: dict[str, str] = Field(default_factory=dict,
                                   description="labels the node must carry, each with exactly this value")
    profile: str | None = Field(None, description="the node's firmware profile must be this one")
    capabilities: list[str] = Field(default_factory=list,
                                    description="capabilities the node must offer (its profile's, such as gpio, "
                                                "and its enabled executors, such as shell)")
    nodes: list[str] = Field(default_factory=list, description="explicit node ids (any of them)")

    def matches(self, node_id: str, labels: dict[str, str], profile: str, caps: set[str] | frozenset[str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.labels.items())
                and (self.profile is None or self.profile == profile)
                and all(c in caps for c in self.capabilities)
                and (not self.nodes or node_id in self.nodes))


class Placement(_Model):
    selector: Selector = Field(default_factory=Selector, description="which nodes may run the step")
    strategy: Literal["spread", "bin-pack"] = Field(
        "spread", description="spread: the least loaded fitting node; bin-pack: the most loaded one that still fits")
    affinity: str | None = Field(None, description="run on the node that ran this step")
    anti_affinity: list[str] = Field(default_factory=list, description="avoid the nodes that ran these steps")
    priority: int = Field(0, description="added to the workflow's priority; higher is placed first")


class Resources(_Model):
    cores: float = Field(0.0, ge=0, description="CPU cores the step holds on its node while it runs")
    memory_mb: float = Field(0.0, ge=0, description="memory in MB the step holds while it runs")
    disk_gb: float = Field(0.0, ge=0, description="disk in GB the step holds while it runs")


class Retry(_Model):
    max_attempts: int = Field(3, ge=1, le=100, description="attempts in all, the first included (1: no retry)")
    initial: float = Field(5.0, gt=0, description="seconds before the first retry")
    multiplier: float = Field(2.0, ge=1, description="each retry waits this many times longer than the one before")
    max: float = Field(300.0, gt=0, description="cap on the delay, seconds")
    jitter: float = Field(0.2, ge=0, le=1, description="each delay varies by up to this fraction either way")

    def delay(self, failures: int, unit: float) -> float:
        """Delay after `failures` failures; `unit` in [0, 1) is the deterministic jitter draw."""
        base = min(self.max, self.initial * self.multiplier ** max(0, failures - 1))
        return max(0.0, base * (1 + self.jitter * (2 * unit - 1)))


class Compensation(_Model):
    uses: str = Field(description="executor that undoes the step")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="the executor's arguments")
    timeout: float = Field(300.0, gt=0, description="seconds per attempt")


class Step(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: str = Field(pattern=STEP_ID, description="unique within the workflow: letters, digits, _ and -")
    uses: str = Field(description="executor: noop, sleep, echo, fail, shell, python, or one a node offers")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with",
                                  description="the executor's arguments, sent to the node as they are")
    needs: list[str] = Field(default_factory=list, description="steps that must finish before this one starts")
    join: Literal["all", "any"] = Field("all", description="all: every need succeeded; any: at least one did")
    when: str | None = Field(None, description="condition over inputs and earlier outputs; false skips the step")
    placement: Placement = Field(default_factory=Placement, description="where the step may run")
    resources: Resources = Field(default_factory=Resources, description="what the step holds on its node")
    timeout: float = Field(300.0, gt=0, description="seconds per attempt")
    retry: Retry = Field(default_factory=Retry, description="attempts and backoff after a failure")
    migratable: bool = Field(False, description="may move to another node while running (it can start over)")
    compensate: Compensation | None = Field(None, description="what undoes this step if a later step fails (saga)")
    for_each: Selector | None = Field(None, description="one instance of the step on every online node matching "
                                                        "this selector")

    @field_validator("when")
    @classmethod
    def _condition(cls, value: str | None) -> str | None:
        if value is not None:
            parse_condition(value)
        return value

    def condition(self) -> Condition | None:
        return parse_condition(self.when) if self.when else None


class Input(_Model):
    type: Literal["string", "number", "integer", "boolean", "object", "array"] = Field(
        "string", description="JSON type the value must have")
    default: Any = Field(None, description="value when the run gives none")
    required: bool = Field(False, description="a run must give a value")


class Workflow(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="letters, digits, _, . and -")
    version: str = Field("0.1.0", description="semantic version, MAJOR.MINOR.PATCH")
    description: str = Field("", description="free text for people")
    inputs: dict[str, Input] = Field(default_factory=dict, description="values a run is given, by name")
    steps: list[Step] = Field(min_length=1, description="the steps; order does not matter, needs do")
    timeout: float | None = Field(None, gt=0, description="deadline for the whole run, seconds")
    priority: int = Field(0, description="higher is placed first (with each step's placement.priority)")
    migrates_from: list[str] = Field(
        default_factory=list, description="deployments: the versions a node may move from to this one across a minor "
                                          "or major change, as specifier sets such as \">=1.2,<2\" (a patch needs none)")

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not SEMVER.match(value):
            raise ValueError(f"version {value!r} is not semantic (MAJOR.MINOR.PATCH)")
        return value

    @field_validator("migrates_from")
    @classmethod
    def _specifiers(cls, value: list[str]) -> list[str]:
        from .deployments.versions import parse_specifiers

        for text in value:
            parse_specifiers(text)  # a VersionError is a ValueError: reported with the field's path and line
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _graph(cls, data: Any, handler: ModelWrapValidatorHandler[Workflow]) -> Workflow:
        """References, duplicates and cycles, checked on the raw data so they are reported with every other
        problem of the file at once (an after-validator runs only when all fields are valid)."""
        graph = [InitErrorDetails(type=PydanticCustomError("graph", "{message}", {"message": message}), loc=loc,
                                  input=None) for loc, message in graph_problems(data)]
        try:
            workflow = handler(data)
        except ValidationError as exc:
            if not graph:
                raise
            # errors() gives each error's type, loc, input and ctx: all that InitErrorDetails needs to rebuild it.
            raise ValidationError.from_exception_data(cls.__name__, [*exc.errors(), *graph]) from None  # type: ignore[list-item]
        if graph:
            raise ValidationError.from_exception_data(cls.__name__, graph)
        return workflow

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
        types: dict[str, type | tuple[type, ...]] = {"string": str, "number": (int, float), "integer": int,
                                                     "boolean": bool, "object": dict, "array": list}
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


Loc = tuple[str | int, ...]


def _strings(value: Any) -> list[tuple[int, str]]:
    return [(i, v) for i, v in enumerate(value) if isinstance(v, str)] if isinstance(value, list) else []


def graph_problems(data: Any) -> list[tuple[Loc, str]]:
    """Unknown references, duplicate ids and cycles (with the loop spelled out), each with the location of the
    reference. Reads the raw mapping and skips what is malformed: the field checks report that."""
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
        return []
    steps = [(i, s) for i, s in enumerate(data["steps"]) if isinstance(s, dict) and isinstance(s.get("id"), str)]
    needs = {s["id"]: [n for _, n in _strings(s.get("needs"))] for _, s in steps}
    inputs = set(data["inputs"]) if isinstance(data.get("inputs"), dict) else set()
    problems: list[tuple[Loc, str]] = []
    seen: set[str] = set()
    for i, step in steps:
        sid = step["id"]
        if sid in seen:
            problems.append((("steps", i, "id"), f"step id {sid!r} is used twice"))
        seen.add(sid)
        for j, need in _strings(step.get("needs")):
            if need not in needs:
                problems.append((("steps", i, "needs", j), f"step {sid!r} needs unknown step {need!r}"))
        placement: dict[str, Any] = step["placement"] if isinstance(step.get("placement"), dict) else {}
        affinity = placement.get("affinity")
        if isinstance(affinity, str) and affinity not in needs:
            problems.append((("steps", i, "placement", "affinity"),
                             f"step {sid!r}: affinity to unknown step {affinity!r}"))
        for j, other in _strings(placement.get("anti_affinity")):
            if other not in needs:
                problems.append((("steps", i, "placement", "anti_affinity", j),
                                 f"step {sid!r}: anti_affinity to unknown step {other!r}"))
        when = step.get("when")
        try:
            condition = parse_condition(when) if isinstance(when, str) else None
        except ConditionError:
            condition = None  # the field check reports it
        if condition is not None:
            ancestors = _ancestors(needs, sid)
            for ref in sorted(condition.step_refs - ancestors):
                problems.append((("steps", i, "when"), f"step {sid!r}: condition reads steps.{ref}, which is not "
                                                       f"among its needs (direct or indirect)"))
            for ref in sorted(condition.input_refs - inputs):
                problems.append((("steps", i, "when"),
                                 f"step {sid!r}: condition reads inputs.{ref}, which is not declared"))
    cycle = find_cycle(needs)
    if cycle:
        first = next(i for i, s in steps if s["id"] == cycle[0])
        problems.append((("steps", first, "needs"), "steps form a cycle: " + " -> ".join(cycle)))
    return problems


def _ancestors(needs: dict[str, list[str]], step_id: str) -> set[str]:
    seen: set[str] = set()
    stack = list(needs.get(step_id, []))
    while stack:
        current = stack.pop()
        if current not in seen and current in needs:
            seen.add(current)
            stack.extend(needs[current])
    return seen


def find_cycle(needs: dict[str, list[str]]) -> list[str] | None:
    """The first cycle of needs (step id -> the ids it needs), spelled out; iterative, as a chain of a thousand
    steps is a legal workflow."""
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


def line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Follow a location (a pydantic error's, or a path such as ("steps", 2, "uses")) through the composed YAML
    tree; returns a 1-based line: the deepest part that exists, so a missing key points at its parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
            if pair is None:
                break
            # The key's line: a block value starts on the line after it, and the key is what a person looks for.
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


NOT_A_WORKFLOW = "a workflow file must be a YAML mapping (name, version, steps, ...)"


def load_workflow_text(text: str, source: str = "<workflow>", limits: Limits = DEFAULT_LIMITS) -> Workflow:
    return load_model_text(Workflow, text, source, NOT_A_WORKFLOW, limits)


def _refuse(problem: Problem | None) -> None:
    if problem is not None:
        raise WorkflowError([problem])


class _Constructor(SafeConstructor):
    """PyYAML's safe constructor, with what some of its scalar constructors let out instead of a ConstructorError
    (int() of 5000 digits, a `!!timestamp` that does not match) turned into one, with the node's line."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, LookupError, AttributeError, OverflowError):  # LookupError: `!!bool maybe`
            value = str(node.value)[:60] if isinstance(node, yaml.ScalarNode) else node.id
            raise ConstructorError(None, None, f"{value!r} is not a valid {node.tag.rsplit(':', 1)[-1]}",
                                   node.start_mark) from None


def parse_yaml(text: str, source: str, limits: Limits = DEFAULT_LIMITS, workflow: bool = False
               ) -> tuple[Any, yaml.Node | None]:
    """The data of a YAML document and its composed tree (for lines), parsed within `limits` (see limits.py: each
    stage is bounded before it runs). `workflow` also counts the root mapping's `steps`.

    CPU-bound for up to a second on a large document: callers on the hub's event loop run it in a thread.
    """
    _refuse(text_problem(text, source, limits))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (from a JSON string): libyaml cannot even be handed it
        raise WorkflowError([(source, f"not valid YAML: a lone surrogate at character {exc.start} is not Unicode")]
                            ) from None
    try:
        _refuse(event_problem(text, source, limits, workflow))
        tree = yaml.compose(text, Loader=yaml_loader())
        _refuse(tree_problem(tree, source, limits, workflow))
        # Construct from the tree already composed and measured, rather than parse the text again.
        data = _Constructor().construct_document(tree) if tree is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise WorkflowError([(where, f"not valid YAML: {getattr(exc, 'problem', None) or exc}")]) from None
    return data, tree


def load_model_text(model: type[_M], text: str, source: str, not_a_mapping: str,
                    limits: Limits = DEFAULT_LIMITS) -> _M:
    """Parse and validate YAML within `limits`; every problem is reported at once, with its line."""
    return load_model_tree(model, text, source, not_a_mapping, limits)[0]


def load_model_tree(model: type[_M], text: str, source: str, not_a_mapping: str,
                    limits: Limits = DEFAULT_LIMITS) -> tuple[_M, yaml.Node | None]:
    """As `load_model_text`, also returning the YAML tree, so later checks can name lines (`line_of`)."""
    data, tree = parse_yaml(text, source, limits, issubclass(model, Workflow))
    if not isinstance(data, dict):
        raise WorkflowError([(source, not_a_mapping)])
    return model_from_data(model, data, source, tree), tree


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
        located = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            line = line_of(tree, loc)
            path = ".".join(str(p) for p in loc) or "workflow"
            message = error["msg"].removeprefix("Value error, ")
            located.append((line or 0, f"{source}:{line}" if line else source, f"{path}: {message}"))
        # Every problem at once, in the order of the file.
        raise WorkflowError([(where, what) for _, where, what in sorted(located, key=lambda p: p[0])]) from None
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


def load_workflow_tree(path: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[Workflow, yaml.Node | None]:
    """A workflow file and its YAML tree, for checks that report lines (`fleetflow validate`)."""
    return load_model_tree(Workflow, read_bounded(path, limits), str(path), NOT_A_WORKFLOW, limits)


def instance_id(step_id: str, node_id: str) -> str:
    """The step id of one for_each instance."""
    return f"{step_id}.{node_id}"


assert is_valid_id(instance_id("a" * 48, "n" * 15))
