"""Least privilege at the broker, end to end: Mosquitto runs what `fleetflow broker config` wrote, the hub gives each
node it accepts a login of its own (--broker-admin-file), real agents log in with theirs, and third-party
connections with each login try to publish and subscribe where that login may not.

Evidence is the wire and the broker, not the hub: subscribers whose logins may read the topics (the hub's login for
node topics, a node's login for its commands and the hub state) see nothing of what was refused, and the broker logs
each refusal (`Denied PUBLISH`, debug logging added to the generated configuration). A forged message would also be
refused by its receiver (every message is signed); these tests show the broker drops it first.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from protocols import Topic
from tests.agentprocess import AgentProcess
from tests.brokers import HOST, Broker, free_port, wait_for_port
from tests.hubprocess import HubProcess
from tests.waiting import wait

FLEET = "acl"
BIN = Path(sys.executable).parent
FORGED = b"forged"
TWO_STEPS = "name: two\nsteps:\n  - id: a\n    uses: echo\n  - id: b\n    uses: echo\n    needs: [a]\n"

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
                                reason="needs Mosquitto (tests/run.sh installs it)")


def clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("FLEETFLOW_")}, **extra}


def broker_config(out: Path, port: int, *more: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fleetflow"), "broker", "config", "--out", str(out), "--fleet", FLEET, "--port",
                           str(port), *more], capture_output=True, text=True, timeout=180, env=clean_env(), check=False)


class Login:
    """One MQTT connection with a username and password, as a third party would open it."""

    def __init__(self, port: int, username: str, password: str, ca: Path | None = None) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{username}-{os.urandom(4).hex()}")
        self.client.username_pw_set(username, password)
        if ca is not None:
            self.client.tls_set_context(ssl.create_default_context(cafile=str(ca)))
        self.messages: list[tuple[str, bytes]] = []
        self.granted: dict[int, list[int]] = {}
        self.answer: int | None = None  # the CONNACK code
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = lambda *args: self.closed.set()
        self.client.connect(HOST, port, keepalive=60)
        self.client.loop_start()
        wait(lambda: self.answer is not None or self.closed.is_set(), 15, f"the broker's answer to {username}")

    @property
    def id(self) -> str:
        return self.client._client_id.decode()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.answer = reason.value

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, properties: Any) -> None:
        self.granted[mid] = [code.value for code in codes]

    def subscribe(self, topic_filter: str) -> int:
        """The SUBACK code: the QoS granted, or 128 refused."""
        _, mid = self.client.subscribe(topic_filter, qos=1)
        assert mid is not None
        codes: list[int] = wait(lambda: self.granted.get(mid) or [], 15, f"SUBACK for {topic_filter}")
        return codes[0]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        # MQTT 3.1.1 has no refusal code: the broker acknowledges a refused QoS 1 publish and drops it.
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(15)

    def got(self, payload: bytes) -> list[str]:
        with self._lock:
            return [topic for topic, data in self.messages if data == payload]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_denied(broker: Broker, client: Login, topics: list[str]) -> None:
    """Until the broker has logged that it refused this client's publish on each topic (`log_type debug`)."""
    for topic in topics:
        wait(lambda: any(f"Denied PUBLISH from {client.id} (" in line and f", '{topic}'," in line  # noqa: B023
                         for line in broker.log().splitlines()), 15, f"the broker to refuse {topic}")


