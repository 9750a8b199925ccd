"""Operator keys and nodes without a broker: re-keying and deleting in the registry and the hub's replay state,
accept of every pending request, label selectors, the hub key rotation files and the agent's side of it (protocol
section 7.2), the API token's overlap, and the CLI's refusals. tests/system/test_keys_and_nodes_e2e.py has the wire."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from agent.config import AgentConfig
from agent.node import Agent
from agent.runtime.clock import now_ms
from hub.events import NodeBorn
from hub.keys import (ApiTokens, HubKeys, RotationError, parse_duration, read_rotation, rotate_token,
                      start_key_rotation)
from hub.registry import EnrollPolicy, KeyTaken, Registry, fingerprint, matches, parse_selector
from protocols import (HUB_ID, Ack, HubState, Keyring, Malformed, Receiver, ReplayWindow, Replayed, Signer, UnknownKey,
                       WrongSender, kid_for)
from protocols.messages import body_from_map
from tests.cli import fleetflow

FLEET = "f"
NOW = 1_763_900_000_000


def key(n: int) -> bytes:
    return bytes(nacl.signing.SigningKey(bytes([n]) * 32).verify_key)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- registry: re-key, delete, accept every pending request, selectors ---------------------------------------------

def test_a_new_key_resets_the_replay_state_and_the_same_key_back_keeps_it(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "nodes.json")
    registry.add("n1", key(1), 1)
    assert registry.fresh_key("n1")  # first trust: nothing to keep
    registry.trusted("n1")
    assert not registry.fresh_key("n1")
    registry.set_state("n1", "revoked", 2)
    registry.add("n1", key(2), 3)  # re-key: the device has a new key
    assert registry.get("n1")["state"] == "accepted" and registry.fresh_key("n1")  # type: ignore[index]
    registry.trusted("n1")
    registry.flush()
    with pytest.raises(KeyTaken, match="revoke it first"):
        registry.add("n1", key(3), 4)  # enrolled with another key: a typo never takes over a working node
    assert registry.add("n1", key(2), 5)["kid"] == fingerprint(key(2))  # the same key again: nothing changes
    registry.delete("n1")
    assert registry.get("n1") is None
    reopened = Registry(tmp_path / "nodes.json")
    reopened.add("n1", key(2), 6)
    assert not reopened.fresh_key("n1")  # deleted, then the same key back: its replay state stays
    reopened.delete("n1")
    reopened.add("n1", key(4), 7)
    assert reopened.fresh_key("n1") and reopened.stale_replay() == ["n1"]


def test_a_registry_from_before_replay_tracking_resets_nothing(tmp_path: Path) -> None:
    path = tmp_path / "nodes.json"
    doc = {"id": "n1", "key": key(1).hex(), "state": "accepted", "profile": "", "labels": {}, "requested_at": 1,
           "changed_at": 1}
    path.write_text(json.dumps({"nodes": {"1": doc}, "tokens": {}}))
    assert Registry(path).stale_replay() == []


def test_accept_pending_takes_every_pending_request_by_its_current_key_and_nothing_else(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "nodes.json")
    for i in (1, 2, 3, 4):
        registry.request(f"n{i}", key(i), "", {}, i, EnrollPolicy())
    registry.request("n2", key(12), "", {}, 5, EnrollPolicy())  # n2 changed keys while pending: its current key
    registry.set_state("n3", "rejected", 6)
    registry.accept("n4", fingerprint(key(4)), 7)
    registry.set_state("n4", "revoked", 8)
    accepted = registry.accept_pending(9)
    assert [(d["id"], d["kid"]) for d in accepted] == [("n1", fingerprint(key(1))), ("n2", fingerprint(key(12)))]
    reopened = Registry(tmp_path / "nodes.json")
    assert {d["id"]: d["state"] for d in reopened.all()} == {"n1": "accepted", "n2": "accepted", "n3": "rejected",
                                                             "n4": "revoked"}
    assert reopened.accept_pending(10) == []


def test_label_selectors_must_all_match() -> None:
    selector = parse_selector(["site=north", "line=2"])
    assert matches({"site": "north", "line": "2", "x": "y"}, selector)
    assert not matches({"site": "north"}, selector)
    assert matches({}, parse_selector([]))
    assert parse_selector(["empty="]) == {"empty": ""}
    for bad in (["site"], ["=north"], ["a=1", "a=2"]):
        with pytest.raises(ValueError, match="label selector"):
            parse_selector(bad)


# -- the hub: a re-keyed node's replay window, durably; delete -------------------------------------------------

@pytest.fixture
def make_hub(tmp_path: Path) -> Iterator[Any]:
    from hub.service import Hub, HubConfig

    hubs: list[Hub] = []

    def make() -> Hub:
        hub = Hub(HubConfig(broker="mqtt://127.0.0.1:1", fleet=FLEET, data=tmp_path / "hub"))
        hubs.append(hub)
        return hub

    def close(hub: Hub) -> None:
        hub.journal.close()
        hub.registry.close()
        hub.meta.close()
        hub.lock.release()
        hubs.remove(hub)

    make.close = close  # type: ignore[attr-defined]
    yield make
    for hub in list(hubs):
        close(hub)


def test_re_keying_a_node_gives_it_a_fresh_replay_window_that_survives_a_restart(make_hub: Any) -> None:
    hub = make_hub()
    asyncio.run(hub.add_node("n1", key(1)))
    window = ReplayWindow()
    window.accept(7, 100)  # the old device's 7th session
    hub.receiver.windows["n1"] = window
    hub.journal.append_now([], {"n1": window.mark()})
    asyncio.run(hub.node_action("n1", "revoke"))
    assert hub.receiver.keyring.get(kid_for(key(1))) is None
    asyncio.run(hub.add_node("n1", key(2)))  # a new device: its boots count from 1 again
    assert hub.receiver.keyring.get(kid_for(key(2))) is not None
    hub.receiver.windows["n1"].check(1, 1)
    make_hub.close(hub)
    hub = make_hub()  # the fresh window is durable
    hub.receiver.windows["n1"].accept(1, 1)
    hub.receiver.windows["n1"].accept(1, 2)
    make_hub.close(hub)


def test_the_same_key_added_back_keeps_its_replay_window(make_hub: Any) -> None:
    hub = make_hub()
    asyncio.run(hub.add_node("n1", key(1)))
    hub.receiver.windows["n1"] = ReplayWindow.fenced(7, 100)
    asyncio.run(hub.node_action("n1", "revoke"))
    asyncio.run(hub.add_node("n1", key(1)))
    with pytest.raises(Replayed):
        hub.receiver.windows["n1"].check(7, 50)  # captured under that key before: still refused


def test_delete_is_refused_while_online_and_then_forgets_the_node(make_hub: Any) -> None:
    from hub.errors import OperatorError

    hub = make_hub()

    async def main() -> None:
        loop = asyncio.create_task(hub._core_loop())
        try:
            await hub.add_node("n1", key(1))
            await hub.request([NodeBorn(now_ms(), "n1", 1, "rpi4", {"site": "a"})])
            with pytest.raises(OperatorError) as refused:
                await hub.admin.delete("n1", force=False)
            assert refused.value.status == 409 and "--force" in str(refused.value)
            assert hub.registry.get("n1") is not None and "n1" in hub.core.nodes  # nothing changed
            with pytest.raises(OperatorError) as missing:
                await hub.admin.delete("n2", force=False)
            assert missing.value.status == 404
            assert (await hub.admin.delete("n1", force=True))["state"] == "deleted"
            assert hub.registry.get("n1") is None and "n1" not in hub.core.nodes
            assert len(hub.receiver.keyring) == 0
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)

    asyncio.run(main())
    make_hub.close(hub)
    hub = make_hub()  # forgotten in the journal too
    assert "n1" not in hub.core.nodes and hub.registry.get("n1") is None


# -- hub key rotation: the files -----------------------------------------------------------------------------------

def test_a_key_rotation_is_announced_first_and_switches_only_after_the_overlap(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    data.mkdir(mode=0o700)
    keys = HubKeys.open(data, NOW)
    old = keys.public_key
    assert keys.state(True, "v").next_key is None and not keys.refresh()
    rotation = start_key_rotation(data, parse_duration("2s"), NOW)
    assert mode(data / "hub.key.next") == 0o600 and mode(data / "key-rotation.json") == 0o600
    with pytest.raises(RotationError, match="under way"):
        start_key_rotation(data, 1, NOW)
    assert read_rotation(data) == rotation  # the refused one changed nothing
    assert keys.refresh() and keys.state(True, "v").next_key == rotation.next_key  # a running hub picks it up
    # Not announced yet: however late the hub starts, it does not switch before nodes had the whole overlap.
    late = HubKeys.open(data, NOW + 10**9)
    assert late.public_key == old and late.rotation is not None and late.rotation.switch_at is None
    keys.announced(NOW + 1000)
    keys.announced(NOW + 5000)  # the first announcement counts
    assert keys.rotation is not None and keys.rotation.switch_at == NOW + 3000
    assert not keys.due(NOW + 2999) and keys.due(NOW + 3000)
    assert HubKeys.open(data, NOW + 2999).public_key == old  # a restart keeps the plan
    keys.switch()
    assert keys.public_key == rotation.next_key and keys.state(True, "v") == HubState(True, rotation.next_key, "v")
    assert (data / "hub.key.pub").read_text().strip() == rotation.next_key.hex()
    assert not (data / "hub.key.next").exists() and not (data / "key-rotation.json").exists()
    assert mode(data / "hub.key") == 0o600
    assert HubKeys.open(data, NOW).public_key == rotation.next_key


def test_a_switch_interrupted_after_the_key_was_replaced_is_finished_at_start(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    data.mkdir(mode=0o700)
    HubKeys.open(data, NOW)
    rotation = start_key_rotation(data, 1, NOW)
    os.replace(data / "hub.key.next", data / "hub.key")  # the crash: the plan and the .pub are left behind
    keys = HubKeys.open(data, NOW)
    assert keys.public_key == rotation.next_key and keys.rotation is None
    assert (data / "hub.key.pub").read_text().strip() == rotation.next_key.hex()
    assert read_rotation(data) is None


def test_a_broken_plan_is_ignored_and_a_new_rotation_replaces_it(tmp_path: Path, caplog: Any) -> None:
    data = tmp_path / "hub"
    data.mkdir(mode=0o700)
    old = HubKeys.open(data, NOW).public_key
    start_key_rotation(data, 1, NOW)
    (data / "hub.key.next").unlink()
    with caplog.at_level(logging.ERROR):
        keys = HubKeys.open(data, NOW)
    assert keys.public_key == old and keys.rotation is None and "fleetflow hub rotate-key --data" in caplog.text
    assert start_key_rotation(data, 1, NOW).next_key != old


def test_durations() -> None:
    assert [parse_duration(v) for v in ("90", "90s", "30m", "24h", "7d", "0", "1.5h")] == \
        [90, 90, 1800, 86400, 604800, 0, 5400]
    for bad in ("", "1w", "-1s", "h"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


# -- the API token's overlap ---------------------------------------------------------------------------------------

def test_the_previous_api_token_is_accepted_until_the_overlap_ends(tmp_path: Path, caplog: Any) -> None:
    data = tmp_path / "hub"
    data.mkdir(mode=0o700)
    tokens = ApiTokens(data)
    old = tokens.current
    assert tokens.check(old, NOW) and not tokens.check("wrong", NOW) and not tokens.check("", NOW)
    previous = rotate_token(data, 60, NOW)
    new = (data / "api.token").read_text().strip()
    assert new != old and previous.token == old and previous.until == NOW + 60_000
    assert mode(data / "api.token") == 0o600 and mode(data / "api.token.previous") == 0o600
    assert tokens.check(new, NOW) and tokens.check(old, NOW + 59_999)  # the running hub re-reads the files
    assert not tokens.check(old, NOW + 60_000) and tokens.check(new, NOW + 60_000)
    rotate_token(data, 0, NOW)  # a leaked token: refused at once, and the one before it too
    newest = (data / "api.token").read_text().strip()
    assert tokens.check(newest, NOW) and not tokens.check(new, NOW) and not tokens.check(old, NOW)
    os.chmod(data / "api.token", 0o644)  # someone loosened it: the hub says so and keeps what it had
    with caplog.at_level(logging.ERROR):
        os.utime(data / "api.token", ns=(1, 1))
        assert tokens.check(newest, NOW)
    assert "accessible by other users" in caplog.text


# -- the agent's side of a hub key rotation (protocol section 7.2) ---------------------------------------------

HUB_OLD = nacl.signing.SigningKey(b"\x31" * 32)
HUB_NEW = nacl.signing.SigningKey(b"\x32" * 32)
ROGUE = nacl.signing.SigningKey(b"\x33" * 32)


def pub(signing: nacl.signing.SigningKey) -> bytes:
    return bytes(signing.verify_key)


def make_agent(data: Path, hub_key: bytes) -> Agent:
    return Agent(AgentConfig(broker="mqtt://127.0.0.1:9", fleet=FLEET, node_id="n1", data=data, hub_key=hub_key))


def close(agent: Agent) -> None:
    agent.outbox.close()
    agent.identity.close()


class Hub:
    """Hub-signed messages, one boot, as the hub's Signer makes them (it keeps boot and seq across a switch)."""

    def __init__(self) -> None:
        self.signer = Signer(HUB_OLD, FLEET, HUB_ID, boot=3)

    def state(self, next_key: bytes | None = None, signer: nacl.signing.SigningKey | None = None) -> Any:
        if signer is not None:
            self.signer.use_key(signer)
        return self.signer.seal(HubState(True, self.signer.public_key, "t", next_key), NOW)

    def command(self) -> Any:
        return self.signer.seal(Ack((1,)), NOW, dst="n1", ttl_ms=60_000)


