"""The Sparkplug part of the broker's least-privilege roles (hub/broker_acl.py `SparkplugAccess`) and of `fleetflow
broker config --sparkplug`, without a broker: who may publish and read which Sparkplug topic, checked with paho's
topic matching (the broker's rule, not ours), and the hub settings written beside the ACLs naming the same ids. The
real broker's side is tests/system/test_sparkplug_acl_e2e.py."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from hub.broker_acl import BrokerLogin, FleetRoles, SparkplugAccess
from hub.broker_commands import Layout, dynsec_state, sparkplug_access, write_config
from hub.config import load_hub_settings
from hub.sparkplug.settings import DEFAULT_GROUP, DEVICE_KINDS, NODE_KINDS
from protocols import ProtocolError, check_id
from tests.cli import fleetflow

FLEET = "plant-1"
COMMANDS = ("NCMD", "DCMD")


def allowed(acls: list[dict[str, Any]], acltype: str) -> set[str]:
    return {a["topic"] for a in acls if a["acltype"] == acltype and a["allow"]}


def may_publish(acls: list[dict[str, Any]], topic: str) -> bool:
    return any(topic_matches_sub(pattern, topic) for pattern in allowed(acls, "publishClientSend"))


def test_the_hub_publishes_as_its_edge_node_and_reads_only_commands_to_it() -> None:
    roles = FleetRoles(FLEET, SparkplugAccess("plant", "hub-1"))
    hub = roles.hub_acls()
    assert allowed(hub, "publishClientSend") >= {
        "spBv1.0/plant/NBIRTH/hub-1", "spBv1.0/plant/NDATA/hub-1", "spBv1.0/plant/NDEATH/hub-1",
        "spBv1.0/plant/DBIRTH/hub-1/+", "spBv1.0/plant/DDATA/hub-1/+", "spBv1.0/plant/DDEATH/hub-1/+"}
    sparkplug_reads = {t for t in allowed(hub, "subscribePattern") if t.startswith("spBv1.0/")}
    assert sparkplug_reads == {"spBv1.0/plant/NCMD/hub-1", "spBv1.0/plant/DCMD/hub-1/+", "spBv1.0/STATE/+"}
    # Its fleetflow topics are as they were without Sparkplug.
    plain = FleetRoles(FLEET).hub_acls()
    assert [a for a in hub if not a["topic"].startswith("spBv1.0/")] == plain
    # Without a host application there is no scada login, and no role but the hub's names a Sparkplug topic.
    assert set(roles.roles()) == set(FleetRoles(FLEET).roles())


def test_only_the_host_application_may_command_and_nodes_get_nothing_of_sparkplug() -> None:
    roles = FleetRoles(FLEET, SparkplugAccess("plant", "hub-1", "scada"))
    scada = roles.roles()[roles.scada_username]
    assert roles.scada_username == f"scada@{FLEET}"
    assert allowed(scada, "publishClientSend") == {"spBv1.0/plant/NCMD/hub-1", "spBv1.0/plant/DCMD/hub-1/+",
                                                   "spBv1.0/STATE/scada"}
    assert allowed(scada, "subscribePattern") == {"spBv1.0/plant/#", "spBv1.0/STATE/scada"}
    for name, acls in roles.roles().items():
        if name not in (roles.hub_username, roles.scada_username):
            assert not [a for a in acls if "spBv1.0" in a["topic"]], name
    assert not [a for a in roles.own_acls("n1") if "spBv1.0" in a["topic"]]
    with pytest.raises(ProtocolError):  # no node can log in as the host application
        check_id(roles.scada_username, "node id")
    # The broker's initial state: the scada login with its own role, as the other fixed logins.
    state = dynsec_state(roles, [BrokerLogin(roles.scada_username, "pw")])
    assert state["clients"][0]["roles"] == [{"rolename": roles.scada_username}]
    assert roles.scada_username in {r["rolename"] for r in state["roles"]}
    with pytest.raises(ValueError, match="no host application"):
        SparkplugAccess("plant", "hub-1").host_acls()


sparkplug_ids = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="+/#"),
                        min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(group=sparkplug_ids, edge=sparkplug_ids, host=sparkplug_ids, other=sparkplug_ids, device=sparkplug_ids)
def test_who_may_publish_each_sparkplug_topic(group: str, edge: str, host: str, other: str, device: str) -> None:
    """For any ids: the hub publishes exactly its own edge node's and devices' messages, the host exactly commands to
    that edge node and its own STATE, and nobody else anything; another group or edge node is nobody's."""
    roles = FleetRoles(FLEET, SparkplugAccess(group, edge, host))
    by_role = roles.roles()
    hub, scada = by_role[roles.hub_username], by_role[roles.scada_username]
    others = [acls for name, acls in by_role.items() if name not in (roles.hub_username, roles.scada_username)]
    others.append(roles.own_acls("n1"))
    for kind in (*NODE_KINDS, *COMMANDS):
        topic = f"spBv1.0/{group}/{kind}/{edge}"
        assert may_publish(hub, topic) == (kind in NODE_KINDS), topic
        assert may_publish(scada, topic) == (kind == "NCMD"), topic  # a DCMD names a device
        if other not in (group, edge):
            assert not may_publish(hub, f"spBv1.0/{other}/{kind}/{edge}")
            assert not may_publish(scada, f"spBv1.0/{group}/{kind}/{other}")
    for kind in (*DEVICE_KINDS, *COMMANDS):
        topic = f"spBv1.0/{group}/{kind}/{edge}/{device}"
        assert may_publish(hub, topic) == (kind in DEVICE_KINDS), topic
        assert may_publish(scada, topic) == (kind == "DCMD"), topic
    assert may_publish(scada, f"spBv1.0/STATE/{host}") and not may_publish(hub, f"spBv1.0/STATE/{host}")
    if other != host:
        assert not may_publish(scada, f"spBv1.0/STATE/{other}")
    for acls in others:
        for topic in (f"spBv1.0/{group}/DCMD/{edge}/{device}", f"spBv1.0/{group}/NCMD/{edge}",
                      f"spBv1.0/{group}/NBIRTH/{edge}", f"spBv1.0/STATE/{host}"):
            assert not may_publish(acls, topic), topic
        assert not [a for a in acls if a["acltype"] == "subscribePattern" and "spBv1.0" in a["topic"]]


