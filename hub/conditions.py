"""`when` conditions: a small, safe expression language over workflow inputs and earlier outputs. Never `eval`.

    steps.read.output.temperature > inputs.threshold and not inputs.dry_run

Allowed: literals, `inputs.x`, `steps.<id>.output.x` / `steps.<id>.state`, `.attr` and `[const]` lookups,
comparisons (`== != < <= > >= in not in`), `and`, `or`, `not`, `+ - * / %`, unary minus. Anything else is refused
when the workflow is loaded, with the position of the offending part.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from typing import Any

from protocols import FleetflowError

MAX_LENGTH = 1000
MAX_NESTING = 32
# Levels of the parsed expression: `- - - x` and `1 + 1 + 1` nest without brackets, and the checker and evaluator
# recurse once per level, so a 1000-character chain would otherwise run out of Python stack.
MAX_DEPTH = 64
# Longest text or list a `+` may build: with the operands a run's inputs can hold, a chain of concatenations would
# otherwise take gigabytes and minutes inside the hub's reducer.
MAX_VALUE = 65_536


class ConditionError(FleetflowError, ValueError):
    """A condition that cannot be parsed, uses something not allowed, or fails to evaluate."""


_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
            ast.NotIn: lambda a, b: a not in b}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Mod: operator.mod}
_ROOTS = ("inputs", "steps")


@dataclass(frozen=True)
class Condition:
    source: str
    tree: ast.Expression
    step_refs: frozenset[str]    # steps.<id> it reads
    input_refs: frozenset[str]   # inputs.<name> it reads

    def evaluate(self, context: dict[str, Any]) -> bool:
        try:
            return bool(_eval(self.tree.body, context))
        except ConditionError:
            raise
        except (TypeError, ArithmeticError, ValueError) as exc:  # OverflowError: 10**400 / 3 has no float
            raise ConditionError(f"condition {self.source!r}: {exc}") from None


def parse_condition(source: str) -> Condition:
    if not isinstance(source, str) or not source.strip():
        raise ConditionError("a condition must be a non-empty string")
    if len(source) > MAX_LENGTH:
        raise ConditionError(f"condition is {len(source)} characters; the limit is {MAX_LENGTH}")
    # Bound nesting before handing the text to CPython's parser, which misbehaves on deep input.
    depth = peak = 0
    for char in source:
        depth += char in "([{"
        depth -= char in ")]}"
        peak = max(peak, depth)
    if peak > MAX_NESTING:
        raise ConditionError(f"condition nests {peak} brackets deep; the limit is {MAX_NESTING}")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise ConditionError(f"condition {source!r}: syntax error at column {exc.offset}") from None
    except ValueError as exc:  # a lone surrogate (JSON allows "\ud800") cannot be encoded for the parser
        raise ConditionError(f"condition {source!r}: {exc}") from None
    levels = _depth(tree.body)
    if levels > MAX_DEPTH:
        raise ConditionError(f"condition nests {levels} operations deep; the limit is {MAX_DEPTH}")
    steps: set[str] = set()
    inputs: set[str] = set()
    _check(tree.body, source, steps, inputs)
    return Condition(source, tree, frozenset(steps), frozenset(inputs))


def _depth(root: ast.AST) -> int:
    """Levels of the tree, counted without recursion (the point is to refuse what recursion cannot walk)."""
    deepest, stack = 0, [(root, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _check(node: ast.AST, source: str, steps: set[str], inputs: set[str]) -> None:
    where = f"condition {source!r}, column {getattr(node, 'col_offset', 0) + 1}"
    if isinstance(node, ast.Constant):
        if not isinstance(node.value, (int, float, str, bool, type(None))):
            raise ConditionError(f"{where}: literal {node.value!r} is not allowed")
    elif isinstance(node, ast.Name):
        if node.id not in _ROOTS and node.id not in ("true", "false", "null"):
            raise ConditionError(f"{where}: unknown name {node.id!r} (use inputs.<name> or steps.<id>.output.<key>)")
    elif isinstance(node, (ast.Attribute, ast.Subscript)):
        chain = _chain(node)
        if chain is None:
            raise ConditionError(f"{where}: only lookups on inputs and steps are allowed")
        if any(isinstance(part, str) and part.startswith("_") for part in chain):
            raise ConditionError(f"{where}: names starting with '_' are not allowed")
        if chain[0] == "steps":
            if len(chain) < 3 or chain[2] not in ("output", "state"):
                raise ConditionError(f"{where}: use steps.<id>.output.<key> or steps.<id>.state")
            steps.add(str(chain[1]))
        elif len(chain) >= 2:
            inputs.add(str(chain[1]))
    elif isinstance(node, ast.BoolOp) or isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.And, ast.Or, ast.Not, ast.USub)):
                _check(child, source, steps, inputs)
    elif isinstance(node, ast.Compare):
        if not all(type(op) in _COMPARE for op in node.ops):
            raise ConditionError(f"{where}: comparison not allowed")
        for child in [node.left, *node.comparators]:
            _check(child, source, steps, inputs)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check(node.left, source, steps, inputs)
        _check(node.right, source, steps, inputs)
    elif isinstance(node, (ast.List, ast.Tuple)):
        for child in node.elts:
            _check(child, source, steps, inputs)
    else:
        raise ConditionError(f"{where}: {type(node).__name__} is not allowed in a condition")


def _chain(node: ast.AST) -> list[Any] | None:
    parts: list[Any] = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript):
            if not isinstance(node.slice, ast.Constant) or not isinstance(node.slice.value, (str, int)):
                return None
            parts.append(node.slice.value)
            node = node.value
        elif isinstance(node, ast.Name) and node.id in _ROOTS:
            parts.append(node.id)
            return list(reversed(parts))
        else:
            return None


def _eval(node: ast.AST, ctx: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return {"true": True, "false": False, "null": None}.get(node.id, ctx.get(node.id))
    if isinstance(node, (ast.Attribute, ast.Subscript)):
        chain = _chain(node)
        value: Any = ctx
        for i, part in enumerate(chain or []):
            try:
                value = value[part]
            except (KeyError, IndexError, TypeError):
                raise ConditionError(f"{'.'.join(map(str, chain[:i + 1]))} is not defined") from None  # type: ignore[index]
        return value
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            return all(_eval(v, ctx) for v in node.values)
        return any(_eval(v, ctx) for v in node.values)
    if isinstance(node, ast.UnaryOp):
        operand = _eval(node.operand, ctx)
        return (not operand) if isinstance(node.op, ast.Not) else -operand
    if isinstance(node, ast.Compare):
        left = _eval(node.left, ctx)
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node, ctx)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BinOp):
        return _arithmetic(node.op, _eval(node.left, ctx), _eval(node.right, ctx))
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval(e, ctx) for e in node.elts]
    raise ConditionError(f"cannot evaluate {type(node).__name__}")


def _arithmetic(op: ast.operator, left: Any, right: Any) -> Any:
    """`+ - * / %` on numbers, and `+` joining two texts or two lists up to MAX_VALUE. Python's other meanings,
    repetition (`'a' * 10**9`) and %-formatting (`'%.999999999f' % 1`), cost what the operands ask, so they are
    refused like any other type mismatch."""
    if isinstance(left, (int, float)) and isinstance(right, (int, float)):
        return _BINARY[type(op)](left, right)
    if isinstance(op, ast.Add) and type(left) is type(right) and isinstance(left, (str, list)):
        if len(left) + len(right) > MAX_VALUE:
            raise ConditionError(f"`+` would build a value of {len(left) + len(right)} items; the limit is {MAX_VALUE}")
        return left + right
    raise TypeError(f"unsupported operand types for {_SYMBOLS[type(op)]}: {type(left).__name__} and "
                    f"{type(right).__name__}")


_SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Mod: "%"}