@dataclass
class Fleet:
    out: Path
    broker: Broker
    hub: HubProcess

    def login(self, name: str) -> tuple[str, str]:
        if name == "hub":
            settings = tomllib.loads((self.out / "hub.toml").read_text())
            return settings["username"], settings["password"]
        if name == "enroll":
            settings = tomllib.loads((self.out / "agent.toml").read_text())
            return settings["enroll_username"], settings["enroll_password"]
        agent = next(a for a in self.hub.agents if a.node_id == name)
        return name, (agent.data / "broker.password").read_text().strip()

    def connect(self, name: str) -> Login:
        client = Login(self.broker.port, *self.login(name))
        assert client.answer == 0, f"{name}: CONNACK {client.answer}"
        return client

    def agent(self, node_id: str) -> AgentProcess:
        # Not the hub's default agent arguments: these log in with the shared enrollment login of agent.toml.
        agent = AgentProcess(self.broker, FLEET, node_id, self.out / node_id, self.hub.public_key,
                             ("--config", str(self.out / "agent.toml"), "--heartbeat", "0.5")).start()
        self.hub.agents.append(agent)
        return agent


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A directory Mosquitto can reach: started as root, it drops to its own user, for whom pytest's are closed."""
    top = Path(tempfile.mkdtemp(prefix="fleetflow-broker-acl-"))
    os.chmod(top, 0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def configured(tmp_path: Path, reachable: Path) -> Iterator[tuple[Path, Broker]]:
    """What `broker config` wrote, and Mosquitto running it."""
    port = free_port()
    out = reachable / "cfg"
    done = broker_config(out, port)
    assert done.returncode == 0, done.stderr
    # Debug logging shows every refused publish; everything else is the generated configuration.
    broker = Broker("mosquitto", tmp_path / "broker", port=port, config=out / "broker" / "mosquitto.conf",
                    extra=("log_dest stderr", "log_type all")).start()
    try:
        yield out, broker
    finally:
        broker.stop()


@pytest.fixture
def fleet(tmp_path: Path, configured: tuple[Path, Broker]) -> Iterator[Fleet]:
    out, broker = configured
    hub = HubProcess(broker, FLEET, tmp_path / "hub" / "data", args=("--config", str(out / "hub.toml"),
                                                                      "--auto-accept"))
    try:
        hub.start()
        yield Fleet(out, broker, hub)
    finally:
        hub.stop()


def test_a_node_publishes_only_as_itself_and_only_the_hub_commands(fleet: Fleet) -> None:
    n1, n2 = fleet.agent("n1"), fleet.agent("n2")
    fleet.hub.wait_nodes(2, 30)  # auto-accepted: each asked over the enrollment login, then logged in as itself
    hub_eye = fleet.connect("hub")  # the only login that may read node topics
    for kind in ("enroll", "birth", "death", "hb", "tel", "evt"):
        assert hub_eye.subscribe(f"fleetflow/v1/{FLEET}/node/+/{kind}") == 1
    n2_eye = fleet.connect("n2")  # what node n2 reads: its commands and the hub state
    assert n2_eye.subscribe(Topic.node(FLEET, "n2", "cmd").value) == 1
    assert n2_eye.subscribe(Topic.hub_state(FLEET).value) == 1

    thief = fleet.connect("n1")  # node n1's own login, used by someone who took it off the device
    assert thief.subscribe(Topic.node(FLEET, "n1", "cmd").value) == 1  # its own commands: it would get its forgery
    forged = [Topic.node(FLEET, "n2", kind).value for kind in ("birth", "death", "hb", "tel", "evt", "enroll")]
    forged += [Topic.node(FLEET, "n2", "cmd").value, Topic.node(FLEET, "n1", "cmd").value, Topic.hub_state(FLEET).value]
    for topic in forged:
        thief.publish(topic, FORGED, retain=topic.endswith("/hub/state"))
    thief.publish(Topic.node(FLEET, "n1", "hb").value, b"own")  # allowed: published after every forgery
    wait(lambda: hub_eye.got(b"own"), 15, "n1's own heartbeat topic to reach the hub's login")
    wait_denied(fleet.broker, thief, forged)
    assert hub_eye.got(FORGED) == [] and n2_eye.got(FORGED) == [] and thief.got(FORGED) == []
    # Reading other nodes' commands, or enroll requests (they carry broker passwords), is refused too.
    assert thief.subscribe(Topic.node(FLEET, "n2", "cmd").value) == 128
    assert thief.subscribe(f"fleetflow/v1/{FLEET}/node/+/enroll") == 128
    assert thief.subscribe("#") == 128
    late = fleet.connect("n2")  # nothing forged was retained as the hub state either
    assert late.subscribe(Topic.hub_state(FLEET).value) == 1
    wait(lambda: late.messages, 15, "the retained hub state")
    assert late.got(FORGED) == []

    # The shared enrollment login: enroll requests, for any node id, and nothing else.
    device = fleet.connect("enroll")
    refused = [Topic.node(FLEET, "n1", kind).value for kind in ("birth", "hb", "evt", "cmd")] + [
        Topic.hub_state(FLEET).value]
    for topic in refused:
        device.publish(topic, FORGED)
    device.publish(Topic.node(FLEET, "newcomer", "enroll").value, b"asks")
    wait(lambda: hub_eye.got(b"asks"), 15, "an enroll request over the enrollment login to reach the hub")
    wait_denied(fleet.broker, device, refused)
    assert hub_eye.got(FORGED) == [] and n2_eye.got(FORGED) == []
    for topic_filter in (Topic.hub_state(FLEET).value, f"fleetflow/v1/{FLEET}/node/+/cmd",
                         f"fleetflow/v1/{FLEET}/node/+/enroll"):
        assert device.subscribe(topic_filter) == 128, topic_filter
    # The nodes themselves kept working throughout.
    assert fleet.hub.wait_run(fleet.hub.submit(TWO_STEPS), 30)["state"] == "succeeded"
    for client in (hub_eye, n2_eye, thief, late, device):
        client.close()
    assert n1.proc is not None and n1.proc.poll() is None and n2.proc is not None and n2.proc.poll() is None


def test_a_device_waiting_for_its_login_rides_out_a_broker_restart(tmp_path: Path,
                                                                  configured: tuple[Path, Broker]) -> None:
    """No hub yet: the broker refuses the device's own login, and it asks over the enrollment login. A broker
    restart then is an outage like any other, not a failed start; a wrong enrollment password at start is."""
    out, broker = configured
    args = ("--config", str(out / "agent.toml"))
    device = AgentProcess(broker, FLEET, "d1", tmp_path / "d1", "ab" * 32, args).start()
    try:
        wait(lambda: f"u'enroll@{FLEET}'" in broker.log(), 20, "d1 to ask over the enrollment login")
        broker.stop()
        wait(lambda: device.log().count("reconnecting in") >= 3, 30, "d1 to retry while the broker is away")
        assert device.proc is not None and device.proc.poll() is None, device.log()[-2000:]
        seen = broker.log().count(f"u'enroll@{FLEET}'")
        broker.start()
        wait(lambda: broker.log().count(f"u'enroll@{FLEET}'") > seen, 30, "d1 to ask again after the restart")
        assert device.proc.poll() is None
    finally:
        device.stop()
    wrong = AgentProcess(broker, FLEET, "d2", tmp_path / "d2", "ab" * 32, args,
                         env={"FLEETFLOW_ENROLL_PASSWORD": "not-the-enrollment-password"}).start()
    assert wrong.wait_exit(30) == 1
    assert f"and the enrollment login 'enroll@{FLEET}'" in wrong.log() and "FLEETFLOW_ENROLL_PASSWORD" in wrong.log()


def printed_commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line.startswith("   ")]