def hub_keys(agent: Agent) -> set[bytes]:
    return {k.public_key for k in agent.receiver.keyring}


def test_an_agent_follows_a_rotation_its_hub_key_announced_and_keeps_following_after_a_restart(
        tmp_path: Path, caplog: Any) -> None:
    caplog.set_level(logging.INFO, "fleetflow.agent")
    hub = Hub()
    agent = make_agent(tmp_path, pub(HUB_OLD))
    try:
        rogue = Signer(ROGUE, FLEET, HUB_ID, boot=9).seal(HubState(True, pub(ROGUE), "x", pub(ROGUE)), NOW)
        agent._on_hub_state(rogue.topic, rogue.payload)  # announced by no key it trusts: nothing
        assert hub_keys(agent) == {pub(HUB_OLD)} and agent.rejected["unknown-key"] == 1
        announced = hub.state(next_key=pub(HUB_NEW))
        agent._on_hub_state(announced.topic, announced.payload)
        assert hub_keys(agent) == {pub(HUB_OLD), pub(HUB_NEW)} and agent.identity.hub_next_key == pub(HUB_NEW)
        assert f"announced its next key kid {kid_for(pub(HUB_NEW)).hex()}" in caplog.text
        command = hub.command()  # still the old key during the overlap
        agent.receiver.receive(command.topic, command.payload, NOW)
        switched = hub.state(signer=HUB_NEW)
        agent._on_hub_state(switched.topic, switched.payload)
        assert agent.hub_key == pub(HUB_NEW) and hub_keys(agent) == {pub(HUB_NEW)}
        assert agent.identity.hub_retired_keys == [pub(HUB_OLD)]
        command = hub.command()
        agent.receiver.receive(command.topic, command.payload, NOW)
        stale = Signer(HUB_OLD, FLEET, HUB_ID, boot=4).seal(Ack((2,)), NOW, dst="n1", ttl_ms=60_000)
        with pytest.raises(UnknownKey):  # the retired key commands nothing any more
            agent.receiver.receive(stale.topic, stale.payload, NOW)
    finally:
        close(agent)
    agent = make_agent(tmp_path, pub(HUB_OLD))  # restarted with its old configuration
    try:
        assert agent.hub_key == pub(HUB_NEW) and hub_keys(agent) == {pub(HUB_NEW)}
        assert "was rotated" in caplog.text
    finally:
        close(agent)
    other = nacl.signing.SigningKey(b"\x34" * 32)
    agent = make_agent(tmp_path, pub(other))  # an operator configured another hub: that one wins, the chain goes
    try:
        assert agent.hub_key == pub(other) and hub_keys(agent) == {pub(other)}
        assert agent.identity.hub_retired_keys == [] and agent.identity.hub_next_key is None
    finally:
        close(agent)


