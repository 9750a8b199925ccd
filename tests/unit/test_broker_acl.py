"""Broker logins per node, without a broker: which login change the hub wants after each enrollment decision, the
password in the enroll body, the agent's settings and password file, and what `broker config` refuses. The real
broker's side is tests/system/test_broker_acl_e2e.py."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from agent.config import ConfigError, load_config
from agent.identity import Identity
from hub.broker_acl import BrokerLogin, Change, FleetRoles, failures
from hub.config import load_hub_settings
from hub.registry import fingerprint
from protocols import Enroll, ProtocolError, Signer, open_envelope
from tests.cli import fleetflow

FLEET = "plant-1"
PASSWORD = "a-node-made-password-0123456789"


def key(n: int) -> bytes:
    return bytes(nacl.signing.SigningKey(bytes([n]) * 32).verify_key)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Any]:
    from hub.service import Hub, HubConfig

    made = Hub(HubConfig(broker="mqtt://127.0.0.1:1", fleet=FLEET, data=tmp_path / "hub",
                         broker_admin=BrokerLogin(f"admin@{FLEET}", "admin-password")))
    yield made
    made.journal.close()
    made.registry.close()
    made.meta.close()


def ask(hub: Any, node: str, n: int, password: str | None = PASSWORD) -> None:
    hub.admin.enroll(node, Enroll(key(n), "rpi4", {}, None, password), 1_000, [])


def test_a_pending_password_becomes_the_login_only_for_the_kid_the_operator_accepts(hub: Any) -> None:
    ask(hub, "n1", 1)
    assert hub.broker_clients.wanted == {}  # pending: nothing at the broker yet
    asyncio.run(hub.node_action("n1", "accept", kid=fingerprint(key(1))))
    assert hub.broker_clients.wanted == {"n1": Change("grant", PASSWORD)}
    # Someone asks for id n2 with their key and password; the operator adds the real device's key instead: that
    # password is not the login's (the device sends its own over the enrollment login when the broker refuses it).
    ask(hub, "n2", 2, "an-attackers-password-0123456789")
    asyncio.run(hub.admin.add("n2", key(3)))
    assert hub.broker_clients.wanted["n2"].action == "grant" and hub.broker_clients.wanted["n2"].password is None
    ask(hub, "n1", 9, "an-attackers-password-0123456789")  # another key for an enrolled id: `taken`
    assert hub.broker_clients.wanted["n1"] == Change("grant", PASSWORD)


def test_a_revoked_or_deleted_node_loses_its_login_and_the_latest_change_wins(hub: Any) -> None:
    hub.config.auto_accept = True
    hub.protocol.enrollment = type(hub.protocol.enrollment)(True, None, 1, 10)
    ask(hub, "n1", 1)
    assert hub.broker_clients.wanted == {"n1": Change("grant", PASSWORD)}  # admitted at once
    asyncio.run(hub.node_action("n1", "revoke"))
    assert hub.broker_clients.wanted == {"n1": Change("disable")}
    ask(hub, "n1", 1)  # a revoked node asking again gets no login
    assert hub.broker_clients.wanted == {"n1": Change("disable")}
    asyncio.run(hub.admin.delete("n1", force=True))
    assert hub.broker_clients.wanted == {"n1": Change("delete")}
    assert PASSWORD not in repr(Change("grant", PASSWORD))


def test_without_an_admin_login_the_hub_wants_no_change_and_says_why(tmp_path: Path, caplog: Any) -> None:
    from hub.service import Hub, HubConfig

    hub = Hub(HubConfig(broker="mqtt://127.0.0.1:1", fleet=FLEET, data=tmp_path / "hub", auto_accept=True))
    try:
        ask(hub, "n1", 1)
        asyncio.run(hub.node_action("n1", "revoke"))
        assert hub.broker_clients.wanted == {}
        assert "manages no broker logins: give it --broker-admin-file" in caplog.text
    finally:
        hub.journal.close()
        hub.registry.close()
        hub.meta.close()


def test_a_nodes_role_names_only_its_own_topics() -> None:
    roles = FleetRoles(FLEET)
    own = roles.own_acls("n1")
    assert {a["topic"] for a in own if a["acltype"] == "publishClientSend"} == {
        f"fleetflow/v1/{FLEET}/node/n1/{kind}" for kind in ("enroll", "birth", "death", "hb", "tel", "evt")}
    assert [a["topic"] for a in own if a["acltype"] == "subscribePattern"] == [f"fleetflow/v1/{FLEET}/node/n1/cmd"]
    assert all("+" not in a["topic"] and "#" not in a["topic"] for a in own)
    assert roles.enroll_acls() == [{"acltype": "publishClientSend", "topic": f"fleetflow/v1/{FLEET}/node/+/enroll",
                                    "allow": True, "priority": 0}]
    with pytest.raises(ProtocolError):
        roles.own_role("n1/#")


def test_already_so_is_no_failure_but_anything_else_is() -> None:
    commands = [{"command": "createClient"}, {"command": "modifyClient"}, {"command": "disableClient"}]
    assert failures(commands, [{"command": "createClient", "error": "Client already exists"}, {}, {}]) == []
    assert failures(commands, [{}, {"error": "Role not found"}, {}]) == ["modifyClient: Role not found"]
    assert failures(commands, [{}]) != []


def test_the_broker_password_travels_signed_and_never_shows_in_a_repr() -> None:
    signer = Signer(nacl.signing.SigningKey(bytes(32)), FLEET, "n1", boot=1)
    body = Enroll(signer.public_key, "rpi4", {}, None, PASSWORD)
    sent = signer.seal(body, 1_000)
    assert open_envelope(sent.payload, sent.topic, signer.public_key).body == body
    assert PASSWORD not in repr(body)
    with pytest.raises(ProtocolError):
        signer.seal(Enroll(signer.public_key, "rpi4", {}, None, "short"), 1_001)


def test_the_agent_logs_in_as_itself_with_a_password_it_keeps(tmp_path: Path) -> None:
    required = {"broker": "mqtt://broker.invalid", "fleet": FLEET, "node_id": "n1", "data": str(tmp_path / "n1")}
    env = {"FLEETFLOW_ENROLL_PASSWORD": "shared-enrollment-password"}
    config = load_config({**required, "enroll_username": f"enroll@{FLEET}"}, None, env)
    identity = Identity.open(config.data, "n1", FLEET)
    password = identity.broker_password()
    assert identity.broker_password() == password and len(password) >= 16
    assert stat.S_IMODE((config.data / "broker.password").stat().st_mode) == 0o600
    own, shared = config.own_login_settings(password), config.enroll_login_settings()
    assert (own.username, own.password) == ("n1", password)
    assert shared is not None and (shared.username, shared.password) == (f"enroll@{FLEET}", env[
        "FLEETFLOW_ENROLL_PASSWORD"])
    identity.close()
    with pytest.raises(ConfigError, match="remove username"):
        load_config({**required, "enroll_username": "e", "username": "n1"}, None, env)
    with pytest.raises(ConfigError, match="needs enroll_password"):
        load_config({**required, "enroll_username": "e"}, None, {})
    with pytest.raises(ConfigError, match="not accepted on the command line"):
        load_config({**required, "enroll_username": "e", "enroll_password": "x"}, None, {})


def test_the_admin_login_file_must_be_private_json(tmp_path: Path) -> None:
    required = {"broker": "mqtt://broker.invalid", "fleet": FLEET, "data": str(tmp_path / "hub")}
    path = tmp_path / "admin.json"
    path.write_text(json.dumps({"username": "admin@x", "password": "pw"}))
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="broker-admin-file: .* accessible by other users"):
        load_hub_settings({**required, "broker_admin_file": str(path)}, None, {})
    os.chmod(path, 0o600)
    assert load_hub_settings({**required, "broker_admin_file": str(path)}, None, {}).broker_admin_file == \
        BrokerLogin("admin@x", "pw")
    path.write_text("admin:pw")
    with pytest.raises(ConfigError, match="not JSON"):
        load_hub_settings({**required, "broker_admin_file": str(path)}, None, {})


def test_broker_config_refuses_to_overwrite_and_bad_settings(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "hub.toml").write_text("kept")
    out = fleetflow("broker", "config", "--out", str(tmp_path / "out"), "--fleet", FLEET)
    assert out.returncode == 2 and "not overwriting" in out.stderr and "hub.toml" in out.stderr, out.stderr
    assert (tmp_path / "out" / "hub.toml").read_text() == "kept" and not (tmp_path / "out" / "broker").exists()
    bad = fleetflow("broker", "config", "--out", str(tmp_path / "other"), "--fleet", "no/slashes")
    assert bad.returncode == 2 and "--fleet" in bad.stderr and "Traceback" not in bad.stderr