def test_the_printed_commands_run_and_a_revoked_node_is_cut_off(tmp_path: Path, reachable: Path) -> None:
    """The commands `broker config --tls` prints, run exactly as printed (the API on a free port through
    FLEETFLOW_API: tests use no fixed port): a new device waits, an operator accepts it, the hub gives it its login,
    it runs a workflow; revoked, it is disconnected and cannot log in again."""
    top = reachable
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        done = broker_config(top / "cfg", port, "--tls")
        assert done.returncode == 0, done.stderr
        mosquitto, hub_run, agent_run = printed_commands(done.stdout)
        assert Path(mosquitto[0]).name == "mosquitto" and hub_run[1:3] == ["hub", "run"], done.stdout
        assert agent_run[1:3] == ["agent", "run"], done.stdout

        def start(argv: list[str], log: str, **env: str) -> subprocess.Popen[bytes]:
            with open(tmp_path / f"{log}.log", "ab") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=clean_env(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **env))
            procs.append(proc)
            return proc

        wait_for_port(port, proc=start(mosquitto, "broker"))
        settings = tomllib.loads((top / "cfg" / "hub.toml").read_text())
        hub = HubProcess(Broker("mosquitto", tmp_path / "unused", port=port), FLEET, Path(settings["data"]))
        hub.proc = start(hub_run, "hub", FLEETFLOW_API="127.0.0.1:0")
        hub.wait(hub._api_up, 30, "the hub API")
        node = start(agent_run, "node-1")
        ca = top / "cfg" / "ca.pem"
        pending = hub.wait(lambda: next((n for n in hub.get("/nodes") if n["id"] == "node-1"
                                         and n["enrollment"] == "pending"), None), 30, "node-1's enroll request")
        kid = hub.get("/nodes/node-1")["kid"]
        assert pending and hub.post("/nodes/node-1/accept", {"kid": kid})["state"] == "accepted"
        hub.wait_nodes(1, 30)  # its login set up at the broker, it logged in as itself, enrolled and was born
        assert hub.wait_run(hub.submit(TWO_STEPS), 30)["state"] == "succeeded"

        password = (top / "cfg" / "node-1" / "broker.password").read_text().strip()
        watcher = Login(port, "node-1", password, ca)  # a second connection with the node's login
        assert watcher.answer == 0
        assert hub.post("/nodes/node-1/revoke")["state"] == "revoked"
        assert watcher.closed.wait(15), "the revoked node's connection stayed open"
        again = Login(port, "node-1", password, ca)
        assert again.answer not in (None, 0), again.answer  # not authorized
        assert node.poll() is None  # the agent keeps trying, refused, and asks over the enrollment login
        watcher.close()
        again.close()
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