def test_an_agent_restarted_during_the_overlap_trusts_both_and_a_newer_announcement_replaces_the_next_key(
        tmp_path: Path) -> None:
    hub = Hub()
    agent = make_agent(tmp_path, pub(HUB_OLD))
    try:
        state = hub.state(next_key=pub(ROGUE))
        agent._on_hub_state(state.topic, state.payload)
        state = hub.state(next_key=pub(HUB_NEW))  # the current key announces another next key: only it counts
        agent._on_hub_state(state.topic, state.payload)
        assert hub_keys(agent) == {pub(HUB_OLD), pub(HUB_NEW)}
    finally:
        close(agent)
    agent = make_agent(tmp_path, pub(HUB_OLD))
    try:
        assert hub_keys(agent) == {pub(HUB_OLD), pub(HUB_NEW)}
        assert agent.identity.describe()["hub_next_key"] == pub(HUB_NEW).hex()
    finally:
        close(agent)
    agent = make_agent(tmp_path, pub(HUB_NEW))  # configured with the announced key ahead of the switch
    try:
        assert agent.hub_key == pub(HUB_NEW) and hub_keys(agent) == {pub(HUB_NEW)}
    finally:
        close(agent)


# -- the wire: next_key, and opening a hub state with a keyring --------------------------------------------------

