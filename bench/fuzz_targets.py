"""The decoders bench/fuzz.py drives, one `Target` each: how to make an input (generated, or a mutated valid seed),
how to feed it, and which exceptions are the decoder's documented refusals. Anything else it raises is a crash.

Here: the target type, and the file formats (workflow and policy YAML, workflow objects, `when` conditions, firmware
profiles) and Sparkplug commands; the wire protocol is in fuzz_protocol.py, the HTTP API in fuzz_api.py. Seeds are
the real thing: the workflows of sim/scenarios/ and docs/, the example policy, the firmware profiles, Sparkplug
commands built by the real codec.
"""

from __future__ import annotations

import functools
import json
import random
import re
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import fuzz_inputs as gen
import yaml

from agent.runtime.profiles import ProfileError, parse_profile
from hub.conditions import ConditionError, parse_condition
from hub.health import Policy
from hub.sparkplug import codec as sparkplug_codec
from hub.sparkplug import sparkplug_b_pb2 as pb
from hub.sparkplug.edge import DeviceView, EdgeConfig, EdgeNode
from hub.validate import validate
from hub.workflow import (
    WorkflowError,
    load_model_text,
    load_workflow_text,
    workflow_from_object,
)

ROOT = Path(__file__).resolve().parents[1]
NOW = 1_760_000_000_000  # every target's clock


@dataclass(frozen=True)
class Codec:
    """How a crashing input is written to bench/fuzz-crashes/ and read back by `fuzz.py --replay`."""

    ext: str
    dump: Callable[[Any], bytes]
    load: Callable[[bytes], Any]


RAW = Codec("bin", bytes, bytes)
TEXT = Codec("yaml", lambda s: s.encode("utf-8", "surrogatepass"), lambda b: b.decode("utf-8", "surrogatepass"))
CBOR = Codec("cbor", cbor2.dumps, cbor2.loads)
JSON = Codec("json", lambda v: json.dumps(v).encode(), json.loads)


def _label(exc: BaseException) -> str:
    return type(exc).__name__


@dataclass(frozen=True)
class Target:
    name: str
    about: str
    generate: Callable[[random.Random], Any]
    run: Callable[[Any], str]          # returns an outcome label; raises a refusal or (a bug) anything else
    refusals: tuple[type[BaseException], ...] = ()
    codec: Codec = CBOR
    reason: Callable[[BaseException], str] = _label
    weight: float = 1.0                # share of --count relative to the others


def refusal_reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or type(exc).__name__)


# -- workflows, policies, conditions, profiles ----------------------------------------------------------------------


def _docs_workflows() -> list[str]:
    guide = (ROOT / "docs" / "workflows.md").read_text()
    return [m.group(1) for m in re.finditer(r"^```yaml workflow\n(.*?)^```$", guide, re.MULTILINE | re.DOTALL)]


@functools.cache
def workflow_texts() -> list[str]:
    files = sorted((ROOT / "sim" / "scenarios").glob("*.yaml")) + [
        p for p in sorted((ROOT / "docs" / "examples").glob("*.yaml")) if p.name != "policy.yaml"]
    return [p.read_text() for p in files] + _docs_workflows()


@functools.cache
def workflow_objects() -> list[Any]:
    return [yaml.safe_load(t) for t in workflow_texts()]


