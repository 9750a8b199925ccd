"""Limits on what one request or one workflow may cost, checked before the expensive step that would pay for it.

A workflow reaches the hub as YAML text or as a JSON object, and every stage of loading it can be made to cost far
more than its size: a 700-byte YAML of nested aliases expands to millions of nodes ("billion laughs"), a deeply
nested document exhausts recursive code (PyYAML's composer and constructor, pydantic, the journal's encoder), and
100,000 steps keep validation busy for minutes. So each stage is bounded by a cheaper one before it runs:

1. the text's size, before anything reads it;
2. nesting depth, alias count and steps, from an iterative pass over the parser's events (`yaml.parse`), before
   the recursive `yaml.compose` builds anything;
3. the steps again (an alias may stand for them), and the size and depth with every alias expanded (an alias at
   depth 30 of an anchor 30 deep is 60 deep), from one memoised pass over the composed graph, before construction
   and pydantic;
4. for a JSON object (already parsed by the HTTP layer): steps, depth and size from one iterative walk.

The checks return a problem `(where, what)` instead of raising, so the loaders in `workflow.py` own the error type.
Every message names the limit and the `fleetflow hub run` option that sets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# PyYAML is a hub extra, imported where it is used: `fleetflow` on a device (agent only) reads the defaults below.
if TYPE_CHECKING:
    import yaml

Problem = tuple[str, str]


def yaml_loader() -> type[Any]:
    """libyaml's loader when present: the pure-Python one takes seconds over a 256 KiB document."""
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Limits:
    """What one request and one workflow may hold. Defaults are documented in docs/operations.md."""

    request_bytes: int = 1 << 20       # an HTTP request body, counted as it arrives
    workflow_bytes: int = 256 << 10    # workflow YAML text, before parsing
    steps: int = 1_000                 # steps in one workflow
    depth: int = 32                    # nesting of mappings and sequences, aliases expanded
    aliases: int = 100                 # YAML aliases (*name) in one document
    nodes: int = 100_000               # mappings, sequences and scalars, aliases expanded


DEFAULT_LIMITS = Limits()
LIBYAML_MAX_DEPTH = 1000
# Deeper than this, PyYAML's composer and constructor and pydantic run out of Python stack: the highest depth the
# operator may allow.
MAX_DEPTH = 200

# The `fleetflow hub run` option of each limit, named in every refusal so the operator knows what to change.
OPTIONS = {"request_bytes": "--max-request-bytes", "workflow_bytes": "--max-workflow-bytes",
           "steps": "--max-workflow-steps", "depth": "--max-workflow-depth", "aliases": "--max-workflow-aliases",
           "nodes": "--max-workflow-nodes"}


def over(limits: Limits, name: str) -> str:
    return f"over the limit of {getattr(limits, name)} ({OPTIONS[name]})"


def _at(source: str, node: Any) -> str:
    """`source:line` of a YAML node, event or mark."""
    line = getattr(getattr(node, "start_mark", node), "line", None)  # libyaml's marks are not yaml.Mark
    return f"{source}:{line + 1}" if isinstance(line, int) else source


def text_problem(text: str, source: str, limits: Limits) -> Problem | None:
    size = len(text.encode("utf-8", "surrogatepass"))  # a JSON string may hold lone surrogates
    if size > limits.workflow_bytes:
        return source, f"{size} bytes of YAML, {over(limits, 'workflow_bytes')}"
    return None