def test_hub_state_next_key_is_optional_checked_and_named_in_errors() -> None:
    assert body_from_map("hub_state", {"online": True, "key": key(1)}) == HubState(True, key(1))
    assert body_from_map("hub_state", {"online": True, "key": key(1), "next_key": key(2)}).next_key == key(2)  # type: ignore[attr-defined]
    with pytest.raises(Malformed, match="field 'next_key': a public key has 32 bytes"):
        body_from_map("hub_state", {"online": True, "key": key(1), "next_key": b"short"})


def test_a_hub_state_opens_only_with_a_hub_key_of_the_keyring() -> None:
    hub = Signer(HUB_OLD, FLEET, HUB_ID, boot=1)
    state = hub.seal(HubState(True, pub(HUB_OLD)), NOW)
    message, signed_by = Receiver(FLEET, Keyring([(HUB_ID, pub(HUB_OLD))])).open_hub_state(state.topic, state.payload)
    assert signed_by == pub(HUB_OLD) and isinstance(message.body, HubState)
    with pytest.raises(WrongSender):  # a node's key never speaks for the hub
        Receiver(FLEET, Keyring([("n1", pub(HUB_OLD))])).open_hub_state(state.topic, state.payload)
    with pytest.raises(UnknownKey):
        Receiver(FLEET, Keyring([(HUB_ID, pub(HUB_NEW))])).open_hub_state(state.topic, state.payload)


