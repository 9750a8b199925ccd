"""Least privilege for Sparkplug, end to end: Mosquitto runs what `fleetflow broker config --sparkplug
--sparkplug-host scada` wrote, the hub runs with the hub.toml it wrote (--sparkplug-commands added), a real agent
joins over the enrollment login, and third-party connections use the generated logins.

The hub's login may publish its births, the scada login may command the hub's edge node (its DCMD drains a node,
audited), and a node's login or the enrollment login may not: the broker drops their DCMDs (`Denied PUBLISH` in its
debug log) and the node is not drained. Evidence is the wire (what the scada login reads), the broker's log, and the
audit log read by the real `fleetflow audit` commands from the hub's data directory.
"""

from __future__ import annotations

import json
import shutil
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hub.sparkplug import sparkplug_b_pb2 as pb
from tests.agentprocess import AgentProcess
from tests.brokers import Broker, free_port
from tests.cli import ok
from tests.hubprocess import HubProcess
# Third-party logins and the broker's refusals, as the fleetflow ACL test reads them; `reachable` is its fixture.
from tests.system.test_broker_acl_e2e import FLEET, Login, broker_config, reachable, wait_denied  # noqa: F401
from tests.waiting import wait

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
                                 reason="needs Mosquitto (tests/run.sh installs it)")]

GROUP, HOST = "Plant 1", "scada"  # a space is a valid Sparkplug id character
EDGE = FLEET  # the edge node id defaults to the fleet id, in `broker config` as in `hub run`
DRAIN = "Device Control/Drain"
WAIT_S = 60.0
FORGED = b"forged"


def topic(kind: str, device: str | None = None) -> str:
    return f"spBv1.0/{GROUP}/{kind}/{EDGE}" + (f"/{device}" if device else "")


def drain_command(alias: int, on: bool) -> bytes:
    payload = pb.Payload(timestamp=int(time.time() * 1000))
    payload.metrics.append(pb.Payload.Metric(alias=alias, boolean_value=on))
    return payload.SerializeToString()


def rebirth_request() -> bytes:
    payload = pb.Payload(timestamp=int(time.time() * 1000))
    payload.metrics.append(pb.Payload.Metric(name="Node Control/Rebirth", boolean_value=True))
    return payload.SerializeToString()


@dataclass
class Setup:
    out: Path
    broker: Broker
    hub: HubProcess
    scada: Login  # the host application, subscribed to the group

    def of(self, kind: str) -> list[pb.Payload]:
        with self.scada._lock:
            return [pb.Payload.FromString(p) for t, p in self.scada.messages if t.split("/")[2] == kind]


@pytest.fixture
def setup(tmp_path: Path, reachable: Path) -> Iterator[Setup]:  # noqa: F811  (the imported fixture)
    port, out = free_port(), reachable / "cfg"
    done = broker_config(out, port, "--sparkplug", "--sparkplug-group", GROUP, "--sparkplug-host", HOST)
    assert done.returncode == 0, done.stderr
    broker = Broker("mosquitto", tmp_path / "broker", port=port, config=out / "broker" / "mosquitto.conf",
                    extra=("log_dest stderr", "log_type all")).start()
    hub = HubProcess(broker, FLEET, tmp_path / "hub" / "data", args=("--config", str(out / "hub.toml"),
                                                                      "--auto-accept", "--sparkplug-commands"))
    scada: Login | None = None
    try:
        login = json.loads((out / "scada.json").read_text())
        scada = Login(port, login["username"], login["password"])
        assert scada.answer == 0, f"scada login: CONNACK {scada.answer}"
        assert scada.subscribe(f"spBv1.0/{GROUP}/#") == 1
        # The primary host is online (retained, on its own STATE topic): the hub's births need not wait.
        scada.publish(f"spBv1.0/STATE/{HOST}", json.dumps({"online": True, "timestamp": int(time.time() * 1000)})
                      .encode(), retain=True)
        hub.start()
        yield Setup(out, broker, hub, scada)
    finally:
        if scada is not None:
            scada.close()
        hub.stop()
        broker.stop()