def hostile_yaml(rng: random.Random) -> str:
    """Constructions that cost more than their size: billion laughs, deep nesting, recursive aliases, many steps."""
    roll = rng.randrange(6)
    if roll == 0:
        levels, width = rng.randrange(2, 12), rng.randrange(2, 10)
        lines = ["a0: &a0 [x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
        return "\n".join(lines) + f"\nname: w\nsteps: [{{id: s, uses: echo, with: {{v: *a{levels - 1}}}}}]\n"
    if roll == 1:
        depth = gen.pick(rng, (31, 32, 33, 200, 1001, 5000))
        return "name: w\nsteps: [{id: s, uses: echo, with: " + "{a: " * depth + "1" + "}" * depth + "}]\n"
    if roll == 2:
        depth = gen.pick(rng, (30, 40, 300))
        return "name: w\nsteps:\n- id: s\n  uses: echo\n  with:\n" + "".join(
            "  " * (i + 2) + "a:\n" for i in range(depth)) + "  " * (depth + 2) + "b: 1\n"
    if roll == 3:
        count = gen.pick(rng, (999, 1000, 1001, 3000))
        return "name: w\nsteps:\n" + "".join(f"- {{id: s{i}, uses: noop{', needs: [s' + str(i - 1) + ']' if i else ''}}}\n"
                                            for i in range(count))
    if roll == 4:
        return gen.pick(rng, ("a: &a [*a]", "&a {x: *a}", "steps: &s [{id: a, uses: echo, with: *s}]\nname: w",
                              "name: w\nsteps: [" + ", ".join(["*x"] * 101) + "]", "--- a\n--- b", "\ufeffname: w"))
    return yaml.safe_dump(gen.mutate_value(rng, gen.pick(rng, workflow_objects()), donors=workflow_objects(),
                                           json_only=True, max_depth=120), allow_unicode=rng.random() < 0.5,
                          default_flow_style=gen.pick(rng, (None, True, False)))


def workflow_text_input(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return hostile_yaml(rng)
    return gen.mutate_text(rng, gen.pick(rng, workflow_texts()), workflow_texts(), gen.YAML_SNIPPETS)


def workflow_load(text: str) -> str:
    """As the hub loads a file (POST /runs text, --workflow), then as `fleetflow validate` checks one."""
    load_workflow_text(text, "fuzz.yaml")
    path = Path(tempfile.gettempdir()) / "workflow.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _, report = validate(path)
    return "valid, with errors" if report.errors else "valid"


def _workflow_reason(exc: BaseException) -> str:
    text = str(exc)
    return ("not YAML" if "not valid YAML" in text else "over a limit" if "over the limit" in text
            else "recursive alias" if "recursive" in text else "not a mapping" if "must be a YAML mapping" in text
            else "schema")


def workflow_object_input(rng: random.Random) -> Any:
    objects = workflow_objects()
    if rng.random() < 0.1:
        return gen.value(rng, 4, json_only=True)
    return gen.mutate_value(rng, gen.pick(rng, objects), donors=objects, json_only=True)


def workflow_object(data: Any) -> str:
    workflow_from_object(data, "workflow")
    return "valid"


@functools.cache
def policy_texts() -> list[str]:
    return [(ROOT / "docs" / "examples" / "policy.yaml").read_text(),
            yaml.safe_dump(Policy().model_dump(mode="json"), sort_keys=False)]


def policy_input(rng: random.Random) -> str:
    texts = policy_texts()
    if rng.random() < 0.3:
        return yaml.safe_dump(gen.mutate_value(rng, yaml.safe_load(gen.pick(rng, texts)), json_only=True,
                                               max_depth=120))
    return gen.mutate_text(rng, gen.pick(rng, texts), texts, gen.YAML_SNIPPETS)


def policy_load(text: str) -> str:
    load_model_text(Policy, text, "policy.yaml", "a hub policy file must be a YAML mapping")
    return "valid"


@functools.cache
def condition_seeds() -> list[str]:
    return sorted({s["when"] for w in workflow_objects() if isinstance(w, dict)
                   for s in w.get("steps", []) if isinstance(s, dict) and isinstance(s.get("when"), str)})


def condition_input(rng: random.Random) -> list[Any]:
    roll = rng.random()
    if roll < 0.6:
        source = gen.expression(rng)
    elif roll < 0.85:
        source = gen.mutate_text(rng, gen.pick(rng, condition_seeds()), condition_seeds(), gen.EXPRESSION_PARTS)
    else:
        source = gen.pick(rng, gen.HOSTILE_EXPRESSIONS)
    return [source, gen.condition_context(rng)]


def condition_evaluate(item: list[Any]) -> str:
    """Parsed when the workflow is loaded, evaluated by the hub's reducer once the step's needs are settled."""
    source, context = item
    return str(parse_condition(source).evaluate(context)).lower()


@functools.cache
def profile_texts() -> list[str]:
    return [p.read_text() for p in sorted((ROOT / "firmware-profiles").glob("*.toml"))]


def profile_input(rng: random.Random) -> bytes:
    texts = profile_texts()
    if rng.random() < 0.4:  # by structure: every field given a wrong type, an extreme value, or taken away
        documents = [tomllib.loads(t) for t in texts]
        text = gen.toml_text(gen.mutate_value(rng, gen.pick(rng, documents), donors=documents, max_depth=50))
    else:
        text = gen.mutate_text(rng, gen.pick(rng, texts), texts, gen.TOML_SNIPPETS)
    data = text.encode("utf-8", "surrogatepass")
    return gen.mutate_bytes(rng, data, []) if rng.random() < 0.1 else data


def profile_parse(data: bytes) -> str:
    path = Path(tempfile.gettempdir()) / "fuzz.toml"
    path.write_bytes(data)
    parse_profile(path)
    return "valid"


# -- Sparkplug commands ----------------------------------------------------------------------------------------------

SPARKPLUG_GROUP, SPARKPLUG_NODE, SPARKPLUG_HOST = "plant", "hub-1", "scada"


def _metric(**fields: Any) -> pb.Payload.Metric:
    return pb.Payload.Metric(**fields)


@functools.cache
def sparkplug_seeds() -> list[bytes]:
    def payload(*metrics: pb.Payload.Metric) -> bytes:
        out = pb.Payload(timestamp=NOW, seq=3)
        out.metrics.extend(metrics)
        return out.SerializeToString()

    return [payload(_metric(name="Node Control/Rebirth", datatype=pb.Boolean, boolean_value=True)),
            payload(_metric(name="Device Control/Drain", datatype=pb.Boolean, boolean_value=True)),
            payload(_metric(alias=1 * 1000 + 8, boolean_value=False)),
            payload(_metric(name="bdSeq", datatype=pb.Int64, long_value=3), _metric(alias=5, is_null=True)),
            payload(_metric(name="Device Control/Drain", datatype=pb.String, string_value="yes")),
            json.dumps({"online": True, "timestamp": NOW + 1}).encode(),
            json.dumps({"online": False, "timestamp": NOW - 1}).encode()]


def sparkplug_input(rng: random.Random) -> list[Any]:
    seeds = sparkplug_seeds()
    kind = gen.pick(rng, ("NCMD", "DCMD", "DCMD", "STATE", "DCMD?"))
    data = gen.pick(rng, seeds)
    roll = rng.random()
    if roll < 0.7:
        data = gen.mutate_bytes(rng, data, list(seeds))
    elif roll < 0.8:
        data = rng.randbytes(rng.randrange(100))
    elif roll < 0.9:
        data = json.dumps(gen.value(rng, 3, json_only=True)).encode()
    return [kind, data]


def sparkplug_receive(item: list[Any]) -> str:
    """The edge node born with one device, commands on: NCMD, DCMD (to that device or another) and STATE."""
    kind, data = item
    try:
        sparkplug_codec.decode(data)
    except sparkplug_codec.Refused:
        pass
    node = EdgeNode(EdgeConfig(SPARKPLUG_GROUP, SPARKPLUG_NODE, SPARKPLUG_HOST, {}, commands=True))
    node.update_device(DeviceView("d1", True, 1, {"cpu": 1.0, "drain": False}, {"line": "2"}), NOW)
    node.connected(4, NOW)
    node.received(f"spBv1.0/STATE/{SPARKPLUG_HOST}", json.dumps({"online": True, "timestamp": NOW}).encode(), NOW)
    topic = {"NCMD": f"spBv1.0/{SPARKPLUG_GROUP}/NCMD/{SPARKPLUG_NODE}",
             "DCMD": f"spBv1.0/{SPARKPLUG_GROUP}/DCMD/{SPARKPLUG_NODE}/d1",
             "DCMD?": f"spBv1.0/{SPARKPLUG_GROUP}/DCMD/{SPARKPLUG_NODE}/d2",
             "STATE": f"spBv1.0/STATE/{SPARKPLUG_HOST}"}[kind]
    out = node.received(topic, data, NOW + 1)
    return f"refused {out.refused[0].reason}" if out.refused else "acted" if out.actions or out.publish else "nothing"


def all_targets() -> list[Target]:
    from fuzz_api import api_target
    from fuzz_protocol import protocol_targets

    return protocol_targets() + [
        Target("workflow-yaml", "workflow files: load_workflow_text, then fleetflow validate", workflow_text_input,
               workflow_load, (WorkflowError,), TEXT, _workflow_reason, 1.5),
        Target("workflow-json", "workflow objects (POST /runs JSON): workflow_from_object", workflow_object_input,
               workflow_object, (WorkflowError,), JSON, _workflow_reason),
        Target("policy", "hub policy files: load_model_text(Policy)", policy_input, policy_load, (WorkflowError,),
               TEXT, _workflow_reason),
        Target("condition", "`when` conditions: parse_condition, then evaluate over run values", condition_input,
               condition_evaluate, (ConditionError,), JSON),
        Target("profile", "firmware profiles: agent.runtime.profiles.parse_profile", profile_input, profile_parse,
               (ProfileError,), RAW),
        Target("sparkplug", "the hub's Sparkplug edge node: NCMD, DCMD and STATE, and codec.decode",
               sparkplug_input, sparkplug_receive, (), CBOR),
        api_target(),
    ]
