"""Inputs bench/fuzz.py found that crashed or hung a decoder, fed to it again: each must now end in the decoder's
documented refusal (or be accepted), quickly. The inputs are kept as the fuzzer saved them, in fuzz_inputs/, named
TARGET.SEED.INDEX (the generator that made them has moved on, so the numbers are a record, not a recipe)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import httpx
import nacl.signing
import pytest

from agent.protocol import AgentProtocol, HubTrust, NodeFacts, Refused
from agent.runtime.profiles import ProfileError, parse_profile
from hub.conditions import ConditionError, parse_condition
from hub.health import Policy
from hub.workflow import WorkflowError, load_model_text, load_workflow_text
from protocols import Heartbeat, Keyring, Receiver, ReplayWindow, Signer, body_from_map
from protocols.errors import Malformed, Replayed

INPUTS = Path(__file__).with_name("fuzz_inputs")
NOW = 1_760_000_000_000


def saved(name: str) -> Any:
    data = (INPUTS / name).read_bytes()
    if name.endswith(".cbor"):
        return cbor2.loads(data)
    if name.endswith(".json"):
        return json.loads(data)
    if name.endswith(".yaml"):
        return data.decode("utf-8", "surrogatepass")
    return data


def quickly(seconds: float = 1.0) -> Any:
    """Fails the test if the block takes longer: each of these inputs once hung or took gigabytes."""
    class Timer:
        def __enter__(self) -> None:
            self.started = time.perf_counter()

        def __exit__(self, *exc: object) -> None:
            took = time.perf_counter() - self.started
            assert took < seconds, f"took {took:.1f} s"
    return Timer()


# -- protocols ---------------------------------------------------------------------------------------------------------


def test_a_seq_far_ahead_of_the_window_is_accepted_without_shifting_by_it() -> None:
    """payload.1.938: an authentic heartbeat whose seq jumps ~1.76e12 past the last one; the window shifted its
    bitmap by the jump (a 220 GB integer): MemoryError out of Receiver.receive instead of an acceptance."""
    key = nacl.signing.SigningKey(b"\x11" * 32)
    receiver = Receiver("fuzz", Keyring([("n1", bytes(key.verify_key))]))
    first = Signer(key, "fuzz", "n1", boot=3).seal(Heartbeat(), NOW)
    receiver.receive(first.topic, first.payload, NOW)
    topic, data = saved("payload.1.938.cbor")
    with quickly():
        message = receiver.receive(topic, data, NOW)
    assert message.header.seq == NOW and receiver.windows["n1"].top == NOW
    with pytest.raises(Replayed):
        receiver.receive(first.topic, first.payload, NOW)  # far behind the window now


def test_a_window_jump_keeps_the_new_seq_and_only_it() -> None:
    window = ReplayWindow()
    window.accept(1, 5)
    window.accept(1, 2**62)
    assert window.bitmap == 1 and window.top == 2**62
    with pytest.raises(Replayed):
        window.accept(1, 2**62)
    window.accept(1, 2**62 - 3)  # inside the window, not seen yet


def test_an_outbox_body_that_is_not_a_map_is_malformed() -> None:
    """body.1.0: body_from_map("birth", [...]) raised AttributeError ('list' object has no attribute 'get')."""
    type_name, fields = saved("body.1.0.cbor")
    with pytest.raises(Malformed, match="must be a map"):
        body_from_map(type_name, fields)
    with pytest.raises(Malformed, match="unknown message type"):
        body_from_map(["hb"], {})  # type: ignore[arg-type]


def test_the_agent_refuses_a_message_from_a_topic_it_does_not_read() -> None:
    """command.1.1980: a valid self-signed enroll request handed to the agent as if on its subscription: the
    receiver accepted it (enroll checks) and the agent then looked up a hub replay window that was never made
    (KeyError 'hub'). Only the agent's command topic and the hub state are read."""
    facts = NodeFacts("rpi4", "0.1.0", {}, (), 1, {})
    agent = AgentProtocol(nacl.signing.SigningKey(b"\x11" * 32), "fuzz", "n1", boot=5, intervals=(5.0, 10.0),
                          facts=facts, enrolled=True, hub=HubTrust(bytes(nacl.signing.SigningKey(b"\x22" * 32)
                                                                         .verify_key)))
    topic, data, _first_use = saved("command.1.1980.cbor")
    assert topic == "fleetflow/v1/fuzz/node/n1/enroll"
    [refused] = agent.receive(topic, data, NOW)
    assert isinstance(refused, Refused) and refused.reason == "wrong-topic" and agent.rejected["wrong-topic"] == 1