# -- the CLI: usage errors and refusals change nothing -----------------------------------------------------------


def one_line_error(out: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert says in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_rotation_commands_refuse_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    data.mkdir(mode=0o700)
    HubKeys.open(data, NOW)
    ApiTokens(data)
    one_line_error(fleetflow("hub", "rotate-key", "--data", str(data), "--overlap", "soon"), 2, "--overlap")
    one_line_error(fleetflow("hub", "rotate-key", "--data", str(tmp_path / "nothing")), 2, "hub data directory")
    one_line_error(fleetflow("hub", "rotate-token", "--data", str(tmp_path / "nothing")), 2, "hub data directory")
    assert not (data / "hub.key.next").exists()
    done = fleetflow("hub", "rotate-key", "--data", str(data), "--overlap", "1h", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["overlap_s"] == 3600 and (data / "hub.key.next.pub").read_text().strip() == info["next_key"]
    before = (data / "key-rotation.json").read_bytes()
    one_line_error(fleetflow("hub", "rotate-key", "--data", str(data)), 1, "under way")
    assert (data / "key-rotation.json").read_bytes() == before
    shown = json.loads(fleetflow("hub", "identity", "--data", str(data), "--json").stdout)
    assert shown["next_kid"] == info["next_kid"] and shown["switch_at"] == "not announced yet"
    token = (data / "api.token").read_text()
    done = fleetflow("hub", "rotate-token", "--data", str(data), "--overlap", "30m")
    assert done.returncode == 0 and "accepted until" in done.stdout, done.stderr
    assert token.strip() not in done.stdout and (data / "api.token").read_text() != token


@pytest.mark.parametrize("args, says", [
    (["nodes", "list", "-l", "site"], "KEY=VALUE"),
    (["nodes", "accept"], "or --all"),
    (["nodes", "accept", "n1"], "or --all"),
    (["nodes", "accept", "n1", "--all"], "no ID"),
    (["nodes", "accept", "--all", "--kid", "00" * 8], "no ID"),
])
def test_node_commands_refuse_bad_usage_before_asking_the_hub(args: list[str], says: str) -> None:
    one_line_error(fleetflow(*args, "--hub", "http://127.0.0.1:1"), 2, says)
