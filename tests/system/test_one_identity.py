"""One identity, one process: a second agent or hub on a data directory is refused (and changes nothing there), a
lock left by kill -9 blocks nothing, and two devices running one identity (a copied data directory) are reported
as a conflict on the node without driving each other's boot counters up.

Real processes, Mosquitto, a real hub. Evidence of boots comes from the wire (an independent MQTT connection) and
from the agents' own identity files; the conflict from the hub's API, metrics and log, which are under test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocols import cbor, envelope
from tests.agentprocess import AgentProcess
from tests.brokers import Broker
from tests.hubprocess import HubProcess
from tests.waiting import wait
from tests.wire import Observer

FLEET = "one"
FLEETFLOW = str(Path(sys.executable).parent / "fleetflow")

pytestmark = pytest.mark.slow



def tree(directory: Path) -> dict[str, str]:
    """Every file under `directory` with its content's digest and mode: equal trees, nothing changed."""
    return {str(p.relative_to(directory)): f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_mode:o}"
            for p in sorted(directory.rglob("*")) if p.is_file()}


def fleetflow(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLEETFLOW, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def boot_of(data: Path) -> int:
    return int(json.loads((data / "identity.json").read_text())["identity"]["1"]["boot"])


@pytest.fixture
def hub(mosquitto: Broker, tmp_path: Path) -> Iterator[HubProcess]:
    with HubProcess(mosquitto, FLEET, tmp_path / "hub") as running:
        yield running


def test_a_second_agent_on_a_data_directory_is_refused_and_kill_9_blocks_nothing(hub: HubProcess,
                                                                                 tmp_path: Path) -> None:
    first = hub.agent("n1")
    hub.wait_nodes(1)
    second = fleetflow("agent", "run", "--broker", hub.broker.url, "--fleet", FLEET, "--node-id", "n1",
                       "--data", first.data, "--hub-key", hub.public_key)
    assert first.proc is not None
    # `fleetflow agent run` execs the agent process: the PID that holds the lock is the one that was started.
    assert (second.returncode, second.stdout) == (1, "")
    assert second.stderr == (f"error: data directory {first.data} (--data) is in use by another fleetflow process "
                             f"(pid {first.proc.pid}); stop it, or give each agent or hub its own --data directory\n")
    assert first.proc.poll() is None and "connected as n1" in first.log()

    first.kill()  # SIGKILL: the lock goes with the process
    again = AgentProcess(hub.broker, FLEET, "n1", first.data, hub.public_key, ("--heartbeat", "0.5")).start()
    hub.agents.append(again)
    wait(lambda: again.log().count("connected as n1") >= 2, 20, "the restarted agent to connect")
    assert again.proc is not None and again.proc.poll() is None


def test_a_refused_start_changes_nothing_in_the_data_directory(mosquitto: Broker, tmp_path: Path) -> None:
    data, agent_data = tmp_path / "hub", tmp_path / "agent"
    with HubProcess(mosquitto, FLEET, data) as hub:
        agent = hub.agent("n2")
        hub.wait_nodes(1)
        agent.signal(signal.SIGTERM)
        assert agent.proc is not None and agent.proc.wait(30) == 0
        shutil.move(agent.data, agent_data)
        key = hub.public_key
    # Stopped: both directories hold an identity. A stand-in process holds each lock, as a running one would.
    runs: list[tuple[Path, list[str | Path]]] = [
        (data, ["hub", "run", "--broker", mosquitto.url, "--fleet", FLEET, "--data", data, "--api", "127.0.0.1:0"]),
        (agent_data, ["agent", "run", "--broker", mosquitto.url, "--fleet", FLEET, "--node-id", "n2",
                      "--data", agent_data, "--hub-key", key])]
    for directory, command in runs:
        holder = subprocess.Popen([sys.executable, "-c", "import sys; from agent.runtime.startup import DataLock; "
                                   f"lock = DataLock.acquire({str(directory)!r}); print('held', flush=True); "
                                   "sys.stdin.read()"],  # held until killed: nobody writes its stdin
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  cwd=Path(__file__).resolve().parents[2])
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            before = tree(directory)
            refused = fleetflow(*command)
            assert refused.returncode == 1, refused.stderr
            assert refused.stderr.endswith(f"error: data directory {directory} (--data) is in use by another "
                                           f"fleetflow process (pid {holder.pid}); stop it, or give each agent or "
                                           f"hub its own --data directory\n")
            assert "Traceback" not in refused.stderr
            assert tree(directory) == before
        finally:
            holder.kill()
            holder.wait(10)


def test_a_second_hub_is_refused_and_a_killed_hub_restarts(hub: HubProcess) -> None:
    assert hub.proc is not None
    second = fleetflow("hub", "run", "--broker", hub.broker.url, "--fleet", FLEET, "--data", hub.data,
                       "--api", "127.0.0.1:0")
    assert second.returncode == 1
    assert second.stderr == (f"error: data directory {hub.data} (--data) is in use by another fleetflow process "
                             f"(pid {hub.proc.pid}); stop it, or give each agent or hub its own --data directory\n")
    hub.kill()
    hub.start()  # waits (bounded) for the API and the broker connection
    assert hub.get("/health")["connected"] is True


def test_two_devices_with_one_identity_are_a_conflict_and_do_not_drive_each_others_boots(
        hub: HubProcess, mosquitto: Broker, tmp_path: Path) -> None:
    observer = Observer(mosquitto, f"fleetflow/v1/{FLEET}/node/n1/+")
    first = hub.agent("n1")
    hub.wait_nodes(1)
    clone_data = tmp_path / "clone" / "data"
    # A cloned SD card: the same key, node id, boot counter and enrollment. (The lock file is copied too: a copy of
    # a file holds no lock.)
    shutil.copytree(first.data, clone_data)
    clone = AgentProcess(mosquitto, FLEET, "n1", clone_data, hub.public_key, ("--heartbeat", "0.5")).start()
    hub.agents.append(clone)
    try:
        node = hub.wait(lambda: (n := hub.get("/nodes/n1"))["conflict"] and n, 30, "the conflict on n1")
        assert "signed after boot" in node["conflict"]["reason"] or "two different births" in node["conflict"]["reason"]
        assert hub.metric("fleetflow_node_conflicts") == 1
        assert any(h["kind"] == "conflict" for h in node["history"])

        # Bounded observation: both devices keep running, each on its own boot; nothing makes them reconnect.
        boots_before = (boot_of(first.data), boot_of(clone_data))
        seen_from = len(observer.messages)

        def heartbeats_since() -> list[bytes]:
            return [payload for topic, payload in observer.messages[seen_from:] if topic.endswith("/hb")]

        # The window is counted in heartbeats on the wire (both devices send several a second), not in seconds.
        wait(lambda: len(heartbeats_since()) >= 20, 60, "20 more heartbeats from the two devices")
        boots_after = (boot_of(first.data), boot_of(clone_data))
        wire_boots = {cbor.loads(envelope.parse(payload).payload)["boot"] for payload in heartbeats_since()}
        assert boots_after == boots_before, f"identity boots moved: {boots_before} -> {boots_after}"
        assert wire_boots <= set(boots_before) and len(wire_boots) >= 1, wire_boots
        assert first.proc is not None and first.proc.poll() is None and clone.proc is not None \
            and clone.proc.poll() is None
        # One log line for the conflict, however long it goes on.
        assert hub.log().count("two devices use this identity") == 1
    finally:
        observer.close()