# -- `when` conditions --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, was", [
    ("condition.1.7.json", "'%.999999999f' % 1.0: a billion-digit string, a hang"),
    ("condition.1.12.json", "'a' * 99999999 * 99: MemoryError"),
    ("condition.1.277.json", "'%c' % 99999999: OverflowError"),
])
def test_conditions_that_cost_what_their_operands_ask_are_refused(name: str, was: str) -> None:
    source, context = saved(name)
    condition = parse_condition(source)
    with quickly(), pytest.raises(ConditionError, match="unsupported operand"):
        condition.evaluate(context)


@pytest.mark.parametrize("name, was", [
    ("condition.1.91.json", "999 unary minuses: RecursionError in the checker"),
    ("condition.1.234.json", "a lone surrogate: UnicodeEncodeError from the parser"),
])
def test_conditions_the_parser_cannot_walk_are_refused(name: str, was: str) -> None:
    source, _ = saved(name)
    with quickly(), pytest.raises(ConditionError):
        parse_condition(source)


def test_condition_arithmetic_keeps_its_documented_meaning() -> None:
    context = {"inputs": {"x": 10**400, "s": "ab", "l": [1]}, "steps": {}}
    assert parse_condition("1 + 2 * 3 - 4 / 2 % 3 == 5").evaluate(context)
    assert parse_condition("inputs.s + 'c' == 'abc' and inputs.l + [2] == [1, 2]").evaluate(context)
    with pytest.raises(ConditionError):
        parse_condition("inputs.x / 3 > 1").evaluate(context)  # OverflowError: no float that large
    with pytest.raises(ConditionError, match="the limit is"):
        parse_condition("inputs.s + inputs.s > 'a'").evaluate({"inputs": {"s": "x" * 40_000}, "steps": {}})


# -- workflow and policy files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, line, was", [
    ("workflow-yaml.1.405.yaml", 3, "timeout: !!timestamp 2020-01-011800: AttributeError inside PyYAML"),
    ("workflow-yaml.1.34.yaml", None, "a lone surrogate: UnicodeEncodeError from libyaml"),
])
def test_workflow_texts_that_broke_the_yaml_loader_are_workflow_errors(name: str, line: int | None, was: str) -> None:
    with quickly(), pytest.raises(WorkflowError, match="not valid YAML") as refused:
        load_workflow_text(saved(name), "w.yaml")
    if line is not None:
        assert refused.value.problems[0][0] == f"w.yaml:{line}"


@pytest.mark.parametrize("name, was", [
    ("policy.1.599.yaml", "an int of 5002 digits: ValueError from int() inside PyYAML"),
    ("policy.1.6376.yaml", "!!bool yesecovery: KeyError inside PyYAML"),
    ("policy.1.84.yaml", "a lone surrogate: UnicodeEncodeError from libyaml"),
])
def test_policy_texts_that_broke_the_yaml_loader_are_workflow_errors(name: str, was: str) -> None:
    with quickly(), pytest.raises(WorkflowError, match="not valid YAML"):
        load_model_text(Policy, saved(name), "policy.yaml", "a mapping")


# -- firmware profiles --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, was", [
    ("profile.1.18.bin", "bytes that are not UTF-8: UnicodeDecodeError"),
    ("profile.1.108.bin", "3000 nested arrays: RecursionError inside tomllib"),
    ("profile.1.2581.bin", "critical = 10**400: OverflowError from float()"),
])
def test_profiles_that_crashed_the_reader_are_profile_errors(tmp_path: Path, name: str, was: str) -> None:
    path = tmp_path / "broken.toml"
    path.write_bytes(saved(name))
    with pytest.raises(ProfileError, match="broken.toml"):
        parse_profile(path)