def write(out: Path, access: SparkplugAccess | None) -> None:
    """What `broker config` writes (its own function: run as root, the command wants an --out the mosquitto user can
    reach, which a test's temporary directory is not)."""
    plugin = out.parent / "plugin.so"  # any existing file stands for the plugin: nothing here starts a broker
    plugin.touch()
    write_config(Layout(out), FleetRoles(FLEET, access), "127.0.0.1", 8883, False, str(plugin))


def test_broker_config_writes_hub_settings_that_name_the_ids_of_its_acls(tmp_path: Path) -> None:
    group = "Plant 1 \U0001F3ED"  # any UTF-8 but + / #: a space, and a character outside the BMP
    out = tmp_path / "out"
    write(out, sparkplug_access(FLEET, True, group, "edge-7", "scada-main"))
    hub_toml = tomllib.loads((out / "hub.toml").read_text())
    # The hub started with this file runs the bridge as the ACLs expect it (the same parser as `hub run --config`).
    spark = load_hub_settings({}, out / "hub.toml", {}).sparkplug_settings()
    assert spark is not None and (spark.group, spark.node_id, spark.host) == (group, "edge-7", "scada-main")
    assert hub_toml["username"] == f"hub@{FLEET}" and not spark.commands  # commands stay an operator's choice
    state = json.loads((out / "broker" / "dynamic-security.json").read_text())
    roles = {r["rolename"]: r["acls"] for r in state["roles"]}
    assert f"spBv1.0/{group}/NBIRTH/edge-7" in allowed(roles[f"hub@{FLEET}"], "publishClientSend")
    assert f"spBv1.0/{group}/DCMD/edge-7/+" in allowed(roles[f"scada@{FLEET}"], "publishClientSend")
    scada = json.loads((out / "scada.json").read_text())
    assert stat.S_IMODE((out / "scada.json").stat().st_mode) == 0o600
    assert (scada["username"], scada["host_id"], scada["group"], scada["edge_node"], scada["broker"]) == (
        f"scada@{FLEET}", "scada-main", group, "edge-7", "mqtt://127.0.0.1:8883")  
    assert [c["username"] for c in state["clients"]] == [f"hub@{FLEET}", f"enroll@{FLEET}", f"admin@{FLEET}",
                                                        f"scada@{FLEET}"]
    assert len({c["password"] for c in state["clients"]}) == 4


def test_without_a_host_no_scada_login_and_the_hubs_defaults(tmp_path: Path) -> None:
    access = sparkplug_access(FLEET, True, None, None, None)
    assert access == SparkplugAccess(DEFAULT_GROUP, FLEET, None)  # the defaults of `hub run --sparkplug`
    write(tmp_path / "out", access)
    spark = load_hub_settings({}, tmp_path / "out" / "hub.toml", {}).sparkplug_settings()
    assert spark is not None and (spark.group, spark.node_id, spark.host) == (DEFAULT_GROUP, FLEET, None)
    assert not (tmp_path / "out" / "scada.json").exists()
    state = json.loads((tmp_path / "out" / "broker" / "dynamic-security.json").read_text())
    assert f"scada@{FLEET}" not in {c["username"] for c in state["clients"]}
    # And without --sparkplug, nothing of it at all.
    assert sparkplug_access(FLEET, False, None, None, None) is None
    write(tmp_path / "plain", None)
    assert load_hub_settings({}, tmp_path / "plain" / "hub.toml", {}).sparkplug_settings() is None
    assert "spBv1.0" not in (tmp_path / "plain" / "broker" / "dynamic-security.json").read_text()


@pytest.mark.parametrize(("flags", "says"), [
    (("--sparkplug-host", "scada"), "--sparkplug-host: needs --sparkplug"),
    (("--sparkplug-group", "plant"), "--sparkplug-group: needs --sparkplug"),
    (("--sparkplug", "--sparkplug-group", "a/b"), "--sparkplug-group: 'a/b' contains '/'"),
    (("--sparkplug", "--sparkplug-node-id", "x+"), "--sparkplug-node-id: 'x+' contains '+'"),
    (("--sparkplug", "--sparkplug-host", "#"), "--sparkplug-host: '#' contains '#'"),
])
def test_broker_config_refuses_sparkplug_flags_the_hub_would_refuse(tmp_path: Path, flags: tuple[str, ...],
                                                                    says: str) -> None:
    done = fleetflow("broker", "config", "--out", tmp_path / "out", "--fleet", FLEET, *flags)
    assert done.returncode == 2 and says in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "out").exists()