def event_problem(text: str, source: str, limits: Limits, workflow: bool) -> Problem | None:
    """Depth, aliases and (for a workflow) steps from the parser's events: iterative, so any nesting is safe to scan,
    and a long `steps:` list is counted without building it.

    Raises yaml.YAMLError for text that is not YAML, as yaml.compose would.
    """
    import yaml

    depth = aliases = 0
    root_mapping = False
    root_nodes = 0  # nodes begun directly inside the root mapping: keys at even positions, values at odd
    steps_key = False  # the last root key read was `steps`
    steps: Any = None  # the event that opened the root `steps:` sequence, while it is open
    count = 0
    try:
        for event in yaml.parse(text, Loader=yaml_loader()):
            if isinstance(event, yaml.NodeEvent):
                if depth == 0:
                    root_mapping = isinstance(event, yaml.MappingStartEvent)
                elif depth == 1 and root_mapping and workflow:
                    if root_nodes % 2 == 0:
                        steps_key = isinstance(event, yaml.ScalarEvent) and event.value == "steps"
                    elif steps_key and isinstance(event, yaml.SequenceStartEvent):
                        steps, count = event, 0
                    root_nodes += 1
                elif depth == 2 and steps is not None:
                    count += 1
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > limits.depth:
                    return _at(source, event), f"nesting {depth} levels deep, {over(limits, 'depth')}"
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
                if depth == 1 and steps is not None:
                    if count > limits.steps:
                        return _at(source, steps), f"{count} steps, {over(limits, 'steps')}"
                    steps = None
            elif isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > limits.aliases:
                    return _at(source, event), f"more than {limits.aliases} aliases, {over(limits, 'aliases')}"
    except yaml.MarkedYAMLError as exc:
        # libyaml's scanner reads a flow collection ahead and stops at its own nesting limit (1000 levels) before
        # the parser hands us the event that passes ours: say which limit of ours that is.
        if "maximum nesting depth" in str(exc.problem) and limits.depth < LIBYAML_MAX_DEPTH:
            return _at(source, exc.problem_mark), (f"nesting over {LIBYAML_MAX_DEPTH} levels deep, "
                                                   f"{over(limits, 'depth')}")
        raise
    return None


def _children(node: yaml.Node) -> list[yaml.Node]:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def steps_node(tree: yaml.Node | None) -> yaml.Node | None:
    """The `steps:` value of a workflow's root mapping, if there is one."""
    import yaml

    if isinstance(tree, yaml.MappingNode):
        for key, value in tree.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "steps":
                return value
    return None


def tree_problem(tree: yaml.Node | None, source: str, limits: Limits, workflow: bool) -> Problem | None:
    """Steps (for a workflow), then size and depth with aliases expanded, over the composed graph.

    Aliases make the tree a graph whose expansion can be exponential in its size, or infinite (`&a [*a]`), so each
    node's expanded size and height are computed once (memoised by identity) in an iterative post-order walk, and a
    node met again while it is still open is a cycle.
    """
    import yaml

    if tree is None:
        return None
    steps = steps_node(tree) if workflow else None
    if isinstance(steps, yaml.SequenceNode) and len(steps.value) > limits.steps:
        return _at(source, steps), f"{len(steps.value)} steps, {over(limits, 'steps')}"
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    text: dict[int, int] = {}  # scalar characters, aliases expanded: what the journal would store
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(tree, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            height[key] = 0 if isinstance(node, yaml.ScalarNode) else 1 + max((height[id(k)] for k in kids), default=0)
            if size[key] > limits.nodes:
                return _at(source, node), (f"more than {limits.nodes} nodes with aliases expanded, "
                                           f"{over(limits, 'nodes')}")
            if height[key] > limits.depth:
                return _at(source, node), (f"nesting {height[key]} levels deep through aliases, "
                                           f"{over(limits, 'depth')}")
            text[key] = (len(node.value) if isinstance(node, yaml.ScalarNode) else 0) + sum(text[id(k)] for k in kids)
            if text[key] > limits.workflow_bytes:  # a few aliases of one large string can expand without many nodes
                return _at(source, node), (f"more than {limits.workflow_bytes} characters of text with aliases "
                                           f"expanded, {over(limits, 'workflow_bytes')}")
            continue
        if key in size:
            continue
        if key in open_nodes:
            return _at(source, node), "an alias refers to a node that contains it (a recursive structure)"
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((kid, False) for kid in _children(node) if id(kid) not in size)
    return None


def data_problem(data: Any, source: str, limits: Limits, workflow: bool) -> Problem | None:
    """Steps (for a workflow), depth and size of an already parsed object (a workflow or inputs sent as JSON)."""
    if workflow and isinstance(data, dict) and isinstance(data.get("steps"), list) \
            and len(data["steps"]) > limits.steps:
        return source, f"{len(data['steps'])} steps, {over(limits, 'steps')}"
    count = 0
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > limits.nodes:
            return source, f"more than {limits.nodes} values, {over(limits, 'nodes')}"
        if isinstance(value, (dict, list)):
            if depth + 1 > limits.depth:
                return source, f"nesting {depth + 1} levels deep, {over(limits, 'depth')}"
            items = [v for pair in value.items() for v in pair] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
    return None