# -- the HTTP API -------------------------------------------------------------------------------------------------------


class Api:
    """A real hub (its own data directory, no broker: it retries 127.0.0.1:1 in the background) and its app."""

    def __init__(self, data: Path) -> None:
        from hub.api import create_app
        from hub.service import Hub, HubConfig

        self.hub = Hub(HubConfig(broker="mqtt://127.0.0.1:1", fleet="fuzz", data=data))
        self.app = create_app(self.hub)

    def session(self, *requests: tuple[str, str, str | None, bytes]) -> list[httpx.Response]:
        """The requests in order, with the hub's core loop running (a submission waits on it)."""
        async def go() -> list[httpx.Response]:
            running = asyncio.create_task(self.hub.run(api=False, first_connection_required=False))
            try:
                async with httpx.AsyncClient(transport=httpx.ASGITransport(self.app), base_url="http://hub",
                                             headers={"Authorization": f"Bearer {self.hub.token}"}) as client:
                    out: list[httpx.Response] = []
                    for method, path, content_type, body in requests:
                        headers = {"Content-Type": content_type} if content_type else {}
                        path = path.format(*[r.json().get("id") for r in out])  # "{0}": the first answer's id
                        out.append(await asyncio.wait_for(client.request(method, path, content=body,
                                                                         headers=headers), 30))
                    return out
            finally:
                self.hub.stop()
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
        return asyncio.run(go())

    def close(self) -> None:
        self.hub.journal.close()
        self.hub.registry.close()
        self.hub.meta.close()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    made = Api(tmp_path / "hub")
    try:
        yield made
    finally:
        made.close()


@pytest.mark.parametrize("name, was", [
    ("api.1.16.cbor", "-Infinity in the body: FastAPI's 422 echoed it and could not render it (500)"),
    ("api.1.200.cbor", "a body that is not UTF-8: FastAPI's 422 echoed the bytes and failed to decode them (500)"),
    ("api.1.360.cbor", "a lone surrogate echoed in the 422: UnicodeEncodeError while rendering (500)"),
    ("api.1.1790.cbor", "a lone surrogate in a cancel reason: the audit log failed to encode it (500)"),
])
def test_request_bodies_that_made_the_api_answer_500_are_422(api: Api, name: str, was: str) -> None:
    [response] = api.session(tuple(saved(name)))  # type: ignore[arg-type]
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail and all("input" not in d and d["msg"] and isinstance(d["loc"], list) for d in detail)


def test_a_workflow_holding_a_lone_surrogate_is_refused_before_it_is_encoded(api: Api) -> None:
    """Once past the 422 echo, the same text reached the assignment's CBOR encoder (UnicodeEncodeError, 500)."""
    body = json.dumps({"workflow": {"name": "w", "steps": [{"id": "a", "uses": "echo", "with": {"x": "\ud800"}}]}})
    [response] = api.session(("POST", "/runs", "application/json", body.encode()))
    assert response.status_code == 422 and "lone surrogate" in response.text


def test_a_run_whose_step_output_holds_nan_and_raw_bytes_can_be_shown(api: Api) -> None:
    """Found by reading, next to the 500s above: a node's result may carry NaN and bytes that are not UTF-8 (the
    wire's DATA allows both), and showing the run then failed in FastAPI's encoder or JSON renderer (a 500)."""
    body = b'{"workflow": {"name": "w", "steps": [{"id": "a", "uses": "echo"}]}}'
    [created] = api.session(("POST", "/runs", "application/json", body))
    assert created.status_code == 201, created.text
    run = api.hub.core.runs[created.json()["id"]]
    run.steps["a"].output = {"nan": math.nan, "inf": [-math.inf], "raw": b"\xff\x00ok", "text": b"plain"}
    [shown] = api.session(("GET", f"/runs/{run.id}", None, b""))
    assert shown.status_code == 200, shown.text
    assert shown.json()["steps"][0]["output"] == {"nan": None, "inf": [None], "raw": "\\xff\x00ok", "text": "plain"}