def test_only_the_scada_login_drains_a_node_over_dcmd_and_the_drain_is_audited(setup: Setup) -> None:
    hub, scada = setup.hub, setup.scada
    # The hub's login publishes its NBIRTH (the broker would drop it otherwise, and the host would see nothing).
    wait(lambda: setup.of("NBIRTH"), WAIT_S, "the hub's NBIRTH, read by the scada login")
    agent = AgentProcess(setup.broker, FLEET, "n1", setup.out / "n1", hub.public_key,
                         ("--config", str(setup.out / "agent.toml"), "--heartbeat", "0.5")).start()
    hub.agents.append(agent)
    hub.wait_nodes(1, WAIT_S)
    dbirth = wait(lambda: setup.of("DBIRTH"), WAIT_S, "n1's DBIRTH")[0]
    alias = next(m.alias for m in dbirth.metrics if m.name == DRAIN)

    # A node's own login (taken off the device) and the shared enrollment login try to drain n1, ask for a rebirth
    # and publish as the edge node; the broker drops every one of them.
    thief = Login(setup.broker.port, "n1", (setup.out / "n1" / "broker.password").read_text().strip())
    shared = tomllib.loads((setup.out / "agent.toml").read_text())
    device = Login(setup.broker.port, shared["enroll_username"], shared["enroll_password"])
    assert thief.answer == 0 and device.answer == 0
    forged = [topic("DCMD", "n1"), topic("NCMD"), topic("NBIRTH"), topic("DDATA", "n1"), f"spBv1.0/STATE/{HOST}"]
    for client in (thief, device):
        for where in forged:
            client.publish(where, drain_command(alias, True) if "DCMD" in where else FORGED)
        wait_denied(setup.broker, client, forged)
        assert client.subscribe(f"spBv1.0/{GROUP}/#") == 128 and client.subscribe("spBv1.0/STATE/+") == 128
    # The scada login is confined too: it commands the edge node, and cannot speak as it or as a node.
    scada_forged = [topic("NBIRTH"), topic("DDATA", "n1"), f"fleetflow/v1/{FLEET}/node/n1/cmd"]
    for where in scada_forged:
        scada.publish(where, FORGED)
    wait_denied(setup.broker, scada, scada_forged)
    assert scada.subscribe(f"fleetflow/v1/{FLEET}/#") == 128

    # A rebirth request from the scada login, sent after the broker refused every forgery: once its NBIRTH is out,
    # the hub has read everything delivered before it, and n1 was not drained.
    births = len(setup.of("NBIRTH"))
    scada.publish(topic("NCMD"), rebirth_request())
    wait(lambda: len(setup.of("NBIRTH")) > births, WAIT_S, "the NBIRTH answering the scada login's rebirth request")
    assert hub.get("/nodes/n1")["draining"] is False
    assert scada.got(FORGED) == [] and len(setup.of("NBIRTH")) == births + 1

    # The scada login's DCMD drains n1; the DDATA reporting it follows.
    scada.publish(topic("DCMD", "n1"), drain_command(alias, True))
    hub.wait(lambda: hub.get("/nodes/n1")["draining"], WAIT_S, "n1 drained by the scada login's DCMD")
    wait(lambda: any(m.alias == alias and m.boolean_value for p in setup.of("DDATA") for m in p.metrics), WAIT_S,
         "the DDATA reporting the drain")

    # On record, verifiably: the rebirth and the drain, by the Sparkplug host, from their topics.
    verdict = ok("audit", "verify", "--data", str(hub.data))
    assert verdict.startswith("audit log ok: 2 entries"), verdict
    entries = json.loads(ok("audit", "show", "--data", str(hub.data), "--json"))
    assert [(e["action"], e["target"], e["who"], e["role"], e["from"], e["status"], e["params"]) for e in entries] == [
        ("sparkplug.rebirth", EDGE, f"sparkplug:{HOST}", "operator", f"mqtt:{topic('NCMD')}", 200, {}),
        ("node.drain", "n1", f"sparkplug:{HOST}", "operator", f"mqtt:{topic('DCMD', 'n1')}", 200, {"on": True})]
    for client in (thief, device):
        client.close()
