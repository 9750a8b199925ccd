"""Input makers for bench/fuzz.py: seeded generators of hostile values, CBOR, YAML and expressions, and mutators of
valid seeds (bytes, text and decoded structures). Pure functions of a `random.Random`, so an input is rebuilt
exactly from (seed, target, index) and a crash reproduces from its command line alone.
"""

from __future__ import annotations

import math
import random
import struct
from typing import Any, Final

INTS: Final = (0, 1, -1, 7, 23, 24, 255, 256, 65535, 65536, 2**31 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1,
               2**64, -(2**63), -(2**64) - 1, 10**30, -(10**30), 10**400)
FLOATS: Final = (0.0, -0.0, 0.5, -1.5, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan, 1e16, 2.0**63)
TEXTS: Final = ("", "a", "hub", "n1", "fuzz", "a" * 64, "a" * 65, "a/b", "+", "#", "..", "a b", "\x00", "é",
                "\u202e", "x" * 5000, "%s%n", "{0}", "${x}", "steps", "inputs", "with", "true", "null", "1.0.0",
                "noop", "echo", "shell", "cpu", "Device Control/Drain", "Node Control/Rebirth")
MAX_DEPTH: Final = 400  # json and cbor2 encode this deep; PyYAML's representer only about 150
# Only JSON carries a lone surrogate (as "\ud800"): CBOR text must be valid UTF-8.
JSON_TEXTS: Final = (*TEXTS, "\ud800", "a\udfffb")
BYTES: Final = (b"", b"\x00", b"\xff" * 8, b"\x00" * 32, b"\x01" * 64, bytes(range(256)))


def pick(rng: random.Random, options: Any) -> Any:
    return options[rng.randrange(len(options))]


# -- plain values (what a CBOR or JSON decoder hands to the schema checks) -------------------------------------------


def scalar(rng: random.Random, json_only: bool = False) -> Any:
    kind = rng.randrange(9 if json_only else 10)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return pick(rng, INTS) if rng.random() < 0.5 else rng.randint(-1000, 1000)
    if kind == 3:
        value = pick(rng, FLOATS) if rng.random() < 0.5 else rng.uniform(-1e6, 1e6)
        return value if not json_only or math.isfinite(value) or rng.random() < 0.3 else 0.25
    if kind in (4, 5, 6):
        return pick(rng, JSON_TEXTS if json_only else TEXTS) if rng.random() < 0.6 else text(rng)
    if kind in (7, 8):
        return rng.randint(0, 10**6) if json_only else pick(rng, BYTES)
    return rng.randbytes(rng.randrange(40))


def text(rng: random.Random, size: int = 12) -> str:
    alphabet = "abcxyz019_.-/ :{}[]#&*!|>'\"\\\t\n\u00e9\u4e2d\U0001f600"
    return "".join(pick(rng, alphabet) for _ in range(rng.randrange(size + 1)))


def value(rng: random.Random, depth: int = 3, json_only: bool = False) -> Any:
    """A random nested value: scalars, lists and maps (text keys mostly, other keys now and then unless JSON)."""
    roll = rng.random()
    if depth <= 0 or roll < 0.55:
        return scalar(rng, json_only)
    if roll < 0.75:
        return [value(rng, depth - 1, json_only) for _ in range(rng.randrange(5))]
    out: dict[Any, Any] = {}
    for _ in range(rng.randrange(5)):
        key: Any = pick(rng, TEXTS) if rng.random() < 0.7 else text(rng, 6)
        if not json_only and rng.random() < 0.1:
            key = scalar(rng)
            if isinstance(key, (list, dict)):
                key = 1
        out[key] = value(rng, depth - 1, json_only)
    return out


def deep(rng: random.Random, levels: int, leaf: Any = 1) -> Any:
    out = leaf
    for _ in range(levels):
        out = [out] if rng.random() < 0.5 else {"a": out}
    return out


def paths(obj: Any, prefix: tuple[Any, ...] = (), limit: int = 400) -> list[tuple[Any, ...]]:
    """Every path into a nested list/dict structure (the root included), breadth first, at most `limit`."""
    out = [prefix]
    queue = [(obj, prefix)]
    while queue and len(out) < limit:
        node, at = queue.pop(0)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            out.append((*at, key))
            queue.append((child, (*at, key)))
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        obj = obj[part]
    return obj


def copy_tree(obj: Any) -> Any:
    """A copy of the lists and maps of a document (iterative: documents here may be nested thousands deep)."""
    if not isinstance(obj, (dict, list)):
        return obj
    root: Any = {} if isinstance(obj, dict) else []
    stack = [(obj, root)]
    while stack:
        source, target = stack.pop()
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, child in items:
            copy = ({} if isinstance(child, dict) else []) if isinstance(child, (dict, list)) else child
            if isinstance(target, dict):
                target[key] = copy
            else:
                target.append(copy)
            if copy is not child:
                stack.append((child, copy))
    return root


def depth_of(obj: Any) -> int:
    deepest, stack = 0, [(obj, 0)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(node, (dict, list)):
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def mutate_value(rng: random.Random, obj: Any, donors: list[Any] | None = None, json_only: bool = False,
                 rounds: int = 0, max_depth: int = MAX_DEPTH) -> Any:
    """Structure-aware mutation of a decoded document: replace, drop, add, wrap, retype or graft one part, a few
    times over. The input is not changed."""
    obj = copy_tree(obj)
    for _ in range(rounds or 1 + int(rng.expovariate(0.9))):
        where = pick(rng, paths(obj))
        if not where:
            obj = _mutate_node(rng, obj, donors, json_only)
            continue
        parent = _get(obj, where[:-1])
        key = where[-1]
        op = rng.randrange(6)
        if op == 0 and isinstance(parent, dict):
            del parent[key]
        elif op == 0 and isinstance(parent, list):
            parent.pop(key)
        elif op == 1 and isinstance(parent, dict):
            parent[pick(rng, TEXTS) if rng.random() < 0.5 else text(rng, 8)] = value(rng, 2, json_only)
        elif op == 1 and isinstance(parent, list):
            parent.insert(rng.randrange(len(parent) + 1), copy_tree(parent[key]) if rng.random() < 0.5
                          else value(rng, 2, json_only))
        else:
            parent[key] = _mutate_node(rng, parent[key], donors, json_only)
    # Deeper than this, the encoders that carry an input (json, cbor2) recurse out of stack before a decoder sees it.
    return obj if depth_of(obj) <= max_depth else deep(rng, max_depth)


def _mutate_node(rng: random.Random, node: Any, donors: list[Any] | None, json_only: bool) -> Any:
    roll = rng.randrange(8)
    if roll == 0:
        return [node] * rng.randrange(0, 3) if rng.random() < 0.5 else {"x": node}
    if roll == 1 and donors:
        donor = pick(rng, donors)
        return copy_tree(_get(donor, pick(rng, paths(donor))))
    if roll == 2:
        return deep(rng, rng.choice((5, 31, 33, 100, MAX_DEPTH)), node if not isinstance(node, (list, dict)) else 1)
    if roll == 3 and isinstance(node, str):
        return node * rng.choice((2, 50, 5000)) if rng.random() < 0.3 else node[:rng.randrange(len(node) + 1)]
    if roll == 4 and isinstance(node, (int, float)) and not isinstance(node, bool):
        return pick(rng, INTS + FLOATS) if not json_only else pick(rng, INTS)
    if roll == 5 and isinstance(node, list):
        return node * rng.choice((0, 2, 1100, 5000)) if len(node) < 8 else node[:1]
    return value(rng, 2, json_only)


# -- bytes -------------------------------------------------------------------------------------------------------------

_BYTE_VALUES: Final = (0x00, 0x01, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1F, 0x3F, 0x40, 0x5B, 0x5F, 0x7F, 0x80, 0x9B, 0x9F,
                       0xA0, 0xBB, 0xBF, 0xC0, 0xC2, 0xD2, 0xD8, 0xF4, 0xF6, 0xF7, 0xF9, 0xFB, 0xFF)


def _length_fields(data: bytes) -> list[int]:
    """Offsets of bytes that look like CBOR heads with a 1-8 byte argument (a length, a count or a value)."""
    return [i for i, b in enumerate(data) if 24 <= b & 0x1F <= 27 and b >> 5 != 7]


def mutate_bytes(rng: random.Random, data: bytes, donors: list[bytes]) -> bytes:
    """A few stacked byte-level mutations: flips, interesting bytes, inserts, deletes, repeats, truncation, splices,
    and corrupted CBOR length fields."""
    out = bytearray(data)
    for _ in range(1 + int(rng.expovariate(0.8))):
        op = rng.randrange(10)
        n = len(out)
        if op == 0 and n:
            out[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            out[rng.randrange(n)] = pick(rng, _BYTE_VALUES)
        elif op == 2:
            at = rng.randrange(n + 1)
            out[at:at] = rng.randbytes(rng.randrange(1, 9)) if rng.random() < 0.5 else bytes(
                [pick(rng, _BYTE_VALUES)] * rng.randrange(1, 40))
        elif op == 3 and n:
            at = rng.randrange(n)
            del out[at:at + rng.randrange(1, 17)]
        elif op == 4 and n:
            out = out[:rng.randrange(n)]
        elif op == 5 and n:
            at = rng.randrange(n)
            chunk = out[at:at + rng.randrange(1, 33)]
            out[at:at] = chunk * rng.randrange(1, 20)
        elif op == 6 and donors:
            donor = pick(rng, donors)
            cut, cut2 = rng.randrange(n + 1), rng.randrange(len(donor) + 1)
            out = bytearray(out[:cut] + donor[cut2:] if rng.random() < 0.5 else donor[:cut2] + out[cut:])
        elif op == 7:
            heads = _length_fields(bytes(out))
            if heads:
                at = pick(rng, heads)
                width = 1 << ((out[at] & 0x1F) - 24)
                extreme = pick(rng, (0, 1, 2**(8 * width) - 1, 2**(8 * width - 1), rng.randrange(2**(8 * width))))
                out[at + 1:at + 1 + width] = extreme.to_bytes(width, "big")
        elif op == 8 and n:
            # A short head (length 0-23) made long or indefinite: shifts everything after it.
            at = rng.randrange(n)
            major = out[at] & 0xE0
            out[at] = major | pick(rng, (0x18, 0x19, 0x1A, 0x1B, 0x1C, 0x1F))
        elif op == 9:
            out += rng.randbytes(rng.randrange(1, 6))
    return bytes(out)


def cbor_head(major: int, arg: int, width: int | None = None) -> bytes:
    if width is None:
        width = 0 if arg < 24 else 1 if arg < 256 else 2 if arg < 65536 else 4 if arg < 2**32 else 8
    if width == 0:
        return bytes([major << 5 | arg])
    code = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([major << 5 | code]) + (arg % (1 << (8 * width))).to_bytes(width, "big")


def cbor_item(rng: random.Random, depth: int = 4) -> bytes:
    """Raw CBOR, well-formed or nearly: non-minimal heads, indefinite lengths, tags, huge declared lengths, floats
    of every width, simple values, duplicate map keys, and deep nesting."""
    roll = rng.randrange(16)
    width = pick(rng, (None, None, None, 1, 2, 4, 8))
    if roll == 0:
        return cbor_head(0, pick(rng, (0, 1, 23, 24, 255, 2**32, 2**64 - 1)), width)
    if roll == 1:
        return cbor_head(1, pick(rng, (0, 7, 2**63, 2**64 - 1)), width)
    if roll == 2:
        data = rng.randbytes(rng.randrange(20))
        return cbor_head(2, len(data) if rng.random() < 0.8 else pick(rng, (2**31, 2**63, len(data) + 1)), width) + data
    if roll == 3:
        data = text(rng).encode() if rng.random() < 0.8 else rng.randbytes(6)
        return cbor_head(3, len(data), width) + data
    if roll in (4, 5) and depth > 0:
        items = [cbor_item(rng, depth - 1) for _ in range(rng.randrange(5))]
        count = len(items) if rng.random() < 0.85 else pick(rng, (2**32, 2**64 - 1, len(items) + 1))
        return cbor_head(4, count, width) + b"".join(items)
    if roll in (6, 7) and depth > 0:
        pairs = [cbor_item(rng, 0) + cbor_item(rng, depth - 1) for _ in range(rng.randrange(4))]
        if pairs and rng.random() < 0.2:
            pairs.append(pairs[0])  # a duplicate key
        count = len(pairs) if rng.random() < 0.85 else pick(rng, (2**32, len(pairs) + 1))
        return cbor_head(5, count, width) + b"".join(pairs)
    if roll == 8:
        tag = pick(rng, (0, 1, 2, 3, 4, 5, 18, 24, 25, 28, 29, 30, 32, 35, 36, 37, 52, 54, 55799, 2**64 - 1))
        return cbor_head(6, tag, width) + (cbor_item(rng, depth - 1) if depth > 0 else b"\x00")
    if roll == 9:
        return pick(rng, (b"\xf4", b"\xf5", b"\xf6", b"\xf7", b"\xf8\x10", b"\xf8\xff", b"\xf0", b"\xff"))
    if roll == 10:
        number = pick(rng, FLOATS)
        kind = rng.randrange(3)
        if kind == 0:
            return b"\xf9" + rng.randbytes(2)
        return b"\xfa" + struct.pack(">f", number if abs(number) < 3e38 or not math.isfinite(number) else 1.0) \
            if kind == 1 else b"\xfb" + struct.pack(">d", number)
    if roll == 11 and depth > 0:
        major = pick(rng, (2, 3, 4, 5))
        body = b"".join(cbor_item(rng, depth - 1) for _ in range(rng.randrange(4)))
        return bytes([major << 5 | 31]) + body + (b"\xff" if rng.random() < 0.7 else b"")
    if roll == 12:
        levels = pick(rng, (7, 8, 9, 50, 2000))
        return pick(rng, (b"\x81", b"\xa1\x00", b"\xd8\x18")) * levels + b"\x00"
    if roll == 13:
        return pick(rng, (b"\x9b", b"\x5b", b"\x7b", b"\xbb")) + pick(rng, (b"\xff" * 8, b"\x00\x00\x00\x01" * 2))
    return cbor_head(0, rng.randrange(1000))


# -- text (YAML, TOML, expressions) -----------------------------------------------------------------------------------


def mutate_text(rng: random.Random, source: str, donors: list[str], snippets: tuple[str, ...]) -> str:
    """Line- and character-level mutations of a text document, with snippets of the format's trickier parts."""
    lines = source.split("\n")
    for _ in range(1 + int(rng.expovariate(0.8))):
        op = rng.randrange(10)
        n = len(lines)
        at = rng.randrange(n) if n else 0
        if op == 0 and n:
            del lines[at]
        elif op == 1 and n:
            lines.insert(at, lines[rng.randrange(n)])
        elif op == 2 and n > 1:
            other = rng.randrange(n)
            lines[at], lines[other] = lines[other], lines[at]
        elif op in (3, 4):
            indent = " " * pick(rng, (0, 0, 2, 4, 6, 8, 1, 3))
            lines.insert(at, indent + pick(rng, snippets))
        elif op == 5 and n:
            line = lines[at]
            cut = rng.randrange(len(line) + 1)
            lines[at] = line[:cut] + pick(rng, snippets) + line[cut:]
        elif op == 6 and n:
            line = lines[at]
            if line:
                i = rng.randrange(len(line))
                lines[at] = line[:i] + chr(pick(rng, (0, 9, 10, 13, 0x85, 0xFEFF, 0xD7FF, 0xD800, 0x10FFFF,
                                                      ord(line[i]) ^ 1 << rng.randrange(7)))) + line[i + 1:]
        elif op == 7 and donors:
            donor = pick(rng, donors).split("\n")
            cut = rng.randrange(len(donor) + 1)
            lines = lines[:at] + donor[cut:cut + rng.randrange(1, 8)] + lines[at:]
        elif op == 8:
            lines = lines[:at]
        elif op == 9 and n:
            lines[at] = (" " * rng.randrange(1, 4) + lines[at]) if rng.random() < 0.5 else lines[at].lstrip()
    return "\n".join(lines)


YAML_SNIPPETS: Final = (
    "&a", "*a", "&a [1, 2]", "x: *a", "<<: *a", "<<: [*a, *a]", "? [a, b]\n: c", "? {a: 1}", "!!python/object:os.system",
    "!!python/object/apply:os.system [ls]", "!!binary aGVsbG8=", "!!set {a, b}", "!!omap [a: 1]", "!!timestamp 2020-01-01",
    "!!float nan", "!!int 0x10", "!!str", "!!null", "!!bool yes", "!custom x", "!<tag:x,2000:y> z", "%YAML 1.1", "%TAG ! tag:x:",
    "---", "...", "--- !!map", "- ", "-", ": ", "|", ">-", "'", '"', "\\", "\t", "{", "}", "[", "]", "[" * 40, "{a: " * 40,
    "1e400", "-.inf", ".nan", "0o777", "0x" + "f" * 40, "9" * 5000, "~", "null", "yes", "no", "on", "2001-12-14t21:59:43.10-05:00",
    "id: a", "uses: echo", "needs: [a]", "needs: [x, x]", "when: inputs.x > 1", "when: 'a' * 99999999999",
    "when: " + "-" * 900 + "1", "when: " + "not " * 200 + "true", "steps: []", "steps: *a", "with: *a",
    "with: {a: &b [1, 2, 3]}", "timeout: 0", "timeout: -1", "timeout: .inf", "retry: {max_attempts: 0}",
    "version: 1.0.x", "name: ''", "for_each: {labels: {a: b}}", "compensate: {uses: echo}", "priority: 99999999999999999999",
    "placement: {affinity: x}", "join: any", "inputs: {x: {type: number}}", "thresholds: {cpu: {high: 90, critical: 10}}",
    "triggers: [{metric: cpu, threshold: .nan, action: alert}]", "hysteresis: 1", "cooldown: -1",
    "a: &x " + "[*x, " * 3, "x: " + "a" * 70000,
)

def toml_text(document: Any) -> str:
    """A TOML document from a mutated one (no writer in the standard library): root values, then one table per
    map, with inline tables and arrays for nested values. Nulls, which TOML lacks, are left out."""
    def key(name: Any) -> str:
        name = str(name)
        return name if name and all(c.isascii() and (c.isalnum() or c in "_-") for c in name) else _toml_string(name)

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else "inf" if v == math.inf else "-inf" if v == -math.inf else repr(v)
        if isinstance(v, int):
            return str(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v if x is not None) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items() if x is not None) + "}"
        return _toml_string(v.hex() if isinstance(v, bytes) else str(v))

    if not isinstance(document, dict):
        document = {"value": document}
    lines = [f"{key(k)} = {value(v)}" for k, v in document.items() if v is not None and not isinstance(v, dict)]
    for name, table in document.items():
        if isinstance(table, dict):
            lines.append(f"[{key(name)}]")
            lines += [f"{key(k)} = {value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    out = []
    for char in text:
        code = ord(char)
        out.append(char if 0x20 <= code < 0x7F and char not in '"\\' else f"\\u{code:04x}" if code < 0x10000
                   else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


TOML_SNIPPETS: Final = (
    "[resources]", "[[x]]", "[intervals]", "[labels]", "[thresholds]", "[sim]", "cores = 1e400", "cores = inf",
    "cores = nan", "cores = -1", "cores = 99999999999999999999999999999", "max_concurrent = inf", "max_concurrent = 1e308",
    "max_concurrent = 99999999999999999999999", "max_concurrent = 'x'", "max_concurrent = true", "name = 5",
    "name = 'a/b'", "name = ''", "heartbeat_s = 'x'", "labels = 3", "labels = [1]", "capabilities = 'ab'",
    "capabilities = [[1]]", "thresholds = {cpu = 1}", "thresholds = {cpu = {high = 'x'}}", "sim = 'ab'", "sim = [1]",
    "resources = 3", "intervals = []", "x = " + "[" * 3000 + "]" * 3000, "x = " + "{a = " * 2000 + "1" + "}" * 2000,
    "x = 1979-05-27T07:32:00Z", "x = \"\\u0000\"", "x = '''", "x = \"\"\"", "a.b.c = 1", "'quoted key' = 1", "= 1",
    "x = 0x_1", "x = +inf", "description = \"\\uD800\"",
)

EXPRESSION_PARTS: Final = (
    "inputs.x", "inputs.limit", "inputs.s", "inputs.l", "steps.a.output.v", "steps.a.state", "steps.a.output['k']",
    "steps.a.output.l[0]", "steps.b.output.m.n", "1", "0", "-1", "1.5", "1e308", "1e400", "'a'", "'t1'", "\"x\"", "true",
    "false", "null", "True", "None", "[1, 2]", "[]", "99999999999", "0x7fffffffffffffff", "inputs", "steps", "(1)",
)
OPERATORS: Final = (" and ", " or ", " == ", " != ", " < ", " <= ", " > ", " >= ", " in ", " not in ", " + ", " - ",
                    " * ", " / ", " % ")
HOSTILE_EXPRESSIONS: Final = (
    "-" * 999 + "1", "not " * 249 + "true", "(" * 33 + "1" + ")" * 33, "(" * 32 + "1" + ")" * 32, "1" + " + 1" * 249,
    "'a' * 99999999999", "'a' * 99999999 * 99", "[1] * 99999999", "[0] * 99999 * 99999", "'%999999999d' % 1",
    "'%.999999999f' % 1.0", "'%s' % inputs.x", "'%(a)s' % inputs.m", "'%c' % 99999999", "inputs.s * inputs.n",
    "inputs.l * inputs.n", "inputs.l + inputs.l", "steps.a.output.v / 0", "1 % 0", "1e308 * 10", "-inputs.s",
    "inputs.__class__", "inputs._x", "__import__('os')", "lambda: 1", "[x for x in inputs]", "inputs.x if 1 else 2",
    "f'{inputs.x}'", "a := 1", "inputs.x ** 2", "~1", "1 @ 2", "inputs[0]", "steps[inputs.x]", "inputs.x()", "{1: 2}",
    "{1, 2}", "...", "b'x'", "1j", "'\x00'", "1\x00", "'\ud800'", "\u00a0inputs.x", "inputs.\u00e9", "1 <> 2",
    "0" * 999, "9" * 999, "1" + " < 1" * 300, "[" * 32 + "]" * 32, "inputs.x[" * 30 + "0" + "]" * 30,
)


def expression(rng: random.Random, depth: int = 3) -> str:
    """A `when` condition from the language's own parts, often valid, sometimes not."""
    roll = rng.random()
    if depth <= 0 or roll < 0.35:
        return pick(rng, EXPRESSION_PARTS)
    if roll < 0.75:
        return expression(rng, depth - 1) + pick(rng, OPERATORS) + expression(rng, depth - 1)
    if roll < 0.85:
        return pick(rng, ("not ", "-", "(", "[")) + expression(rng, depth - 1) + pick(rng, ("", ")", "]"))
    return pick(rng, HOSTILE_EXPRESSIONS)


def condition_context(rng: random.Random) -> dict[str, Any]:
    """What a run offers a condition: inputs and earlier outputs, of every shape a run or a node may produce."""
    def any_value() -> Any:
        return pick(rng, (rng.randint(-5, 5), rng.random(), "a", "t1", "%s", [1, 2], [], {"k": 1, "n": {"m": 2}},
                          None, True, pick(rng, INTS), pick(rng, FLOATS), "x" * 1000, [0] * 100, 2**40))

    inputs = {name: any_value() for name in ("x", "limit", "s", "l", "n", "m") if rng.random() < 0.8}
    steps = {sid: {"output": {k: any_value() for k in ("v", "k", "l", "m")}, "state": pick(rng, ("succeeded", "skipped"))}
             for sid in ("a", "b") if rng.random() < 0.8}
    return {"inputs": inputs, "steps": steps}
